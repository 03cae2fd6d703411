"""Fault injection for tests only, loaded into a worker with ``--include``: a reload message for
a change that sets a value starting with ``held:`` is never applied in this process (nor
reported as applied), as a process whose consumer is stuck would be: the convergence panels
name it as a straggler."""

from __future__ import annotations

from store.broadcast.codec import CHANGE, ReloadMessage
from store.broadcast.consumer import ReloadConsumer

HELD_PREFIX = "held:"

_on_reload = ReloadConsumer._on_reload


def _held_back(self: ReloadConsumer, reload: ReloadMessage) -> None:
    if reload.kind == CHANGE and any(
        isinstance(value, str) and value.startswith(HELD_PREFIX) for value in reload.sets.values()
    ):
        return
    _on_reload(self, reload)


ReloadConsumer._on_reload = _held_back  # type: ignore[method-assign]
