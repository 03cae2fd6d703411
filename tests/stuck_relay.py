"""Fault injection for tests only, loaded into a worker with ``--include``: in a main process
that relays the exchange to its children, a change setting a value that starts with ``stuck:``
holds the consumer thread for STUCK seconds before it forwards anything, as a consumer stuck in
a call would; the relay's own thread keeps the children's stream alive meanwhile."""

from __future__ import annotations

import time

from store.broadcast.codec import CHANGE, ReloadMessage
from store.broadcast.consumer import ReloadConsumer

STUCK_PREFIX = "stuck:"
STUCK = 15.0

_on_reload = ReloadConsumer._on_reload


def _stuck(self: ReloadConsumer, reload: ReloadMessage) -> None:
    if (
        self.relay is not None
        and reload.kind == CHANGE
        and any(
            isinstance(value, str) and value.startswith(STUCK_PREFIX)
            for value in reload.sets.values()
        )
    ):
        time.sleep(STUCK)
    _on_reload(self, reload)


ReloadConsumer._on_reload = _stuck  # type: ignore[method-assign]
