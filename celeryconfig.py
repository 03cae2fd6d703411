"""Celery configuration for ``worker.app``; the one place the worker reads its environment."""

from __future__ import annotations

from store.settings import Settings

SETTINGS = Settings.from_environ()

broker_url = SETTINGS.broker_url
# On a Redis broker, a transport that cannot lose a task between handing it to a worker and
# recording it as unacknowledged (worker/broker.py); None keeps the URL's own.
broker_transport = SETTINGS.broker_transport
result_backend = SETTINGS.result_backend
broker_connection_retry_on_startup = True

# JSON only: unpickling what a broker hands you is remote code execution.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"

imports = ("tasks",)
task_default_queue = SETTINGS.task_queue

# A write is acknowledged only after it ran; a child killed mid-write gets it redelivered.
task_acks_late = True
task_reject_on_worker_lost = True
# One unacknowledged write per child at a time: a crash redelivers at most that one.
worker_prefetch_multiplier = 1
# Redis redelivers unacknowledged messages after this long (kombu's default is an hour). A
# redelivered write is harmless: a re-run of a task id changes nothing.
# kombu looks for expired unacknowledged messages only every unacked_restore_interval times
# throttle seconds (100 s by default): sweep often enough for the timeout to mean something.
broker_transport_options = {
    "visibility_timeout": SETTINGS.visibility_timeout,
    "unacked_restore_interval": max(1, min(10, SETTINGS.visibility_timeout // 2)),
    "unacked_restore_throttle": 1,
}
result_expires = 3600
worker_hijack_root_logger = False
worker_send_task_events = False
