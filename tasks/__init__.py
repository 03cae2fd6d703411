"""The write tasks of the contract, registered on a Celery app by ``register(app)`` (which
``worker.install`` calls). Each task builds a checked ``Write`` that ``WriteTask`` commits.

The module's ``set_option``, ``set_project_option``, ... are the task helpers
(``tasks.set_project_option.delay(42, "k", "v")``): they send through the app installed last
in this process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.local import Proxy

import store
from store.errors import NotConfigured
from store.model.scopes import (
    Scope,
    global_scope,
    group_scope,
    project_scope,
    tag_keys_scope,
    user_scope,
)
from store.model.writes import (
    Write,
    add_tag_key_write,
    many_write,
    remove_tag_key_write,
    set_write,
    unset_write,
)
from store.rollouts.start import start_rollout as _start_rollout
from tasks.base import WriteTask


def _limit() -> int:
    return store.runtime.max_value_bytes()


def _set_option(key: str, value: Any) -> Write:
    return set_write(global_scope(), key, value, max_value_bytes=_limit())


def _unset_option(key: str) -> Write:
    return unset_write(global_scope(), key)


def _set_project_option(project_id: int, key: str, value: Any) -> Write:
    return set_write(project_scope(project_id), key, value, max_value_bytes=_limit())


def _unset_project_option(project_id: int, key: str) -> Write:
    return unset_write(project_scope(project_id), key)


def _set_user_option(user_id: int, project_id: int | None, key: str, value: Any) -> Write:
    return set_write(user_scope(user_id, project_id), key, value, max_value_bytes=_limit())


def _unset_user_option(user_id: int, project_id: int | None, key: str) -> Write:
    return unset_write(user_scope(user_id, project_id), key)


def _set_group_meta(group_id: int, key: str, value: Any) -> Write:
    return set_write(group_scope(group_id), key, value, max_value_bytes=_limit())


def _unset_group_meta(group_id: int, key: str) -> Write:
    return unset_write(group_scope(group_id), key)


def _add_tag_key(project_id: int, key: str) -> Write:
    return add_tag_key_write(tag_keys_scope(project_id), key)


def _remove_tag_key(project_id: int, key: str) -> Write:
    return remove_tag_key_write(tag_keys_scope(project_id), key)


def _set_many(scope: str, values: dict[str, Any], unset: list[str]) -> Write:
    settings = store.runtime.settings()
    return many_write(
        Scope.parse(scope),
        values,
        unset,
        max_value_bytes=_limit(),
        max_write_keys=settings.max_write_keys,
        max_write_bytes=settings.max_write_bytes,
    )


# The contract's task names and what each one's run() is.
WRITE_TASKS: dict[str, Callable[..., Write]] = {
    "options.set_option": _set_option,
    "options.unset_option": _unset_option,
    "options.set_project_option": _set_project_option,
    "options.unset_project_option": _unset_project_option,
    "options.set_user_option": _set_user_option,
    "options.unset_user_option": _unset_user_option,
    "options.set_group_meta": _set_group_meta,
    "options.unset_group_meta": _unset_group_meta,
    "options.add_tag_key": _add_tag_key,
    "options.remove_tag_key": _remove_tag_key,
    "options.set_many": _set_many,
}


def register(app: Any) -> dict[str, Any]:
    """Register the write tasks on ``app``; returns them by name. Idempotent per app."""
    registered = {
        name: app.task(base=WriteTask, name=name)(run) for name, run in WRITE_TASKS.items()
    }
    # The helpers send through the app registered last (this process's state: store.runtime).
    store.runtime.task_app = app
    return registered


def _sending_app() -> Any:
    app = store.runtime.task_app
    if app is None:
        raise NotConfigured(
            "the task helpers send through an optionstore app: call worker.install(app) on "
            "yours, or import worker for the project's own"
        )
    return app


def _helper(name: str) -> Any:
    return Proxy(lambda: _sending_app().tasks[name], __doc__=f"The ``{name}`` task.")


set_option = _helper("options.set_option")
unset_option = _helper("options.unset_option")
set_project_option = _helper("options.set_project_option")
unset_project_option = _helper("options.unset_project_option")
set_user_option = _helper("options.set_user_option")
unset_user_option = _helper("options.unset_user_option")
set_group_meta = _helper("options.set_group_meta")
unset_group_meta = _helper("options.unset_group_meta")
add_tag_key = _helper("options.add_tag_key")
remove_tag_key = _helper("options.remove_tag_key")
set_many = _helper("options.set_many")


def start_rollout(
    scope: str,
    key: str,
    value: Any,
    *,
    canary: str,
    watch: float | str,
    actor: str | None = None,
    reason: str | None = None,
    **thresholds: float,
) -> dict[str, Any]:
    """Start a canary rollout of ``key`` = ``value`` in ``scope``: served first to the processes
    ``canary`` selects (``queue:NAME``, ``host:GLOB``, ``percent:N``), watched for ``watch``
    (seconds, or ``"120s"``, ``"2m"``), then promoted or reverted by the leader. Thresholds by
    keyword (``failure_ratio``, ``retry_ratio``, ``p95_ratio``, ``p95_min_ms``, ``min_tasks``).

    Not a task: it records the rollout in this process's store (the same as
    ``optionstore set … --canary``). Bad input raises InvalidOption naming the field, and
    nothing is recorded. Returns the rollout as ``optionstore rollouts --json`` shows it.
    """
    store.runtime.ensure_configured()
    rollout = _start_rollout(
        store.backend,
        store.runtime.namespace,
        scope,
        key,
        value,
        canary=canary,
        watch=watch,
        thresholds=dict(thresholds),
        actor=actor,
        reason=reason,
    )
    return rollout.as_dict()


__all__ = [
    "WRITE_TASKS",
    "add_tag_key",
    "register",
    "remove_tag_key",
    "set_group_meta",
    "set_many",
    "set_option",
    "set_project_option",
    "set_user_option",
    "start_rollout",
    "unset_group_meta",
    "unset_option",
    "unset_project_option",
    "unset_user_option",
]
