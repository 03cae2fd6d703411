"""The write queue as a RabbitMQ quorum queue on the machine's RabbitMQ: declared quorum by the
worker, writes land, and the queue of the test's own is deleted afterwards."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import Services, Worker, amqp_url, fresh_id

# Celery's native delayed delivery (retries with a countdown on quorum queues) declares these.
DELAYED = "celery_delayed_"


def rabbit_queues() -> dict[str, str]:
    """Every queue on the machine's RabbitMQ and its type, as rabbitmqctl lists them."""
    if not shutil.which("rabbitmqctl"):
        pytest.skip("rabbitmqctl is not installed here")
    done = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "type"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(line.split("\t")[:2] for line in done.stdout.splitlines() if "\t" in line)


@pytest.mark.integration
def test_quorum_write_queue(services: Services) -> None:
    """OPTIONS_TASK_QUEUE_TYPE=quorum makes the worker declare its task queue as a quorum queue
    and take writes from it with per-consumer prefetch; each write is read back everywhere."""
    url = amqp_url()
    before = rabbit_queues()
    worker = Worker(services, broker_url=url, extra_env={"OPTIONS_TASK_QUEUE_TYPE": "quorum"})
    worker.producer.conf.task_default_queue_type = "quorum"
    try:
        worker.start()
        assert rabbit_queues().get(worker.queue) == "quorum"
        assert "Global QoS is disabled" in worker.log()
        project = fresh_id()
        for n in range(20):
            worker.call("options.set_project_option", project, f"k{n % 4}", n)
        reads = worker.read_everywhere("project_options", "get_all_values", project)
        assert all(v == {"k0": 16, "k1": 17, "k2": 18, "k3": 19} for v in reads.values()), reads
    finally:
        worker.stop()  # deletes the task queue
        left = rabbit_queues()
        assert worker.queue not in left
        # Celery's delayed-delivery queues, only if this test made them.
        made = [q for q in left if q.startswith(DELAYED) and q not in before]
        for queue in made:
            subprocess.run(["rabbitmqctl", "-q", "delete_queue", queue], check=False, timeout=60)
