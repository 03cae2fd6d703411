"""Fault injection for tests only, loaded into a worker with ``--include``: a reload message
for a change that sets a value starting with ``swallowed:`` is dropped on the way, and the
publish returns as if the broker had taken it (a publish into a dying connection). On a broker
that shares the cache's Redis the message rides on the cache script: there the script moves
the cache and publishes nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from store.broadcast import Publisher
from store.redis_cache import RedisCache
from tests.fault_values import sets_value_starting

SWALLOW_PREFIX = "swallowed:"

_send = Publisher._send
_cache_apply = RedisCache.apply


def _swallowing_send(self: Publisher, text: str) -> None:
    if not sets_value_starting(SWALLOW_PREFIX, text):
        _send(self, text)


def _swallowing_cache_apply(
    self: RedisCache,
    scope: str,
    revision: int,
    changes: Mapping[str, str | None],
    *,
    announce: tuple[Sequence[str], str] | None = None,
) -> Any:
    if announce is not None and sets_value_starting(SWALLOW_PREFIX, announce[1]):
        announce = None
    return _cache_apply(self, scope, revision, changes, announce=announce)


Publisher._send = _swallowing_send  # type: ignore[method-assign]
RedisCache.apply = _swallowing_cache_apply  # type: ignore[method-assign]
