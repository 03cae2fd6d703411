"""PgBouncer in transaction pooling mode between the workers and PostgreSQL: writes, reads in
worker children and reads in this process all pass through it without an error, and its own
errors count as transient."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from store.postgres.schema import SCHEMA_VERSION, migrate
from store.postgres.store import PostgresStore
from store.transient import postgres_unavailable
from tests.conftest import fresh_id
from tests.faults.checks import committed, record, snapshot, wait_converged
from tests.faults.fleet import fleet
from tests.faults.servers import (
    PgBouncer,
    PostgresServer,
    RedisServer,
    free_port,
    pgbouncer_binary,
    unavailable,
)

PROJECTS = 10
WRITES = 500
WORKER_READS = 300
IN_PROCESS_READS = 200


@pytest.fixture
def machine_database() -> Iterator[str]:
    """A database of the test's own on the machine's PostgreSQL (PgBouncer, run as the postgres
    user, reaches it over TCP with trust auth); dropped afterwards."""
    url = os.environ.get("OPTIONS_TEST_DATABASE_URL")
    if not url:
        unavailable("PgBouncer test: OPTIONS_TEST_DATABASE_URL is unset")
    assert url is not None
    name = f"optionstore_pgb_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pgbouncer(machine_database: str) -> Iterator[PgBouncer]:
    """A PgBouncer of the test's own, transaction pooling, two server connections per pool."""
    binary = pgbouncer_binary()
    if binary is None:
        unavailable("pgbouncer is not installed (apt-get install pgbouncer)")
    assert binary is not None
    bouncer = PgBouncer(binary, machine_database, pool_size=2, query_wait_timeout="3")
    bouncer.databases["unreachable"] = f"host=127.0.0.1 port={free_port()} dbname=none"
    yield bouncer.start()
    bouncer.close()


def _writes(projects: list[int], tag: str) -> list[tuple[str, str, list[Any]]]:
    """Single-key writes and set_many batches, each key written once, so the end state is known
    whatever order the children run them in."""
    writes: list[tuple[str, str, list[Any]]] = []
    for i in range(WRITES):
        project = projects[i % len(projects)]
        if i % 10 == 9:
            values = {f"m{i}a": i, f"m{i}b": {"n": str(i)}}
            writes.append(
                (f"pgb-{i:04d}-{tag}", "options.set_many", [f"project:{project}", values, []])
            )
        else:
            writes.append(
                (f"pgb-{i:04d}-{tag}", "options.set_project_option", [project, f"k{i}", i])
            )
    return writes


def _expected(writes: list[tuple[str, str, list[Any]]]) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {}
    for _, name, args in writes:
        if name == "options.set_many":
            state.setdefault(args[0], {}).update(args[1])
        else:
            state.setdefault(f"project:{args[0]}", {})[args[1]] = args[2]
    return state


def _read_in_process(conninfo: str, scopes: list[str]) -> list[str]:
    """IN_PROCESS_READS snapshot loads, history and listings from four threads sharing one pool
    (so the same statements run many times on connections PgBouncer multiplexes); the errors."""
    db = PostgresStore(conninfo=conninfo, max_size=4)
    errors: list[str] = []

    def read(n: int) -> None:
        try:
            if n % 10 == 0:
                db.history(scopes[n % len(scopes)])
            elif n % 10 == 1:
                db.list_scopes()
            else:
                db.load_scopes([scopes[n % len(scopes)], scopes[(n + 1) % len(scopes)]])
        except Exception as exc:  # counted: the test asserts there are none
            errors.append(f"{type(exc).__name__}: {exc}")

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(read, range(IN_PROCESS_READS)))
    finally:
        db.close()
    return errors


@pytest.mark.faults
def test_a_thousand_writes_and_reads_through_pgbouncer_transaction_pooling(
    stable: PostgresServer, own_redis: Any, pgbouncer: PgBouncer, machine_database: str
) -> None:
    """Behind PgBouncer in transaction pooling, migrations, 500 write tasks, 300 reads in
    prefork children and 200 reads in this process all succeed, and every write lands."""
    database = urlsplit(machine_database).path.lstrip("/")
    url = pgbouncer.url(database)
    assert migrate(url) == (0, SCHEMA_VERSION)  # one transaction, a transaction-level lock
    broker: RedisServer = own_redis()
    projects = [fresh_id() for _ in range(PROJECTS)]
    scopes = [f"project:{p}" for p in projects]
    writes = _writes(projects, uuid.uuid4().hex[:8])
    ids = [task_id for task_id, _, _ in writes]
    with fleet(url, stable.redis_url, stable.redis_url) as own:
        worker = own.start(broker_url=broker.url, concurrency=2)
        started = time.monotonic()
        sent = [worker.producer.send_task(n, args=a, task_id=t) for t, n, a in writes]
        reads = [
            worker.send("probe.read", "project_options", "get_all_values", [projects[i % PROJECTS]])
            for i in range(WORKER_READS)
        ]
        in_process_errors = _read_in_process(url, scopes)
        failures = []
        for result in [*sent, *reads]:
            result.get(timeout=180, propagate=False)
            if result.state != "SUCCESS":
                failures.append(f"{result.id}: {result.state} {result.result!r}")
        all_done_s = time.monotonic() - started
        converge_s = wait_converged(own, machine_database, projects)
        log = worker.log()
    lost = len(ids) - len(committed(machine_database, ids))
    retries = log.count("retry: Retry in")
    record(
        "pgbouncer transaction pooling",
        writes=len(ids),
        worker_reads=len(reads),
        in_process_reads=IN_PROCESS_READS,
        errors=len(failures) + len(in_process_errors),
        lost=lost,
        retries_logged=retries,
        all_done_s=round(all_done_s, 2),
        converge_s=round(converge_s, 2),
    )
    assert failures == [], failures[:5]
    assert in_process_errors == [], in_process_errors[:5]
    assert lost == 0
    expected = _expected(writes)
    for scope in scopes:
        assert snapshot(machine_database, scope)[1] == expected[scope], scope
    assert "PreparedStatement" not in log and "prepared statement" not in log


@pytest.mark.faults
def test_pgbouncer_refusing_a_client_is_a_transient_error(pgbouncer: PgBouncer) -> None:
    """What psycopg raises when PgBouncer cannot reach the server (it answers the client with
    its own error after query_wait_timeout) is classified as transient."""
    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(pgbouncer.url("unreachable"), connect_timeout=30).close()
    assert "query_wait_timeout" in str(raised.value) or "cannot connect" in str(raised.value)
    assert postgres_unavailable(raised.value)
