"""Reads through local cache, Redis and PostgreSQL; writes to PostgreSQL first, then the caches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from store.broadcast import HEARTBEAT, RELOAD, Publisher, ReloadMessage
from store.errors import NotConfigured, StoreUnavailable
from store.fork import after_fork_in_child
from store.local import TASK, LocalCache, ScopeState
from store.postgres import PostgresStore, Snapshot
from store.redis_cache import RedisCache
from store.transient import postgres_unavailable, redis_unavailable
from store.validation import DEFAULT_MAX_VALUE_BYTES, decode_value
from store.writes import Write, WriteResult

log = structlog.get_logger("optionstore")

T = TypeVar("T")

# Scopes remembered for outages; past this, expired ones are dropped.
MAX_LAST_KNOWN = 50_000


class _Breaker:
    """After a failure, skip a service for ``pause`` seconds instead of waiting on every read."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.open_until = 0.0

    def available(self) -> bool:
        return time.monotonic() >= self.open_until

    def trip(self) -> None:
        self.open_until = time.monotonic() + self.pause

    def reset(self) -> None:
        self.open_until = 0.0


class LayeredStore:
    """The one object behind the read API and the write tasks, configured once per process."""

    def __init__(self) -> None:
        self.local = LocalCache(TASK)
        self.postgres: PostgresStore | None = None
        self.redis: RedisCache | None = None
        self.max_value_bytes = DEFAULT_MAX_VALUE_BYTES
        self.grace_period = 300.0
        # Last state loaded per scope, kept across tasks: served only when PostgreSQL is down.
        self._last_known: dict[str, tuple[float, ScopeState]] = {}
        self._redis_breaker = _Breaker(2.0)
        self._postgres_breaker = _Breaker(1.0)
        self._lock = threading.Lock()
        after_fork_in_child(self._new_lock)
        # Called with each committed result; the broadcast publisher hooks in here.
        self.announcers: list[Callable[[WriteResult], None]] = []
        # Round trips made on behalf of reads (misses only; a local hit touches nothing).
        self.stats = {"redis_reads": 0, "postgres_reads": 0}
        self.publisher: Publisher | None = None
        # Set by the process's Runtime: configure on first use; start following broadcasts.
        self.on_first_use: Callable[[], None] = _nothing
        self.on_unsynced_read: Callable[[], None] = _nothing

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def configure(
        self,
        *,
        postgres: PostgresStore,
        redis_cache: RedisCache | None,
        local_cache: str = TASK,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        grace_period: float = 300.0,
        announcers: list[Callable[[WriteResult], None]] | None = None,
    ) -> None:
        with self._lock:
            self.announcers = list(announcers or [])
            if self.postgres is not None:
                self.postgres.close()
            self.postgres = postgres
            self.redis = redis_cache
            self.local.set_mode(local_cache)
            self.local.clear()
            self.max_value_bytes = max_value_bytes
            self.grace_period = grace_period
            self._last_known.clear()

    @property
    def db(self) -> PostgresStore:
        if self.postgres is None:
            self.on_first_use()
        if self.postgres is None:
            raise NotConfigured(
                "optionstore is not configured: set OPTIONS_DATABASE_URL and OPTIONS_REDIS_URL "
                "(or neither, for the embedded default), or call store.configure()"
            )
        return self.postgres

    # -- reads ----------------------------------------------------------------

    def state(self, scope: str) -> ScopeState:
        local = self.local
        scopes = local.holder.scopes
        state = scopes.get(scope)
        if state is None:
            if not local.synced:
                self.on_unsynced_read()
            generation = local.generation
            state = self.load(scope)
            floors = local.floors
            if state.revision < floors.get(scope, 0):
                # Redis answered before a change we already heard about reached it.
                state = self.load(scope, use_redis=False)
            self._keep(scopes, scope, state, generation)
        return state

    def states(self, names: list[str]) -> dict[str, ScopeState]:
        local = self.local
        scopes = local.holder.scopes
        found = {name: scopes[name] for name in names if name in scopes}
        missing = [name for name in names if name not in found]
        if not missing:
            return found
        if not local.synced:
            self.on_unsynced_read()
        generation = local.generation
        loaded = self.load_many(missing)
        floors = local.floors
        behind = [name for name, state in loaded.items() if state.revision < floors.get(name, 0)]
        if behind:
            loaded.update(self.load_many(behind, use_redis=False))
        for name, state in loaded.items():
            found[name] = state
            self._keep(scopes, name, state, generation)
        return found

    def _keep(
        self, scopes: dict[str, ScopeState], name: str, state: ScopeState, generation: int
    ) -> None:
        """Cache a freshly loaded state, unless the process was or went deaf since the load
        began (``generation`` is the cache's when it began) or a newer revision was announced."""
        local = self.local
        if not local.synced or local.generation != generation:
            # A load that straddled a desync may predate a change this process never heard.
            return
        scopes[name] = state
        # The broadcast consumer sets the floor before it scans the caches, and clear() moves
        # the generation on before it empties them: checking again after the insert closes the
        # gap between our check and our insert.
        if (
            local.floors.get(name, 0) > state.revision or local.generation != generation
        ) and scopes.get(name) is state:
            del scopes[name]

    def load(self, scope: str, *, use_redis: bool = True) -> ScopeState:
        return self.load_many([scope], use_redis=use_redis)[scope]

    def load_many(self, scopes: list[str], *, use_redis: bool = True) -> dict[str, ScopeState]:
        """Fresh states from Redis, or PostgreSQL (refilling Redis), or last-known values."""
        if self.postgres is None:
            self.on_first_use()
        snapshots: dict[str, Snapshot | None] = dict.fromkeys(scopes)
        cached = self._from_redis(lambda r: r.get_many(scopes)) if use_redis else None
        if cached is not None:
            snapshots.update(cached)
        missing = [scope for scope, snap in snapshots.items() if snap is None]
        if missing:
            snapshots.update(self._from_postgres(missing))
        now = time.monotonic()
        states: dict[str, ScopeState] = {}
        for scope, snapshot in snapshots.items():
            if snapshot is None:  # PostgreSQL down; a last-known state was served instead
                states[scope] = self._last_known[scope][1]
                continue
            state = ScopeState.from_snapshot(snapshot)
            if len(self._last_known) >= MAX_LAST_KNOWN:
                self._forget_expired(now)
            self._last_known[scope] = (now, state)
            states[scope] = state
        return states

    def _from_redis(self, call: Callable[[RedisCache], T]) -> T | None:
        cache = self.redis
        if cache is None or not self._redis_breaker.available():
            return None
        self.stats["redis_reads"] += 1
        try:
            result = call(cache)
        except Exception as exc:
            if not redis_unavailable(exc):
                raise
            self._redis_breaker.trip()
            log.warning("cache.fallback", layer="redis", to="postgres", error=_describe(exc))
            return None
        self._redis_breaker.reset()
        return result

    def _from_postgres(self, scopes: list[str]) -> dict[str, Snapshot | None]:
        try:
            if not self._postgres_breaker.available():
                raise StoreUnavailable("PostgreSQL failed moments ago")
            self.stats["postgres_reads"] += 1
            snapshots = self.db.load_scopes(scopes)
        except Exception as exc:
            if not (isinstance(exc, StoreUnavailable) or postgres_unavailable(exc)):
                raise
            self._postgres_breaker.trip()
            return self._last_known_or_raise(scopes, exc)
        self._postgres_breaker.reset()
        for scope, snapshot in snapshots.items():
            self._from_redis(lambda r, s=scope, snap=snapshot: r.fill(s, snap))  # type: ignore[misc]
        return dict(snapshots)

    def _forget_expired(self, now: float) -> None:
        expired = [s for s, (at, _) in self._last_known.items() if now - at > self.grace_period]
        for scope in expired:
            self._last_known.pop(scope, None)
        if len(self._last_known) >= MAX_LAST_KNOWN:
            self._last_known.clear()  # still full: an outage now reads PostgreSQL or fails

    def _last_known_or_raise(
        self, scopes: list[str], exc: BaseException
    ) -> dict[str, Snapshot | None]:
        now = time.monotonic()
        for scope in scopes:
            entry = self._last_known.get(scope)
            if entry is None or now - entry[0] > self.grace_period:
                raise StoreUnavailable(
                    f"cannot read {scope}: PostgreSQL is unavailable ({_describe(exc)}) and no "
                    f"value was loaded in the last {self.grace_period:.0f}s"
                ) from exc
        for scope in scopes:
            log.warning(
                "cache.fallback",
                layer="postgres",
                to="last_known",
                scope=scope,
                age_s=round(now - self._last_known[scope][0], 3),
                error=_describe(exc),
            )
        return dict.fromkeys(scopes)

    # -- writes ---------------------------------------------------------------

    def commit(self, write: Write, *, task_id: str | None = None) -> WriteResult:
        """Persist ``write`` (once per task id), then bring the caches forward."""
        started = time.perf_counter()
        result, first_run = self.db.apply(write, task_id=task_id)
        if result.changed:
            # A re-run announces again: its first run may have died between commit and here.
            self.announce(result)
        log.info(
            "option.write",
            scope=result.scope,
            keys=write.keys,
            revision=result.revision,
            changed=result.changed,
            first_run=first_run,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return result

    def apply_message(self, message: ReloadMessage) -> str:
        """Apply a received message to this process's caches: a change in revision order; a
        RELOAD or a heartbeat's marks by dropping whatever they prove older."""
        if message.kind == HEARTBEAT:
            return self._apply_marks(message)
        if message.kind == RELOAD:
            self._forget_older(message.scope, message.revision)
            return "dropped" if self.local.invalidate(message.scope, message.revision) else "absent"
        outcome = self.local.apply_change(
            message.scope, message.revision, message.sets, message.unsets
        )
        self._advance_last_known(message.scope, message.revision, message.sets, message.unsets)
        return outcome

    def _apply_marks(self, message: ReloadMessage) -> str:
        if message.marks is None:
            return "none"
        missed = []
        for scope, revision in message.marks.items():
            self._forget_older(scope, revision)
            if self.local.invalidate(scope, revision):
                missed.append(scope)
        if not message.marks_complete:
            # More changed than one heartbeat names: nothing cached can be proved current.
            self.local.clear()
        if missed or not message.marks_complete:
            log.warning(
                "broadcast.missed",
                scopes=missed[:20],
                missed=len(missed),
                marks_complete=message.marks_complete,
            )
            return "dropped"
        return "current"

    def _forget_older(self, scope: str, revision: int) -> None:
        known = self._last_known.get(scope)
        if known is not None and known[1].revision < revision:
            self._last_known.pop(scope, None)

    def _advance_last_known(
        self, scope: str, revision: int, sets: dict[str, Any], unsets: tuple[str, ...]
    ) -> None:
        """Move the outage copy of ``scope`` forward by one change, or forget it on a gap.

        Never fall back, during an outage, to a state older than one this process heard of.
        """
        known = self._last_known.get(scope)
        if known is None or known[1].revision >= revision:
            return
        if known[1].revision != revision - 1:
            self._last_known.pop(scope, None)
            return
        values = dict(known[1].values)
        values.update(sets)
        for key in unsets:
            values.pop(key, None)
        self._last_known[scope] = (time.monotonic(), ScopeState(revision, values))

    def announce(self, result: WriteResult) -> bool:
        """Tell the caches about a committed change; False leaves it to the outbox relay."""
        # Our own process first: whatever happens below, this process reads the new state.
        self.local.drop(result.scope)
        self._advance_last_known(
            result.scope,
            result.revision,
            {k: decode_value(v) for k, v in result.changes.items() if v is not None},
            tuple(k for k, v in result.changes.items() if v is None),
        )
        # The broadcast first, it is what the running tasks wait for. Safe before Redis: a
        # process that heard it holds a revision floor, so if it reloads the scope before Redis
        # caught up it finds Redis behind the floor and reads PostgreSQL instead. The task
        # returns only after both, so every task started later finds Redis current.
        steps: list[tuple[str, Callable[[WriteResult], object]]] = [
            ("broadcast", announcer) for announcer in self.announcers
        ]
        if self.redis is not None:
            redis_cache = self.redis
            steps.append(("redis", lambda r: redis_cache.apply(r.scope, r.revision, r.changes)))
        announced = True
        for layer, step in steps:
            try:
                step(result)
            except Exception as exc:
                # PostgreSQL holds the change; the outbox relay finishes the job later.
                announced = False
                log.warning(
                    "cache.announce_failed",
                    layer=layer,
                    scope=result.scope,
                    revision=result.revision,
                    error=_describe(exc),
                )
        if announced:
            try:
                self.db.mark_announced([result.task_id])
            except Exception as exc:
                if not postgres_unavailable(exc):
                    raise
                # Harmless: the relay announces it again, and an old revision changes nothing.
                log.warning("outbox.mark_failed", task_id=result.task_id, error=_describe(exc))
        return announced


def _nothing() -> None:
    pass


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
