"""Fault injection for tests only, loaded into a worker with ``--include``: the broadcast of a
change that sets a value starting with ``refused:`` raises, every time (a step that keeps
failing), so its outbox row stays unannounced."""

from __future__ import annotations

import json

from store.broadcast import Publisher

REFUSE_PREFIX = "refused:"

_send = Publisher._send


def _refusing_send(self: Publisher, text: str) -> None:
    values = json.loads(text).get("set") or {}
    if any(isinstance(v, str) and v.startswith(REFUSE_PREFIX) for v in values.values()):
        raise ConnectionError("the broker refused this broadcast (test fault)")
    _send(self, text)


Publisher._send = _refusing_send  # type: ignore[method-assign]
