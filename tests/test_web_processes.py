"""Processes that are not workers read with nothing but the environment: a gunicorn with
``--preload`` and two workers, and a plain process that forks. Each sees a later change."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from store.redis.presence import Presence
from tests.conftest import ROOT, Services, Worker, fresh_id, wait_for
from tests.processes import start_group, stop_group

# How long a change may take to reach a process that follows broadcasts: well past the
# measured milliseconds, and the heartbeat deadline (5 s) after which a deaf process desyncs.
PROPAGATION_BOUND_S = 5.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Gunicorn:
    """``gunicorn --preload -w 2`` serving tests/webapp.py."""

    def __init__(self, services: Services) -> None:
        self.port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="gunicorn-", suffix=".log")[1])
        command = [
            *(sys.executable, "-m", "gunicorn", "--preload", "--workers", "2"),
            *("--bind", f"127.0.0.1:{self.port}", "--graceful-timeout", "5"),
            "tests.webapp:app",
        ]
        self.process = start_group(command, env=services.env(), log_path=self.log_path)

    def workers(self) -> set[int]:
        return {child.pid for child in psutil.Process(self.process.pid).children()}

    def get(self, project: int, key: str, hold: float = 0.0) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/?project={project}&key={key}&hold={hold}"
        with urllib.request.urlopen(url, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    def answers(self, project: int, key: str) -> dict[int, Any]:
        """One answer from each worker: concurrent requests that hold a worker busy a moment."""
        found: dict[int, Any] = {}

        def ask() -> None:
            answer = self.get(project, key, hold=0.05)
            found[answer["pid"]] = answer["value"]

        expected = self.workers()
        while not expected <= set(found):
            threads = [threading.Thread(target=ask) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return {pid: found[pid] for pid in expected}

    def stop(self) -> None:
        stop_group(self.process, timeout=15)


@pytest.fixture(scope="module")
def gunicorn(services: Services) -> Iterator[Gunicorn]:
    server = Gunicorn(services)

    def serving() -> bool:
        if server.process.poll() is not None:
            pytest.fail(f"gunicorn exited:\n{server.log_path.read_text()[-4000:]}")
        try:
            server.get(1, "up")
        except OSError:
            return False
        return len(server.workers()) == 2

    try:
        wait_for(serving, timeout=60, interval=0.1, message="gunicorn to serve")
        yield server
    finally:
        server.stop()


def test_gunicorn_preload_workers_see_a_change(
    services: Services, worker: Worker, gunicorn: Gunicorn
) -> None:
    """Both workers of a preloaded gunicorn return a changed value within the propagation
    bound, with no request hook and no configure call, and show in status as web processes."""
    project, key = fresh_id(), "banner"
    worker.call("options.set_project_option", project, key, "before")
    wait_for(
        lambda: set(gunicorn.answers(project, key).values()) == {"before"},
        timeout=30,
        message="both gunicorn workers to read the first value",
    )
    pids = gunicorn.workers()
    presence = Presence(redis.Redis.from_url(services.redis_url), namespace=services.namespace)

    def synced() -> bool:
        found = {r.pid: r for r in presence.processes()}
        return all(pid in found and found[pid].synced for pid in pids)

    wait_for(synced, timeout=30, message="the gunicorn workers to report themselves synced")
    reports = {r.pid: r for r in presence.processes()}
    assert {reports[pid].kind for pid in pids} == {"web"}

    worker.call("options.set_project_option", project, key, "after")
    wait_for(
        lambda: set(gunicorn.answers(project, key).values()) == {"after"},
        timeout=PROPAGATION_BOUND_S,
        message="both gunicorn workers to read the changed value",
    )


def test_a_process_that_reads_then_forks_sees_a_change_in_parent_and_child(
    services: Services, worker: Worker
) -> None:
    """A plain process that read, then forked: parent and child both read a later change, from
    their local caches moved on by the broadcast."""
    project, key = fresh_id(), "forked"
    worker.call("options.set_project_option", project, key, "before")
    reader = subprocess.Popen(
        [sys.executable, "-m", "tests.forking_reader", str(project), key, '"after"'],
        env=services.env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None

    def next_line() -> dict[str, Any]:
        # Every line on stdout is the reader's own: the store's events go to stderr.
        line = reader.stdout.readline()  # type: ignore[union-attr]
        if not line:
            return {"eof": True}
        found: dict[str, Any] = json.loads(line)
        return found

    try:
        lines: list[dict[str, Any]] = []
        while len([line for line in lines if "ready" in line]) < 2:
            lines.append(next_line())
            assert "eof" not in lines[-1], lines
        ready = {line["role"]: line for line in lines if "ready" in line}
        assert ready["parent"]["ready"] and ready["child"]["ready"], ready
        assert {line["value"] for line in ready.values()} == {"before"}

        worker.call("options.set_project_option", project, key, "after")
        while len([line for line in lines if "saw" in line or "timeout" in line]) < 2:
            lines.append(next_line())
            assert "eof" not in lines[-1], lines
        saw = {line["role"]: line for line in lines if "saw" in line}
        assert set(saw) == {"parent", "child"}, lines
        assert reader.wait(timeout=30) == 0
    finally:
        reader.kill()
        reader.wait()
