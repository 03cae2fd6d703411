"""The process-local option cache: scope -> decoded values, per thread or per process."""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from store.model.validation import decode_value
from store.postgres.store import EncodedScope

# Past this many scopes the revision floors are forgotten; see LocalCache.floors.
MAX_FLOORS = 100_000

TASK = "task"
PROCESS = "process"
MODES = (TASK, PROCESS)


class ScopeState:
    """One scope's decoded values at one revision, as a reader sees it."""

    __slots__ = ("_sorted_keys", "revision", "values")

    def __init__(self, revision: int, values: dict[str, Any]) -> None:
        self.revision = revision
        self.values = values
        self._sorted_keys: list[str] | None = None

    @classmethod
    def from_encoded(cls, scope: EncodedScope) -> ScopeState:
        # One decoder call for the whole scope: far cheaper than one per value.
        return cls(scope.revision, dict(zip(scope.keys, decode_value(scope.array), strict=True)))

    def sorted_keys(self) -> list[str]:
        if self._sorted_keys is None:
            self._sorted_keys = sorted(self.values)
        return list(self._sorted_keys)


_PROJECT_PREFIX = "project:"
_GROUP_PREFIX = "group:"


def _id_of(name: str, prefix: str) -> int | None:
    """The id of a scope name of one kind (``project:42`` -> 42), else None."""
    if name.startswith(prefix):
        rest = name[len(prefix) :]
        if rest.isdigit():
            return int(rest)
    return None


class ScopeMap(dict[str, ScopeState]):
    """Scope name -> state, with the values of project and group scopes also by their integer
    id, so a local hit looks its value up by the id it is given, without making the name.

    ``project_reads``/``group_reads`` are what a read without a default of its own returns:
    the values over the declared defaults of that kind (``defaults``, the registry's, kept
    current by it; the store clears the cache when it changes), or the values themselves when
    none is declared. Every change goes through the four methods below, which keep all of it
    in step; reads are plain dict reads.
    """

    __slots__ = ("defaults", "group_reads", "groups", "project_reads", "projects", "wrap")

    def __init__(
        self,
        defaults: Mapping[str, Mapping[str, Any]] | None = None,
        wrap: Wrap | None = None,
    ) -> None:
        super().__init__()
        self.defaults = defaults if defaults is not None else {}
        # How a state is served in this process (store/rollouts/overlay.py: canary values);
        # applied to every state put in the map, which is where loads and broadcasts meet.
        self.wrap = wrap
        self.projects: dict[int, dict[str, Any]] = {}
        self.project_reads: dict[int, dict[str, Any]] = {}
        self.groups: dict[int, dict[str, Any]] = {}
        self.group_reads: dict[int, dict[str, Any]] = {}

    def __setitem__(self, name: str, state: ScopeState) -> None:
        if self.wrap is not None:
            state = self.wrap(name, state)
        super().__setitem__(name, state)
        self._index(name, state)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._index(name, None)

    def pop(self, name: str, default: Any = None) -> Any:
        state = super().pop(name, default)
        self._index(name, None)
        return state

    def clear(self) -> None:
        for index in (self.project_reads, self.projects, self.group_reads, self.groups):
            index.clear()
        super().clear()

    def _index(self, name: str, state: ScopeState | None) -> None:
        if name.startswith(_PROJECT_PREFIX):
            kind, values, reads = "project", self.projects, self.project_reads
        elif name.startswith(_GROUP_PREFIX):
            kind, values, reads = "group", self.groups, self.group_reads
        else:
            return
        ident = _id_of(name, _GROUP_PREFIX if kind == "group" else _PROJECT_PREFIX)
        if ident is None:
            return
        if state is None or type(state.values) is not dict:
            # Gone, or watched by a rollout (a dict subclass that notes its reads): reads of
            # it take the readers' Python path, by name.
            reads.pop(ident, None)
            values.pop(ident, None)
            return
        declared = self.defaults.get(kind)
        values[ident] = state.values
        reads[ident] = {**declared, **state.values} if declared else state.values


# A state as this process serves it (LocalCache's ``wrap``).
Wrap = Callable[[str, ScopeState], ScopeState]


def stored_values(values: dict[str, Any]) -> dict[str, Any]:
    """A state's stored values: a state served with canary values (``wrap``; a dict subclass,
    store/rollouts/overlay.py) keeps those it was made from as ``base``; a change builds on
    them, so a canary value never becomes part of a stored state."""
    return values if type(values) is dict else getattr(values, "base", values)


class _Holder:
    scopes: ScopeMap


