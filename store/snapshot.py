"""``Snapshot``: one consistent view of the scopes a task (or a request) reads, kept for as long
as it runs, whatever broadcasts arrive meanwhile; and each thread's current one."""

from __future__ import annotations

import threading
from types import TracebackType

from store.local import ScopeMap, ScopeState
from store.options_store import OptionsStore
from store.readers import GroupMeta, Options, ProjectOptions, TagKeys, UserOptions


class _Pinned:
    """What the readers ask of a local cache, for a snapshot: one map, which only grows."""

    __slots__ = ("scopes",)

    def __init__(self, scopes: ScopeMap) -> None:
        self.scopes = scopes

    @property
    def shared(self) -> ScopeMap:
        return self.scopes

    @property
    def holder(self) -> _Pinned:
        return self


class Snapshot:
    """The read API (``options``, ``project_options``, ``user_options``, ``group_meta``,
    ``tag_keys``) over states pinned on first read: each scope is read through the store once
    (local cache, Redis, PostgreSQL, as any read), and every later read of it in this snapshot
    returns that same state. Scopes are pinned one by one, as they are first read: two scopes
    read at different moments may come from different moments. Meant for one thread."""

    def __init__(self, store: OptionsStore, *, owner: Snapshots | None = None) -> None:
        self._store = store
        self._owner = owner
        self._entered = False
        self.registry = store.registry
        self._pinned = ScopeMap(store.registry.defaults)
        self.local = _Pinned(self._pinned)
        # The readers take this object where they take the store: they find the pinned map
        # as its local cache, and state()/states() below on a miss.
        self.options = Options(self)
        self.project_options = ProjectOptions(self)
        self.user_options = UserOptions(self)
        self.group_meta = GroupMeta(self)
        self.tag_keys = TagKeys(self)

    def state(self, scope: str) -> ScopeState:
        state = self._pinned.get(scope)
        if state is None:
            state = self._store.state(scope)
            self._pinned[scope] = state
        return state

    def states(self, names: list[str]) -> dict[str, ScopeState]:
        missing = [name for name in names if name not in self._pinned]
        if missing:
            for name, state in self._store.states(missing).items():
                self._pinned[name] = state
        return {name: self._pinned[name] for name in names if name in self._pinned}

    @property
    def scopes(self) -> list[str]:
        """The scopes pinned so far."""
        return sorted(self._pinned)

    def __enter__(self) -> Snapshot:
        owner = self._owner
        if owner is not None and owner.current is None:
            owner.current = self
            self._entered = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._entered and self._owner is not None and self._owner.current is self:
            self._owner.current = None
        self._entered = False


class Snapshots(threading.local):
    """Each thread's current snapshot: the running task's (from its first ``store.snapshot()``
    to its end), or the one a ``with store.snapshot():`` block opened."""

    def __init__(self) -> None:
        self.current: Snapshot | None = None
        self.depth = 0  # tasks running in this thread (a task may run another eagerly)

    def open(self, store: OptionsStore) -> Snapshot:
        current = self.current
        if current is not None:
            return current
        snapshot = Snapshot(store, owner=self)
        if self.depth:
            self.current = snapshot  # held until the task ends
        return snapshot

    def begin_task(self) -> None:
        if self.depth == 0:
            self.current = None
        self.depth += 1

    def end_task(self) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self.current = None
