"""The Celery app ``worker.app`` and the wiring of the store into each worker process."""

from __future__ import annotations

from celery import Celery

import celeryconfig
import store
from worker.logging import configure_logging

settings = celeryconfig.SETTINGS

configure_logging(log_format=settings.log_format)
store.configure(
    database_url=settings.database_url,
    redis_url=settings.redis_url,
    local_cache=settings.local_cache,
    max_value_bytes=settings.max_value_bytes,
    namespace=settings.namespace,
    broker_url=settings.broker_url,
    broker_transport=settings.broker_transport,
    skip_announce=settings.fault == "skip_announce",
    max_message_bytes=settings.max_message_bytes,
)

app = Celery("optionstore")
app.config_from_object(celeryconfig)

# Signal handlers must be connected in every process that runs tasks.
import worker.signals  # noqa: E402, F401
