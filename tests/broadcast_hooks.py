"""Fault injection for tests only, loaded into a worker with ``--include``: a reload message
for a change that sets a value starting with ``swallowed:`` is dropped on the way, and the
publish returns as if the broker had taken it (a publish into a dying connection). On a broker
that shares the cache's Redis the message rides on the cache script: there the script moves
the cache and publishes nothing."""

from __future__ import annotations

from tests.broadcast_faults import hook_broadcasts, sets_value_starting

SWALLOW_PREFIX = "swallowed:"


def _deliver(message: str) -> bool:
    return not sets_value_starting(SWALLOW_PREFIX, message)


hook_broadcasts(_deliver)
