"""PostgreSQL, the source of truth, restored from a dump older than its last commits: the
revisions it hands out again lose to nothing cached. Every process converges on what the
restored database holds within 10 s, and a later write wins everywhere."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from store.embedded import _postgres_binary
from tests.conftest import amqp_url, fresh_id, read_in_new_process, wait_for
from tests.faults.checks import record
from tests.faults.fleet import FaultWorker, fleet
from tests.faults.servers import PostgresServer

ROLLBACK_BOUND_S = 10.0


def _pg_tool(name: str, *args: str) -> None:
    subprocess.run(
        [str(_postgres_binary().parent / name), *args],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _restore(database_url: str, dump: Path) -> None:
    """Drop the database (its sessions cut), create it again, and restore ``dump`` into it."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    _pg_tool("pg_restore", "--no-owner", "-d", database_url, str(dump))


@pytest.mark.faults
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_database_restored_from_an_older_dump(
    stable: PostgresServer, scratch: Path, broker: str
) -> None:
    """pg_dump, more commits, then drop and pg_restore: a later write to a scope whose commits
    were lost is read by a new process and by every child within 10 s; a scope whose commits
    were lost and that nobody writes again comes back to the restored value, one created after
    the dump to nothing; a scope untouched since the dump keeps its value."""
    database_url = stable.new_database()
    rewritten, reverted, kept, created = (fresh_id() for _ in range(4))
    dump = scratch / f"rollback-{rewritten}.dump"
    broker_url = stable.redis_url if broker == "redis" else amqp_url()
    with fleet(database_url, stable.redis_url, stable.redis_url) as own:
        worker = own.start(
            broker_url=broker_url, concurrency=2, extra_env={"OPTIONS_LOCAL_CACHE": "process"}
        )

        def everywhere(project: int) -> set[Any]:
            answers = worker.read_everywhere("project_options", "get_value", project, "k")
            return set(answers.values())

        for project, value in ((rewritten, "dumped"), (reverted, "dumped"), (kept, "kept")):
            worker.call("options.set_project_option", project, "k", value)
        _pg_tool("pg_dump", "-Fc", "-f", str(dump), database_url)
        for project in (rewritten, reverted, created):
            worker.call("options.set_project_option", project, "k", "lost")
        worker.call("options.set_project_option", rewritten, "k", "lost again")
        assert everywhere(rewritten) == {"lost again"}
        assert everywhere(reverted) == everywhere(created) == {"lost"}

        _restore(database_url, dump)
        back = time.monotonic()
        result = _write(worker, rewritten, "after")
        # Committed after the restore: at revision 2, one the caches had seen (and must move
        # past), or later if the leader's repair of the rolled-back scope came first.
        assert result["revision"] >= 2

        def converged(project: int, value: Any) -> bool:
            return read_in_new_process(own.services, project, "k") == value and everywhere(
                project
            ) == {value}

        wait_for(
            lambda: converged(rewritten, "after"),
            timeout=ROLLBACK_BOUND_S,
            interval=0.05,
            message="a new process and every child to read the write made after the restore",
        )
        later_write_s = time.monotonic() - back
        wait_for(
            lambda: converged(reverted, "dumped") and converged(created, None),
            timeout=ROLLBACK_BOUND_S - (time.monotonic() - back),
            interval=0.05,
            message="every process to read what the restored database holds",
        )
        restored_s = time.monotonic() - back
        assert converged(kept, "kept")
        assert worker.events("reconcile.postgres_went_back"), "the relay did not notice"
        rebased = {event["scope"] for event in worker.events("postgres.went_back")}
        assert {f"project:{p}" for p in (rewritten, reverted, created)} <= rebased
        assert f"project:{kept}" not in rebased

        # Writes after the repair land on top of the restored state, everywhere.
        _write(worker, reverted, "later")
        wait_for(
            lambda: converged(reverted, "later"),
            timeout=ROLLBACK_BOUND_S,
            interval=0.05,
            message="every process to read a write made after the repair",
        )
    record(
        f"PostgreSQL restored from an older dump (pg_dump, drop, pg_restore; {broker} broker)",
        later_write_everywhere_s=round(later_write_s, 2),
        restored_state_everywhere_s=round(restored_s, 2),
    )


def _write(worker: FaultWorker, project: int, value: Any) -> Any:
    """The write task's result, retried while the worker's connections find the database
    being restored (the task itself retries a lost connection)."""
    return worker.call("options.set_project_option", project, "k", value, timeout=60)
