"""The input rules of SPEC, each at its limit and one past it; every error names its field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from store.errors import InvalidOption, OptionsError
from store.model.scopes import global_scope, project_scope, tag_keys_scope
from store.model.validation import (
    DEFAULT_MAX_VALUE_BYTES,
    MAX_DEPTH,
    decode_value,
    encode_value,
    validate_id,
    validate_key,
    validate_tag_key,
)
from store.model.writes import add_tag_key_write, audit, many_write, set_write, unset_write
from store.settings import Settings


def rejects(call: Callable[[], object], field: str) -> InvalidOption:
    """Run ``call`` and return its InvalidOption after checking it names ``field``."""
    with pytest.raises(InvalidOption) as caught:
        call()
    error = caught.value
    assert isinstance(error, ValueError)
    assert isinstance(error, OptionsError)
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    return error


def nested_lists(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def nested_objects(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = {"k": value}
    return value


# -- keys ---------------------------------------------------------------------


def test_key_of_64_characters_is_accepted() -> None:
    """A key of exactly 64 characters (the seed's max_length) is accepted unchanged."""
    key = "k" * 64
    assert validate_key(key) == key
    assert set_write(global_scope(), key, 1).sets == {key: "1"}


def test_key_of_65_characters_is_rejected() -> None:
    """A key of 65 characters is rejected naming the key field and the limit."""
    error = rejects(lambda: validate_key("k" * 65), "key")
    assert "64" in str(error)
    rejects(lambda: set_write(global_scope(), "k" * 65, 1), "key")


def test_key_length_counts_characters_not_bytes() -> None:
    """64 three-byte characters are a 64-character key, accepted like 64 ASCII ones."""
    assert validate_key("€" * 64) == "€" * 64
    rejects(lambda: validate_key("€" * 65), "key")


def test_empty_key_is_rejected() -> None:
    """An empty key is rejected naming the key field."""
    rejects(lambda: validate_key(""), "key")
    rejects(lambda: unset_write(global_scope(), ""), "key")


@pytest.mark.parametrize("char", ["\x00", "\x1f", "\x7f", "\x85", "\x9f", "\n", "\t"])
def test_key_with_a_control_character_is_rejected(char: str) -> None:
    """C0, DEL and C1 control characters anywhere in a key are rejected naming the key field."""
    error = rejects(lambda: validate_key(f"mail{char}from"), "key")
    assert "control" in str(error)


@pytest.mark.parametrize("key", ["a b", "mail:from", "sentry\xa0x", "ключ", "🔑"])
def test_key_with_printable_characters_is_accepted(key: str) -> None:
    """Spaces, punctuation, no-break space and non-ASCII letters are not control characters."""
    assert validate_key(key) == key


@pytest.mark.parametrize("key", [1, None, b"key", ["key"]])
def test_non_string_key_is_rejected(key: object) -> None:
    """A key that is not a str (int, None, bytes, list) is rejected naming the key field."""
    rejects(lambda: validate_key(key), "key")
    rejects(lambda: set_write(global_scope(), key, 1), "key")


def test_key_error_names_the_field_it_is_checked_as() -> None:
    """validate_key reports the caller's field name, not always 'key'."""
    rejects(lambda: validate_key("", "unset[3]"), "unset[3]")


def test_tag_key_of_32_characters_is_accepted() -> None:
    """A tag key of exactly 32 characters (Sentry's MAX_TAG_KEY_LENGTH) is accepted."""
    key = "t" * 32
    assert validate_tag_key(key) == key
    assert add_tag_key_write(tag_keys_scope(1), key).sets == {key: "true"}


def test_tag_key_of_33_characters_is_rejected() -> None:
    """A tag key of 33 characters is rejected naming the key field, though it is a valid key."""
    assert validate_key("t" * 33) == "t" * 33
    error = rejects(lambda: validate_tag_key("t" * 33), "key")
    assert "32" in str(error)
    rejects(lambda: add_tag_key_write(tag_keys_scope(1), "t" * 33), "key")


def test_key_with_a_lone_surrogate_is_rejected() -> None:
    """A key holding a lone UTF-16 surrogate (JSON '\\ud800') cannot be stored and is rejected."""
    rejects(lambda: validate_key("a\ud800"), "key")
    rejects(lambda: many_write(global_scope(), {}, ["\udfff"]), "unset[0]")


# -- ids ----------------------------------------------------------------------


@pytest.mark.parametrize("ident", [1, 2**63 - 1])
def test_id_at_either_end_of_the_range_is_accepted(ident: int) -> None:
    """Ids 1 and 2**63-1 (PostgreSQL bigint's maximum) are accepted."""
    assert validate_id(ident, "project_id") == ident
    assert project_scope(ident).id == ident


@pytest.mark.parametrize("ident", [0, -1, 2**63])
def test_id_outside_the_range_is_rejected(ident: int) -> None:
    """Ids 0, -1 and 2**63 are rejected naming the id field."""
    rejects(lambda: validate_id(ident, "project_id"), "project_id")
    rejects(lambda: project_scope(ident), "project_id")


@pytest.mark.parametrize("ident", [True, False, "1", 1.0, None])
def test_id_that_is_not_an_int_is_rejected(ident: object) -> None:
    """Booleans, strings, floats and None are not ids, even when they compare equal to 1."""
    error = rejects(lambda: validate_id(ident, "group_id"), "group_id")
    assert "integer" in str(error)


# -- values -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**70),
        1.5,
        -0.0,
        "",
        "text",
        [],
        [1, "a", None],
        {},
        {"a": {"b": [1]}},
    ],
)
def test_json_value_is_accepted_and_round_trips(value: object) -> None:
    """null, bool, int, finite float, str, list and str-keyed object encode and decode unchanged."""
    text = encode_value(value)
    assert decode_value(text) == value
    assert type(decode_value(text)) is type(value)


