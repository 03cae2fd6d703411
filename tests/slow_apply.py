"""Fault injection for tests only, loaded into a worker with ``--include``: a reload message for
a change that sets a value starting with ``slow:`` is applied 10 ms late in every process that
receives it, as a busy host's consumer thread would. It makes the window between a write task
returning and another process applying its broadcast wide enough to observe every time."""

from __future__ import annotations

import time

from store.broadcast.codec import CHANGE, ReloadMessage
from store.options_store import OptionsStore

SLOW_PREFIX = "slow:"
DELAY = 0.01

_apply_message = OptionsStore.apply_message


def _late(self: OptionsStore, message: ReloadMessage) -> str:
    if message.kind == CHANGE and any(
        isinstance(value, str) and value.startswith(SLOW_PREFIX) for value in message.sets.values()
    ):
        time.sleep(DELAY)
    return _apply_message(self, message)


OptionsStore.apply_message = _late  # type: ignore[method-assign]
