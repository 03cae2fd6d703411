"""Eight producers writing one key 500 times each at once: PostgreSQL ends on the write with
the highest revision, history holds every write in gapless revision order, and every process
reads the final value."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from tests.conftest import fresh_id
from tests.faults.checks import (
    committed,
    record,
    results,
    snapshot,
    wait_committed,
    wait_converged,
    wait_status_converged,
)
from tests.faults.fleet import Stream, fleet, producer_app
from tests.faults.servers import PostgresServer, RedisServer

PRODUCERS = 8
WRITES_EACH = 500
KEY = "contended"
NAME = "options.set_project_option"


def history(database_url: str, scope: str) -> list[tuple[int, str, Any, Any, str]]:
    """The scope's history rows in the order they were written: (revision, key, old value,
    new value, task id)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT revision, key, old_value, new_value, task_id FROM options_history"
            " WHERE scope = %s ORDER BY id",
            (scope,),
        ).fetchall()
    return [tuple(row) for row in rows]  # type: ignore[misc]


@pytest.mark.faults
def test_eight_producers_race_on_one_key(stable: PostgresServer, own_redis: Any) -> None:
    """4,000 racing writes to one key: the final value is the highest revision's, history
    holds every write once, in revision order, gapless, and every process reads the final
    value."""
    broker: RedisServer = own_redis()
    database_url = stable.new_database()
    project = fresh_id()
    scope = f"project:{project}"
    tag = uuid.uuid4().hex[:8]
    with fleet(database_url, stable.redis_url, stable.redis_url) as own:
        worker = own.start(broker_url=broker.url, concurrency=3)
        gate = threading.Barrier(PRODUCERS)
        streams = [
            Stream(
                producer_app(worker.broker_url, worker.result_backend, worker.queue),
                [
                    (
                        f"race-{n}-{i:03d}-{tag}",
                        "options.set_project_option",
                        [project, KEY, f"p{n}-{i}"],
                    )
                    for i in range(WRITES_EACH)
                ],
                gate=gate,
            )
            for n in range(PRODUCERS)
        ]
        ids = [task_id for stream in streams for task_id, _, _ in stream.writes]
        started = time.monotonic()
        for stream in streams:
            stream.start()
        for stream in streams:
            stream.finish()
        sent_s = time.monotonic() - started
        wait_committed(database_url, ids, timeout=240)
        committed_s = time.monotonic() - started
        converge_s = wait_converged(own, database_url, [project])
        arrived = results(worker.result_backend, ids)
        wait_status_converged(own)
    assert not own.failed_reads, own.failed_reads

    assert {t for t, r in arrived.items() if r["status"] == "SUCCESS"} == set(ids)
    rows = history(database_url, scope)
    revisions = [row[0] for row in rows]
    # Every write changed the key (all values differ): one history row, one revision each.
    assert sorted(row[4] for row in rows) == sorted(ids), "history does not hold each write once"
    assert revisions == list(range(1, len(ids) + 1)), "revisions out of order or with gaps"
    for previous, row in itertools.pairwise(rows):
        assert row[2] == previous[3], f"revision {row[0]} does not follow {previous[0]}"
    assert rows[0][2] is None
    revision, values = snapshot(database_url, scope)
    assert revision == rows[-1][0] == len(ids)
    assert values == {KEY: rows[-1][3]}
    record(
        "eight producers, one key",
        producers=PRODUCERS,
        writes=len(ids),
        lost=len(ids) - len(committed(database_url, ids)),
        revisions=revision,
        final_value=values[KEY],
        send_s=round(sent_s, 2),
        all_committed_s=round(committed_s, 2),
        writes_per_s=round(len(ids) / committed_s, 1),
        converge_s=round(converge_s, 2),
    )
