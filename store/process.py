"""``StoreProcess``: the one owner of optionstore's lifecycle in a process: its configuration
(explicit, or from the environment on first use), its reload consumer, and what a forked child
starts again."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import kombu

from store.broadcast.codec import DEFAULT_MAX_MESSAGE_BYTES
from store.broadcast.consumer import ReloadConsumer
from store.broadcast.publisher import Publisher, publish_transport_options
from store.broadcast.relay import HostRelay
from store.broadcast.relayed import RelayedConsumer
from store.events import log, set_output
from store.fork import after_fork_in_child
from store.local import PROCESS, TASK
from store.model.registry import Registry
from store.model.validation import (
    DEFAULT_MAX_SCOPE_BYTES,
    DEFAULT_MAX_SCOPE_KEYS,
    DEFAULT_MAX_VALUE_BYTES,
)
from store.options_store import DEFAULT_CATCH_UP_WAIT, OptionsStore
from store.postgres.store import PostgresStore
from store.redis.cache import RedisCache
from store.redis.presence import Presence
from store.settings import Settings, broker_connection_options
from store.signing.keys import Keyring

WORKER = "worker"
# Any process that reads options and is not a Celery worker: a web server, a script, a shell.
WEB = "web"

Connect = Callable[[], kombu.Connection]
# The keyring of a process nothing configured yet: resolved from its settings on first use.
_UNRESOLVED: Any = object()


def broker_connections(
    url: str, *, master_name: str | None = None, transport: str | None = None
) -> tuple[Connect, Connect]:
    """Connection factories for announcing changes and for following them, on ``url``: TLS for
    ``rediss://`` (kombu's own transport would default to not verifying the certificate), the
    transport that checks the certificate's name for ``amqps://``, the master's name for
    ``sentinel://``."""
    options = broker_connection_options(url, master_name=master_name)
    sentinel = options.pop("transport_options", {})
    tls_transport = options.pop("transport", None)
    publish = functools.partial(
        kombu.Connection,
        url,
        transport=transport or tls_transport,
        connect_timeout=2,
        transport_options={**publish_transport_options(url), **sentinel},
        **options,
    )
    follow = functools.partial(
        kombu.Connection,
        url,
        transport=tls_transport,
        connect_timeout=2,
        heartbeat=10,
        transport_options=dict(sentinel),
        **options,
    )
    return publish, follow


