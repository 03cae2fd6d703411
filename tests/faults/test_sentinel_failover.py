"""Redis Sentinel in front of a primary and a replica, as broker and cache: the primary killed
mid-stream, the Sentinels promote the replica, and the worker, its reload consumers and the
cache follow the new master with no write lost."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import fresh_id, wait_for
from tests.faults.checks import (
    committed,
    record,
    writes_through_fault,
)
from tests.faults.fleet import FaultWorker, fleet, project_writes, wait_synced
from tests.faults.servers import PostgresServer
from tests.faults.topology_servers import SentinelGroup

WRITES = 300
PER_SECOND = 40.0
KEYS = 4


@pytest.fixture
def sentinels(scratch: Path) -> Iterator[SentinelGroup]:
    """A primary, a replica and two Sentinels of this test's own."""
    group = SentinelGroup(scratch / f"sentinel-{uuid.uuid4().hex[:8]}").start()
    yield group
    group.close()


@pytest.mark.faults
def test_sentinel_failover_under_load(stable: PostgresServer, sentinels: SentinelGroup) -> None:
    """With the broker on sentinel:// URLs and the cache on a redis+sentinel:// URL, kill -9 of
    the primary during writes loses none: every write commits once, and every process then reads
    and reports what PostgreSQL holds, through the promoted replica."""
    database_url = stable.new_database()
    projects = [fresh_id(), fresh_id()]
    writes = project_writes("sentinel", projects, count=WRITES, keys=KEYS)
    ids = [task_id for task_id, _, _ in writes]
    with fleet(database_url, sentinels.cache_url, stable.redis_url) as own:
        worker = FaultWorker(
            own.services,
            result_backend=stable.redis_url,
            broker_url=sentinels.broker_url,
            concurrency=2,
            extra_env={"OPTIONS_BROKER_MASTER_NAME": sentinels.master},
        )
        worker.producer.conf.broker_transport_options = {"master_name": sentinels.master}
        own.stack.callback(worker.stop)
        worker.start()
        own.workers.append(worker)
        wait_synced(own, worker.pids())
        old = sentinels.primary()
        promoted: list[float] = []
        killed: list[float] = []

        def kill_primary() -> None:
            # Between two sends, once the replica holds all the primary has: Redis replicates
            # asynchronously, so a task the primary took in its last milliseconds may be
            # missing on the replica it fails over to, whatever the producer does
            # (docs/architecture.md, known limits). Every send after this meets the failover:
            # refused, then sent again to the promoted replica.
            client = old.client()
            sent = int(client.info("replication")["master_repl_offset"])
            wait_for(
                lambda: replicated(client, sent),
                timeout=30,
                interval=0.01,
                message="the replica to hold every task sent so far",
            )
            killed.append(time.monotonic())
            old.kill()

        def promotion() -> float:
            wait_for(
                lambda: sentinels.primary_port() != old.port,
                timeout=60,
                interval=0.1,
                message="the Sentinels to promote the replica",
            )
            promoted.append(time.monotonic() - killed[0])
            return killed[0]

        done = writes_through_fault(
            own,
            worker,
            database_url,
            projects,
            writes,
            between_sends=kill_primary,
            fault=promotion,
            build_up=WRITES // 3,
            per_second=PER_SECOND,
            when="after the failover",
        )
        # The worker takes with BLMOVE on the new master (never a silent BRPOP fall-back).
        names = [str(c.get("name", "")) for c in sentinels.primary().client().client_list()]
        assert any(n.startswith("optionstore-taken-") for n in names), names
        assert "can be lost if this worker dies" not in worker.log()
        reconnects = worker.log().count("Connection to broker lost")
    assert not own.failed_reads, own.failed_reads
    assert set(done.counts) == set(ids)
    assert set(done.counts.values()) == {1}, "a write is in history more than once"
    record(
        "Redis Sentinel failover (primary kill -9), broker and cache",
        writes=len(ids),
        lost=len(ids) - len(committed(database_url, ids)),
        committed_when_killed=done.committed_at_fault,
        promoted_s=round(promoted[0], 2),
        sends_refused=done.sends_refused,
        worker_reconnects=reconnects,
        all_committed_s=round(done.committed_s, 2),
        converge_s=round(done.converge_s, 2),
    )


def replicated(primary: redis.Redis, offset: int) -> bool:
    """Whether every replica of ``primary`` has acknowledged its stream up to ``offset`` (a
    replica acknowledges about once a second)."""
    info = primary.info("replication")
    replicas = [value for name, value in info.items() if name.startswith("slave")]
    return bool(replicas) and all(int(r.get("offset", -1)) >= offset for r in replicas)
