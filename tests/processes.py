"""Real `celery -A worker worker` processes for the tests and the benchmarks: the command
line, a process group of their own, a clean stop, the structured events in their logs, and
waiting on a condition with a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_DECODER = json.JSONDecoder()


def worker_command(
    *,
    pool: str,
    concurrency: int,
    queue: str,
    hostname: str,
    include: str,
    loglevel: str,
    app: str = "worker",
) -> list[str]:
    """The command line of a worker of ``app`` (this project's by default) on one queue, with
    ``include``'s tasks (probes, no-op tasks) registered next to the write tasks."""
    return [
        *(sys.executable, "-m", "celery", "-A", app, "worker"),
        *("--pool", pool, "--concurrency", str(concurrency), "--queues", queue),
        *("--hostname", hostname, *(("--include", include) if include else ())),
        *("--without-mingle", "--without-gossip", "--loglevel", loglevel),
    ]


def start_group(
    command: list[str], *, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a session of its own (so a stop or a kill -9 reaches its children),
    appending its output to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen[bytes] | None, *, timeout: float) -> None:
    """SIGTERM to the whole group (a warm shutdown), SIGKILL if it is still there after
    ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def log_events(text: str, *names: str) -> list[dict[str, Any]]:
    """The structured events in ``text`` (all of them, or those called one of ``names``).

    Read object by object, not line by line: the children share one stderr, and structlog's
    print writes an event and its newline separately, so two events can share a line.
    """
    found = []
    position = 0
    while (start := text.find("{", position)) >= 0:
        try:
            event, position = _DECODER.raw_decode(text, start)
        except ValueError:
            position = start + 1
            continue
        if isinstance(event, dict) and (not names or event.get("event") in names):
            found.append(event)
    return found


def poll_until(condition: Callable[[], Any], *, timeout: float, interval: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; TimeoutError
    naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
