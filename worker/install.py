"""``install(app)``: makes any Celery app an optionstore app, and owns what that sets up."""

from __future__ import annotations

import functools
import gc
import inspect
from typing import Any

import kombu
import structlog
from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    worker_process_init,
    worker_process_shutdown,
)

import store
import tasks
from store.broadcast.publisher import publish_transport_options
from store.errors import describe
from store.events import log
from store.redis.eviction import eviction_policy
from store.settings import OVERRIDES, Settings
from store.tokens import HEADER, parse_token, written
from worker.metrics import process_ended
from worker.steps import STEPS


class Installation:
    """optionstore on one Celery app.

    Made once per app by ``install``. It registers the write tasks on the app, adds the
    worker's steps (worker/steps.py: the store, configured from the environment and the
    overrides with the reload exchange on the app's own broker connection; the reload consumer
    of a main process that runs tasks; the leader's duties; metrics) and connects the signals
    that reach every process of such a worker: the consumer starts in each prefork child after
    its fork, and the local cache is cleared at the end of each task. A process that only
    reads (a web server that imports the app) is configured from it on first use.
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
        # Whether this worker's processes record metrics (worker/steps.py: MetricsStep).
        self.metrics = False

    def install(self) -> Installation:
        tasks.register(self.app)
        # One bootstep per component (worker/steps.py); each finds this object as app.optionstore.
        self.app.steps["worker"].update(STEPS)
        task_prerun.connect(self._task_started, weak=False)
        task_postrun.connect(self._task_ended, weak=False)
        task_failure.connect(self._task_failed, weak=False)
        task_retry.connect(self._task_retried, weak=False)
        worker_process_init.connect(self._process_started, weak=False)
        worker_process_shutdown.connect(self._process_ending, weak=False)
        if self.provide:
            store.runtime.provide(
                functools.partial(self.configure_store, kind=store.WEB),
                settings=lambda: self.settings,
            )
        return self

    # -- settings and connections -----------------------------------------------------------

    @functools.cached_property
    def settings(self) -> Settings:
        # The broker is the app's: its URL is not one of the store's settings, but it is the
        # one a cache on a Redis Cluster is checked against.
        broker = self.overrides.get("broker_url") or self.app.conf.broker_write_url
        return Settings.from_environ(
            reload_broker=None if broker is None else str(broker),
            **{k: v for k, v in self.overrides.items() if k != "broker_url"},
        )

    def connect_for_write(self) -> kombu.Connection:
        """A new connection to the app's broker, with its transport, options and TLS."""
        url = self.overrides.get("broker_url") or self.app.conf.broker_write_url
        return self.app.connection_for_write(
            url, connect_timeout=2, transport_options=publish_transport_options(url or "")
        )

    def broker_eviction_policy(self) -> str | None:
        """The ``maxmemory-policy`` of the app's broker if it is a Redis; None if it is not, or
        cannot be asked now (the worker connects and retries on its own)."""
        try:
            with self.app.connection_for_write(connect_timeout=2) as conn:
                if conn.transport.driver_type != "redis":
                    return None
                return eviction_policy(conn.default_channel.client)
        except Exception as exc:  # the broker is down at start: Celery waits for it itself
            log.warning("broker.policy_unknown", error=describe(exc))
            return None

    def connect_for_read(self) -> kombu.Connection:
        return self.app.connection_for_read(
            self.overrides.get("broker_url"), connect_timeout=2, heartbeat=10
        )

    def configure_store(self, *, kind: str) -> None:
        store.runtime.configure_from(
            self.settings, publish=self.connect_for_write, follow=self.connect_for_read, kind=kind
        )

    # -- signals (global in Celery: each handler checks the event is this app's) -------------

    def _process_started(self, **_: Any) -> None:
        # Sent in each prefork child, and by the solo pool in the main process. It must return
        # within worker_proc_alive_timeout: the consumer connects in its own thread.
        if self.running:
            if self.pool == "prefork":
                # Everything inherited from the main process (Celery, kombu, the app's modules)
                # out of the collector's sight: a full collection in this child then walks only
                # what the child made, instead of pausing a broadcast's apply for that long.
                gc.freeze()
            if self.metrics:
                store.backend.metrics.enable()
            self.note_queues()
            pool = self._result_backend_pool()
            if pool is not None:
                store.runtime.give_back_when_idle(pool)
            store.runtime.start_consumer()

    def note_queues(self) -> None:
        """Tell the rollouts which queues this process's worker consumes (``queue:`` canaries)."""
        queues = self.app.amqp.queues
        store.backend.overlay.queues = tuple(sorted(queues.consume_from or queues))

    def _result_backend_pool(self) -> Any:
        """The connection pool of this thread's result backend, if it is Celery's Redis one:
        a prefork child stores its results in this thread, and gives its connection back when
        idle (store/broadcast/relayed.py) instead of holding one for good."""
        from celery.backends.redis import RedisBackend

        backend = self.app.backend  # per thread in Celery: this child's task thread's
        if not isinstance(backend, RedisBackend):
            return None
        return backend.client.connection_pool

    def _process_ending(self, **_: Any) -> None:
        # Not guaranteed (children may leave with os._exit): a report left behind expires.
        if self.running:
            store.runtime.stop()
            if self.metrics:
                process_ended()

    def _task_started(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if getattr(task, "app", None) is self.app:
            structlog.contextvars.bind_contextvars(task_id=task_id, task_name=task.name)
            store.runtime.check_heard()
            store.snapshots.begin_task()
            written.begin_task()
            store.backend.overlay.task_started()

    def _task_failed(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            store.backend.overlay.task_failed()

    def _task_retried(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            store.backend.overlay.task_retried()

    def _task_ended(self, task: Any = None, **_: Any) -> None:
        # Sent from a finally in Celery's tracer: after success, failure, retry and eager runs.
        if getattr(task, "app", None) is self.app:
            store.backend.overlay.task_ended()
            store.backend.local.end_task()
            store.snapshots.end_task()
            # After the chain's next step and the links were published with it.
            written.end_task()
            structlog.contextvars.unbind_contextvars("task_id", "task_name")

    def guard_tasks(self) -> None:
        """Make every task of the app catch up to its ``options_after`` token before its body
        runs: a ``before_start`` wrapped around the task class's own, so that a malformed token
        fails the task with InvalidToken (an error in a ``task_prerun`` receiver would only be
        logged, and the body would run). Run when the worker starts, before the pool forks
        (Celery builds each task's tracer, which looks ``before_start`` up, after that)."""
        for name, task in self.app.tasks.items():
            if not name.startswith("celery."):
                _guard(type(task))


def catch_up_task(request: Any) -> None:
    """Catch this process up to the ``options_after`` token of the task ``request`` belongs
    to, if it carries one; InvalidToken (naming the field) if the token is malformed."""
    # Celery hands custom headers to the task as attributes of its request (protocol 2).
    raw = getattr(request, HEADER, None)
    if raw is None:
        raw = (getattr(request, "headers", None) or {}).get(HEADER)
    if raw is None:
        return
    token = parse_token(raw)
    if token:
        store.backend.catch_up(token)


def _guard(cls: type) -> None:
    if "_optionstore_guarded" in cls.__dict__:
        return
    # As defined, not as looked up: a staticmethod or classmethod is bound below as Python
    # would bind it (every Celery Task has a before_start).
    inner = inspect.getattr_static(cls, "before_start")

    def before_start(self: Any, task_id: str, args: Any, kwargs: Any) -> None:
        catch_up_task(self.request)
        bind = getattr(type(inner), "__get__", None)  # any callable without it, as it is
        (bind(inner, self, type(self)) if bind is not None else inner)(task_id, args, kwargs)

    cls.before_start = before_start  # type: ignore[attr-defined]
    cls._optionstore_guarded = True  # type: ignore[attr-defined]


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
