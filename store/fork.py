"""What a child process redoes right after a fork: fresh locks, no inherited threads or clients."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

# Bound methods, held weakly: an object that is gone needs nothing redone.
_callbacks: list[weakref.WeakMethod[Callable[[], Any]]] = []
_registered = False
_guard = threading.Lock()


def after_fork_in_child(method: Callable[[], Any]) -> None:
    """Call ``method`` (a bound method) in every child forked from now on, before it runs on.

    A lock the parent held at the fork stays held forever in the child, and a client's socket
    would be shared by two processes: an object that owns either replaces them here, the way
    ``threading`` and redis-py's pools do.
    """
    global _registered  # noqa: PLW0603 (one process-wide registration with os.register_at_fork)
    with _guard:
        _callbacks.append(weakref.WeakMethod(method))
        if not _registered:
            os.register_at_fork(after_in_child=_run)
            _registered = True


def _run() -> None:
    global _guard  # noqa: PLW0603 (the parent may have held it at the fork)
    _guard = threading.Lock()
    alive = []
    for ref in _callbacks:
        method = ref()
        if method is not None:
            method()
            alive.append(ref)
    _callbacks[:] = alive
