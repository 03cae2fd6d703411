"""Tasks the benchmark loads into its workers (``--include bench.noop_tasks``)."""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg

import store
from worker import app

# The table bench.commit_row writes to; bench/writes.py creates it before the worker starts.
COMMIT_ROW_TABLE = "bench_commit_row"
_commit_connections: dict[int, psycopg.Connection[Any]] = {}


@app.task(name="bench.noop")
def noop() -> float:
    """Does nothing; returns when it started (the baseline of task latency and throughput)."""
    return time.time()


@app.task(name="bench.commit_row")
def commit_row(serial: int) -> int:
    """Commits one row to PostgreSQL, durably (its own transaction, WAL flushed): the least
    any write task that persists does. One connection per process, opened after the fork."""
    conn = _commit_connections.get(os.getpid())
    if conn is None:
        conn = psycopg.connect(os.environ["OPTIONS_DATABASE_URL"], autocommit=True)
        _commit_connections[os.getpid()] = conn
    conn.execute(f"INSERT INTO {COMMIT_ROW_TABLE} (serial) VALUES (%s)", (serial,))
    return serial


@app.task(name="bench.warm")
def warm(project_id: int | None, key: str, hold: float = 0.0) -> dict[str, Any]:
    """Read one option in whichever child runs this, so that child caches the scope."""
    if project_id is None:
        value = store.options.get_value(key)
    else:
        value = store.project_options.get_value(project_id, key)
    time.sleep(hold)
    return {"pid": os.getpid(), "value": value}
