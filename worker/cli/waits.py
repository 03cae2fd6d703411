"""Waiting for enqueued writes (``set --wait``, ``apply``, ``revert``): until each committed, then
until every live worker process applied the ones that changed something."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

from store.errors import InvalidOption, OptionsError
from store.model.writes import WriteResult
from store.redis.presence import Presence, lagging
from worker.cli.console import Progress, settings

T = TypeVar("T")

# How often a wait asks the result backend whether a write not committed yet failed instead.
FAILED_CHECK_INTERVAL = 0.2


def poll(probe: Callable[[], T | None], deadline: float, interval: float = 0.02) -> T | None:
    while True:
        found = probe()
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(interval)


def presence(backend: Any, namespace: str) -> Presence:
    """The process reports of ``namespace`` (the settings' ``namespace`` of whoever asks: the
    command line's environment, a console's own settings)."""
    if backend.redis is None:
        raise OptionsError("process reports live in Redis, and no Redis is configured")
    return Presence(backend.redis.client, namespace=namespace)


def wait_for_writes(
    backend: Any,
    task_ids: list[str],
    *,
    timeout: float,
    progress: Progress | None = None,
    on_commit: Callable[[WriteResult], None] | None = None,
    out: TextIO | None = None,
) -> int:
    """Wait for ``task_ids`` to commit and be applied everywhere; 0 when they were, else 1 (and
    what is missing on stderr), or 2 if the worker refused a write as invalid (a scope limit,
    say: the error on stderr)."""
    deadline = time.monotonic() + timeout
    committed: dict[str, tuple[WriteResult, bool]] = {}
    failed: dict[str, BaseException] = {}
    failures = _task_failures()
    checked_at = time.monotonic()

    def all_committed() -> bool | None:
        nonlocal checked_at
        pending = [t for t in task_ids if t not in committed and t not in failed]
        found = backend.db.write_records(pending)
        for task_id in task_ids:  # in enqueue order, for the messages
            if task_id in found:
                committed[task_id] = found[task_id]
                if progress is not None:
                    progress.advance()
                if on_commit is not None:
                    on_commit(found[task_id][0])
        if failures is not None and time.monotonic() - checked_at >= FAILED_CHECK_INTERVAL:
            checked_at = time.monotonic()
            failed.update(failures([t for t in pending if t not in found]))
        return True if len(committed) + len(failed) == len(task_ids) else None

    done = poll(all_committed, deadline)
    if progress is not None:
        progress.close()
    for task_id, error in failed.items():
        print(f"optionstore: task {task_id} failed: {error}", file=sys.stderr)
    invalid = any(isinstance(error, InvalidOption) for error in failed.values())
    status = 0 if not failed else 2 if invalid else 1
    if done is None:
        missing = len(task_ids) - len(committed) - len(failed)
        hint = (
            ""
            if failures is not None
            else " (without CELERY_RESULT_BACKEND, a write it refused shows only in its log)"
        )
        print(
            f"not committed after {timeout:.0f}s"
            + (f" ({missing} of {len(task_ids)} writes)" if len(task_ids) > 1 else "")
            + f": is a worker running?{hint}",
            file=sys.stderr,
        )
        return 1
    changed = [t for t in task_ids if t in committed and committed[t][0].changed]
    if not changed:
        return status
    reports = presence(backend, settings().namespace)

    def behind() -> dict[str, list[str]]:
        current = backend.db.write_records(changed)
        return lagging(reports.processes(), current.values())

    def all_applied() -> dict[str, list[str]] | None:
        found = behind()
        return None if any(found.values()) else found

    converged = poll(all_applied, deadline)
    if converged is not None:
        print(f"applied by {len(converged)} live worker processes", file=out or sys.stdout)
        return status
    late = sorted(name for name, missing in behind().items() if missing)
    print(f"not applied after {timeout:.0f}s by: {', '.join(late)}", file=sys.stderr)
    return 1


def _task_failures() -> Callable[[list[str]], dict[str, BaseException]] | None:
    """What asks the result backend which of some writes failed (a refusal is never committed,
    so waiting for its commit would only time out); None without a result backend."""
    from celery.backends.base import DisabledBackend

    from worker import app

    if isinstance(app.backend, DisabledBackend):
        return None

    def failures(task_ids: list[str]) -> dict[str, BaseException]:
        found = {}
        for task_id in task_ids:
            result = app.AsyncResult(task_id)
            if result.state == "FAILURE":
                error = result.result
                found[task_id] = error if isinstance(error, BaseException) else OptionsError(error)
        return found

    return failures
