"""Fault injection for tests only, loaded into a worker with ``--include``: a reload message
for a change that sets a value starting with ``swallowed:`` is dropped on the way, and the
publish returns as if the broker had taken it (a publish into a dying connection)."""

from __future__ import annotations

import json

from store.broadcast import Publisher

SWALLOW_PREFIX = "swallowed:"

_send = Publisher._send


def _swallowing_send(self: Publisher, text: str) -> None:
    values = json.loads(text).get("set") or {}
    if any(isinstance(v, str) and v.startswith(SWALLOW_PREFIX) for v in values.values()):
        return
    _send(self, text)


Publisher._send = _swallowing_send  # type: ignore[method-assign]
