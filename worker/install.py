"""``install(app)``: makes any Celery app an optionstore app, and owns what that sets up."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import kombu
import structlog
from celery import bootsteps
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_process_shutdown

import store
import tasks
from store.broadcast.codec import Publisher, publish_transport_options
from store.events import log
from store.metrics import metrics
from store.settings import OVERRIDES, Settings
from worker.duties.heartbeat import Heartbeat
from worker.duties.lease import FOLLOWER, LeaderLease
from worker.duties.reconcile import Reconciler
from worker.duties.relay import OutboxRelay
from worker.duties.retention import Retention
from worker.logging import configure_logging
from worker.metrics import MetricsEndpoint, prepare_directory, process_ended

# Pools whose processes run one task at a time: task mode keeps one map, not one per thread.
ONE_TASK_AT_A_TIME = ("prefork", "solo")


class Installation:
    """optionstore on one Celery app.

    Made once per app by ``install``. It registers the write tasks on the app and, in every
    process of a worker of that app: configures the store from the environment and the
    overrides, with the reload exchange on the app's own broker connection; starts the reload
    consumer (in each prefork child after its fork; in the main process for the solo, threads
    and gevent pools); clears the local cache at the end of each task; and in the worker's
    main process, while it holds the namespace's leader lease (worker/duties/lease.py), runs the
    heartbeat, the outbox relay, the reconciler and retention. A process that only reads (a web
    server that imports the app) is configured from it on first use.
    """

    def __init__(
        self,
        app: Any,
        *,
        overrides: dict[str, Any] | None = None,
        provide: bool = True,
        logging: bool = False,
        interval: float = 1.0,
        lease_ttl: float = 3.0,
    ) -> None:
        unknown = set(overrides or {}) - set(OVERRIDES) - {"broker_url"}
        if unknown:
            raise TypeError(
                f"install() got unknown setting(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(OVERRIDES))}"
            )
        self.app = app
        self.overrides = dict(overrides or {})
        self.provide = provide
        self.logging = logging
        self.interval = interval
        self.lease_ttl = lease_ttl
        # True in a worker of this app, and in the children it forks.
        self.running = False
        self.pool = "-"
        self.metrics = False
        self._duties: list[_Every] = []
        self._lease: LeaderLease | None = None
        self._endpoint: MetricsEndpoint | None = None

    def install(self) -> Installation:
        tasks.register(self.app)
        self.app.steps["worker"].add(_step_for(self))
        task_prerun.connect(self._task_started, weak=False)
        task_postrun.connect(self._task_ended, weak=False)
        worker_process_init.connect(self._process_started, weak=False)
        worker_process_shutdown.connect(self._process_ending, weak=False)
        if self.provide:
            store.runtime.provide(functools.partial(self.configure_store, kind=store.WEB))
        return self

    # -- settings and connections -----------------------------------------------------------

    @functools.cached_property
    def settings(self) -> Settings:
        # The broker is the app's: its URL is not one of the store's settings.
        return Settings.from_environ(
            **{k: v for k, v in self.overrides.items() if k != "broker_url"}
        )

    def connect_for_write(self) -> kombu.Connection:
        """A new connection to the app's broker, with its transport, options and TLS."""
        url = self.overrides.get("broker_url") or self.app.conf.broker_write_url
        return self.app.connection_for_write(
            url, connect_timeout=2, transport_options=publish_transport_options(url or "")
        )

    def connect_for_read(self) -> kombu.Connection:
        return self.app.connection_for_read(
            self.overrides.get("broker_url"), connect_timeout=2, heartbeat=10
        )

    def configure_store(self, *, kind: str) -> None:
        store.runtime.configure_from(
            self.settings, publish=self.connect_for_write, follow=self.connect_for_read, kind=kind
        )

    # -- a worker of this app ---------------------------------------------------------------

    def worker_created(self, worker: Any) -> None:
        """In the worker's main process, before any child is forked."""
        if self.logging:
            configure_logging(
                log_format=self.settings.log_format,
                level=logging.getLevelName(self.settings.log_level.upper()),
            )
        module = getattr(worker.pool_cls, "__module__", "") or str(worker.pool_cls)
        self.pool = module.rsplit(".", 1)[-1] or "prefork"
        self.running = True
        if self.settings.metrics_port is not None:
            prepare_directory()  # before any process of this worker imports prometheus_client
            self.metrics = True
        store.runtime.pool = self.pool
        self.configure_store(kind=store.WORKER)
        local = store.backend.local
        local.set_mode(local.mode, one_task_at_a_time=self.pool in ONE_TASK_AT_A_TIME)

    def worker_started(self, worker: Any) -> None:
        if self.pool != "prefork":
            # threads, gevent and eventlet pools never send worker_process_init; solo does,
            # and starting twice is a no-op. Here the main process runs the tasks.
            if self.metrics:
                metrics.enable()
            store.runtime.start_consumer()
        origin = f"heartbeat:{socket.gethostname()}:{os.getpid()}"
        backend = store.backend
        settings = self.settings
        reconciler = Reconciler(postgres=backend.db, cache=backend.redis)
        heartbeat = Heartbeat(
            # The store's own publisher, which the relay uses too: one broker connection.
            publisher=backend.publisher
            or Publisher(connect=self.connect_for_write, namespace=settings.namespace),
            reconciler=reconciler,
            origin=origin,
        )
        relay = OutboxRelay(backend=backend)
        retention = Retention(
            postgres=backend.db,
            write_age=settings.write_retention,
            history_age=settings.history_retention,
        )
        lease = LeaderLease(
            None if backend.redis is None else backend.redis.client,
            namespace=settings.namespace,
            ttl=self.lease_ttl,
        )
        self._lease = lease
        # Only the lease holder heartbeats, relays, reconciles and prunes; without an answer
        # from Redis every main process does it all (the heartbeat must not fall silent, and
        # the relay's row claims keep announcements single). The heartbeat has a thread of its
        # own: a slow relay or PostgreSQL never delays it, nor the lease's renewal.
        self._duties = [
            _Every(
                self.interval,
                [heartbeat.beat],
                when=lambda: lease.claim() != FOLLOWER,
                name="optionstore-heartbeat",
            ),
            _Every(
                self.interval,
                [relay.relay, reconciler.run_once, retention.run_once],
                when=lambda: lease.leading,
                name="optionstore-main",
            ),
        ]
        for duty in self._duties:
            duty.start()
        if self.metrics and settings.metrics_port is not None:
            # Served from the main process, which records nothing itself in prefork: it forks
            # children, and prometheus_client's lock must never be held at a fork.
            self._endpoint = MetricsEndpoint(
                port=settings.metrics_port, backlog=backend.db.count_unannounced
            )
            self._endpoint.start()

    def worker_stopping(self, worker: Any) -> None:
        for duty in self._duties:
            duty.stop()
        for duty in self._duties:
            duty.join(timeout=5)
        self._duties = []
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None
        if self._lease is not None:
            # A clean stop hands the lease over at once instead of after its time to live.
            self._lease.release()
            self._lease = None
        store.runtime.stop()

    # -- signals (global in Celery: each handler checks the event is this app's) -------------

    def _process_started(self, **_: Any) -> None:
        # Sent in each prefork child, and by the solo pool in the main process. It must return
        # within worker_proc_alive_timeout: the consumer connects in its own thread.
        if self.running:
            if self.metrics:
                metrics.enable()
            store.runtime.start_consumer()

    def _process_ending(self, **_: Any) -> None:
        # Not guaranteed (children may leave with os._exit): a report left behind expires.
        if self.running:
            store.runtime.stop()
            if self.metrics:
                process_ended()

    def _task_started(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if getattr(task, "app", None) is self.app:
            structlog.contextvars.bind_contextvars(task_id=task_id, task_name=task.name)

    def _task_ended(self, task: Any = None, **_: Any) -> None:
        # Sent from a finally in Celery's tracer: after success, failure, retry and eager runs.
        if getattr(task, "app", None) is self.app:
            store.backend.local.end_task()
            structlog.contextvars.unbind_contextvars("task_id", "task_name")


def install(app: Any, **overrides: Any) -> Installation:
    """Make ``app`` an optionstore app (once; a second call returns the first installation).

    Keyword arguments override the environment: ``database_url``, ``redis_url``,
    ``local_cache``, ``namespace``, ``max_value_bytes``, ... and ``broker_url`` for the reload
    exchange (default: the app's own broker).
    """
    existing: Installation | None = getattr(app, "optionstore", None)
    if existing is not None:
        return existing
    installation = Installation(app, overrides=overrides).install()
    app.optionstore = installation
    return installation


def _step_for(installation: Installation) -> type[bootsteps.StartStopStep]:
    class OptionstoreStep(bootsteps.StartStopStep):  # type: ignore[misc]
        """optionstore's part of a worker's life: made before the pool forks, started after."""

        requires = ("celery.worker.components:Pool",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            installation.worker_created(parent)

        def start(self, parent: Any) -> None:
            installation.worker_started(parent)

        def stop(self, parent: Any) -> None:
            installation.worker_stopping(parent)

    return OptionstoreStep


class _Every(threading.Thread):
    """Calls each duty every ``interval`` seconds, when ``when()`` says so, until stopped; a
    failing duty is logged."""

    def __init__(
        self,
        interval: float,
        duties: list[Callable[[], object]],
        *,
        when: Callable[[], bool] = lambda: True,
        name: str = "optionstore-main",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.duties = duties
        self.when = when
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                if not self.when():
                    continue
            except Exception as exc:
                log.warning("worker.duty_failed", duty="when", error=f"{type(exc).__name__}: {exc}")
                continue
            for duty in self.duties:
                if self.stopping.is_set():
                    return
                try:
                    duty()
                except Exception as exc:  # PostgreSQL or the broker may be down; next second
                    log.warning(
                        "worker.duty_failed",
                        duty=getattr(duty, "__qualname__", repr(duty)),
                        error=f"{type(exc).__name__}: {exc}",
                    )
