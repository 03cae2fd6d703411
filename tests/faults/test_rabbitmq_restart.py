"""A RabbitMQ broker (a node of our own) restarted under write load: no write is lost, and once
it is back every process reads what PostgreSQL holds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fresh_id
from tests.faults.checks import (
    committed,
    record,
    writes_through_fault,
)
from tests.faults.fleet import FaultWorker, Fleet, fleet, project_writes
from tests.faults.servers import PostgresServer, RabbitNode, rabbit_binaries, unavailable

WRITES = 400
PER_SECOND = 40.0
KEYS = 4


@pytest.fixture(scope="module")
def rabbit(scratch: Path) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this module's own, on free ports; skipped where none can start."""
    binaries = rabbit_binaries()
    if binaries is None:
        unavailable("rabbitmq-server is not installed here")
    assert binaries is not None
    node = RabbitNode(scratch / f"rabbit-{uuid.uuid4().hex[:8]}", binaries)
    try:
        node.start(timeout=90)
    except Exception as exc:
        node.close()
        unavailable(f"a second RabbitMQ node did not start within 90 s here: {exc}")
    yield node
    node.close()


def restart_under_load(
    own: Fleet, worker: FaultWorker, rabbit: RabbitNode, database_url: str, *, fault: str
) -> None:
    """Stream writes to ``worker`` through ``rabbit``, restart the node mid-stream, then check
    that every write committed once and every process reads what PostgreSQL holds; record the
    figures as ``fault``."""
    projects = [fresh_id(), fresh_id()]
    writes = project_writes("amqp", projects, count=WRITES, keys=KEYS)
    down: list[float] = []

    def restart() -> float:
        stopped_at = time.monotonic()
        rabbit.stop()
        rabbit.start()
        down.append(time.monotonic() - stopped_at)
        return time.monotonic()

    done = writes_through_fault(
        own,
        worker,
        database_url,
        projects,
        writes,
        fault=restart,
        build_up=WRITES // 5,
        per_second=PER_SECOND,
        when="once RabbitMQ was back",
    )
    reconnects = worker.log().count("Connection to broker lost")
    assert not own.failed_reads, own.failed_reads
    assert set(done.counts) == set(done.ids)
    assert set(done.counts.values()) == {1}, "a write is in history more than once"
    record(
        fault,
        writes=len(done.ids),
        lost=len(done.ids) - len(committed(database_url, done.ids)),
        committed_when_stopped=done.committed_at_fault,
        down_s=round(down[0], 2),
        sends_refused=done.sends_refused,
        worker_reconnects=reconnects,
        all_committed_s=round(done.committed_s, 2),
        converge_s=round(done.converge_s, 2),
    )


@pytest.mark.faults
def test_rabbitmq_restart_under_load(stable: PostgresServer, rabbit: RabbitNode) -> None:
    """RabbitMQ restarted mid-stream loses no write the broker confirmed, and once it is back,
    with every write committed, the first read in every process returns what PostgreSQL
    holds."""
    database_url = stable.new_database()
    with fleet(database_url, stable.redis_url, stable.redis_url) as own:
        worker = own.start(broker_url=rabbit.url, concurrency=2)
        restart_under_load(own, worker, rabbit, database_url, fault="rabbitmq restart")
