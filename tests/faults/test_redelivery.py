"""Redelivery on a Redis broker: how soon a restarted worker gets back what a killed one held
(OPTIONS_VISIBILITY_TIMEOUT), and that a write handed to a worker that dies, or whose Redis
stops, before it records the write as unacknowledged still runs (store/transport/redis.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.conftest import fresh_id, wait_for
from tests.faults.checks import committed, kill_mid_stream, record, wait_committed
from tests.faults.fleet import FaultWorker, fleet
from tests.faults.servers import PostgresServer, RedisServer

VISIBILITY_S = 3
# A sweep every 10 s (kombu's default interval, unthrottled) redelivers within 10 s of the
# timeout; the margin adds half of that again for a noisy machine.
MARGIN_S = 15
WRITES = 60


@pytest.mark.faults
def test_restarted_worker_redelivers_within_the_visibility_timeout(
    stable: PostgresServer, own_redis: Any
) -> None:
    """A worker killed -9 mid-stream and restarted at once has run and acknowledged every
    unacknowledged write within OPTIONS_VISIBILITY_TIMEOUT plus a margin."""
    broker: RedisServer = own_redis()
    client = redis.Redis.from_url(broker.url)
    database_url = stable.new_database()
    project = fresh_id()
    tag = uuid.uuid4().hex[:8]
    writes = [
        (f"redeliver-{i:03d}-{tag}", "options.set_project_option", [project, "k", f"v{i}"])
        for i in range(WRITES)
    ]
    ids = [task_id for task_id, _, _ in writes]
    with fleet(database_url, stable.redis_url, stable.redis_url) as own:
        worker = own.start(
            broker_url=broker.url,
            concurrency=2,
            extra_env={"OPTIONS_VISIBILITY_TIMEOUT": str(VISIBILITY_S)},
        )
        killed_at, done = kill_mid_stream(worker, database_url, writes, worker.kill, WRITES // 3)
        # What the dead worker had taken and not acknowledged: the writes that must come back.
        held = client.hlen("unacked")
        assert held > 0, "the kill left nothing unacknowledged: the test proves nothing"
        worker.start()
        restarted_at = time.monotonic()

        def redelivered() -> bool:
            return client.hlen("unacked") == 0 and committed(database_url, ids) == set(ids)

        try:
            wait_for(
                redelivered,
                timeout=VISIBILITY_S + MARGIN_S,
                interval=0.1,
                message=f"the {held} unacknowledged writes to be redelivered",
            )
        finally:
            record(
                "redelivery after a whole-worker kill, restarted at once",
                visibility_timeout_s=VISIBILITY_S,
                unacknowledged_at_kill=held,
                committed_at_kill=done,
                committed_at_deadline=len(committed(database_url, ids)),
                writes=WRITES,
                waited_s=round(time.monotonic() - restarted_at, 2),
                down_s=round(restarted_at - killed_at, 2),
            )


def waiting_on_queue(client: redis.Redis) -> bool:
    """Whether a worker is blocked taking from the queue on this Redis: idle, nothing reserved."""
    return any(c["cmd"] == "blmove" and "b" in c["flags"] for c in client.client_list())


def taken(client: redis.Redis) -> list[bytes]:
    """What consumers have taken off the queue and not yet recorded as unacknowledged."""
    keys = [key for key in client.scan_iter(match="unacked.taken.*") if client.type(key) == b"list"]
    return [item for key in keys for item in client.lrange(key, 0, -1)]


def hand_over_then(
    worker: FaultWorker, client: redis.Redis, project: int, fault: Callable[[], None]
) -> str:
    """Send a write while the worker's main process is paused with its BLMOVE outstanding, so
    Redis hands the write over but the worker cannot record it yet; then ``fault``.

    The pause stands for a busy or descheduled process: it only widens the window between
    the two round trips, it does not create it.
    """
    main = worker.process
    assert main is not None
    wait_for(lambda: waiting_on_queue(client), timeout=30, message="the worker to wait (BLMOVE)")
    os.kill(main.pid, signal.SIGSTOP)
    try:
        task_id = f"taken-{uuid.uuid4().hex}"
        worker.producer.send_task(
            "options.set_project_option", args=[project, "k", task_id], task_id=task_id
        )
        assert client.llen(worker.queue) == 0, "the write was not handed to the worker"
        fault()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(main.pid, signal.SIGCONT)
    return task_id


def assert_not_lost(
    worker: FaultWorker, client: redis.Redis, database_url: str, task_id: str
) -> None:
    """Once the worker waits on the queue again, the write is committed, queued, held as
    unacknowledged or taken by the consumer that went away (and so comes back); then it
    commits."""
    wait_for(lambda: waiting_on_queue(client), timeout=60, message="the worker to wait again")
    kept = client.lrange(worker.queue, 0, -1) + client.hvals("unacked") + taken(client)
    held = any(task_id.encode() in message for message in kept)
    assert held or task_id in committed(database_url, [task_id]), (
        "the write is neither committed nor queued, unacknowledged or taken: it is lost"
    )
    wait_committed(database_url, [task_id], timeout=VISIBILITY_S + MARGIN_S, what="accepted write")


@pytest.mark.faults
def test_write_taken_by_a_worker_killed_before_recording_it_runs_again(
    stable: PostgresServer, own_redis: Any
) -> None:
    """A write the Redis broker handed to a worker killed -9 before it recorded the write as
    unacknowledged runs once the worker is restarted."""
    broker: RedisServer = own_redis()
    client = redis.Redis.from_url(broker.url)
    database_url = stable.new_database()
    with fleet(database_url, stable.redis_url, stable.redis_url) as own:
        worker = own.start(
            broker_url=broker.url,
            concurrency=1,
            extra_env={"OPTIONS_VISIBILITY_TIMEOUT": str(VISIBILITY_S)},
        )
        task_id = hand_over_then(worker, client, fresh_id(), worker.kill)
        time.sleep(VISIBILITY_S + 1)  # down past the visibility timeout, as in test_kills.py
        worker.start()
        assert_not_lost(worker, client, database_url, task_id)


@pytest.mark.faults
def test_write_taken_as_the_broker_stops_is_not_lost(
    stable: PostgresServer, own_redis: Any
) -> None:
    """A write the Redis broker handed to the worker just before Redis stopped runs once Redis
    is back."""
    broker: RedisServer = own_redis()
    client = redis.Redis.from_url(broker.url)
    database_url = stable.new_database()
    with fleet(database_url, stable.redis_url, stable.redis_url) as own:
        worker = own.start(
            broker_url=broker.url,
            concurrency=1,
            extra_env={"OPTIONS_VISIBILITY_TIMEOUT": str(VISIBILITY_S)},
        )
        since = len(worker.log())
        task_id = hand_over_then(worker, client, fresh_id(), broker.stop)
        wait_for(
            lambda: "Connection to broker lost" in worker.log()[since:],
            timeout=30,
            message="the worker to notice the broker is gone",
        )
        broker.start()
        assert_not_lost(worker, client, database_url, task_id)
