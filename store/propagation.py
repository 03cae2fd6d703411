"""After a commit: every cache is brought forward, then the outbox row is marked announced."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from store.errors import describe
from store.validation import decode_value
from store.writes import WriteResult

if TYPE_CHECKING:
    from store.layered import LayeredStore

log = structlog.get_logger("optionstore")


def propagate(store: LayeredStore, result: WriteResult) -> bool:
    """Tell every cache about a committed change: this process's own, the other processes'
    (the broadcast) and Redis. False if a step failed: the outbox relay does it again later."""
    # Our own process first: whatever happens below, this process reads the new state.
    store.local.drop(result.scope)
    # The broadcast next, it is what the running tasks wait for. Safe before Redis: a
    # process that heard it holds a revision floor, so if it reloads the scope before Redis
    # caught up it finds Redis behind the floor and reads PostgreSQL instead. The task
    # returns only after both, so every task started later finds Redis current.
    steps: list[tuple[str, Callable[[WriteResult], object]]] = [
        ("broadcast", announcer) for announcer in store.announcers
    ]
    if store.redis is not None:
        redis_cache = store.redis
        steps.append(("redis", lambda r: redis_cache.apply(r.scope, r.revision, r.changes)))
    done = True
    for layer, step in steps:
        try:
            step(result)
        except Exception as exc:
            # PostgreSQL holds the change; the outbox relay finishes the job later.
            done = False
            log.warning(
                "cache.announce_failed",
                layer=layer,
                scope=result.scope,
                revision=result.revision,
                error=describe(exc),
            )
    store.last_known.advance(
        result.scope,
        result.revision,
        {k: decode_value(v) for k, v in result.changes.items() if v is not None},
        tuple(k for k, v in result.changes.items() if v is None),
    )
    if done:
        # Marked by this process's next write, in its transaction, or a moment later in bulk
        # (store/marks.py): a mark needs no round trip of its own.
        store.db.marks.add(result.task_id)
    return done
