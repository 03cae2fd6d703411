"""The project's Celery app: configured the project's way, then handed to ``worker.install``."""

from __future__ import annotations

import os

from celery import Celery

import worker

app = Celery("userproj")
app.conf.update(
    broker_url=os.environ["USERPROJ_BROKER_URL"],
    result_backend=os.environ["USERPROJ_RESULT_BACKEND"],
    task_default_queue=os.environ["USERPROJ_QUEUE"],
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    imports=("userproj.tasks",),
)
worker.install(app)