class _Registry:
    """Every thread's map, so code outside a thread (a broadcast, a write) can reach it.

    Readers take a snapshot that never changes size: the entries live in a tuple replaced whole
    under a lock, never mutated, so ``maps()`` needs no lock while threads register and die.
    Threads are held weakly and without a callback (a callback would run at any point, in any
    thread): a dead thread's entry is skipped, and removed the next time a thread registers.
    """

    def __init__(self) -> None:
        self._entries: tuple[tuple[weakref.ref[threading.Thread], ScopeMap], ...] = ()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def add(self, thread: threading.Thread, scopes: ScopeMap) -> None:
        if self._pid != os.getpid():
            # Forked while another thread may have held the lock: the child gets its own.
            self._lock = threading.Lock()
            self._pid = os.getpid()
        with self._lock:
            live = tuple(entry for entry in self._entries if entry[0]() is not None)
            self._entries = (*live, (weakref.ref(thread), scopes))

    def maps(self) -> list[ScopeMap]:
        return [scopes for thread, scopes in self._entries if thread() is not None]


class _ThreadHolder(threading.local):
    def __init__(
        self,
        registry: _Registry,
        defaults: Mapping[str, Mapping[str, Any]],
        wrap: Wrap | None,
    ) -> None:
        self.scopes = ScopeMap(defaults, wrap)
        # Remembered so code outside this thread (a broadcast) can reach every thread's cache.
        registry.add(threading.current_thread(), self.scopes)


