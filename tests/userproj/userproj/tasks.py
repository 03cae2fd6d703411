"""The project's tasks: ordinary Celery tasks that read options on their hot path."""

from __future__ import annotations

import os
import time
from typing import Any

import store
from userproj.celery import app


@app.task(name="userproj.read")
def read(project_id: int, key: str, hold: float = 0.0) -> dict[str, Any]:
    value = store.project_options.get_value(project_id, key)
    time.sleep(hold)  # keeps this child busy, so the next task goes to the other one
    return {"pid": os.getpid(), "value": value}
