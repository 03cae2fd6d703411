"""The registry and its JSON-schema subset, in process: declarations, file errors, defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from store.errors import InvalidOption
from store.model.registry import Registry, load_registry_file
from store.model.scopes import Scope
from store.model.writes import many_write, set_write, unset_write
from tests.conftest import fresh_id


def test_an_empty_registry_refuses_nothing() -> None:
    """With no declarations and no strict mode, every write passes, as without a registry."""
    registry = Registry()
    registry.check_write(set_write(Scope.parse("global"), "anything", {"x": [1]}))
    assert not registry.active


def test_schema_subset_errors_name_the_field() -> None:
    """type, enum, minimum/maximum, maxLength and items are checked, each error naming its field."""
    registry = Registry()
    registry.declare("tags", schema={"type": "array", "items": {"type": "string", "maxLength": 3}})
    registry.declare("ratio", schema={"type": "number", "minimum": 0, "maximum": 1})
    scope = Scope.parse("project:1")
    with pytest.raises(InvalidOption) as raised:
        registry.check_write(many_write(scope, {"tags": ["ab", "abcd"]}, []), many=True)
    assert str(raised.value) == "values['tags'][1]: must be at most 3 characters, got 4"
    with pytest.raises(InvalidOption, match="value: must be at least 0"):
        registry.check_write(set_write(scope, "ratio", -0.5))
    registry.check_write(set_write(scope, "ratio", 1))  # an integer is a number


def test_bad_declarations_are_refused(tmp_path: Path) -> None:
    """A registry file with an unknown keyword, a default outside its schema or an unknown scope
    kind is refused when loaded, naming the option."""
    for body, message in (
        ('[options.a]\ntype = "string"\npattern = "x"\n', "unknown field(s): pattern"),
        ('[options.a]\ntype = "integer"\ndefault = "x"\n', "default: must be of type integer"),
        ('[options.a]\nscopes = ["tagkeys"]\n', "'tagkeys' is not one of"),
    ):
        path = tmp_path / "r.toml"
        path.write_text(body)
        with pytest.raises(InvalidOption, match=re.escape(message)):
            load_registry_file(path)


def test_strict_refuses_undeclared_keys_and_the_scope_kind_is_checked() -> None:
    """Strict mode refuses undeclared keys (sets and unsets); a key used outside its declared
    scope kinds is refused naming the scope."""
    registry = Registry()
    registry.declare("mail:prefix", scopes=["project"], schema={"type": "string"})
    registry.strict_override = True
    with pytest.raises(InvalidOption, match="key: 'typo' is not a declared option"):
        registry.check_write(unset_write(Scope.parse("project:1"), "typo"))
    with pytest.raises(InvalidOption, match="scope: 'mail:prefix' is declared for project"):
        registry.check_write(set_write(Scope.parse("group:1"), "mail:prefix", "x"))


def test_declared_default_and_undeclared_read_in_process(backend: Any) -> None:
    """An unset declared key reads as its default, a caller's default wins (even None), and the
    first read of an undeclared key logs one event."""
    import store

    project = fresh_id()
    store.registry.declare("mail:prefix", scopes=["project"], default="[Sentry]")
    try:
        assert store.project_options.get_value(project, "mail:prefix") == "[Sentry]"
        assert store.project_options.get_value(project, "mail:prefix", None) is None
        assert store.project_options.get_value(project, "mail:prefix", "[x]") == "[x]"
        with capture_logs() as logs:
            for _ in range(3):
                assert store.project_options.get_value(project, "mail:prefx") is None
        assert [e["event"] for e in logs] == ["option.undeclared_read"]
    finally:
        store.registry.reset()
