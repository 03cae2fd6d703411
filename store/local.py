"""The process-local option cache: scope -> decoded values, per thread or per process."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

from store.postgres import Snapshot
from store.validation import decode_value

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
    def from_snapshot(cls, snapshot: Snapshot) -> ScopeState:
        return cls(snapshot.revision, {k: decode_value(v) for k, v in snapshot.values.items()})

    def sorted_keys(self) -> list[str]:
        if self._sorted_keys is None:
            self._sorted_keys = sorted(self.values)
        return list(self._sorted_keys)


class _Holder:
    scopes: dict[str, ScopeState]


class _ThreadHolder(threading.local):
    def __init__(
        self, registry: weakref.WeakKeyDictionary[threading.Thread, dict[str, ScopeState]]
    ) -> None:
        self.scopes: dict[str, ScopeState] = {}
        # Remembered so code outside this thread (a broadcast) can reach every thread's cache.
        registry[threading.current_thread()] = self.scopes


class LocalCache:
    """Scope states kept in this process.

    In ``task`` mode each thread has its own map, cleared when its task ends, so a threads-pool
    worker finishing one task never empties the cache another running task is reading (the seed
    kept its caches per thread for the same reason). In ``process`` mode one map serves every
    thread and only broadcasts change it.
    """

    def __init__(self, mode: str = TASK) -> None:
        self._registry: weakref.WeakKeyDictionary[threading.Thread, dict[str, ScopeState]] = (
            weakref.WeakKeyDictionary()
        )
        self._shared = _Holder()
        self._shared.scopes = {}
        self._threads = _ThreadHolder(self._registry)
        self.mode = TASK
        self.holder: _Holder | _ThreadHolder = self._threads
        self.set_mode(mode)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"local cache mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.holder = self._threads if mode == TASK else self._shared

    @property
    def scopes(self) -> dict[str, ScopeState]:
        return self.holder.scopes

    def end_task(self) -> None:
        """A task finished: in task mode its thread starts the next task empty."""
        if self.mode == TASK:
            self._threads.scopes.clear()

    def clear(self) -> None:
        """Drop everything this process holds, in every thread."""
        for scopes in self.all_maps():
            scopes.clear()

    def drop(self, scope: str) -> None:
        for scopes in self.all_maps():
            scopes.pop(scope, None)

    def all_maps(self) -> Iterator[dict[str, ScopeState]]:
        yield self._shared.scopes
        yield from list(self._registry.values())
