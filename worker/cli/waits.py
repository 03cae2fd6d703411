"""Waiting for enqueued writes (``set --wait``, ``apply``, ``revert``): until each committed, then
until every live worker process applied the ones that changed something."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

from store.errors import OptionsError
from store.model.writes import WriteResult
from store.redis.presence import Presence, lagging
from worker.cli.console import Progress, settings

T = TypeVar("T")


def poll(probe: Callable[[], T | None], deadline: float, interval: float = 0.02) -> T | None:
    while True:
        found = probe()
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(interval)


def presence(backend: Any) -> Presence:
    if backend.redis is None:
        raise OptionsError("process reports live in Redis, and no Redis is configured")
    return Presence(backend.redis.client, namespace=settings().namespace)


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
    what is missing on stderr)."""
    deadline = time.monotonic() + timeout
    committed: dict[str, tuple[WriteResult, bool]] = {}

    def all_committed() -> bool | None:
        found = backend.db.write_records([t for t in task_ids if t not in committed])
        for task_id in task_ids:  # in enqueue order, for the messages
            if task_id in found:
                committed[task_id] = found[task_id]
                if progress is not None:
                    progress.advance()
                if on_commit is not None:
                    on_commit(found[task_id][0])
        return True if len(committed) == len(task_ids) else None

    done = poll(all_committed, deadline)
    if progress is not None:
        progress.close()
    if done is None:
        missing = len(task_ids) - len(committed)
        print(
            f"not committed after {timeout:.0f}s"
            + (f" ({missing} of {len(task_ids)} writes)" if len(task_ids) > 1 else "")
            + ": is a worker running?",
            file=sys.stderr,
        )
        return 1
    changed = [t for t in task_ids if committed[t][0].changed]
    if not changed:
        return 0
    reports = presence(backend)

    def behind() -> dict[str, list[str]]:
        current = backend.db.write_records(changed)
        return lagging(reports.processes(), current.values())

    def all_applied() -> dict[str, list[str]] | None:
        found = behind()
        return None if any(found.values()) else found

    converged = poll(all_applied, deadline)
    if converged is not None:
        print(f"applied by {len(converged)} live worker processes", file=out or sys.stdout)
        return 0
    late = sorted(name for name, missing in behind().items() if missing)
    print(f"not applied after {timeout:.0f}s by: {', '.join(late)}", file=sys.stderr)
    return 1
