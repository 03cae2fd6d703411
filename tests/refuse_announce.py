"""Fault injection for tests only, loaded into a worker with ``--include``: the broadcast of a
change that sets a value starting with ``refused:`` raises, every time (a step that keeps
failing), so its outbox row stays unannounced. On a broker that shares the cache's Redis the
broadcast rides on the cache script: there the script is refused."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from store.broadcast import Publisher
from store.redis_cache import RedisCache
from tests.fault_values import sets_value_starting

REFUSE_PREFIX = "refused:"

_send = Publisher._send
_cache_apply = RedisCache.apply


def _refusing_send(self: Publisher, text: str) -> None:
    if sets_value_starting(REFUSE_PREFIX, text):
        raise ConnectionError("the broker refused this broadcast (test fault)")
    _send(self, text)


def _refusing_cache_apply(
    self: RedisCache,
    scope: str,
    revision: int,
    changes: Mapping[str, str | None],
    *,
    announce: tuple[Sequence[str], str] | None = None,
) -> Any:
    if announce is not None and sets_value_starting(REFUSE_PREFIX, announce[1]):
        raise ConnectionError("the broker refused this broadcast (test fault)")
    return _cache_apply(self, scope, revision, changes, announce=announce)


Publisher._send = _refusing_send  # type: ignore[method-assign]
RedisCache.apply = _refusing_cache_apply  # type: ignore[method-assign]