class LocalCache:
    """Scope states kept in this process.

    In ``task`` mode each thread has its own map, cleared when its task ends, so a threads-pool
    worker finishing one task never empties the cache another running task is reading (the seed
    kept its caches per thread for the same reason). In ``process`` mode one map serves every
    thread and only broadcasts change it.
    """

    def __init__(
        self,
        mode: str = TASK,
        *,
        defaults: Mapping[str, Mapping[str, Any]] | None = None,
        wrap: Wrap | None = None,
    ) -> None:
        # The declared defaults per scope kind (Registry.defaults), for ScopeMap's reads.
        defaults = defaults if defaults is not None else {}
        # ``wrap``: how a state is served here (the canary values of rollouts), applied to
        # every state a map takes in.
        self.wrap = wrap
        self._registry = _Registry()
        self._shared = _Holder()
        self._shared.scopes = ScopeMap(defaults, wrap)
        self._threads = _ThreadHolder(self._registry, defaults, wrap)
        self.mode = TASK
        self.holder: _Holder | _ThreadHolder = self._shared
        # The newest revision announced per scope: a load that comes back older than this
        # (Redis read before the change landed) is not cached.
        self.floors: dict[str, int] = {}
        # The newest revision per scope this process heard of from the store's side (a
        # broadcast, a heartbeat's marks, a state held): unlike a floor, never raised by a
        # token's mere claim, so taking a claimed floor back never goes below it.
        self.heard: dict[str, int] = {}
        # False while broadcasts may be missed (not yet subscribed, connection lost, silence):
        # reads then go to Redis or PostgreSQL every time and nothing is kept locally.
        self.synced = True
        # Moves on at every clear (so every desync and resync): a load that started in an
        # earlier generation may predate a change this process never heard, and is not kept.
        self._generations = itertools.count()
        self.generation = next(self._generations)
        self.one_task_at_a_time = True
        self.set_mode(mode)

    def set_mode(self, mode: str, *, one_task_at_a_time: bool | None = None) -> None:
        """Choose task or process mode.

        ``one_task_at_a_time``: the process never ends one task while another runs in another
        thread, so task mode can use one map instead of a thread-local one, which is cheaper to
        reach on every read. Unset keeps the previous choice. The default is one map: only a
        worker whose pool runs tasks side by side in threads (threads, gevent, eventlet) ends
        tasks that way, and its start says so (worker/steps.py); elsewhere nothing ends a task.
        """
        if mode not in MODES:
            raise ValueError(f"local cache mode must be one of {MODES}, got {mode!r}")
        if one_task_at_a_time is not None:
            self.one_task_at_a_time = one_task_at_a_time
        self.mode = mode
        per_thread = mode == TASK and not self.one_task_at_a_time
        holder = self._threads if per_thread else self._shared
        if holder is not self.holder:
            # Readers look in the shared map first (``shared``): it must not keep states the
            # per-thread maps have since moved past.
            self.clear()
        self.holder = holder

    @property
    def scopes(self) -> ScopeMap:
        return self.holder.scopes

    @property
    def shared(self) -> ScopeMap:
        """The map of process mode and of one-task-at-a-time task mode, for the readers' hit
        path; empty while the per-thread maps are in use. Never replaced, only changed."""
        return self._shared.scopes

    def end_task(self) -> None:
        """A task finished: in task mode its thread starts the next task empty."""
        if self.mode == TASK:
            self.holder.scopes.clear()

    def clear(self) -> None:
        """Drop everything this process holds, in every thread."""
        # Before the maps are emptied: a load that inserts after this sees the new generation.
        self.generation = next(self._generations)  # next() is atomic: no bump is lost
        for scopes in self.all_maps():
            scopes.clear()

    def desync(self) -> None:
        """Broadcasts may have been missed: drop everything and keep nothing until resynced."""
        self.synced = False
        self.clear()

    def resync(self) -> None:
        """Subscribed again: drop whatever was read while deaf, then cache again."""
        self.clear()
        self.synced = True

    def drop(self, scope: str) -> None:
        for scopes in self.all_maps():
            scopes.pop(scope, None)

    def drop_scopes(self, names: Iterable[str]) -> None:
        """How these scopes are served changed (a rollout began or ended here): drop them, and
        keep no load that began before (it may carry the old way)."""
        names = list(names)
        if not names:
            return
        self.generation = next(self._generations)  # before the drop, as in clear()
        for scopes in self.all_maps():
            for name in names:
                scopes.pop(name, None)

    def apply_change(
        self, scope: str, revision: int, sets: dict[str, Any], unsets: tuple[str, ...]
    ) -> str:
        """Apply one announced change in revision order; returns what happened to the cache.

        ``applied``: the direct successor of a cached state; ``old``: a duplicate or stale
        message, nothing changes; ``gap``: a revision was missed, the scope is dropped and the
        next read reloads it; ``absent``: nothing cached here.
        """
        self._raise_floor(scope, revision, heard=True)  # before the scan: see OptionsStore.state
        outcome = "absent"
        successors: dict[int, ScopeState] = {}
        for scopes in self.all_maps():
            state = scopes.get(scope)
            if state is None:
                continue
            if state.revision >= revision:
                outcome = "old"
            elif state.revision == revision - 1:
                # A new state object, swapped in whole: a reader never sees half a set_many.
                successor = successors.get(id(state))
                if successor is None:
                    values = dict(stored_values(state.values))
                    values.update(sets)
                    for key in unsets:
                        values.pop(key, None)
                    successor = successors[id(state)] = ScopeState(revision, values)
                scopes[scope] = successor
                outcome = "applied"
            else:
                scopes.pop(scope, None)
                outcome = "gap"
        return outcome

    def invalidate(self, scope: str, revision: int, *, claimed: bool = False) -> bool:
        """``revision`` of ``scope`` is committed: drop any state older than it and raise the
        floor, so the next read cannot settle for an older one (Redis behind included).
        ``claimed``: only a token says so, not yet confirmed (``retract_floor`` may take the
        floor back); it is not recorded as heard.

        Returns whether a cached state was dropped: this process had missed that change.
        """
        self._raise_floor(scope, revision, heard=not claimed)  # before the scan, as in apply_change
        dropped = False
        for scopes in self.all_maps():
            state = scopes.get(scope)
            if state is not None and state.revision < revision:
                # Only if it is still that state: a newer one may have been swapped in.
                if scopes.get(scope) is state:
                    scopes.pop(scope, None)
                dropped = True
        return dropped

    def retract_floor(self, scope: str, revision: int, to: int) -> None:
        """Take back a floor raised to ``revision`` on a claim the store did not confirm (a
        token it cannot serve), down to ``to``; unless something raised it further meanwhile.
        Never below a revision heard (a broadcast that came while the claimed floor stood
        could not raise it): a load older than that is still not cached."""
        floors = self.floors
        if floors.get(scope) == revision:
            to = max(to, self.heard.get(scope, 0))
            if to > 0:
                floors[scope] = to
            else:
                floors.pop(scope, None)

    def _raise_floor(self, scope: str, revision: int, *, heard: bool) -> None:
        floors = self.floors
        if len(floors) >= MAX_FLOORS:
            floors.clear()
            self.heard.clear()
        if floors.get(scope, 0) < revision:
            floors[scope] = revision
        if heard and self.heard.get(scope, 0) < revision:
            self.heard[scope] = revision

    def all_maps(self) -> Iterator[ScopeMap]:
        yield self._shared.scopes
        yield from self._registry.maps()
