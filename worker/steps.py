"""optionstore's parts of a Celery worker's life, one bootstep each: the store, the reload
consumer, the leader's duties and the metrics endpoint (added to an app by ``worker.install``)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps

import store
from store.broadcast.publisher import Publisher
from store.errors import describe
from store.events import log
from store.redis.eviction import check_broker_policy
from store.rollouts.records import RolloutRecords
from store.settings import ACCEPT
from store.signing.keys import Keyring
from worker.duties.heartbeat import Heartbeat
from worker.duties.lease import FOLLOWER, LeaderLease
from worker.duties.reconcile import Reconciler
from worker.duties.relay import OutboxRelay
from worker.duties.retention import Retention
from worker.duties.rollouts import RolloutJudge
from worker.logging import configure_logging
from worker.metrics import MetricsEndpoint, prepare_directory

# Pools whose processes run one task at a time: task mode keeps one map, not one per thread.
ONE_TASK_AT_A_TIME = ("prefork", "solo")


def _installation(worker: Any) -> Any:
    # The app's worker.install.Installation (typed Any: it imports this module).
    return worker.app.optionstore


class StoreStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Configures this worker's store in its main process, before the pool forks; stops it
    (consumer, report, outbox marks) last."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        installation = _installation(parent)
        settings = installation.settings
        if installation.logging:
            configure_logging(
                log_format=settings.log_format,
                level=logging.getLevelName(settings.log_level.upper()),
            )
        # Before anything runs: a broker that evicts keys loses tasks without an error.
        check_broker_policy(installation.broker_eviction_policy(), where="CELERY_BROKER_URL")
        module = getattr(parent.pool_cls, "__module__", "") or str(parent.pool_cls)
        installation.pool = module.rsplit(".", 1)[-1] or "prefork"
        installation.running = True
        store.runtime.pool = installation.pool
        installation.configure_store(kind=store.WORKER)
        installation.note_queues()
        if installation.pool == "prefork":
            store.runtime.runs_no_tasks()
        if installation.pool == "prefork" and settings.host_relay:
            # Before the pool forks: every child, first or replacement, finds its path.
            store.runtime.open_relay()
        installation.guard_tasks()
        local = store.backend.local
        local.set_mode(local.mode, one_task_at_a_time=installation.pool in ONE_TASK_AT_A_TIME)
        report_signing(store.runtime.keyring(), unsigned_writes=settings.unsigned_writes)

    def stop(self, parent: Any) -> None:
        store.runtime.stop()


def report_signing(keyring: Keyring | None, *, unsigned_writes: str) -> None:
    """Say at a worker's start whether what it receives is checked: a warning when it is not."""
    if keyring is None:
        log.warning(
            "signing.off",
            consequence="any client of the broker can send write tasks as anyone and forge "
            "reload messages and heartbeats",
            remedy="set OPTIONS_SIGNING_KEY (or OPTIONS_SIGNING_KEY_FILE) on every process",
        )
        return
    log.info("signing.on", key_ids=list(keyring.ids), signs_with=keyring.signing_id)
    if unsigned_writes == ACCEPT:
        log.warning(
            "signing.unsigned_writes_accepted",
            consequence="a write task without a signature runs, with whatever actor it names "
            "(one with a signature is still checked)",
        )


class ReloadConsumerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """The reload consumer of a main process that runs tasks itself (solo, threads, gevent),
    or that relays the exchange to its prefork children (``OPTIONS_HOST_RELAY``); a prefork
    child starts its own on ``worker_process_init`` (a consumer of that relay)."""

    requires = (StoreStep,)

    def start(self, parent: Any) -> None:
        installation = _installation(parent)
        if installation.pool == "prefork":
            if installation.settings.host_relay:
                store.runtime.start_consumer()  # the host's one subscription
            return
        # threads, gevent and eventlet pools never send worker_process_init; solo does, and
        # starting twice is a no-op.
        if installation.metrics:
            store.backend.metrics.enable()
        store.runtime.start_consumer()


class LeaderDutiesStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """While this main process holds the namespace's leader lease (worker/duties/lease.py): the
    heartbeat, the outbox relay, the reconciler, retention and the rollouts' judge, each
    second."""

    requires = (StoreStep,)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._threads: list[Every] = []
        self._lease: LeaderLease | None = None

    def start(self, parent: Any) -> None:
        installation = _installation(parent)
        backend, settings = store.backend, installation.settings
        reconciler = Reconciler(
            postgres=backend.db,
            cache=backend.redis,
            rebase=lambda scope, above: backend.rebase(scope, above=above),
        )
        heartbeat = Heartbeat(
            # The store's own publisher, which the relay uses too: one broker connection.
            publisher=backend.publisher
            or Publisher(
                connect=installation.connect_for_write,
                namespace=settings.namespace,
                keyring=store.runtime.keyring(),
            ),
            reconciler=reconciler,
            origin=f"heartbeat:{socket.gethostname()}:{os.getpid()}",
        )
        relay = OutboxRelay(backend=backend)
        retention = Retention(
            postgres=backend.db,
            write_age=settings.write_retention,
            history_age=settings.history_retention,
        )
        judge = RolloutJudge(
            records=RolloutRecords(
                backend.db,
                None if backend.redis is None else backend.redis.client,
                namespace=settings.namespace,
            ),
            commit=backend.commit,
        )
        lease = self._lease = LeaderLease(
            None if backend.redis is None else backend.redis.client,
            namespace=settings.namespace,
            ttl=installation.lease_ttl,
        )
        # Only the lease holder heartbeats, relays, reconciles and prunes; without an answer
        # from Redis every main process does it all (the heartbeat must not fall silent, and
        # the relay's row claims keep announcements single). The heartbeat has a thread of its
        # own: a slow relay or PostgreSQL never delays it, nor the lease's renewal (which, in a
        # prefork main process, waits only for the other threads' Redis commands: they take
        # turns on one connection, RedisCache.take_turns).
        self._threads = [
            Every(
                installation.interval,
                [heartbeat.beat],
                when=lambda: lease.claim() != FOLLOWER,
                name="optionstore-heartbeat",
            ),
            Every(
                installation.interval,
                [relay.relay, reconciler.run_once, retention.run_once, judge.run_once],
                when=lambda: lease.leading,
                name="optionstore-main",
            ),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, parent: Any) -> None:
        for thread in self._threads:
            thread.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        if self._lease is not None:
            # A clean stop hands the lease over at once instead of after its time to live.
            self._lease.release()
            self._lease = None


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """``/metrics`` for every process of this worker, when OPTIONS_METRICS_PORT is set."""

    requires = (StoreStep,)
    conditional = True

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._endpoint: MetricsEndpoint | None = None

    def include_if(self, parent: Any) -> bool:
        installation = _installation(parent)
        if installation.settings.metrics_port is None:
            return False
        prepare_directory()  # before any process of this worker imports prometheus_client
        installation.metrics = True
        return True

    def start(self, parent: Any) -> None:
        port = _installation(parent).settings.metrics_port
        if port is None:
            return
        # Served from the main process, which records nothing itself in prefork: it forks
        # children, and prometheus_client's lock must never be held at a fork.
        self._endpoint = MetricsEndpoint(
            port=port,
            backlog=store.backend.db.count_unannounced,
            refusals=lambda: store.backend.metrics.refusals,
        )
        self._endpoint.start()

    def stop(self, parent: Any) -> None:
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None


STEPS = (StoreStep, ReloadConsumerStep, LeaderDutiesStep, MetricsStep)


class Every(threading.Thread):
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
                log.warning("worker.duty_failed", duty="when", error=describe(exc))
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
                        error=describe(exc),
                    )
