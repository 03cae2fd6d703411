"""A RabbitMQ broker (a node of our own) restarted under write load: no write is lost, and once
it is back every process reads what PostgreSQL holds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fresh_id, wait_for
from tests.faults.checks import (
    committed,
    history_counts,
    read_all,
    record,
    stale_reads,
    wait_committed,
    wait_converged,
    wait_status_converged,
)
from tests.faults.fleet import FaultWorker, Fleet, Stream, fleet, project_writes
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
    ids = [task_id for task_id, _, _ in writes]
    for project in projects:
        worker.call("options.set_project_option", project, "warm", 0)
        read_all(worker, project)
    stream = Stream(worker.producer, writes, per_second=PER_SECOND)
    stream.start()
    wait_for(lambda: len(stream.sent) >= WRITES // 5, timeout=60, message="load to build up")
    at_stop = len(committed(database_url, ids))
    stopped_at = time.monotonic()
    rabbit.stop()
    rabbit.start()
    back_at = time.monotonic()
    sent = stream.finish()
    assert sent == ids
    wait_committed(database_url, ids, timeout=150)
    committed_s = time.monotonic() - back_at
    stale = stale_reads(worker, database_url, projects)
    assert not stale, f"stale reads once RabbitMQ was back and every write committed: {stale}"
    converge_s = wait_converged(own, database_url, projects) + committed_s
    counts = history_counts(database_url, ids)
    wait_status_converged(own)
    reconnects = worker.log().count("Connection to broker lost")
    assert not own.failed_reads, own.failed_reads
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}, "a write is in history more than once"
    record(
        fault,
        writes=len(ids),
        lost=len(ids) - len(committed(database_url, ids)),
        committed_when_stopped=at_stop,
        down_s=round(back_at - stopped_at, 2),
        sends_refused=stream.refused,
        worker_reconnects=reconnects,
        all_committed_s=round(committed_s, 2),
        converge_s=round(converge_s, 2),
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
