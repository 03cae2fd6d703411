"""PostgreSQL stopped for 10 s under write load: reads keep answering from the caches (a
last-known value, logged, when Redis has nothing), writes retry with backoff, and every write
lands once PostgreSQL is back."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import redis

from tests.conftest import fresh_id, wait_for
from tests.faults.checks import (
    committed,
    history_counts,
    read_all,
    record,
    wait_committed,
    wait_converged,
    wait_status_converged,
)
from tests.faults.fleet import FaultWorker, Fleet, Stream, fleet
from tests.faults.servers import PostgresServer, RedisServer

OUTAGE_S = 10.0
WRITES = 300
PER_SECOND = 20.0
KEYS = 3
KEPT = {"kept": {"last": "known"}}


def state_before_outage(database_url: str, scope: str) -> dict[str, Any]:
    """The scope at the last revision committed before the server was last started."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT key, new_value FROM options_history WHERE scope = %s"
            " AND changed_at < pg_postmaster_start_time() ORDER BY revision, id",
            (scope,),
        ).fetchall()
    values: dict[str, Any] = {}
    for key, new_value in rows:
        if new_value is None:
            values.pop(key, None)
        else:
            values[key] = new_value
    return values


@dataclass
class Outage:
    """What the readers answered while PostgreSQL was down."""

    rounds: list[dict[int, Any]] = field(default_factory=list)
    last_known: dict[int, Any] = field(default_factory=dict)
    slowest_s: float = 0.0

    def read(self, reader: FaultWorker, project: int) -> dict[int, Any]:
        started = time.monotonic()
        answers = read_all(reader, project)
        self.slowest_s = max(self.slowest_s, time.monotonic() - started)
        return answers


def read_through_outage(
    own: Fleet, reader: FaultWorker, writer: FaultWorker, cache_url: str, projects: list[int]
) -> Outage:
    """Read in every reader process while PostgreSQL is down: ``written`` (in Redis) again and
    again, and ``quiet`` once its Redis entry is gone (each process's last-known value)."""
    written, quiet = projects
    seen = Outage()
    seen.rounds.append(seen.read(reader, written))
    redis.Redis.from_url(cache_url).delete(f"{own.namespace}:scope:project:{quiet}")
    seen.last_known = seen.read(reader, quiet)
    wait_for(
        lambda: "retry: Retry in" in writer.log(),
        timeout=OUTAGE_S,
        message="the writer to log a retry",
    )
    return seen


@pytest.mark.faults
def test_postgres_stopped_for_ten_seconds_under_load(
    stable: PostgresServer, own_postgres: PostgresServer, own_redis: Any
) -> None:
    """With PostgreSQL stopped for 10 s under write load, every reader process still answers
    (from Redis, or a logged last-known value), the writer logs retries, and every write
    lands exactly once when PostgreSQL returns."""
    broker: RedisServer = own_redis()
    own_postgres.start()
    database_url = own_postgres.new_database()
    written, quiet = fresh_id(), fresh_id()
    tag = uuid.uuid4().hex[:8]
    writes = [
        (f"pg-{i:04d}-{tag}", "options.set_project_option", [written, f"k{i % KEYS}", f"w{i}"])
        for i in range(WRITES)
    ]
    ids = [task_id for task_id, _, _ in writes]
    with fleet(database_url, own_postgres.redis_url, stable.redis_url) as own:
        # Readers and the writer consume separate queues: writes stuck retrying never queue
        # ahead of the reads made during the outage.
        reader = own.start(broker_url=broker.url, concurrency=2)
        # One writer thread: two race their Redis updates and can leave Redis a floor (no
        # values) for the scope; test_postgres_reads.py pins what readers do then.
        writer = own.start(
            broker_url=broker.url,
            pool="threads",
            concurrency=1,
            extra_env={"OPTIONS_TASK_QUEUE": f"{own.namespace}.writer"},
        )
        writer.call("options.set_project_option", written, "k0", "before")
        writer.call("options.set_project_option", quiet, "kept", KEPT["kept"])
        wait_converged(own, database_url, [written, quiet])
        # Every reader process has now loaded `quiet`: the value it may fall back on later.
        since = len(reader.log())

        stream = Stream(writer.producer, writes, per_second=PER_SECOND)
        stream.start()
        wait_for(lambda: len(stream.sent) >= 40, timeout=60, message="load to build up")
        own_postgres.stop()
        stopped_at = time.monotonic()
        try:
            seen = read_through_outage(
                own, reader, writer, own_postgres.redis_url, [written, quiet]
            )
            while time.monotonic() < stopped_at + OUTAGE_S - 1.5:
                seen.rounds.append(seen.read(reader, written))
            # The rest of the 10 s is the outage itself, not a wait for an outcome.
            time.sleep(max(0.0, stopped_at + OUTAGE_S - time.monotonic()))
        finally:
            own_postgres.start()
        back_at = time.monotonic()

        sent = stream.finish()
        assert sent == ids
        wait_committed(database_url, ids, timeout=150)
        landed_s = time.monotonic() - back_at
        converge_s = wait_converged(own, database_url, [written, quiet]) + landed_s
        wait_status_converged(own)

        expected = state_before_outage(database_url, f"project:{written}")
        for answers in seen.rounds:
            assert set(answers) == reader.pids()
            for pid, values in answers.items():
                assert values == expected, f"pid {pid} read {values} during the outage"
        assert set(seen.last_known) == reader.pids()
        assert all(values == KEPT for values in seen.last_known.values()), seen.last_known
        fallbacks = [
            e
            for e in reader.events("cache.fallback", since=since)
            if e.get("to") == "last_known" and e.get("scope") == f"project:{quiet}"
        ]
        # Each reader process answered `quiet` with its Redis entry gone and PostgreSQL down,
        # so from its last-known value; each such read logs one event.
        assert len({e.get("task_id") for e in fallbacks}) >= len(reader.pids()), fallbacks
        retries = writer.log().count("retry: Retry in")
        counts = history_counts(database_url, ids)
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}, "a write is in history more than once"
    record(
        "postgresql stopped",
        writes=len(ids),
        lost=len(ids) - len(committed(database_url, ids)),
        outage_s=round(back_at - stopped_at, 2),
        read_rounds_during_outage=len(seen.rounds) + 1,
        slowest_read_round_s=round(seen.slowest_s, 2),
        last_known_fallbacks_logged=len(fallbacks),
        retries_logged=retries,
        # A read in a process whose pooled connection the restart cut: test_postgres_reads.py.
        reads_failed_after_return=len(own.failed_reads),
        all_landed_s=round(landed_s, 2),
        converge_s=round(converge_s, 2),
    )
