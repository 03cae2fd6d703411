"""Fixtures of the fault suite: servers of its own that a test may stop, kill and restart.

Nothing here touches the machine's shared PostgreSQL, Redis or RabbitMQ: every server a fault
breaks is a process this suite started, on a port or in a folder of its own. Each fault's
figures are printed, appended to $OPTIONS_FAULT_REPORT, and repeated at the end of the run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.checks import FIGURES
from tests.faults.servers import PostgresServer, RedisServer


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Repeat every fault's figures at the end of the run, where they are easy to find."""
    if FIGURES:
        terminalreporter.section("fault figures")
        for line in FIGURES:
            terminalreporter.write_line(json.dumps(line, sort_keys=True))


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    """A temp folder for the suite's servers, removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="optionstore-faults-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def stable(scratch: Path) -> Iterator[PostgresServer]:
    """PostgreSQL and Redis no fault touches: databases, caches and result backends."""
    server = PostgresServer(scratch / "stable").start()
    yield server
    server.close()


@pytest.fixture
def own_redis(scratch: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start Redis servers this test may restart; all are killed at its end."""
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(scratch / f"redis-{uuid.uuid4().hex[:8]}").start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def own_postgres(scratch: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL (and a cache Redis) of the module's own, since its tests stop it; each test
    starts it again if it finds it stopped."""
    server = PostgresServer(scratch / f"pg-{uuid.uuid4().hex[:8]}").start()
    yield server
    server.close()
