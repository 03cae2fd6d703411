"""Celery signal handlers: per-task log context, the end-of-task cache clear, and the threads
that keep every process's cache coherent (a reload consumer per process, a beacon per worker)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import structlog
from celery.signals import (
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

import store
from store.broadcast import Publisher
from store.presence import Presence
from worker.beacon import Beacon
from worker.consumer import ReloadConsumer

_pool = {"name": "prefork"}
_consumers: dict[int, ReloadConsumer] = {}
_beacons: dict[int, Beacon] = {}


@task_prerun.connect
def _bind_task_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.bind_contextvars(task_id=task_id, task_name=getattr(task, "name", None))


@task_postrun.connect
def _end_task(**_: Any) -> None:
    # Sent from a finally in Celery's tracer: after success, failure, retry and in eager mode.
    store.backend.local.end_task()
    structlog.contextvars.unbind_contextvars("task_id", "task_name")


@worker_init.connect
def _remember_pool(sender: Any = None, **_: Any) -> None:
    pool_cls = getattr(sender, "pool_cls", None)
    module = getattr(pool_cls, "__module__", "") or str(pool_cls)
    _pool["name"] = module.rsplit(".", 1)[-1] if module else "prefork"
    # A prefork child or a solo worker runs one task at a time: one map, no thread-local.
    local = store.backend.local
    local.set_mode(local.mode, one_task_at_a_time=_pool["name"] in ("prefork", "solo"))


@worker_process_init.connect
def _start_child_consumer(**_: Any) -> None:
    # Sent in each prefork child, and by the solo pool in the main process. It must return
    # within worker_proc_alive_timeout: the consumer connects in its own thread.
    start_consumer()


@worker_ready.connect
def _start_main_threads(**_: Any) -> None:
    from worker.app import settings

    if _pool["name"] != "prefork":
        # threads, gevent and eventlet pools never send worker_process_init.
        start_consumer()
    origin = f"beacon:{socket.gethostname()}:{os.getpid()}"
    publisher = Publisher(
        broker_url=settings.broker_url,
        namespace=settings.namespace,
        transport=settings.broker_transport,
    )
    beacon = Beacon(backend=store.backend, publisher=publisher, origin=origin)
    _beacons[os.getpid()] = beacon
    beacon.start()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stop_threads(**_: Any) -> None:
    # worker_process_shutdown is not guaranteed (children may leave with os._exit): a report
    # left behind expires after its TTL.
    for consumer in _consumers.values():
        consumer.stop()
    for beacon in _beacons.values():
        beacon.stop()
    own = _consumers.get(os.getpid())
    if own is not None and own.presence is not None:
        # Best effort: a report that is not removed expires on its own.
        with contextlib.suppress(Exception):
            own.presence.remove(own.hostname, own.pid)


def start_consumer() -> ReloadConsumer:
    """Start this process's reload consumer once (idempotent per pid)."""
    from worker.app import settings

    existing = _consumers.get(os.getpid())
    if existing is not None and existing.is_alive():
        return existing
    cache = store.backend.redis
    consumer = ReloadConsumer(
        backend=store.backend,
        broker_url=settings.broker_url,
        namespace=settings.namespace,
        presence=None if cache is None else Presence(cache.client, namespace=settings.namespace),
        pool=_pool["name"],
    )
    _consumers[os.getpid()] = consumer
    consumer.start()
    return consumer
