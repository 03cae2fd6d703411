"""A database failover seen from the workers: the database turns read-only and its sessions are
cut, for a few seconds, while writes flow. Every write is retried until it lands; none fails."""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.conftest import fresh_id, wait_for
from tests.faults.checks import (
    committed,
    history_counts,
    record,
    results,
    wait_committed,
    wait_converged,
)
from tests.faults.fleet import Stream, fleet
from tests.faults.servers import PostgresServer, RedisServer

READ_ONLY_S = 4.0
WRITES = 50
KEYS = 5


def _read_only(admin: psycopg.Connection[Any], database: str, *, on: bool) -> None:
    """What a failover looks like for a few seconds: new sessions are read-only (``on``) or
    writable again; with ``on``, the current sessions are cut as a switchover cuts them."""
    setting = "on" if on else "off"
    admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = {setting}')
    if on:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        )


def _all_results(backend_url: str, ids: list[str]) -> dict[str, dict[str, Any]] | None:
    found = results(backend_url, ids)
    return found if len(found) == len(ids) else None


@pytest.mark.faults
def test_writes_sent_while_the_database_is_read_only_all_land(
    stable: PostgresServer, own_redis: Any
) -> None:
    """Writes sent to a prefork worker while its database is read-only (SQLSTATE 25006) and its
    sessions are terminated are retried with backoff, and every one lands once it is writable,
    none acknowledged as failed."""
    broker: RedisServer = own_redis()
    database_url = stable.new_database()
    database = urlsplit(database_url).path.lstrip("/")
    project = fresh_id()
    tag = uuid.uuid4().hex[:8]
    writes = [
        (f"ro-{i:03d}-{tag}", "options.set_project_option", [project, f"k{i % KEYS}", f"v{i}"])
        for i in range(WRITES)
    ]
    ids = [task_id for task_id, _, _ in writes]
    with (
        fleet(database_url, stable.redis_url, stable.redis_url) as own,
        psycopg.connect(stable.database_url, autocommit=True) as admin,
    ):
        worker = own.start(broker_url=broker.url, concurrency=2)
        worker.call("options.set_project_option", project, "k0", "before")
        since = len(worker.log())
        _read_only(admin, database, on=True)
        read_only_at = time.monotonic()
        try:
            stream = Stream(worker.producer, writes)
            stream.start()
            wait_for(
                lambda: "ReadOnlySqlTransaction" in worker.log()[since:],
                timeout=60,
                message="a write to meet the read-only database",
            )
            # The rest of the few seconds is the failover itself, not a wait for an outcome.
            time.sleep(max(0.0, read_only_at + READ_ONLY_S - time.monotonic()))
        finally:
            _read_only(admin, database, on=False)
        writable_at = time.monotonic()
        assert stream.finish() == ids
        wait_committed(database_url, ids, timeout=150)
        landed_s = time.monotonic() - writable_at
        wait_converged(own, database_url, [project])
        outcomes = wait_for(
            lambda: _all_results(stable.redis_url, ids),
            timeout=60,
            message="every write's result",
        )
        log = worker.log()[since:]
    failed = {t: r for t, r in outcomes.items() if r.get("status") != "SUCCESS"}
    counts = history_counts(database_url, ids)
    record(
        "database read-only (failover)",
        writes=len(ids),
        lost=len(ids) - len(committed(database_url, ids)),
        failed=len(failed),
        read_only_s=round(writable_at - read_only_at, 2),
        retries_logged=log.count("retry: Retry in"),
        all_landed_s=round(landed_s, 2),
    )
    assert failed == {}, list(failed.items())[:3]
    assert "ReadOnlySqlTransaction" in log
    assert set(counts.values()) <= {1}, "a write is in history more than once"
