"""A RabbitMQ node of our own whose write queue is a quorum queue (OPTIONS_TASK_QUEUE_TYPE=quorum),
restarted under write load: no write is lost, and every process then reads what PostgreSQL holds."""

from __future__ import annotations

import subprocess
import time
import uuid

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
from tests.faults.fleet import FaultWorker, Stream, fleet, wait_synced
from tests.faults.servers import PostgresServer, RabbitNode
from tests.faults.test_rabbitmq_restart import rabbit  # noqa: F401 (the node fixture)

WRITES = 400
PER_SECOND = 40.0
KEYS = 4


def queue_type(node: RabbitNode, queue: str) -> str:
    """The type RabbitMQ reports for ``queue`` ("quorum", "classic"), or "" if it has none."""
    done = subprocess.run(
        [str(node.binaries / "rabbitmqctl"), "-q", "-n", node.name, "list_queues", "name", "type"],
        env=node.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = dict(line.split("\t")[:2] for line in done.stdout.splitlines() if "\t" in line)
    return found.get(queue, "")


@pytest.mark.faults
def test_quorum_queue_restart_under_load(stable: PostgresServer, rabbit: RabbitNode) -> None:  # noqa: F811
    """With the write queue a quorum queue, RabbitMQ restarted mid-stream loses no write the
    broker confirmed, and once it is back every process reads what PostgreSQL holds."""
    database_url = stable.new_database()
    projects = [fresh_id(), fresh_id()]
    tag = uuid.uuid4().hex[:8]
    writes = [
        (
            f"quorum-{i:04d}-{tag}",
            "options.set_project_option",
            [projects[i % len(projects)], f"k{i % KEYS}", f"w{i}-{tag}"],
        )
        for i in range(WRITES)
    ]
    ids = [task_id for task_id, _, _ in writes]
    with fleet(database_url, stable.redis_url, stable.redis_url) as own:
        worker = FaultWorker(
            own.services,
            result_backend=stable.redis_url,
            broker_url=rabbit.url,
            concurrency=2,
            extra_env={"OPTIONS_TASK_QUEUE_TYPE": "quorum"},
        )
        # A producer declares the queue as it sends: the same type, or RabbitMQ refuses.
        worker.producer.conf.task_default_queue_type = "quorum"
        own.stack.callback(worker.stop)
        worker.start()
        own.workers.append(worker)
        wait_synced(own, worker.pids())
        assert queue_type(rabbit, worker.queue) == "quorum"
        assert "Global QoS is disabled" in worker.log()
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
        "rabbitmq restart, quorum write queue",
        writes=len(ids),
        lost=len(ids) - len(committed(database_url, ids)),
        committed_when_stopped=at_stop,
        down_s=round(back_at - stopped_at, 2),
        sends_refused=stream.refused,
        worker_reconnects=reconnects,
        all_committed_s=round(committed_s, 2),
        converge_s=round(converge_s, 2),
    )
