"""What one process serves and counts for the active rollouts: the canary values over the
states it caches (only where its identity matches a selector), which rollouts each task read,
and that task's outcome, reported for the leader to judge."""

from __future__ import annotations

import collections
import json
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from store.events import log
from store.fork import after_fork_in_child
from store.local import ScopeState
from store.redis.cluster import RedisClient
from store.rollouts.model import MAX_SAMPLES, Selector
from store.rollouts.records import HEALTH_TTL, MAX_MIRROR_BYTES, health_key, mirror_key

# How often a process reads the active rollouts (and reports its health figures) while it
# serves some: how soon it drops a canary value after its rollout ended.
REFRESH_INTERVAL = 1.0
# ... and while it serves none: only the start of a rollout waits on this (the process serves
# the stored value meanwhile), so a fleet without rollouts reads the copy less often.
IDLE_REFRESH_INTERVAL = 5.0
# A process that could not read the active rollouts for this long stops serving canary
# values: it cannot know whether they were reverted meanwhile.
FAILSAFE_AFTER = 5.0
MAX_ROLLOUTS = 1000


class _Drops(Protocol):
    def drop_scopes(self, scopes: Iterable[str]) -> None: ...


class Entry(NamedTuple):
    """One key under rollout, as this process serves it."""

    rollout_id: int
    canary: bool
    value: Any


class Watched(dict[str, Any]):
    """A scope's values while one of its keys is under rollout: a read of such a key notes the
    rollout for the running task. Its states are kept out of the id index of the local cache
    (store/local.py), so their reads take the Python path; other scopes' hits are unchanged."""

    __slots__ = ("base", "epoch", "rollouts")

    def __init__(
        self, values: dict[str, Any], rollouts: dict[str, int], epoch: int, base: dict[str, Any]
    ) -> None:
        super().__init__(values)
        self.rollouts = rollouts
        self.epoch = epoch
        # The stored values it was made from: what a later wrap starts from again, so that a
        # canary value of a rollout since ended is never carried over.
        self.base = base

    def get(self, key: str, default: Any = None) -> Any:
        rollout = self.rollouts.get(key)
        if rollout is not None:
            _note(rollout)
        return dict.get(self, key, default)

    def __getitem__(self, key: str) -> Any:
        rollout = self.rollouts.get(key)
        if rollout is not None:
            _note(rollout)
        return dict.__getitem__(self, key)

    def __contains__(self, key: object) -> bool:
        rollout = self.rollouts.get(key) if isinstance(key, str) else None
        if rollout is not None:
            _note(rollout)
        return dict.__contains__(self, key)