def test_value_is_encoded_canonically() -> None:
    """Equal objects encode to the same text: sorted keys, no spaces, non-ASCII kept as is."""
    assert encode_value({"b": 1, "a": ["é", 2]}) == '{"a":["é",2],"b":1}'
    assert encode_value({"a": ["é", 2], "b": 1}) == encode_value({"b": 1, "a": ["é", 2]})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), [1, float("nan")]])
def test_non_finite_float_is_rejected(value: object) -> None:
    """NaN and infinities, also inside a list, are not JSON and are rejected naming the field."""
    rejects(lambda: encode_value(value), "value")


@pytest.mark.parametrize("value", [{1: "a"}, {None: 1}, {("a",): 1}, {"ok": {2: 1}}])
def test_object_with_a_non_string_key_is_rejected(value: object) -> None:
    """An object key that is not a str, at any depth, is rejected instead of silently coerced."""
    error = rejects(lambda: encode_value(value), "value")
    assert "keys" in str(error)


class Custom:
    pass


@pytest.mark.parametrize(
    "value",
    [(1, 2), {1, 2}, frozenset(), b"bytes", bytearray(b"x"), Custom(), 1j, [object()]],
)
def test_value_that_is_not_json_is_rejected(value: object) -> None:
    """Tuples, sets, bytes, complex and custom objects (also nested) are rejected naming value."""
    rejects(lambda: encode_value(value), "value")


def test_nesting_32_deep_is_accepted() -> None:
    """32 nested containers (each list or object is one level) are accepted."""
    assert MAX_DEPTH == 32
    assert decode_value(encode_value(nested_lists(32))) == nested_lists(32)
    assert decode_value(encode_value(nested_objects(32))) == nested_objects(32)
    mixed: Any = 0
    for level in range(32):
        mixed = [mixed] if level % 2 else {"k": mixed}
    assert decode_value(encode_value(mixed)) == mixed


def test_nesting_33_deep_is_rejected() -> None:
    """33 nested containers are rejected naming the field and the limit."""
    error = rejects(lambda: encode_value(nested_lists(33)), "value")
    assert "32" in str(error)
    rejects(lambda: encode_value(nested_objects(33)), "value")


def test_self_referencing_value_is_rejected() -> None:
    """A list containing itself hits the depth rule instead of recursing forever."""
    loop: list[Any] = []
    loop.append(loop)
    rejects(lambda: encode_value(loop), "value")


def test_value_at_the_byte_limit_is_accepted_and_one_byte_over_is_rejected() -> None:
    """A value whose encoding is exactly max_bytes is accepted; one more byte is rejected."""
    limit = 100
    at_limit = "x" * (limit - 2)  # two bytes of quotes
    assert len(encode_value(at_limit, max_bytes=limit).encode()) == limit
    error = rejects(lambda: encode_value("x" * (limit - 1), max_bytes=limit), "value")
    assert "101" in str(error)
    assert "100" in str(error)


