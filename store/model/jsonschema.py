"""The JSON-schema subset declared options use: ``type``, ``enum``, ``minimum``, ``maximum``,
``maxLength`` and ``items``. Small enough to own; errors name the field and the rule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from store.errors import InvalidOption

KEYWORDS = ("type", "enum", "minimum", "maximum", "maxLength", "items")
TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")


_JSON_TYPES = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def json_type(value: object) -> str:
    """The JSON type name of a decoded value (``integer`` for ints, never for bools)."""
    return _JSON_TYPES.get(type(value), "object")


def _types(schema: Mapping[str, Any]) -> tuple[str, ...]:
    kind = schema.get("type")
    if kind is None:
        return ()
    return (kind,) if isinstance(kind, str) else tuple(kind)


def check_schema(schema: Mapping[str, Any], field: str) -> None:
    """Refuse a schema outside the subset, so a typo in a declaration is not silently ignored."""
    if not isinstance(schema, Mapping):
        raise InvalidOption(field, "must be a table of JSON-schema keywords")
    unknown = set(schema) - set(KEYWORDS)
    if unknown:
        raise InvalidOption(
            field,
            f"unsupported keyword(s) {', '.join(sorted(unknown))}; "
            f"supported: {', '.join(KEYWORDS)}",
        )
    kinds = schema.get("type")
    if kinds is not None:
        listed = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(listed, list) or not listed:
            raise InvalidOption(f"{field}.type", "must be a type name or a list of them")
        for kind in listed:
            if kind not in TYPES:
                raise InvalidOption(f"{field}.type", f"{kind!r} is not one of {', '.join(TYPES)}")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise InvalidOption(f"{field}.enum", "must be a non-empty list of values")
    for bound in ("minimum", "maximum"):
        if bound in schema and json_type(schema[bound]) not in ("integer", "number"):
            raise InvalidOption(f"{field}.{bound}", "must be a number")
    if "maxLength" in schema and (
        json_type(schema["maxLength"]) != "integer" or schema["maxLength"] < 0
    ):
        raise InvalidOption(f"{field}.maxLength", "must be a non-negative integer")
    if "items" in schema:
        check_schema(schema["items"], f"{field}.items")


def check_value(schema: Mapping[str, Any], value: object, field: str) -> None:
    """Refuse ``value`` (decoded JSON) unless it satisfies ``schema``."""
    kinds = _types(schema)
    actual = json_type(value)
    # JSON schema: an integer is also a number, and 2.0 counts as an integer.
    whole = isinstance(value, float) and value.is_integer()
    if kinds and not (
        actual in kinds
        or (actual == "integer" and "number" in kinds)
        or (whole and "integer" in kinds)
    ):
        raise InvalidOption(field, f"must be of type {' or '.join(kinds)}, got {actual}")
    if "enum" in schema and not any(_same(value, choice) for choice in schema["enum"]):
        choices = ", ".join(repr(choice) for choice in schema["enum"])
        raise InvalidOption(field, f"must be one of {choices}, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):  # a Python caller's might be
            raise InvalidOption(field, "must be a number, got NaN")
        if "minimum" in schema and value < schema["minimum"]:
            raise InvalidOption(field, f"must be at least {schema['minimum']}, got {value!r}")
        if "maximum" in schema and value > schema["maximum"]:
            raise InvalidOption(field, f"must be at most {schema['maximum']}, got {value!r}")
    if isinstance(value, str) and "maxLength" in schema and len(value) > schema["maxLength"]:
        raise InvalidOption(
            field, f"must be at most {schema['maxLength']} characters, got {len(value)}"
        )
    if isinstance(value, list) and "items" in schema:
        for position, item in enumerate(value):
            check_value(schema["items"], item, f"{field}[{position}]")


def _same(value: object, choice: object) -> bool:
    # JSON equality: true is not 1.
    numbers = ("integer", "number")
    if json_type(value) in numbers and json_type(choice) in numbers:
        return value == choice
    return json_type(value) == json_type(choice) and value == choice


def schema_summary(schema: Mapping[str, Any]) -> str:
    """A short reading of a schema for tables: ``integer 0..100``, ``string (max 32)``."""
    parts = [" | ".join(_types(schema)) or "any"]
    if "enum" in schema:
        parts = ["one of " + ", ".join(repr(choice) for choice in schema["enum"])]
    if "minimum" in schema or "maximum" in schema:
        parts.append(f"{schema.get('minimum', '')}..{schema.get('maximum', '')}")
    if "maxLength" in schema:
        parts.append(f"(max {schema['maxLength']})")
    if "items" in schema:
        parts.append(f"of {schema_summary(schema['items'])}")
    return " ".join(parts)
