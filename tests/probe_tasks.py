"""Tasks the integration tests load into real workers (``--include tests.probe_tasks``).

They call the public read API from inside a task, in whichever child runs them, and report
the child's pid with the answer.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

import store
from worker import app

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


@app.task(name="probe.stats")
def stats(reader: str, method: str, args: list[Any], hold: float = 0.0) -> dict[str, Any]:
    """Like probe.read, plus the read round trips this process has made so far (before/after)."""
    before = dict(store.backend.stats)
    answer = read(reader, method, args, hold)
    answer["before"] = before
    answer["after"] = dict(store.backend.stats)
    answer["mode"] = store.backend.local.mode
    return answer


@app.task(name="probe.poll")
def poll(  # noqa: PLR0917 (a task's arguments arrive positionally)
    reader: str, method: str, args: list[Any], expected: Any, marker: str, timeout: float = 20.0
) -> dict[str, Any]:
    """Read once, raise ``marker`` in Redis, then poll the same read until it returns
    ``expected`` (or ``timeout``), all inside this one running task."""
    first = getattr(getattr(store, reader), method)(*args)
    assert store.backend.redis is not None
    store.backend.redis.client.set(marker, os.getpid(), ex=60)
    deadline = time.monotonic() + timeout
    value = first
    polls = 0
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.001)
        value = getattr(getattr(store, reader), method)(*args)
        polls += 1
    return {
        "pid": os.getpid(),
        "first": first,
        "last": value,
        "polls": polls,
        "stats": dict(store.backend.stats),
    }


@app.task(name="probe.churn")
def churn(project_ids: list[int], key: str, threads: int) -> dict[str, Any]:
    """Start ``threads`` short-lived threads, one after another, that each read ``key`` of every
    project (so each gets a local cache of its own) and end: churn beside the pool's threads.

    One at a time, so a pool of 32 churning stays within the Redis client's connection pool.
    """
    errors: list[str] = []

    def read() -> None:
        try:
            for project_id in project_ids:
                store.project_options.get_value(project_id, key)
        except Exception as exc:  # reported in the answer, the test fails on it
            errors.append(f"{type(exc).__name__}: {exc}")

    for _ in range(threads):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    return {"pid": os.getpid(), "threads": threads, "errors": errors}


@app.task(name="probe.switch_interval")
def switch_interval(seconds: float) -> float:
    """Set how often this process switches threads (``sys.setswitchinterval``); returns the old
    value. A short interval makes thread interleavings that are rare under light load common."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    return before


@app.task(name="probe.read_chained")
def read_chained(write_result: Any, project_id: int, key: str) -> dict[str, Any]:
    """The step after a write in a chain: the write's result arrives first; reads one project
    option and reports the token this task carried."""
    return {
        "pid": os.getpid(),
        "result": store.project_options.get_value(project_id, key),
        "write": write_result,
        "token": getattr(read_chained.request, "options_after", None),
    }


@app.task(name="probe.mark")
def mark(marker: str) -> int:
    """Set ``marker`` in Redis: proof that this task's body ran."""
    assert store.backend.redis is not None
    store.backend.redis.client.set(marker, os.getpid(), ex=60)
    return os.getpid()


@app.task(name="probe.snapshot_twice")
def snapshot_twice(project_id: int, key: str, marker: str, changed: Any) -> dict[str, Any]:
    """Read a project option through ``store.snapshot()``, raise ``marker`` in Redis, poll the
    plain read until it returns ``changed`` (the broadcast of a write made meanwhile has
    arrived; at most 20 s), then read through the snapshot again."""
    view = store.snapshot()
    first = view.project_options.get_value(project_id, key)
    assert store.backend.redis is not None
    store.backend.redis.client.set(marker, os.getpid(), ex=60)
    deadline = time.monotonic() + 20.0
    plain = store.project_options.get_value(project_id, key)
    while plain != changed and time.monotonic() < deadline:
        time.sleep(0.001)
        plain = store.project_options.get_value(project_id, key)
    return {
        "pid": os.getpid(),
        "first": first,
        "plain": plain,
        "second": store.snapshot().project_options.get_value(project_id, key),
        "same_view": store.snapshot() is view,
    }


@app.task(name="probe.check")
def check(project_id: int, key: str, bad: Any, hold: float = 0.0) -> dict[str, Any]:
    """Read a project option and fail if it is ``bad`` (a change that breaks the tasks that
    read it); the error names this process."""
    value = store.project_options.get_value(project_id, key)
    time.sleep(hold)
    if value == bad:
        raise RuntimeError(f"pid {os.getpid()} read the bad value {value!r}")
    return {"pid": os.getpid(), "result": value}


@app.task(name="probe.cut_relay")
def cut_relay() -> int:
    """Close this child's end of its parent's relay socket, as a broken channel would (the
    fault of tests/test_host_relay.py); returns the child's pid."""
    consumer = store.runtime._consumer  # a fault hook reaches in on purpose
    sock = getattr(consumer, "_sock", None)
    if sock is None:
        raise RuntimeError("probe.cut_relay: this process follows no relay")
    sock.shutdown(socket.SHUT_RDWR)
    return os.getpid()
