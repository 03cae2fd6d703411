"""Loaded into a test worker with ``--include``: that worker commits each write but never
announces its first run, as a worker that died between commit and announcement would. The
outbox relay must do the rest."""

from __future__ import annotations

from typing import Any

import structlog

import store
from store.model.writes import Write, WriteResult

log = structlog.get_logger("optionstore")
_backend = store.backend


def _commit_without_announcing(write: Write, *, task_id: str | None = None) -> WriteResult:
    result, first_run = _backend.db.apply(write, task_id=task_id)
    if result.changed and first_run:
        log.warning("fault.skip_announce", scope=result.scope, revision=result.revision)
    elif result.changed:
        _backend.propagate(result)
    return result


_patched: Any = _backend
_patched.commit = _commit_without_announcing
