"""``OptionsStore``: the one object behind the read API, the write tasks and received broadcasts.

A read goes top to bottom: this process's local cache, Redis, PostgreSQL, then the last-known
state of an outage. A write commits to PostgreSQL, then brings every cache forward. A received
broadcast moves the local cache forward, in revision order.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from store.broadcast.codec import HEARTBEAT, RELOAD, ReloadMessage
from store.broadcast.publisher import Publisher
from store.errors import NotConfigured, StoreUnavailable, describe
from store.events import log
from store.fallback import Breaker, LastKnown
from store.fork import after_fork_in_child
from store.local import TASK, LocalCache, ScopeState
from store.metrics import Metrics
from store.model.registry import Registry
from store.model.validation import DEFAULT_MAX_VALUE_BYTES, decode_value
from store.model.writes import Write, WriteResult
from store.postgres.store import EncodedScope, PostgresStore
from store.redis.cache import Applied, RedisCache
from store.rollouts.overlay import Overlay
from store.transient import postgres_unavailable, redis_unavailable

T = TypeVar("T")

# How long a task with an ``options_after`` token waits for the broadcasts it names before
# loading those scopes from the store instead (OPTIONS_CATCH_UP_WAIT).
DEFAULT_CATCH_UP_WAIT = 0.1


class Lifecycle(Protocol):
    """What the store asks of the process that owns it (store/process.py)."""

    def ensure_configured(self) -> None:
        """Configure the store now if nothing has yet."""

    def ensure_following(self) -> None:
        """Start the reload consumer if this process follows broadcasts and has none."""

    def load_registry(self, registry: Registry) -> None:
        """Load the declarations this process runs with into ``registry``."""


class _Unmanaged:
    """A store configured by hand (tests, benchmarks): nothing happens on first use."""

    def ensure_configured(self) -> None:
        pass

    def ensure_following(self) -> None:
        pass

    def load_registry(self, registry: Registry) -> None:
        pass


class OptionsStore:
    """Reads through the layers, commits writes and applies broadcasts, in one process."""

    def __init__(self, lifecycle: Lifecycle | None = None) -> None:
        self._lifecycle: Lifecycle = lifecycle or _Unmanaged()
        # What this process counts for a fleet operator (no-ops until enabled).
        self.metrics = Metrics()
        # Declared options: the policy reads (defaults) and write tasks (checks) consult.
        self.registry = Registry(resolve=self._lifecycle.load_registry)
        # The canary values of the active rollouts this process serves, and what its tasks
        # that read them did (store/rollouts/overlay.py); followed by the reload consumer.
        self.overlay = Overlay()
        self.local = LocalCache(TASK, defaults=self.registry.defaults, wrap=self.overlay.wrap)
        # A local state's reads include the declared defaults of its day: a new declaration
        # takes effect at the next load.
        self.registry.on_change(self.local.clear)
        self.postgres: PostgresStore | None = None
        self.redis: RedisCache | None = None
        self.max_value_bytes = DEFAULT_MAX_VALUE_BYTES
        # The last state loaded per scope: served only when PostgreSQL is down.
        self.last_known = LastKnown()
        self._redis_breaker = Breaker(2.0)
        self._postgres_breaker = Breaker(1.0)
        self._lock = threading.Lock()
        # Notified after each broadcast applied while a catch_up waits (``_waiting``).
        self._applied = threading.Condition()
        self._waiting = 0
        self.catch_up_wait = DEFAULT_CATCH_UP_WAIT
        after_fork_in_child(self._new_lock)
        # Round trips made on behalf of reads (misses only; a local hit touches nothing), in
        # this process's report.
        self.stats = {"redis_reads": 0, "postgres_reads": 0}
        # Announces each committed change on the reload exchange (None: no broker).
        self.publisher: Publisher | None = None

    def _new_lock(self) -> None:
        self._lock = threading.Lock()
        # A thread of the parent may have been waiting: its count and lock stay there.
        self._applied = threading.Condition()
        self._waiting = 0

    # Keyword-only, the defaults in the signature, like StoreProcess.configure and
    # store.configure above it: each layer names what it takes rather than passing **kwargs on.
    def configure(
        self,
        *,
        postgres: PostgresStore,
        redis_cache: RedisCache | None,
        local_cache: str = TASK,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        grace_period: float = 300.0,
        publisher: Publisher | None = None,
        catch_up_wait: float = DEFAULT_CATCH_UP_WAIT,
    ) -> None:
        with self._lock:
            self.catch_up_wait = catch_up_wait
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
            self._lifecycle.ensure_configured()
        if self.postgres is None:
            raise NotConfigured(
                "optionstore is not configured: set OPTIONS_DATABASE_URL and OPTIONS_REDIS_URL "
                "(or neither, for the embedded default), or call store.configure()"
            )
        return self.postgres

    # -- reads: local, then Redis, then PostgreSQL, then last known ------------------------

    def state(self, scope: str) -> ScopeState:
        local = self.local
        scopes = local.holder.scopes
        state = scopes.get(scope)
        if state is None:
            if not local.synced:
                self._lifecycle.ensure_following()
            generation = local.generation
            state = self.load_many([scope])[scope]
            floors = local.floors
            if state.revision < floors.get(scope, 0):
                # Redis answered before a change we already heard about reached it.
                state = self.load(scope, use_redis=False)
            state = self.overlay.wrap(scope, state)
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
            self._lifecycle.ensure_following()
        generation = local.generation
        loaded = self.load_many(missing)
        floors = local.floors
        behind = [name for name, state in loaded.items() if state.revision < floors.get(name, 0)]
        if behind:
            loaded.update(self.load_many(behind, use_redis=False))
        wrap = self.overlay.wrap
        for name, loaded_state in loaded.items():
            found[name] = state = wrap(name, loaded_state)
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
        # gap between our check and our insert. What the map holds may be another object than
        # ``state`` (the map wraps what it takes in: rollouts' canary values), so it is told
        # by its revision: not newer, it is this load (or as old) and goes; dropping is only
        # ever a miss.
        if local.floors.get(name, 0) > state.revision or local.generation != generation:
            kept = scopes.get(name)
            if kept is not None and kept.revision <= state.revision:
                scopes.pop(name, None)

    def load(self, scope: str, *, use_redis: bool = True) -> ScopeState:
        return self.load_many([scope], use_redis=use_redis)[scope]

    def load_many(self, scopes: list[str], *, use_redis: bool = True) -> dict[str, ScopeState]:
        """Fresh states from Redis, or PostgreSQL (refilling Redis), or last-known values."""
        if self.postgres is None:
            self._lifecycle.ensure_configured()
        found: dict[str, EncodedScope | None] = dict.fromkeys(scopes)
        cached = self._from_redis(lambda r: r.get_encoded(scopes)) if use_redis else None
        if cached is not None:
            found.update(cached)
        missing = [scope for scope, encoded in found.items() if encoded is None]
        if cached is not None:
            self.metrics.miss("redis", len(scopes) - len(missing))
        if missing:
            found.update(self._from_postgres(missing))
        states: dict[str, ScopeState] = {}
        for scope, encoded in found.items():
            if encoded is None:  # PostgreSQL down; a last-known state was served instead
                states[scope] = self.last_known.get(scope)
                continue
            state = ScopeState.from_encoded(encoded)
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
            self.metrics.fallback("redis")
            return None
        self._redis_breaker.reset()
        return result

    def _from_postgres(self, scopes: list[str]) -> dict[str, EncodedScope | None]:
        try:
            if not self._postgres_breaker.available():
                raise StoreUnavailable("PostgreSQL failed moments ago")
            self.stats["postgres_reads"] += 1
            snapshots = self.db.load_scopes(scopes)
        except Exception as exc:
            if not (isinstance(exc, StoreUnavailable) or postgres_unavailable(exc)):
                raise
            self._postgres_breaker.trip()
            self.metrics.fallback("postgres")
            self.last_known.serve(scopes, exc)
            self.metrics.miss("last_known", len(scopes))
            return dict.fromkeys(scopes)
        self._postgres_breaker.reset()
        self.metrics.miss("postgres", len(scopes))
        for scope, snapshot in snapshots.items():
            self._from_redis(lambda r, s=scope, snap=snapshot: r.fill(s, snap))  # type: ignore[misc]
        return {scope: snapshot.encoded() for scope, snapshot in snapshots.items()}

    # -- read-your-writes: catching up to a token -----------------------------------------

    def catch_up(self, token: Mapping[str, int], *, wait: float | None = None) -> dict[str, str]:
        """Make every read of this process (from now on, in every thread) return each scope of
        ``token`` at its revision or a newer one.

        A scope held locally at an older revision waits for its broadcast, up to ``wait``
        seconds (``catch_up_wait`` by default), for all such scopes together. A scope still
        older after that, or not held, is loaded now: from Redis, or from PostgreSQL if Redis
        is behind the revision, which becomes the scope's floor, so no later load settles for
        an older state either.

        Returns what happened per scope: ``current`` (held at that revision or newer),
        ``heard`` (its broadcast arrived in the wait), ``loaded`` (loaded from the store),
        ``behind`` (neither Redis nor PostgreSQL could give that revision: reads serve the
        newest state there is, and it is logged).
        """
        local = self.local
        older = [scope for scope, revision in token.items() if _held_before(local, scope, revision)]
        if older:
            limit = self.catch_up_wait if wait is None else wait
            self._wait_for(token, older, limit)
        outcomes: dict[str, str] = {}
        for scope, revision in token.items():
            state = local.holder.scopes.get(scope)
            if state is not None and state.revision >= revision:
                outcomes[scope] = "heard" if scope in older else "current"
                local.invalidate(scope, revision)  # the floor, confirmed by the state held
                continue
            outcomes[scope] = self._load_at_least(scope, revision)
        if older or "behind" in outcomes.values():
            log.debug("token.caught_up", outcomes=outcomes)
        return outcomes

    def _load_at_least(self, scope: str, revision: int) -> str:
        """Load ``scope`` under a floor of ``revision``; ``loaded``, or ``behind`` if no layer
        has it."""
        local = self.local
        before = local.floors.get(scope, 0)
        # Drops an older state; the load must reach revision. A claim until the store confirms it.
        local.invalidate(scope, revision, claimed=True)
        state = self.state(scope)
        if state.revision >= revision:
            return "loaded"
        # The token claims a revision the store does not have: PostgreSQL down with Redis
        # behind, a database that went back in time, or a forged header. Its floor would keep
        # the scope out of the cache for good (every read two round trips), so it goes back to
        # what the store confirmed, and the process caches as it did before the token.
        local.retract_floor(scope, revision, max(before, state.revision))
        log.warning("token.behind", scope=scope, revision=revision, loaded=state.revision)
        return "behind"

    def _wait_for(self, token: Mapping[str, int], scopes: list[str], limit: float) -> None:
        deadline = time.monotonic() + limit
        local = self.local
        with self._applied:
            self._waiting += 1
            try:
                while any(_held_before(local, scope, token[scope]) for scope in scopes):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self._applied.wait(remaining)
            finally:
                self._waiting -= 1

    # -- writes: commit, then every cache forward ------------------------------------------

    def commit(self, write: Write, *, task_id: str | None = None) -> WriteResult:
        """Persist ``write`` (once per task id), then bring the caches forward."""
        started = time.perf_counter()
        result, first_run = self.db.apply(write, task_id=task_id)
        if result.changed:
            # A re-run propagates again: its first run may have died between commit and here.
            self.propagate(result, fresh=first_run)
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

    def propagate(self, result: WriteResult, *, fresh: bool = False) -> bool:
        """Tell every cache about a committed change: this process's own, the other processes'
        (the broadcast) and Redis. False if a step failed: the outbox relay does it again later,
        then calls this again.

        ``fresh``: ``result`` was committed just now, so no one can have announced its revision
        before. If Redis says someone did, PostgreSQL went back in time and handed it out
        again: the scope is rebased past it (``rebase``), so that the caches take this write.
        """
        # Our own process first: whatever happens below, this process reads the new state.
        self.local.drop(result.scope)
        done = True
        publisher, cache = self.publisher, self.redis
        topics: list[str] = []
        if publisher is not None and cache is not None:
            try:
                topics = publisher.topics_on(cache.client)
            except Exception as exc:  # the broker is unreachable: no second try in this write
                _announce_failed("broadcast", result, exc)
                done = False
                publisher = None
        steps: list[tuple[str, Callable[[WriteResult], object]]] = []
        if topics and publisher is not None and cache is not None:
            # The broker is the cache's Redis server: one script moves the cache, then publishes
            # the broadcast, in one round trip. A process that hears it finds Redis current.
            shared = (publisher, cache, topics, self._database_id())
            steps.append(("redis+broadcast", lambda r: _cache_then_broadcast(*shared, r)))
        else:
            # The broadcast first, it is what the running tasks wait for. Safe before Redis: a
            # process that heard it holds a revision floor, so if it reloads the scope before
            # Redis caught up it finds Redis behind the floor and reads PostgreSQL instead. The
            # task returns only after both, so every task started later finds Redis current.
            if publisher is not None:
                steps.append(("broadcast", publisher.announce))
            if cache is not None:
                steps.append(
                    (
                        "redis",
                        lambda r: cache.apply(
                            r.scope,
                            r.revision,
                            r.changes,
                            task_id=r.task_id,
                            database=self._database_id(),
                        ),
                    )
                )
        stepped, before = _run_steps(steps, result)
        done = done and stepped
        self.last_known.advance(
            result.scope,
            result.revision,
            {k: decode_value(v) for k, v in result.changes.items() if v is not None},
            tuple(k for k, v in result.changes.items() if v is None),
        )
        if done:
            # Marked by this process's next write, in its transaction, or a moment later in
            # bulk (store/postgres/marks.py): a mark needs no round trip of its own.
            self.db.marks.add(result.task_id)
        if fresh and before is not None and before.announced >= result.revision:
            self._check_reused(result, before)
        return done

    def _database_id(self) -> str | None:
        """Whose commits Redis records (PostgresStore.database_id); None while PostgreSQL does
        not answer: the announcement goes ahead unrecorded."""
        try:
            return self.db.database_id()
        except Exception:
            return None

    def _check_reused(self, result: WriteResult, before: Applied) -> None:
        """``result`` was committed just now, and Redis has seen its revision or a newer one
        announced. The same revision from another task: PostgreSQL handed it out again, and
        the scope is rebased at once. A newer one is most often a concurrent write that
        announced first (a busy scope, every few writes): asking PostgreSQL here would cost
        those a round trip, so a database behind it is left to the reconciler's next round,
        which holds every scope announced in the last seconds against PostgreSQL."""
        if before.announced != result.revision or before.by == result.task_id:
            return  # a newer one; or the relay announced this commit first
        try:
            self.rebase(result.scope, above=before.announced)
        except Exception as exc:  # the reconciler finds the database behind, and repairs it
            log.warning("postgres.rebase_failed", scope=result.scope, error=describe(exc))

    def rebase(self, scope: str, *, above: int) -> WriteResult | None:
        """PostgreSQL holds ``scope`` at a revision at or below ``above``, which was announced
        before: it went back in time (a restore, a failover to a replica that lacked the last
        commits), and every cache that holds a revision it handed out again holds other values.
        Move the scope past ``above`` in PostgreSQL and announce that: every cache drops the
        scope and reloads PostgreSQL's state, and later writes are newer than anything cached.
        """
        result = self.db.rebase(scope, above=above)
        if result is None:
            return None
        log.warning("postgres.went_back", scope=scope, announced=above, rebased_to=result.revision)
        self.propagate(result)
        return result

    # -- what the reload exchange brings ----------------------------------------------------

    def apply_message(self, message: ReloadMessage) -> str:
        """Apply a received message: a change in revision order; a RELOAD, or a heartbeat's
        marks, by dropping whatever they prove older. Returns what happened (for the log and
        the tests)."""
        outcome = self._apply(message)
        if self._waiting:  # a task waits in catch_up (one attribute read when none does)
            with self._applied:
                self._applied.notify_all()
        return outcome

    def _apply(self, message: ReloadMessage) -> str:
        local, last_known = self.local, self.last_known
        if message.kind == HEARTBEAT:
            return self._apply_marks(message)
        if message.kind == RELOAD:
            last_known.forget_older(message.scope, message.revision)
            return "dropped" if local.invalidate(message.scope, message.revision) else "absent"
        outcome = local.apply_change(message.scope, message.revision, message.sets, message.unsets)
        last_known.advance(message.scope, message.revision, message.sets, message.unsets)
        return outcome

    def _apply_marks(self, message: ReloadMessage) -> str:
        if message.marks is None:
            return "none"
        missed = []
        for scope, revision in message.marks.items():
            self.last_known.forget_older(scope, revision)
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


def _held_before(local: LocalCache, scope: str, revision: int) -> bool:
    """Whether this thread's reads would find ``scope`` held at a revision before ``revision``."""
    state = local.holder.scopes.get(scope)
    return state is not None and state.revision < revision


