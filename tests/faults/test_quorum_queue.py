"""A RabbitMQ node of our own whose write queue is a quorum queue (OPTIONS_TASK_QUEUE_TYPE=quorum),
restarted under write load: no write is lost, and every process then reads what PostgreSQL holds."""

from __future__ import annotations

import subprocess

import pytest

from tests.faults.fleet import FaultWorker, fleet, wait_synced
from tests.faults.servers import PostgresServer, RabbitNode
from tests.faults.test_rabbitmq_restart import (  # noqa: F401 (rabbit: the node fixture)
    rabbit,
    restart_under_load,
)


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
        restart_under_load(
            own, worker, rabbit, database_url, fault="rabbitmq restart, quorum write queue"
        )