def test_value_size_is_counted_in_utf8_bytes() -> None:
    """Three euro signs encode to 11 UTF-8 bytes (5 characters): over a 10-byte limit."""
    value = "€€€"
    assert len(encode_value(value, max_bytes=11)) == 5
    rejects(lambda: encode_value(value, max_bytes=10), "value")


def test_default_limit_is_one_mebibyte() -> None:
    """Without max_bytes the limit is OPTIONS_MAX_VALUE_BYTES' default, 1 MiB, to the byte."""
    assert DEFAULT_MAX_VALUE_BYTES == 1024 * 1024
    encode_value("x" * (DEFAULT_MAX_VALUE_BYTES - 2))
    rejects(lambda: encode_value("x" * (DEFAULT_MAX_VALUE_BYTES - 1)), "value")


def test_write_helpers_pass_the_limit_through() -> None:
    """set_write and many_write apply their max_value_bytes keyword to every value."""
    scope = project_scope(1)
    assert set_write(scope, "k", "x" * 8, max_value_bytes=10).sets == {"k": '"xxxxxxxx"'}
    rejects(lambda: set_write(scope, "k", "x" * 9, max_value_bytes=10), "value")
    rejects(lambda: many_write(scope, {"k": "x" * 9}, [], max_value_bytes=10), "values['k']")


def _services_environ(**extra: str) -> dict[str, str]:
    # Both URLs set: Settings does not start the embedded servers.
    return {
        "OPTIONS_DATABASE_URL": "postgresql://u@db.invalid/x",
        "OPTIONS_REDIS_URL": "redis://cache.invalid/0",
        **extra,
    }


def test_max_value_bytes_is_read_from_the_environment() -> None:
    """OPTIONS_MAX_VALUE_BYTES sets the limit; unset, it is 1 MiB."""
    assert Settings.from_environ(_services_environ()).max_value_bytes == DEFAULT_MAX_VALUE_BYTES
    configured = Settings.from_environ(_services_environ(OPTIONS_MAX_VALUE_BYTES="4096"))
    assert configured.max_value_bytes == 4096


@pytest.mark.parametrize("raw", ["lots", "0", "-5"])
def test_bad_max_value_bytes_is_rejected_naming_the_variable(raw: str) -> None:
    """A limit that is not a positive integer is rejected naming OPTIONS_MAX_VALUE_BYTES."""
    environ = _services_environ(OPTIONS_MAX_VALUE_BYTES=raw)
    rejects(lambda: Settings.from_environ(environ), "OPTIONS_MAX_VALUE_BYTES")


@pytest.mark.parametrize("value", ["\ud800", ["ok", "a\udfffb"], {"\ud800": 1}])
def test_lone_surrogate_in_a_value_is_rejected_naming_the_field(value: object) -> None:
    """A lone surrogate (json.loads makes one of '\\ud800') in a string or a key is rejected."""
    rejects(lambda: encode_value(value), "value")
    rejects(lambda: many_write(global_scope(), {"k": value}, []), "values['k']")


def test_int_too_long_to_encode_is_rejected_naming_the_field() -> None:
    """An int Python refuses to turn into text (10**5000) is rejected as value, not crashed on."""
    rejects(lambda: encode_value(10**5000), "value")


def test_invalid_option_rebuilt_from_its_args_keeps_field_and_message() -> None:
    """InvalidOption rebuilt from its args (as Celery does from JSON) or copied is unchanged."""
    error = InvalidOption("project_id", "must be between 1 and 9")
    for clone in (InvalidOption(*error.args), copy.deepcopy(error)):
        assert type(clone) is InvalidOption
        assert clone.field == "project_id"
        assert str(clone) == str(error) == "project_id: must be between 1 and 9"


# -- set_many -----------------------------------------------------------------


def test_set_many_builds_one_write_of_sets_and_unsets() -> None:
    """Good set_many input becomes one Write: encoded sets and deduplicated unsets."""
    write = many_write(project_scope(5), {"a": 1, "b": {"y": 2, "x": 1}}, ["c", "d", "c"])
    assert write.scope == project_scope(5)
    assert dict(write.sets) == {"a": "1", "b": '{"x":1,"y":2}'}
    assert write.unsets == ("c", "d")


def test_set_many_accepts_only_unsets() -> None:
    """Empty values with a non-empty unset list is a valid set_many."""
    assert many_write(global_scope(), {}, ["a"]).unsets == ("a",)


@pytest.mark.parametrize("values", [[["a", 1]], "a=1", None, 1])
def test_set_many_values_must_be_an_object(values: object) -> None:
    """values that is not a JSON object is rejected naming values."""
    rejects(lambda: many_write(global_scope(), values, []), "values")


