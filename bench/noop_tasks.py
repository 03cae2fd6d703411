"""Tasks the benchmark loads into its workers (``--include bench.noop_tasks``)."""

from __future__ import annotations

import os
import time
from typing import Any

import store
from worker import app


@app.task(name="bench.noop")
def noop() -> float:
    """Does nothing; returns when it started (the baseline of task latency and throughput)."""
    return time.time()


@app.task(name="bench.warm")
def warm(project_id: int | None, key: str, hold: float = 0.0) -> dict[str, Any]:
    """Read one option in whichever child runs this, so that child caches the scope."""
    if project_id is None:
        value = store.options.get_value(key)
    else:
        value = store.project_options.get_value(project_id, key)
    time.sleep(hold)
    return {"pid": os.getpid(), "value": value}
