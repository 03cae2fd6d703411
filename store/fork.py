"""What a child process redoes right after a fork: fresh locks, no inherited threads or clients."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any


def after_fork_in_child(method: Callable[[], Any]) -> None:
    """Call ``method`` (a bound method) in every child forked from now on, before it runs on.

    A lock the parent held at the fork stays held forever in the child, and a client's socket
    would be shared by two processes: an object that owns either replaces them here, the way
    ``threading`` and redis-py's pools do. The interpreter keeps the hook (in registration
    order); the object is held weakly, so one that is gone needs nothing redone.
    """
    ref = weakref.WeakMethod(method)

    def renew() -> None:
        found = ref()
        if found is not None:
            found()

    os.register_at_fork(after_in_child=renew)
