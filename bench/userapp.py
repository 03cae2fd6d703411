"""A user's own Celery app for the benchmark (``celery -A bench.userapp worker``): configured
the user's way, then made an optionstore app with ``worker.install(app)``."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery

import store
import worker
from bench.hit import time_hits
from worker.logging import configure_logging

app = Celery("benchuser")
app.conf.update(
    broker_url=os.environ["CELERY_BROKER_URL"],
    result_backend=os.environ["CELERY_RESULT_BACKEND"],
    task_default_queue=os.environ["OPTIONS_TASK_QUEUE"],
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)
# This user wants JSON log events, down to debug: the benchmark reads broadcast.applied.
configure_logging(log_format="json", level=logging.DEBUG)
worker.install(app)


@app.task(name="bench.warm")
def warm(project_id: int | None, key: str, hold: float = 0.0) -> dict[str, Any]:
    value = store.project_options.get_value(project_id, key) if project_id else None
    time.sleep(hold)
    return {"pid": os.getpid(), "value": value}


@app.task(name="bench.read_hit")
def read_hit(project_id: int, key: str, values: dict[str, Any], number: int, reps: int) -> Any:
    return {"pid": os.getpid(), **time_hits(project_id, key, values, number, reps)}
