"""Fault injection for tests only, loaded into a worker with ``--include``: the broadcast of a
change that sets a value starting with ``refused:`` raises, every time (a step that keeps
failing), so its outbox row stays unannounced. On a broker that shares the cache's Redis the
broadcast rides on the cache script: there the script is refused."""

from __future__ import annotations

from tests.broadcast_faults import hook_broadcasts, sets_value_starting

REFUSE_PREFIX = "refused:"


def _deliver(message: str) -> bool:
    if sets_value_starting(REFUSE_PREFIX, message):
        raise ConnectionError("the broker refused this broadcast (test fault)")
    return True


hook_broadcasts(_deliver)
