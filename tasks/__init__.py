"""The write tasks of the contract; each builds a checked ``Write`` that ``WriteTask`` commits."""

from __future__ import annotations

from typing import Any

import store
from store.scopes import Scope, global_scope, group_scope, project_scope, tag_keys_scope, user_scope
from store.writes import (
    Write,
    add_tag_key_write,
    many_write,
    remove_tag_key_write,
    set_write,
    unset_write,
)
from tasks.base import WriteTask
from worker.app import app


def _limit() -> int:
    return store.backend.max_value_bytes


@app.task(base=WriteTask, name="options.set_option")
def set_option(key: str, value: Any) -> Write:
    return set_write(global_scope(), key, value, max_value_bytes=_limit())


@app.task(base=WriteTask, name="options.unset_option")
def unset_option(key: str) -> Write:
    return unset_write(global_scope(), key)


@app.task(base=WriteTask, name="options.set_project_option")
def set_project_option(project_id: int, key: str, value: Any) -> Write:
    return set_write(project_scope(project_id), key, value, max_value_bytes=_limit())


@app.task(base=WriteTask, name="options.unset_project_option")
def unset_project_option(project_id: int, key: str) -> Write:
    return unset_write(project_scope(project_id), key)


@app.task(base=WriteTask, name="options.set_user_option")
def set_user_option(user_id: int, project_id: int | None, key: str, value: Any) -> Write:
    return set_write(user_scope(user_id, project_id), key, value, max_value_bytes=_limit())


@app.task(base=WriteTask, name="options.unset_user_option")
def unset_user_option(user_id: int, project_id: int | None, key: str) -> Write:
    return unset_write(user_scope(user_id, project_id), key)


@app.task(base=WriteTask, name="options.set_group_meta")
def set_group_meta(group_id: int, key: str, value: Any) -> Write:
    return set_write(group_scope(group_id), key, value, max_value_bytes=_limit())


@app.task(base=WriteTask, name="options.unset_group_meta")
def unset_group_meta(group_id: int, key: str) -> Write:
    return unset_write(group_scope(group_id), key)


@app.task(base=WriteTask, name="options.add_tag_key")
def add_tag_key(project_id: int, key: str) -> Write:
    return add_tag_key_write(tag_keys_scope(project_id), key)


@app.task(base=WriteTask, name="options.remove_tag_key")
def remove_tag_key(project_id: int, key: str) -> Write:
    return remove_tag_key_write(tag_keys_scope(project_id), key)


@app.task(base=WriteTask, name="options.set_many")
def set_many(scope: str, values: dict[str, Any], unset: list[str]) -> Write:
    return many_write(Scope.parse(scope), values, unset, max_value_bytes=_limit())


__all__ = [
    "add_tag_key",
    "remove_tag_key",
    "set_group_meta",
    "set_many",
    "set_option",
    "set_project_option",
    "set_user_option",
    "unset_group_meta",
    "unset_option",
    "unset_project_option",
    "unset_user_option",
]
