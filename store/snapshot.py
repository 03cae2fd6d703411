"""``Snapshot``: one consistent view of the scopes a task (or a request) reads, kept for as long
as it runs, whatever broadcasts arrive meanwhile; and each context's current one (a thread's,
an asyncio task's)."""

from __future__ import annotations

from contextvars import ContextVar
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
        if self._owner is not None:
            self._owner.enter(self)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._owner is not None:
            self._owner.leave(self)


class Snapshots:
    """Each context's current snapshot: the running task's (from its first ``store.snapshot()``
    to its end), or the one a ``with store.snapshot():`` block opened.

    Held in context variables, not per thread: every thread has its own context (so each
    worker thread of a threads pool, each prefork child and a solo worker run one task per
    context), and so does every asyncio task, so requests of an async web app interleaving on
    one event-loop thread never see one another's snapshot (a task started inside a block
    inherits it, as it inherits any context variable)."""

    def __init__(self) -> None:
        # One instance per process (store.snapshots); a context holds its variables strongly,
        # so they are made once per instance, never per call.
        self._current: ContextVar[Snapshot | None] = ContextVar(
            "optionstore_snapshot", default=None
        )
        # ``with`` blocks open on the current snapshot in this context (they nest).
        self._blocks: ContextVar[int] = ContextVar("optionstore_snapshot_blocks", default=0)
        # Tasks running in this context (a task may run another eagerly).
        self._depth: ContextVar[int] = ContextVar("optionstore_task_depth", default=0)

    @property
    def current(self) -> Snapshot | None:
        return self._current.get()

    @current.setter
    def current(self, snapshot: Snapshot | None) -> None:
        self._current.set(snapshot)

    @property
    def depth(self) -> int:
        return self._depth.get()

    def open(self, store: OptionsStore) -> Snapshot:
        current = self._current.get()
        if current is not None:
            return current
        snapshot = Snapshot(store, owner=self)
        if self._depth.get():
            self._current.set(snapshot)  # held until the task ends
        return snapshot

    def enter(self, snapshot: Snapshot) -> None:
        """A ``with`` block on ``snapshot`` begins: it becomes the current one if there is
        none; a block on the current one (nested) is counted; another snapshot's changes
        nothing."""
        current = self._current.get()
        if current is None:
            self._current.set(snapshot)
            self._blocks.set(1)
        elif current is snapshot:
            self._blocks.set(self._blocks.get() + 1)

    def leave(self, snapshot: Snapshot) -> None:
        """A ``with`` block on ``snapshot`` ends: the last one open on the current snapshot
        ends it, unless a task holds it (until the task ends)."""
        blocks = self._blocks.get()
        if self._current.get() is not snapshot or blocks == 0:
            return
        self._blocks.set(blocks - 1)
        if blocks == 1 and self._depth.get() == 0:
            self._current.set(None)

    def begin_task(self) -> None:
        depth = self._depth.get()
        if depth == 0:
            self._current.set(None)
            self._blocks.set(0)
        self._depth.set(depth + 1)

    def end_task(self) -> None:
        depth = max(0, self._depth.get() - 1)
        self._depth.set(depth)
        if depth == 0:
            self._current.set(None)
            self._blocks.set(0)
