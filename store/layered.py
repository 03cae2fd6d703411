"""``LayeredStore``: reads through the local cache, Redis and PostgreSQL; the entry points of the
write path (store/propagation.py) and of received broadcasts (store/applier.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from store.applier import apply_message
from store.broadcast.codec import Publisher, ReloadMessage
from store.errors import NotConfigured, StoreUnavailable, describe
from store.events import log
from store.fallback import Breaker, LastKnown
from store.fork import after_fork_in_child
from store.local import TASK, LocalCache, ScopeState
from store.metrics import metrics
from store.model.registry import Registry
from store.model.validation import DEFAULT_MAX_VALUE_BYTES
from store.model.writes import Write, WriteResult
from store.postgres.store import PostgresStore, Snapshot
from store.propagation import propagate
from store.redis.cache import RedisCache
from store.transient import postgres_unavailable, redis_unavailable

T = TypeVar("T")


class LayeredStore:
    """The one object behind the read API and the write tasks, configured once per process."""

    def __init__(self) -> None:
        self.local = LocalCache(TASK)
        self.postgres: PostgresStore | None = None
        self.redis: RedisCache | None = None
        self.max_value_bytes = DEFAULT_MAX_VALUE_BYTES
        # The last state loaded per scope: served only when PostgreSQL is down.
        self.last_known = LastKnown()
        self._redis_breaker = Breaker(2.0)
        self._postgres_breaker = Breaker(1.0)
        self._lock = threading.Lock()
        after_fork_in_child(self._new_lock)
        # Round trips made on behalf of reads (misses only; a local hit touches nothing).
        self.stats = {"redis_reads": 0, "postgres_reads": 0}
        # Announces each committed change on the reload exchange (None: no broker).
        self.publisher: Publisher | None = None
        # Set by the process's Runtime: configure on first use; start following broadcasts.
        self.on_first_use: Callable[[], None] = _nothing
        self.on_unsynced_read: Callable[[], None] = _nothing
        # Declared options: the policy reads (defaults) and write tasks (checks) consult.
        self.registry = Registry()

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
        publisher: Publisher | None = None,
    ) -> None:
        with self._lock:
            self.publisher = publisher
            if self.postgres is not None:
                self.postgres.close()
            self.postgres = postgres
            self.redis = redis_cache
            self.local.set_mode(local_cache)
            self.local.clear()
            self.max_value_bytes = max_value_bytes
            self.last_known = LastKnown(grace_period)

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
        if cached is not None:
            metrics.miss("redis", len(scopes) - len(missing))
        if missing:
            snapshots.update(self._from_postgres(missing))
        states: dict[str, ScopeState] = {}
        for scope, snapshot in snapshots.items():
            if snapshot is None:  # PostgreSQL down; a last-known state was served instead
                states[scope] = self.last_known.get(scope)
                continue
            state = ScopeState.from_snapshot(snapshot)
            self.last_known.remember(scope, state)
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
            log.warning("cache.fallback", layer="redis", to="postgres", error=describe(exc))
            metrics.fallback("redis")
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
            metrics.fallback("postgres")
            self.last_known.serve(scopes, exc)
            metrics.miss("last_known", len(scopes))
            return dict.fromkeys(scopes)
        self._postgres_breaker.reset()
        metrics.miss("postgres", len(scopes))
        for scope, snapshot in snapshots.items():
            self._from_redis(lambda r, s=scope, snap=snapshot: r.fill(s, snap))  # type: ignore[misc]
        return dict(snapshots)

    # -- writes and what arrives -------------------------------------------------------------

    def commit(self, write: Write, *, task_id: str | None = None) -> WriteResult:
        """Persist ``write`` (once per task id), then bring the caches forward."""
        started = time.perf_counter()
        result, first_run = self.db.apply(write, task_id=task_id)
        if result.changed:
            # A re-run propagates again: its first run may have died between commit and here.
            self.propagate(result)
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

    def propagate(self, result: WriteResult) -> bool:
        """Bring every cache forward after a commit (store/propagation.py); False leaves it to
        the outbox relay."""
        return propagate(self, result)

    def apply_message(self, message: ReloadMessage) -> str:
        """Apply a received reload message to this process's caches (store/applier.py)."""
        return apply_message(self.local, self.last_known, message)


def _nothing() -> None:
    pass
