"""optionstore's read API and configuration; usable inside any Celery task."""

from __future__ import annotations

from store.broadcast import DEFAULT_MAX_MESSAGE_BYTES, Publisher
from store.errors import (
    InvalidOption,
    MigrationError,
    NotConfigured,
    OptionsError,
    StoreUnavailable,
)
from store.layered import LayeredStore
from store.local import TASK
from store.postgres import PostgresStore
from store.readers import GroupMeta, Options, ProjectOptions, TagKeys, UserOptions
from store.redis_cache import RedisCache
from store.validation import DEFAULT_MAX_VALUE_BYTES

backend = LayeredStore()

options = Options(backend)
project_options = ProjectOptions(backend)
user_options = UserOptions(backend)
group_meta = GroupMeta(backend)
tag_keys = TagKeys(backend)


def configure(
    *,
    database_url: str,
    redis_url: str | None,
    local_cache: str = TASK,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    grace_period: float = 300.0,
    pool_max_size: int = 8,
    broker_url: str | None = None,
    broker_transport: str | None = None,
    namespace: str = "optionstore",
    skip_announce: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> LayeredStore:
    """Point this process at its services; connections open lazily, after any fork.

    With ``broker_url``, every committed change is also broadcast on the reload exchange,
    through kombu's ``broker_transport`` if one is named (the worker names worker/broker.py's
    on a Redis broker) or the URL's own. A change whose message would encode larger than
    ``max_message_bytes`` is broadcast as "reload this scope".
    """
    publisher = (
        None
        if broker_url is None
        else Publisher(
            broker_url=broker_url,
            namespace=namespace,
            transport=broker_transport,
            max_message_bytes=max_message_bytes,
        )
    )
    backend.publisher = publisher
    backend.configure(
        announcers=[] if publisher is None else [publisher.announce],
        skip_announce=skip_announce,
        postgres=PostgresStore(conninfo=database_url, max_size=pool_max_size),
        redis_cache=None if redis_url is None else RedisCache(url=redis_url, prefix=namespace),
        local_cache=local_cache,
        max_value_bytes=max_value_bytes,
        grace_period=grace_period,
    )
    return backend


def clear_local_cache() -> None:
    """Forget every locally cached scope in this process (what ``task_postrun`` does per task)."""
    backend.local.clear()


__all__ = [
    "InvalidOption",
    "MigrationError",
    "NotConfigured",
    "OptionsError",
    "StoreUnavailable",
    "backend",
    "clear_local_cache",
    "configure",
    "group_meta",
    "options",
    "project_options",
    "tag_keys",
    "user_options",
]