def _run_steps(
    steps: list[tuple[str, Callable[[WriteResult], object]]], result: WriteResult
) -> tuple[bool, Applied | None]:
    """Run each step of ``propagate``; returns whether all went through, and what Redis did
    (None if it did not answer)."""
    done, applied = True, None
    for layer, step in steps:
        try:
            outcome = step(result)
        except Exception as exc:
            # PostgreSQL holds the change; the outbox relay finishes the job later.
            _announce_failed(layer, result, exc)
            done = False
        else:
            if isinstance(outcome, Applied):
                applied = outcome
    return done, applied


def _announce_failed(layer: str, result: WriteResult, exc: Exception) -> None:
    log.warning(
        "cache.announce_failed",
        layer=layer,
        scope=result.scope,
        revision=result.revision,
        error=describe(exc),
    )


def _cache_then_broadcast(
    publisher: Publisher,
    cache: RedisCache,
    topics: Sequence[str],
    database: str | None,
    result: WriteResult,
) -> Applied:
    try:
        return cache.apply(
            result.scope,
            result.revision,
            result.changes,
            task_id=result.task_id,
            database=database,
            announce=(topics, publisher.envelope(result)),
        )
    except Exception:
        # Redis refused the script (full, read-only after a failover, unreachable): a plain
        # PUBLISH may still get through, as it would without the shared script. The write
        # stays unannounced either way, for the relay to bring the cache forward.
        with contextlib.suppress(Exception):
            publisher.announce(result)
        raise
