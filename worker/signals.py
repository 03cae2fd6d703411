"""Celery signal handlers: per-task log context and the end-of-task local cache clear."""

from __future__ import annotations

from typing import Any

import structlog
from celery.signals import task_postrun, task_prerun

import store


@task_prerun.connect
def _bind_task_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.bind_contextvars(task_id=task_id, task_name=getattr(task, "name", None))


@task_postrun.connect
def _end_task(**_: Any) -> None:
    # Sent from a finally in Celery's tracer: after success, failure, retry and in eager mode.
    store.backend.local.end_task()
    structlog.contextvars.unbind_contextvars("task_id", "task_name")
