"""optionstore's read API and configuration; usable inside any Celery task or any process.

Importing it connects nothing and reads no setting: the first read (or write) configures the
process from the environment, unless ``configure()`` or ``worker.install()`` did it before.
"""

from __future__ import annotations

import functools

import kombu

from store.broadcast.codec import DEFAULT_MAX_MESSAGE_BYTES
from store.broadcast.publisher import publish_transport_options
from store.errors import (
    InvalidOption,
    MigrationError,
    NotConfigured,
    OptionsError,
    StoreUnavailable,
)
from store.layered import LayeredStore
from store.local import TASK
from store.model.validation import DEFAULT_MAX_VALUE_BYTES
from store.readers import GroupMeta, Options, ProjectOptions, TagKeys, UserOptions
from store.runtime import WEB, WORKER, Runtime
from store.settings import broker_connection_options

backend = LayeredStore()
runtime = Runtime(backend)

options = Options(backend)
project_options = ProjectOptions(backend)
user_options = UserOptions(backend)
group_meta = GroupMeta(backend)
tag_keys = TagKeys(backend)
# Declared options (store/model/registry.py): declare in code, or name a file in OPTIONS_REGISTRY.
registry = backend.registry


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
    broker_master_name: str | None = None,
    namespace: str = "optionstore",
    follow_broadcasts: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> LayeredStore:
    """Point this process at its services by hand; connections open lazily, after any fork.

    With ``broker_url``, every committed change is also broadcast on the reload exchange,
    through kombu's ``broker_transport`` if one is named, or the URL's own (TLS for ``rediss://``,
    ``broker_master_name`` for ``sentinel://``). With
    ``follow_broadcasts`` too, this process runs a reload consumer and caches only while it
    hears every change; without, its local cache is trusted until cleared. A change whose
    message would encode larger than ``max_message_bytes`` is broadcast as "reload this scope".
    """
    options = (
        {}
        if broker_url is None
        else broker_connection_options(broker_url, master_name=broker_master_name)
    )
    sentinel = options.pop("transport_options", {})
    # amqps://: the transport that checks the broker certificate's name (store/transport/amqps.py).
    tls_transport = options.pop("transport", None)
    connect = (
        None
        if broker_url is None
        else functools.partial(
            kombu.Connection,
            broker_url,
            transport=broker_transport or tls_transport,
            connect_timeout=2,
            transport_options={**publish_transport_options(broker_url), **sentinel},
            **options,
        )
    )
    follow = (
        functools.partial(
            kombu.Connection,
            broker_url,
            transport=tls_transport,
            connect_timeout=2,
            heartbeat=10,
            transport_options=dict(sentinel),
            **options,
        )
        if broker_url is not None and follow_broadcasts
        else None
    )
    return runtime.configure(
        database_url=database_url,
        redis_url=redis_url,
        local_cache=local_cache,
        max_value_bytes=max_value_bytes,
        grace_period=grace_period,
        pool_max_size=pool_max_size,
        namespace=namespace,
        publish=connect,
        follow=follow,
        max_message_bytes=max_message_bytes,
    )


def clear_local_cache() -> None:
    """Forget every locally cached scope in this process (what ``task_postrun`` does per task)."""
    backend.local.clear()


__all__ = [
    "WEB",
    "WORKER",
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
    "registry",
    "runtime",
    "tag_keys",
    "user_options",
]
