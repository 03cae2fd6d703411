"""Celery configuration of ``worker.app``; the one place the worker reads its environment.

The fixed settings are plain names. The ones that come from the environment are resolved the
first time Celery reads its configuration, not at import: importing this module reads nothing
and starts nothing (with no broker URL set, the embedded Redis starts when Celery first needs
its broker).
"""

from __future__ import annotations

import functools
from typing import Any

from store.settings import Settings, broker_scheme

# JSON only: unpickling what a broker hands you is remote code execution.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"

broker_connection_retry_on_startup = True
imports = ("tasks",)

# A write is acknowledged only after it ran; a child killed mid-write gets it redelivered.
task_acks_late = True
task_reject_on_worker_lost = True
# One unacknowledged write per child at a time: a crash redelivers at most that one.
worker_prefetch_multiplier = 1
result_expires = 3600
worker_hijack_root_logger = False
worker_send_task_events = False
# RabbitMQ quorum queues (OPTIONS_TASK_QUEUE_TYPE=quorum) refuse global QoS: the worker asks for
# a per-consumer prefetch when its queues are quorum queues.
worker_detect_quorum_queues = True


@functools.cache
def settings() -> Settings:
    """This process's settings, read from the environment once."""
    return Settings.from_environ()


def _broker_transport_options() -> dict[str, Any]:
    # Redis redelivers unacknowledged messages after visibility_timeout (kombu's default is an
    # hour); a redelivered write is harmless, a re-run of a task id changes nothing. kombu looks
    # for expired unacknowledged messages only every unacked_restore_interval times throttle
    # seconds (100 s by default): sweep often enough for the timeout to mean something.
    timeout = settings().visibility_timeout
    options: dict[str, Any] = {
        "visibility_timeout": timeout,
        "unacked_restore_interval": max(1, min(10, timeout // 2)),
        "unacked_restore_throttle": 1,
    }
    # A sentinel:// broker's master name (Celery's form of it).
    options.update(settings().broker_connection_options().get("transport_options", {}))
    if broker_scheme(settings().broker_url) in ("amqp", "amqps", "pyamqp"):
        # Publisher confirms: send_task returns once RabbitMQ has the write, not before.
        options["confirm_publish"] = True
    return options


def _broker_use_ssl() -> dict[str, Any] | None:
    # kombu turns TLS on by the transport's name; a rediss:// URL under the transport of
    # store/transport/redis.py would otherwise connect in plain text.
    ssl: dict[str, Any] | None = settings().broker_connection_options().get("ssl")
    return ssl


_FROM_ENVIRONMENT = {
    "broker_url": lambda: settings().broker_url,
    # On a Redis broker, a transport that cannot lose a task between handing it to a worker
    # and recording it as unacknowledged (store/transport/redis.py); None keeps the URL's own.
    "broker_transport": lambda: settings().broker_transport,
    "result_backend": lambda: settings().result_backend,
    "task_default_queue": lambda: settings().task_queue,
    "broker_transport_options": _broker_transport_options,
    "broker_use_ssl": _broker_use_ssl,
    # "quorum" (OPTIONS_TASK_QUEUE_TYPE) on RabbitMQ: the write queue is replicated and its
    # messages are on disk on a majority of nodes before a confirm.
    "task_default_queue_type": lambda: settings().task_queue_type,
}


def __getattr__(name: str) -> Any:
    resolve = _FROM_ENVIRONMENT.get(name)
    if resolve is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return resolve()


def __dir__() -> list[str]:
    # Celery lists a configuration module's settings with dir().
    return sorted([*globals(), *_FROM_ENVIRONMENT])
