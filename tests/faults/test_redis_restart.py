"""Redis restarted under write load, as the shared cache and (a variant) also as the broker:
no write is lost, and once Redis is back no process serves a value older than PostgreSQL's."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from tests.conftest import fresh_id, wait_for
from tests.faults.checks import (
    broker_drained,
    committed,
    reclaimed,
    record,
    writes_through_fault,
)
from tests.faults.fleet import fleet, project_writes
from tests.faults.servers import PostgresServer, RedisServer

WRITES = 400
PER_SECOND = 40.0
KEYS = 4
VISIBILITY_S = 5
CACHE_DOWN_S = 3.0


@pytest.mark.faults
@pytest.mark.parametrize("role", ["cache", "cache+broker"])
def test_redis_restart_under_load(stable: PostgresServer, own_redis: Any, role: str) -> None:
    """Redis restarted mid-stream loses no write, and once it is back, with every write
    committed, the first read in every process returns what PostgreSQL holds."""
    cache: RedisServer = own_redis()
    broker = cache if role == "cache+broker" else own_redis()
    database_url = stable.new_database()
    projects = [fresh_id(), fresh_id()]
    writes = project_writes("redis", projects, count=WRITES, keys=KEYS)
    ids = [task_id for task_id, _, _ in writes]
    with fleet(database_url, cache.url, stable.redis_url) as own:
        worker = own.start(
            broker_url=broker.url,
            concurrency=2,
            extra_env={"OPTIONS_VISIBILITY_TIMEOUT": str(VISIBILITY_S)},
        )
        down: list[float] = []

        def restart() -> float:
            cache.stop()
            stopped_at = time.monotonic()
            # As the broker, down for longer than the visibility timeout, so that the worker's
            # reconnect sweeps back what it held when Redis went (see test_redelivery.py).
            time.sleep(VISIBILITY_S + 1 if broker is cache else CACHE_DOWN_S)
            cache.start()
            down.append(time.monotonic() - stopped_at)
            return time.monotonic()

        def broker_hands_out_everything() -> None:
            if broker is not cache:
                return
            client = redis.Redis.from_url(broker.url)
            wait_for(
                lambda: broker_drained(client, worker.queue) or worker.exited(),
                timeout=90,
                interval=0.1,
                message="the broker to hand out and see acknowledged every write",
            )
            assert not worker.exited(), "the worker exited when its broker went away"

        # Every process reads the scopes before the fault: Redis and local caches are warm.
        done = writes_through_fault(
            own,
            worker,
            database_url,
            projects,
            writes,
            fault=restart,
            build_up=WRITES // 5,
            per_second=PER_SECOND,
            after_stream=broker_hands_out_everything,
            commit_timeout=120,
            when="once Redis was back",
        )
    assert not own.failed_reads, own.failed_reads
    assert set(done.counts) == set(ids)
    assert set(done.counts.values()) == {1}, "a write is in history more than once"
    record(
        f"redis restart ({role})",
        writes=len(ids),
        lost=len(ids) - len(committed(database_url, ids)),
        taken_and_reclaimed=reclaimed(worker),
        committed_when_stopped=done.committed_at_fault,
        down_s=round(down[0], 2),
        sends_refused=done.sends_refused,
        all_committed_s=round(done.committed_s, 2),
        converge_s=round(done.converge_s, 2),
    )


@pytest.mark.faults
def test_worker_survives_a_broker_outage_with_a_task_in_flight(
    stable: PostgresServer, own_redis: Any
) -> None:
    """A prefork worker (two children, as `make run` starts) running a task when its Redis
    broker stops is still running once Redis is back, and commits the next write."""
    broker: RedisServer = own_redis()
    database_url = stable.new_database()
    with fleet(database_url, stable.redis_url, stable.redis_url) as own:
        worker = own.start(
            broker_url=broker.url,
            concurrency=2,
            extra_env={"OPTIONS_VISIBILITY_TIMEOUT": str(VISIBILITY_S)},
        )
        main = worker.process
        assert main is not None
        since = len(worker.log())
        # Every task is acks_late here: this one stays unacknowledged while it runs.
        in_flight = worker.send("probe.pid", 3.0)
        wait_for(
            lambda: f"probe.pid[{in_flight.id}] received" in worker.log()[since:],
            timeout=30,
            message="the task to reach the worker",
        )
        broker.stop()
        wait_for(
            lambda: "Connection to broker lost" in worker.log()[since:] or main.poll() is not None,
            timeout=30,
            message="the worker to notice the broker is gone",
        )
        broker.start()
        wait_for(
            lambda: "Connected to " in worker.log()[since:] or main.poll() is not None,
            timeout=60,
            message="the worker to reconnect (or exit)",
        )
        assert "Unrecoverable error" not in worker.log()[since:], "the worker gave up"
        assert main.poll() is None, f"the worker exited with {main.returncode}"
        result = worker.call("options.set_project_option", fresh_id(), "k", "after", timeout=60)
        assert result["changed"] is True
