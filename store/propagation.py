"""After a commit: every cache is brought forward, then the outbox row is marked announced."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from store.errors import describe
from store.model.validation import decode_value
from store.model.writes import WriteResult

if TYPE_CHECKING:
    from store.broadcast.codec import Publisher
    from store.layered import LayeredStore
    from store.redis.cache import RedisCache

from store.events import log


def propagate(store: LayeredStore, result: WriteResult) -> bool:
    """Tell every cache about a committed change: this process's own, the other processes'
    (the broadcast) and Redis. False if a step failed: the outbox relay does it again later."""
    # Our own process first: whatever happens below, this process reads the new state.
    store.local.drop(result.scope)
    done = True

    def failed(layer: str, exc: Exception) -> None:
        # PostgreSQL holds the change; the outbox relay finishes the job later.
        nonlocal done
        done = False
        log.warning(
            "cache.announce_failed",
            layer=layer,
            scope=result.scope,
            revision=result.revision,
            error=describe(exc),
        )

    publisher, cache = store.publisher, store.redis
    topics: list[str] = []
    if publisher is not None and cache is not None:
        try:
            topics = publisher.topics_on(cache.client)
        except Exception as exc:  # the broker is unreachable: no second try in this write
            failed("broadcast", exc)
            publisher = None
    steps: list[tuple[str, Callable[[WriteResult], object]]] = []
    if topics and publisher is not None and cache is not None:
        # The broker is the cache's Redis server: one script moves the cache, then publishes
        # the broadcast, in one round trip. A process that hears it finds Redis current.
        shared = (publisher, cache, topics)
        steps.append(("redis+broadcast", lambda r: _cache_then_broadcast(*shared, r)))
    else:
        # The broadcast first, it is what the running tasks wait for. Safe before Redis: a
        # process that heard it holds a revision floor, so if it reloads the scope before
        # Redis caught up it finds Redis behind the floor and reads PostgreSQL instead. The
        # task returns only after both, so every task started later finds Redis current.
        if publisher is not None:
            steps.append(("broadcast", publisher.announce))
        if cache is not None:
            steps.append(("redis", lambda r: cache.apply(r.scope, r.revision, r.changes)))
    for layer, step in steps:
        try:
            step(result)
        except Exception as exc:
            failed(layer, exc)
    store.last_known.advance(
        result.scope,
        result.revision,
        {k: decode_value(v) for k, v in result.changes.items() if v is not None},
        tuple(k for k, v in result.changes.items() if v is None),
    )
    if done:
        # Marked by this process's next write, in its transaction, or a moment later in bulk
        # (store/postgres/marks.py): a mark needs no round trip of its own.
        store.db.marks.add(result.task_id)
    return done


def _cache_then_broadcast(
    publisher: Publisher, cache: RedisCache, topics: Sequence[str], result: WriteResult
) -> None:
    try:
        cache.apply(
            result.scope,
            result.revision,
            result.changes,
            announce=(topics, publisher.envelope(result)),
        )
    except Exception:
        # Redis refused the script (full, read-only after a failover, unreachable): a plain
        # PUBLISH may still get through, as it would without the shared script. The write
        # stays unannounced either way, for the relay to bring the cache forward.
        with contextlib.suppress(Exception):
            publisher.announce(result)
        raise
