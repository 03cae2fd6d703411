"""The embedded default against real servers: start, share, restart after kill -9, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from store.embedded import EmbeddedServices, embedded_status, ensure_embedded, stop_embedded

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not Path("/proc/self").exists(), reason="inspects /proc")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / ".optionstore"
    yield directory
    stop_embedded(directory)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.02)


def exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for init: either way it serves nothing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def postmasters(state_dir: Path) -> list[int]:
    """Live postmasters of this state folder (their backends rename themselves)."""
    pgdata = str((state_dir / "postgres").resolve())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or is_dead(int(proc.name)):
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"/bin/postgres") and pgdata.encode() in argv:
            found.append(int(proc.name))
    return found


def redis_servers(state_dir: Path) -> list[int]:
    """Live redis-server processes working in this state folder (redis chdirs to --dir)."""
    directory = str((state_dir / "redis").resolve())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or is_dead(int(proc.name)):
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd == directory and (exe_of(int(proc.name)) or "").endswith("redis-server"):
            found.append(int(proc.name))
    return found


def redis_pid(state_dir: Path) -> int:
    return int((state_dir / "redis" / "redis.pid").read_text())


def postmaster_pid(state_dir: Path) -> int:
    return int((state_dir / "postgres" / "postmaster.pid").read_text().split()[0])


def assert_serving(services: EmbeddedServices) -> None:
    with psycopg.connect(services.database_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT 1, current_database()").fetchone()
    assert row == (1, "optionstore")
    client = redis.Redis.from_url(services.redis_url, socket_timeout=5)
    try:
        assert client.ping()
    finally:
        client.close()


def test_fresh_state_dir_starts_both_servers(state_dir: Path) -> None:
    """A fresh state folder gets a PostgreSQL with database optionstore and a Redis that answers."""
    services = ensure_embedded(state_dir)

    assert_serving(services)
    assert services.redis_url.startswith("redis://127.0.0.1:") and services.redis_url.endswith("/0")
    assert json.loads((state_dir / "redis.json").read_text())["port"] == int(
        services.redis_url.rsplit(":", 1)[1].split("/")[0]
    )
    client = redis.Redis.from_url(services.redis_url)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        client.close()
    status = embedded_status(state_dir)
    assert status["postgres"] == {
        "running": True,
        "url": services.database_url,
        "log": str(state_dir / "postgres" / "log"),
    }
    assert status["redis"] == {
        "running": True,
        "url": services.redis_url,
        "log": str(state_dir / "redis" / "redis.log"),
    }


def test_warm_call_reuses_running_servers_quickly(state_dir: Path) -> None:
    """Once both servers run, ensure_embedded starts nothing and returns within 50 ms."""
    first = ensure_embedded(state_dir)
    pids = (postmaster_pid(state_dir), redis_pid(state_dir))

    timings = []
    for _ in range(5):
        started = time.perf_counter()
        assert ensure_embedded(state_dir) == first
        timings.append(time.perf_counter() - started)

    assert (postmaster_pid(state_dir), redis_pid(state_dir)) == pids
    assert min(timings) < 0.05, timings


def test_long_state_dir_path_still_gets_postgres(tmp_path: Path) -> None:
    """A state folder too deep for a unix socket name still yields a working PostgreSQL."""
    directory = tmp_path / ("deep-" * 16) / ".optionstore"
    assert len(str(directory / "postgres" / ".s.PGSQL.5432")) > 107
    try:
        services = ensure_embedded(directory)
        assert_serving(services)
    finally:
        stop_embedded(directory)


CHILD = """
import sys
from pathlib import Path
from store.embedded import ensure_embedded
print("ready", flush=True)
sys.stdin.readline()
services = ensure_embedded(Path(sys.argv[1]))
print(services.database_url, services.redis_url, flush=True)
"""


def test_concurrent_callers_share_one_server_each(state_dir: Path) -> None:
    """Five processes racing on a fresh state folder get the same URLs and one server each."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state_dir)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    try:
        for child in children:  # a barrier: every child has imported before any starts
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=120)[0] for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()

    assert [child.returncode for child in children] == [0] * 5
    assert len(set(outputs)) == 1, outputs
    database_url, redis_url = outputs[0].split()
    assert_serving(EmbeddedServices(database_url=database_url, redis_url=redis_url))
    assert postmasters(state_dir) == [postmaster_pid(state_dir)]
    assert redis_servers(state_dir) == [redis_pid(state_dir)]


def test_redis_killed_with_sigkill_is_restarted_on_its_port(state_dir: Path) -> None:
    """After kill -9 of Redis, the next call starts a new one on the same URL."""
    before = ensure_embedded(state_dir)
    old = redis_pid(state_dir)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: is_dead(old))
    assert embedded_status(state_dir)["redis"] == {
        "running": False,
        "url": before.redis_url,
        "log": str(state_dir / "redis" / "redis.log"),
    }

    after = ensure_embedded(state_dir)

    assert after == before
    assert redis_pid(state_dir) != old
    assert redis_servers(state_dir) == [redis_pid(state_dir)]
    assert_serving(after)


def test_postgres_killed_with_sigkill_is_restarted(state_dir: Path) -> None:
    """After kill -9 of the postmaster, the next call starts PostgreSQL again on the same data."""
    before = ensure_embedded(state_dir)
    with psycopg.connect(before.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE survivor (id int)")
    old = postmaster_pid(state_dir)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: is_dead(old))

    after = ensure_embedded(state_dir)

    assert after == before
    assert postmaster_pid(state_dir) != old
    assert postmasters(state_dir) == [postmaster_pid(state_dir)]
    with psycopg.connect(after.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM survivor").fetchone() == (0,)


def test_stop_embedded_stops_both_and_tolerates_repeats(state_dir: Path, tmp_path: Path) -> None:
    """stop_embedded stops both servers, and is a no-op when nothing (or no folder) is there."""
    ensure_embedded(state_dir)
    pids = [postmaster_pid(state_dir), redis_pid(state_dir)]

    stop_embedded(state_dir)

    assert all(is_dead(pid) for pid in pids)
    assert postmasters(state_dir) == [] and redis_servers(state_dir) == []
    for entry in embedded_status(state_dir).values():
        assert isinstance(entry, dict) and entry["running"] is False
    stop_embedded(state_dir)
    stop_embedded(tmp_path / "never-created")
    assert_serving(ensure_embedded(state_dir))  # and it starts again from the stopped state
