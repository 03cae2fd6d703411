"""Fault injection for tests only, loaded into a worker with ``--include``: the broadcast of a
change that sets a value starting with ``refused:`` raises, every time (a step that keeps
failing), so its outbox row stays unannounced."""

from __future__ import annotations

from typing import Any

from store.broadcast import Publisher

REFUSE_PREFIX = "refused:"

_send = Publisher._send


def _refusing_send(self: Publisher, body: dict[str, Any]) -> None:
    values = body.get("set") or {}
    if any(isinstance(v, str) and v.startswith(REFUSE_PREFIX) for v in values.values()):
        raise ConnectionError("the broker refused this broadcast (test fault)")
    _send(self, body)


Publisher._send = _refusing_send  # type: ignore[method-assign]
