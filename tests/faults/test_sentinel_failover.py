"""Redis Sentinel in front of a primary and a replica, as broker and cache: the primary killed
mid-stream, the Sentinels promote the replica, and the worker, its reload consumers and the
cache follow the new master with no write lost."""

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
from tests.faults.fleet import FaultWorker, Stream, fleet, project_writes, wait_synced
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
        for project in projects:
            worker.call("options.set_project_option", project, "warm", 0)
            read_all(worker, project)
        old = sentinels.primary()
        stream = Stream(worker.producer, writes, per_second=PER_SECOND)
        stream.start()
        wait_for(lambda: len(stream.sent) >= WRITES // 3, timeout=60, message="load to build up")
        at_kill = len(committed(database_url, ids))
        killed_at = time.monotonic()
        old.kill()
        wait_for(
            lambda: sentinels.primary_port() != old.port,
            timeout=60,
            interval=0.1,
            message="the Sentinels to promote the replica",
        )
        promoted_s = time.monotonic() - killed_at
        sent = stream.finish()
        assert sent == ids
        wait_committed(database_url, ids, timeout=150)
        committed_s = time.monotonic() - killed_at
        stale = stale_reads(worker, database_url, projects)
        assert not stale, f"stale reads after the failover, every write committed: {stale}"
        converge_s = wait_converged(own, database_url, projects) + committed_s
        counts = history_counts(database_url, ids)
        wait_status_converged(own)
        # The worker takes with BLMOVE on the new master (never a silent BRPOP fall-back).
        names = [str(c.get("name", "")) for c in sentinels.primary().client().client_list()]
        assert any(n.startswith("optionstore-taken-") for n in names), names
        assert "can be lost if this worker dies" not in worker.log()
        reconnects = worker.log().count("Connection to broker lost")
    assert not own.failed_reads, own.failed_reads
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}, "a write is in history more than once"
    record(
        "Redis Sentinel failover (primary kill -9), broker and cache",
        writes=len(ids),
        lost=len(ids) - len(committed(database_url, ids)),
        committed_when_killed=at_kill,
        promoted_s=round(promoted_s, 2),
        sends_refused=stream.refused,
        worker_reconnects=reconnects,
        all_committed_s=round(committed_s, 2),
        converge_s=round(converge_s, 2),
    )
