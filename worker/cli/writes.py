"""What a write from a person (the command line, the console) turns into: the value parsed
from what was typed, and the contract's task name and arguments."""

from __future__ import annotations

import json
from typing import Any

from store.errors import InvalidOption
from store.model.scopes import GLOBAL, GROUP, PROJECT, TAGKEYS, USER, Scope


def task_call(scope: Scope, key: str, value: Any, *, unset: bool) -> tuple[str, list[Any]]:
    """The contract's task name and positional args for a write of ``key`` in ``scope``."""
    verb = "unset" if unset else "set"
    tail: list[Any] = [key] if unset else [key, value]
    if scope.kind == GLOBAL:
        return f"options.{verb}_option", tail
    if scope.kind == PROJECT:
        return f"options.{verb}_project_option", [scope.id, *tail]
    if scope.kind == USER:
        return f"options.{verb}_user_option", [scope.id, scope.project_id, *tail]
    if scope.kind == GROUP:
        return f"options.{verb}_group_meta", [scope.id, *tail]
    assert scope.kind == TAGKEYS
    if not unset and value is not True:
        raise InvalidOption("value", "a tag key is added with the value true")
    return ("options.remove_tag_key" if unset else "options.add_tag_key"), [scope.id, key]


def parse_value(text: str) -> Any:
    """A value typed by a person (``set``'s argument, the console's field): JSON, or an error
    naming ``value`` that says how to quote a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOption(
            "value", f"is not JSON ({exc.msg}); quote strings: '\"text\"'"
        ) from None
    except RecursionError:
        raise InvalidOption("value", "is nested too deeply to read") from None
