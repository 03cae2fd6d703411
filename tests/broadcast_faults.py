"""What the fault-injection modules loaded into test workers (``--include``) share: hooks on
every way a reload message leaves a process, and a look at the values a message sets."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from store.broadcast.publisher import Publisher
from store.redis.cache import RedisCache


def sets_value_starting(prefix: str, message: str) -> bool:
    """Whether a reload message (its JSON text, or kombu's message on Redis around it) sets a
    string value that starts with ``prefix``."""
    body = json.loads(message)
    if "body" in body and "properties" in body:
        body = json.loads(base64.b64decode(body["body"]))
    values = body.get("set") or {}
    return any(isinstance(v, str) and v.startswith(prefix) for v in values.values())


def hook_broadcasts(deliver: Callable[[str], bool]) -> None:
    """Pass every reload message this process sends through ``deliver`` first: False drops it
    as if the broker had taken it, an exception refuses it. Both ways are hooked: the
    publisher's own publish, and the cache script that publishes on a Redis broker it shares."""
    send = Publisher._send
    cache_apply = RedisCache.apply

    def hooked_send(self: Publisher, text: str, *rest: Any) -> None:
        if deliver(text):
            send(self, text, *rest)

    def hooked_cache_apply(
        self: RedisCache,
        scope: str,
        revision: int,
        changes: Mapping[str, str | None],
        *,
        announce: tuple[Sequence[str], str] | None = None,
        **recorded: Any,
    ) -> Any:
        if announce is not None and not deliver(announce[1]):
            announce = None  # the cache moves; nothing is published
        return cache_apply(self, scope, revision, changes, announce=announce, **recorded)

    Publisher._send = hooked_send  # type: ignore[method-assign]
    RedisCache.apply = hooked_cache_apply  # type: ignore[method-assign]