class StoreProcess:
    """Owns the store's lifecycle in one process.

    The store is configured explicitly (``store.configure``; ``worker.install`` when a worker
    starts) or, the first time anything reads or writes, from the environment, or from the app
    handed to ``worker.install`` in this process (``provide``). A process that follows
    broadcasts reads through Redis and PostgreSQL, caching nothing, until its reload consumer's
    hello has come back; the consumer starts on the first such read (or when a worker process
    starts) and again in every child forked afterwards.
    """

    def __init__(self) -> None:
        self.store = OptionsStore(lifecycle=self)
        self.kind = WEB
        self.pool = "-"
        self.namespace = "optionstore"
        self._provider: Callable[[], None] | None = None
        self._provided_settings: Callable[[], Settings] | None = None
        # The Celery app the write-task helpers send through: the last one they were registered
        # on (tasks.register).
        self.task_app: Any = None
        self._settings: Settings | None = None
        self._follow: Connect | None = None
        self._max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self._keyring: Keyring | None = _UNRESOLVED
        self._consumer: ReloadConsumer | None = None
        # In a prefork worker's main process: the relay its children follow. In a child of
        # one: where that relay listens, and its owner's pid.
        self._relay: HostRelay | None = None
        self._relay_path: str | None = None
        self._relay_pid = 0
        # Other Redis connection pools of this process a relayed child gives back when idle
        # (the worker's result backend's: worker/install.py).
        self._idle_pools: list[Any] = []
        # Whether this process's threads take turns on one Redis connection (runs_no_tasks).
        self._takes_turns = False
        self._lock = threading.RLock()
        after_fork_in_child(self._after_fork)

    # -- configuration ----------------------------------------------------------------------

    # The keywords of store.configure, less the broker's (turned into ``publish``/``follow``):
    # spelled out again so each layer's signature says what it takes.
    def configure(
        self,
        *,
        database_url: str,
        redis_url: str | None,
        local_cache: str = TASK,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        grace_period: float = 300.0,
        pool_max_size: int = 8,
        namespace: str = "optionstore",
        publish: Connect | None = None,
        follow: Connect | None = None,
        kind: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_scope_keys: int = DEFAULT_MAX_SCOPE_KEYS,
        max_scope_bytes: int = DEFAULT_MAX_SCOPE_BYTES,
        keyring: Keyring | None = None,
        catch_up_wait: float = DEFAULT_CATCH_UP_WAIT,
    ) -> OptionsStore:
        """Point this process at its services; connections open lazily, after any fork.

        ``publish`` opens a broker connection for announcing committed changes; ``follow`` one
        for this process's reload consumer. Without ``follow`` the local cache is trusted as
        it is (what a test or a single process that clears it itself wants). ``keyring`` signs
        what this process publishes (its write tasks too) and checks what it receives; None:
        signing is off.
        """
        store = self.store
        with self._lock:
            self._stop_consumer()
            if store.publisher is not None:
                store.publisher.close()
            self._keyring = keyring
            self._max_message_bytes = max_message_bytes
            publisher = (
                None
                if publish is None
                else Publisher(
                    connect=publish,
                    namespace=namespace,
                    max_message_bytes=max_message_bytes,
                    keyring=keyring,
                )
            )
            cache = None if not redis_url else RedisCache(url=redis_url, prefix=namespace)
            if cache is not None and self._takes_turns:
                cache.take_turns()
            store.configure(
                publisher=publisher,
                postgres=PostgresStore(
                    conninfo=database_url,
                    max_size=pool_max_size,
                    max_scope_keys=max_scope_keys,
                    max_scope_bytes=max_scope_bytes,
                ),
                redis_cache=cache,
                local_cache=local_cache,
                max_value_bytes=max_value_bytes,
                grace_period=grace_period,
                catch_up_wait=catch_up_wait,
            )
            self.namespace = namespace
            if kind is not None:
                self.kind = kind
            self._follow = follow
            if follow is not None:
                # Nothing is cached until the consumer proves it hears every change.
                store.local.desync()
        return store

    def configure_from(
        self, settings: Settings, *, publish: Connect, follow: Connect | None, kind: str
    ) -> OptionsStore:
        """Configure from resolved settings (the embedded servers start here if they are the
        default). A process that runs no tasks has no task boundary to clear its cache at: it
        keeps one map for all its threads, moved on by broadcasts (process mode)."""
        self._settings = settings
        set_output(level=settings.log_level, log_format=settings.log_format)
        return self.configure(
            database_url=settings.database_url,
            redis_url=settings.redis_url,
            local_cache=settings.local_cache if kind == WORKER else PROCESS,
            max_value_bytes=settings.max_value_bytes,
            namespace=settings.namespace,
            publish=publish,
            follow=follow,
            kind=kind,
            max_message_bytes=settings.max_message_bytes,
            max_scope_keys=settings.max_scope_keys,
            max_scope_bytes=settings.max_scope_bytes,
            keyring=settings.keyring,
            catch_up_wait=settings.catch_up_wait,
        )

    def provide(
        self,
        provider: Callable[[], None] | None,
        *,
        settings: Callable[[], Settings] | None = None,
    ) -> None:
        """Use ``provider`` instead of the environment if this process configures on first use,
        and ``settings`` as this process's settings until then (a producer that never reads
        signs its write tasks with the app's key)."""
        self._provider = provider
        self._provided_settings = settings

    def ensure_configured(self) -> None:
        """Configure from the provider or the environment, unless already configured."""
        if self.store.postgres is not None:
            return
        with self._lock:
            if self.store.postgres is None:
                (self._provider or self._configure_from_environment)()

    def _configure_from_environment(self) -> None:
        settings = self.settings()
        publish, follow = broker_connections(
            settings.broker_url, master_name=settings.broker_master_name
        )
        self.configure_from(settings, publish=publish, follow=follow, kind=WEB)
        log.info("store.configured", source="environment", kind=WEB, pid=os.getpid())

    def settings(self) -> Settings:
        """The settings this process was configured from, else the environment's (read once;
        reading them starts no server)."""
        if self._settings is None:
            provided = self._provided_settings
            self._settings = Settings.from_environ() if provided is None else provided()
        return self._settings

    def keyring(self) -> Keyring | None:
        """The keys this process signs and verifies with: those it was configured with, else
        its settings' (the environment's, resolved on first use); None: signing is off."""
        if self._keyring is _UNRESOLVED:
            with self._lock:
                if self._keyring is _UNRESOLVED:
                    self._keyring = self.settings().keyring
        keyring: Keyring | None = self._keyring
        return keyring

    def load_registry(self, registry: Registry) -> None:
        """The registry resolves on its first use, from the settings this process runs with."""
        settings = self.settings()
        if settings.registry_path:
            registry.load(settings.registry_path, strict=settings.registry_strict)
        else:
            registry.strict_override = settings.registry_strict

    def max_value_bytes(self) -> int:
        """The value size limit in force here, before anything is configured too."""
        if self.store.postgres is not None:
            return self.store.max_value_bytes
        return self.settings().max_value_bytes

    # -- the reload consumer ----------------------------------------------------------------

    def ensure_following(self) -> None:
        """Start this process's reload consumer if it follows broadcasts and has none running."""
        consumer = self._consumer
        if self._follow is None or (consumer is not None and consumer.is_alive()):
            return
        self.start_consumer()

    def check_heard(self) -> None:
        """Before a task: a process whose consumer has heard nothing past its deadline (paused)
        reads through Redis and PostgreSQL until it hears again."""
        consumer = self._consumer
        if consumer is not None:
            consumer.check_heard()

    def open_relay(self) -> HostRelay | None:
        """In a prefork worker's main process, before the pool forks: the socket its children
        will follow the reload exchange through (``start_consumer`` then subscribes for all of
        them). None if this process follows no broadcasts."""
        with self._lock:
            if self._follow is None:
                return None
            if self._relay is None:
                self._relay = HostRelay(
                    presence=self._presence(), hostname=socket.gethostname(), pool=self.pool
                )
                self._relay.start()
            return self._relay

    def runs_no_tasks(self) -> None:
        """This process forks the pool and runs no task itself (a prefork worker's main
        process): its threads take turns on one Redis connection, from now on and after any
        later ``configure``. A child forked afterwards, which runs tasks, shares a pool
        again. Called before the process's threads start."""
        with self._lock:
            self._takes_turns = True
            cache = self.store.redis
            if cache is not None:
                cache.take_turns()

    def give_back_when_idle(self, pool: Any) -> None:
        """Have this process's relayed consumer disconnect ``pool``'s idle connections (a
        redis-py pool) as it does its cache's, once nothing has read for a while."""
        self._idle_pools.append(pool)

    def _presence(self) -> Presence | None:
        cache = self.store.redis
        return None if cache is None else Presence(cache.client, namespace=self.namespace)

    def start_consumer(self) -> ReloadConsumer | None:
        """This process's reload consumer, started once (None if it follows no broadcasts):
        in a relay's owner, the one subscription of its host, which reports nothing itself;
        in a child of one, a consumer of that relay."""
        with self._lock:
            if self._follow is None:
                return None
            if self._consumer is not None and self._consumer.is_alive():
                return self._consumer
            common: dict[str, Any] = {
                "backend": self.store,
                "connect": self._follow,
                "namespace": self.namespace,
                "kind": self.kind,
                "pool": self.pool,
                "keyring": self.keyring(),
                "max_message_bytes": self._max_message_bytes,
            }
            consumer: ReloadConsumer
            if self._relay is not None:
                consumer = ReloadConsumer(presence=None, relay=self._relay, **common)
                self._relay.start()
            elif self._relay_path is not None:
                consumer = RelayedConsumer(
                    relay_path=self._relay_path,
                    relay_pid=self._relay_pid,
                    idle_pools=self._idle_pools,
                    presence=self._presence(),
                    **common,
                )
            else:
                consumer = ReloadConsumer(presence=self._presence(), **common)
            # Unsynced before the thread runs: a read in between must not cache.
            self.store.local.desync()
            consumer.start()
            self._consumer = consumer
            return consumer

    def stop(self) -> None:
        """Stop this process's consumer and remove its report (best effort: reports expire),
        and mark the commits it announced that no write has marked yet (else the relay
        announces them once more)."""
        with self._lock:
            self._stop_consumer()
            relay, self._relay = self._relay, None
        if relay is not None:
            relay.stop()
        if self.store.postgres is not None:
            self.store.postgres.marks.close()

    def _stop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None or not consumer.is_alive():
            return
        consumer.stop()
        if consumer.presence is not None:
            with contextlib.suppress(Exception):
                consumer.presence.remove(consumer.hostname, consumer.pid)

    def _after_fork(self) -> None:
        # The consumer thread did not come along, and the parent may have held the lock.
        self._lock = threading.RLock()
        self._consumer = None
        self._takes_turns = False
        if self.store.redis is not None:
            self.store.redis.share_connections()
        if self._relay is not None:
            # Its sockets are closed by its own hook; the child follows it by its path.
            self._relay_path, self._relay_pid = self._relay.path, self._relay.pid
            self._relay = None
        if self._follow is not None:
            self.store.local.desync()
