"""The reload exchange and a process's own queue on it: what publishers and consumers agree on."""

from __future__ import annotations

import kombu


def reload_exchange(namespace: str) -> kombu.Exchange:
    # Transient: reload messages are worthless once every process has moved on.
    return kombu.Exchange(f"{namespace}.reload", type="fanout", durable=False, auto_delete=False)


def reload_queue(namespace: str, name: str) -> kombu.Queue:
    """This process's own queue: exclusive and auto-deleted, so it dies with the connection."""
    return kombu.Queue(
        f"{namespace}.reload.{name}",
        exchange=reload_exchange(namespace),
        routing_key="",  # on Redis a non-empty key changes the pub/sub topic: both sides use ''
        durable=False,
        exclusive=True,
        auto_delete=True,
        no_ack=True,
    )