class _Task(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.reads: set[int] | None = None
        self.started = 0.0
        self.failed = False
        self.retried = False


_task = _Task()


def _note(rollout_id: int) -> None:
    reads = _task.reads
    if reads is not None:
        reads.add(rollout_id)


class _Counts:
    __slots__ = ("failures", "retries", "runtimes", "tasks")

    def __init__(self) -> None:
        self.tasks = self.failures = self.retries = 0
        self.runtimes: collections.deque[float] = collections.deque(maxlen=MAX_SAMPLES)


class Overlay:
    """The active rollouts as this process serves them (``active``: scope -> key -> Entry),
    read from the leader's copy in Redis each second, and the health of the tasks that read
    them. ``queues``: the queues this process's worker consumes (for ``queue:`` selectors)."""

    def __init__(self) -> None:
        self.active: dict[str, dict[str, Entry]] = {}
        self.epoch = 0
        self.queues: tuple[str, ...] = ()
        self._confirmed_at = time.monotonic()
        self._next_refresh = 0.0
        self._new_process()
        after_fork_in_child(self._new_process)

    def _new_process(self) -> None:
        # A child has an identity of its own: it learns its rollouts again, counts afresh.
        self.active = {}
        self.epoch += 1
        self._lock = threading.Lock()
        self._counts: dict[int, _Counts] = {}
        self._dirty: set[int] = set()
        self._next_refresh = 0.0
        self._confirmed_at = time.monotonic()

    # -- serving ---------------------------------------------------------------------------

    def wrap(self, name: str, state: ScopeState) -> ScopeState:
        """``state`` as this process serves it: with its canary values, and watched, when a
        rollout covers one of its keys; else ``state`` itself. Its stored values while the
        rollouts are unconfirmed for FAILSAFE_AFTER seconds, whether or not ``refresh`` ran
        meanwhile (the consumer may be stuck reconnecting to the broker)."""
        keys = self.active.get(name)
        values = state.values
        base = values.base if type(values) is Watched else values
        if keys is None or time.monotonic() - self._confirmed_at > FAILSAFE_AFTER:
            return state if base is values else ScopeState(state.revision, base)
        epoch = self.epoch
        if type(values) is Watched and values.epoch == epoch:
            return state
        served = dict(base)
        for key, entry in keys.items():
            if entry.canary:
                served[key] = entry.value
        watched = {key: entry.rollout_id for key, entry in keys.items()}
        return ScopeState(state.revision, Watched(served, watched, epoch, base))

    def canary_ids(self) -> set[int]:
        return {e.rollout_id for keys in self.active.values() for e in keys.values() if e.canary}

    # -- following the leader's copy ---------------------------------------------------------

    def refresh(self, client: RedisClient, namespace: str, local: _Drops) -> bytes | None:
        """At most once a second (every IDLE_REFRESH_INTERVAL seconds while this process serves
        no rollout): read the active rollouts, serve what changed, report health. Returns the
        leader's copy as read (empty when there is none), None when it read none now (not due,
        or Redis refused): what a host's relay passes on to its children."""
        now = time.monotonic()
        if now < self._next_refresh:
            return None
        self._next_refresh = now + REFRESH_INTERVAL
        try:
            raw = client.get(mirror_key(namespace))
        except Exception as exc:  # Redis down: keep serving, up to FAILSAFE_AFTER
            self.failsafe(local, why=f"{type(exc).__name__}: {exc}")
            return None
        mirror = raw.encode() if isinstance(raw, str) else bytes(raw or b"")
        self.follow(mirror, local)
        if not self.active:
            self._next_refresh = now + IDLE_REFRESH_INTERVAL
        self.report(client, namespace)
        return mirror

    def follow(self, raw: bytes | None, local: _Drops) -> None:
        """Serve the leader's copy ``raw``, read just now (by this process, or by its host's
        relay); None or empty: no rollout."""
        now = time.monotonic()
        if self.active and now - self._confirmed_at > FAILSAFE_AFTER:
            # Reads in the lapse were served the stored values (``wrap``): start afresh.
            self._serve({}, local)
        self._confirmed_at = now
        self._serve(self._select(parse_mirror(raw or None)), local)

    def failsafe(self, local: _Drops, *, why: str) -> None:
        """Serve no canary value once the rollouts were last confirmed FAILSAFE_AFTER ago."""
        if self.active and time.monotonic() - self._confirmed_at > FAILSAFE_AFTER:
            log.warning("rollout.failsafe", error=why)
            self._serve({}, local)

    def _select(self, rollouts: list[dict[str, Any]]) -> dict[str, dict[str, Entry]]:
        host, pid = socket.gethostname(), os.getpid()
        identity = f"{host}:{pid}"
        active: dict[str, dict[str, Entry]] = {}
        for rollout in rollouts:
            try:
                selector = Selector.parse(rollout["selector"])
            except ValueError:
                continue
            canary = selector.matches(
                host=host, identity=identity, queues=self.queues, members=rollout["members"]
            )
            entry = Entry(rollout["id"], canary, rollout["value"])
            active.setdefault(rollout["scope"], {})[rollout["key"]] = entry
        return active

    def _serve(self, active: dict[str, dict[str, Entry]], local: _Drops) -> None:
        if active == self.active:
            return
        before = self.active
        changed = {s for s in set(before) | set(active) if before.get(s) != active.get(s)}
        self.active = active
        self.epoch += 1
        local.drop_scopes(changed)
        log.info(
            "rollout.serving",
            rollouts=sorted({e.rollout_id for keys in active.values() for e in keys.values()}),
            canary=sorted(self.canary_ids()),
            pid=os.getpid(),
        )

    # -- counting tasks -------------------------------------------------------------------------

    def task_started(self) -> None:
        task = _task
        task.depth += 1
        if task.depth == 1:  # a task run eagerly inside another is part of it
            task.reads = set() if self.active else None
            task.started = time.perf_counter()
            task.failed = task.retried = False

    def task_failed(self) -> None:
        _task.failed = True

    def task_retried(self) -> None:
        _task.retried = True

    def task_ended(self) -> None:
        task = _task
        task.depth = max(0, task.depth - 1)
        if task.depth:
            return
        reads, task.reads = task.reads, None
        if not reads:
            return
        took = time.perf_counter() - task.started
        with self._lock:
            for rollout_id in reads:
                counts = self._counts.get(rollout_id)
                if counts is None:
                    counts = self._counts[rollout_id] = _Counts()
                counts.tasks += 1
                counts.failures += task.failed
                counts.retries += task.retried
                counts.runtimes.append(took)
                self._dirty.add(rollout_id)

    def report(self, client: RedisClient, namespace: str) -> None:
        """Write the health of the tasks counted since the last report (none: nothing sent)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            reports = {
                rollout_id: {
                    "tasks": c.tasks,
                    "failures": c.failures,
                    "retries": c.retries,
                    "runtimes": [round(r, 6) for r in c.runtimes],
                }
                for rollout_id, c in self._counts.items()
                if rollout_id in dirty
            }
        if not reports:
            return
        canary = self.canary_ids()
        identity = f"{socket.gethostname()}:{os.getpid()}"
        try:
            pipe = client.pipeline(transaction=False)
            for rollout_id, report in reports.items():
                key = health_key(namespace, rollout_id)
                report["canary"] = rollout_id in canary
                pipe.hset(key, identity, json.dumps(report))
                pipe.expire(key, HEALTH_TTL)
            pipe.execute()
        except Exception as exc:  # sent again with the next change
            with self._lock:
                self._dirty |= set(reports)
            log.warning("rollout.report_failed", error=f"{type(exc).__name__}: {exc}")


def parse_mirror(raw: bytes | str | None) -> list[dict[str, Any]]:
    """The leader's copy of the active rollouts, checked; none if absent or malformed."""
    if raw is None or len(raw) > MAX_MIRROR_BYTES:
        return []
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to decode
        return []
    rollouts = data.get("rollouts") if isinstance(data, dict) else None
    if not isinstance(rollouts, list) or len(rollouts) > MAX_ROLLOUTS:
        return []
    found = []
    for item in rollouts:
        if (
            isinstance(item, dict)
            and type(item.get("id")) is int
            and isinstance(item.get("scope"), str)
            and isinstance(item.get("key"), str)
            and isinstance(item.get("selector"), str)
            and isinstance(item.get("members"), list)
            and all(isinstance(m, str) for m in item["members"])
            and "value" in item
        ):
            found.append(item)
    return found