@pytest.mark.parametrize("unset", ["a", None, {"a": 1}, ("a",)])
def test_set_many_unset_must_be_a_list(unset: object) -> None:
    """unset that is not a JSON list is rejected naming unset."""
    rejects(lambda: many_write(global_scope(), {"a": 1}, unset), "unset")


def test_set_many_key_in_both_values_and_unset_is_rejected() -> None:
    """A key both set and unset is rejected naming its position in unset."""
    error = rejects(lambda: many_write(global_scope(), {"a": 1, "b": 2}, ["z", "b"]), "unset[1]")
    assert "'b'" in str(error)


def test_set_many_bad_key_in_unset_names_its_position() -> None:
    """An invalid key in unset is rejected naming unset[i]."""
    rejects(lambda: many_write(global_scope(), {}, ["ok", "bad\x00"]), "unset[1]")
    rejects(lambda: many_write(global_scope(), {}, ["ok", "x", 7]), "unset[2]")


def test_set_many_bad_key_in_values_names_values() -> None:
    """An invalid key in values is rejected naming values."""
    rejects(lambda: many_write(global_scope(), {"k" * 65: 1}, []), "values")


def test_set_many_on_a_tag_keys_scope_is_rejected() -> None:
    """set_many takes an option scope: a tagkeys scope is rejected naming scope."""
    rejects(lambda: many_write(tag_keys_scope(1), {"a": "true"}, []), "scope")


def test_set_many_with_nothing_to_do_is_rejected() -> None:
    """Empty values and empty unset is rejected instead of committing an empty write."""
    error = rejects(lambda: many_write(global_scope(), {}, []), "values")
    assert "unset" in str(error)


def test_set_many_bad_value_names_its_key() -> None:
    """A bad value in values is rejected naming values['k'] for its key."""
    rejects(lambda: many_write(global_scope(), {"ok": 1, "k": float("nan")}, []), "values['k']")
    rejects(lambda: many_write(global_scope(), {"k": nested_lists(33)}, []), "values['k']")


@pytest.mark.parametrize("reason", ["two\nlines", "tab\tbed", "carriage\rreturn"])
def test_a_reason_is_one_line(reason: str) -> None:
    """A reason with a newline or another control character is refused, naming the field: it
    could forge a line in history, explain or plan."""
    with pytest.raises(InvalidOption) as info:
        audit(actor="ana", reason=reason)
    assert info.value.field == "reason"


def test_a_one_line_reason_is_kept() -> None:
    """A one-line reason passes unchanged."""
    assert audit(actor="ana", reason="incident 42: roll back").reason == "incident 42: roll back"


def test_a_write_of_as_many_keys_as_allowed_is_accepted() -> None:
    """set_many takes up to max_write_keys keys, counted over values and unset together."""
    write = many_write(project_scope(1), {"a": 1, "b": 2}, ["c"], max_write_keys=3)
    assert write.keys == ["a", "b", "c"]


def test_a_write_of_too_many_keys_is_refused_naming_values() -> None:
    """One key past max_write_keys is refused before any value is encoded, naming `values`."""
    with pytest.raises(InvalidOption, match="at most 3 keys") as info:
        many_write(project_scope(1), {"a": 1, "b": 2}, ["c", "d"], max_write_keys=3)
    assert info.value.field == "values"


def test_a_write_of_too_many_bytes_is_refused_naming_values() -> None:
    """Values whose encodings add up past max_write_bytes are refused, naming `values` and the
    key that crossed the bound; each value alone is within max_value_bytes."""
    values = {"a": "x" * 40, "b": "y" * 40, "c": "z" * 40}
    assert many_write(project_scope(1), values, [], max_write_bytes=126).keys == ["a", "b", "c"]
    with pytest.raises(InvalidOption, match="'c' takes it past") as info:
        many_write(project_scope(1), values, [], max_write_bytes=125)
    assert info.value.field == "values"


@pytest.mark.parametrize("name", ["OPTIONS_MAX_WRITE_KEYS", "OPTIONS_MAX_WRITE_BYTES"])
def test_write_limits_come_from_the_environment(name: str) -> None:
    """The write limits are settings: read from the environment, a bad one refused by name."""
    settings = Settings.from_environ({name: "7"})
    assert 7 in (settings.max_write_keys, settings.max_write_bytes)
    with pytest.raises(InvalidOption) as info:
        Settings.from_environ({name: "many"})
    assert info.value.field == name
