"""Input rules shared by the Python helpers, the tasks and the CLI; each error names its field."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from store.errors import InvalidOption

MAX_KEY_LENGTH = 64  # the seed's CharField(max_length=64)
MAX_TAG_KEY_LENGTH = 32  # Sentry's MAX_TAG_KEY_LENGTH
MAX_ID = 2**63 - 1  # PostgreSQL bigint
MAX_DEPTH = 32
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
# One write (a set_many) is one transaction, one history row per key and one broadcast: bounded
# so that a single task cannot hold a worker child or a scope's row lock for long.
DEFAULT_MAX_WRITE_KEYS = 10_000
DEFAULT_MAX_WRITE_BYTES = 16 * 1024 * 1024
# What one scope may hold, so that a read (which loads its whole scope) stays bounded: refused by
# the database, under the scope's lock, for a write that would grow a scope past either.
DEFAULT_MAX_SCOPE_KEYS = 10_000
DEFAULT_MAX_SCOPE_BYTES = 16 * 1024 * 1024


def validate_id(value: object, field: str) -> int:
    # bool is an int subclass; True must not quietly become project 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption(field, f"must be an integer, not {type(value).__name__}")
    if not 1 <= value <= MAX_ID:
        raise InvalidOption(field, f"must be between 1 and {MAX_ID}, got {value}")
    return value


def validate_key(value: object, field: str = "key", *, max_length: int = MAX_KEY_LENGTH) -> str:
    """A key: 1 to ``max_length`` characters on one line, without control characters."""
    return _one_line(value, field, min_length=1, max_length=max_length)


def validate_text(value: object, field: str, *, max_length: int) -> str:
    """A short free text (an actor, a reason): one line, without control characters."""
    return _one_line(value, field, min_length=0, max_length=max_length)


def _one_line(value: object, field: str, *, min_length: int, max_length: int) -> str:
    if not isinstance(value, str):
        raise InvalidOption(field, f"must be a string, not {type(value).__name__}")
    if not min_length <= len(value) <= max_length:
        bounds = f"{min_length} to {max_length}" if min_length else f"at most {max_length}"
        raise InvalidOption(field, f"must be {bounds} characters, got {len(value)}")
    for char in value:
        if _is_control(char):
            raise InvalidOption(field, f"must not contain control characters, found {char!r}")
    _check_utf8(value, field)
    return value


def _check_utf8(text: str, field: str) -> bytes:
    # JSON can carry a lone surrogate ("\ud800"); UTF-8, PostgreSQL and Redis cannot.
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidOption(
            field, f"contains a lone surrogate {text[exc.start]!r}, which is not valid Unicode"
        ) from None


def validate_tag_key(value: object, field: str = "key") -> str:
    return validate_key(value, field, max_length=MAX_TAG_KEY_LENGTH)


def _is_control(char: str) -> bool:
    # Unicode category Cc: C0, DEL and C1.
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


def encode_value(
    value: object, field: str = "value", *, max_bytes: int = DEFAULT_MAX_VALUE_BYTES
) -> str:
    """Check ``value`` is plain JSON and return its canonical encoding (sorted keys, compact)."""
    _check_json(value, field, 0)
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except ValueError as exc:  # an int past Python's int-to-str digit limit
        raise InvalidOption(field, f"cannot be encoded as JSON: {exc}") from None
    size = len(_check_utf8(text, field))
    if size > max_bytes:
        raise InvalidOption(field, f"encodes to {size} bytes, more than the limit of {max_bytes}")
    return text


# Nineteen digits in a row: perhaps an integer past 64 bits, which orjson would read as a float.
# Found by mapping every byte to "0" (a digit) or " " and searching for the run: C all the way,
# a tenth of a regular expression's time on a scope's text.
_DIGIT_OR_NOT = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_RUN = b"0" * 19


def decode_value(text: str | bytes) -> Any:
    """JSON text as Python: orjson's decoder (a third of the stdlib's time on a scope of small
    objects), unless the text may hold an integer past 64 bits (orjson would make it a float)
    or orjson refuses it (a lone surrogate): then the stdlib's, so that both read the same."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _LONG_RUN not in raw.translate(_DIGIT_OR_NOT):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def _check_json(value: object, field: str, depth: int) -> None:
    # Exact type checks: a str/int/dict subclass may carry behaviour JSON cannot round-trip.
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return
    if kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise InvalidOption(field, f"must be a finite number, got {value!r}")
        return
    if kind is list or kind is dict:
        if depth >= MAX_DEPTH:
            raise InvalidOption(field, f"nests deeper than {MAX_DEPTH} levels")
        if kind is list:
            for item in value:  # type: ignore[attr-defined]
                _check_json(item, field, depth + 1)
            return
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise InvalidOption(field, f"object keys must be strings, found {key!r}")
            _check_json(item, field, depth + 1)
        return
    raise InvalidOption(
        field, f"must be JSON (null, bool, number, string, list, object), got {kind.__name__}"
    )
