"""What a Redis server does at ``maxmemory``, and whether a Celery broker may live on it.

A Redis that evicts any key (``allkeys-*``) under memory pressure drops queued tasks and kombu's
exchange bindings without an error to anyone: writes are lost and broadcasts stop. The cache's
own keys may go (they are rebuilt from PostgreSQL), the broker's must not. ``noeviction`` (Redis
refuses writes when full, which the store treats as Redis down) and ``volatile-*`` (only keys
with a time to live: none of kombu's) are safe.
"""

from __future__ import annotations

from typing import Any

import redis

from store.errors import OptionsError

UNSAFE_FOR_BROKER = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


class BrokerEvicts(OptionsError):
    """The broker's Redis evicts any key under memory pressure: queued tasks would be lost."""


def eviction_policy(client: Any) -> str | None:
    """The server's ``maxmemory-policy``, or None where CONFIG is not allowed (a managed Redis,
    an ACL) and it cannot be known."""
    try:
        found = client.config_get("maxmemory-policy")
    except redis.RedisError:
        return None
    value = found.get("maxmemory-policy") if isinstance(found, dict) else None
    return value.decode() if isinstance(value, bytes) else value


def check_broker_policy(policy: str | None, *, where: str) -> None:
    """Refuse a broker on a Redis that evicts any key; ``where`` names it in the error."""
    if policy in UNSAFE_FOR_BROKER:
        raise BrokerEvicts(
            f"the broker's Redis ({where}) has maxmemory-policy {policy}: under memory pressure "
            "it would drop queued write tasks and kombu's bindings without an error. Set "
            "maxmemory-policy to noeviction (or a volatile-* policy) on that server, or give "
            "the broker a Redis of its own"
        )
