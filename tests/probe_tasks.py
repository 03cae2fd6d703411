"""Tasks the integration tests load into real workers (``--include tests.probe_tasks``).

They call the public read API from inside a task, in whichever child runs them, and report
the child's pid with the answer.
"""

from __future__ import annotations

import os
import time
from typing import Any

import store
from worker.app import app

READERS = ("options", "project_options", "user_options", "group_meta", "tag_keys")
METHODS = ("get_value", "get_all_values", "get_value_bulk", "all_keys")


@app.task(name="probe.read")
def read(reader: str, method: str, args: list[Any], hold: float = 0.0) -> dict[str, Any]:
    """Call ``store.<reader>.<method>(*args)``; ``hold`` keeps the child busy so others get work."""
    if reader not in READERS or method not in METHODS:
        raise ValueError(f"probe.read: unknown reader {reader}.{method}")
    result = getattr(getattr(store, reader), method)(*args)
    if isinstance(result, dict):
        result = {str(k): v for k, v in result.items()}
    time.sleep(hold)
    return {"pid": os.getpid(), "result": result}


@app.task(name="probe.pid")
def pid(hold: float = 0.0) -> int:
    time.sleep(hold)
    return os.getpid()
