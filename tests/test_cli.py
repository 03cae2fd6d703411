"""The ``optionstore`` command run as a subprocess against real services and a real worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from store.postgres.schema import SCHEMA_VERSION
from tests.conftest import ROOT, Services, Worker, fresh_id, wait_for

TASK_ID = re.compile(r"as task ([0-9a-f-]{36})")


def optionstore(
    services: Services, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``optionstore ARGS`` as its own process, pointed at ``services``."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env=services.env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def enqueued_task_id(stdout: str) -> str:
    match = TASK_ID.search(stdout)
    assert match, stdout
    return match.group(1)


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture
def fresh_database(services: Services) -> Iterator[str]:
    """The URL of a new, empty database on the target's PostgreSQL server, dropped afterwards."""
    name = f"optionstore_cli_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(services.database_url, name)
    finally:
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_set_wait_get_list_history_unset(services: Services, worker: Worker) -> None:
    """`set --wait` returns once the write committed, after which get, list and history (plain
    and --json) show it, and `unset --wait` removes it again."""
    project = fresh_id()
    scope = f"project:{project}"
    key = "mail:subject_prefix"

    set_out = ok(optionstore(services, "set", scope, key, '"[Prod]"', "--wait"))
    set_task = enqueued_task_id(set_out)
    assert f"committed: {scope} at revision 1" in set_out
    applied = re.search(r"applied by (\d+) live worker processes", set_out)
    assert applied, set_out
    assert int(applied.group(1)) >= worker.concurrency

    assert json.loads(ok(optionstore(services, "get", scope, key))) == "[Prod]"
    assert json.loads(ok(optionstore(services, "get", scope, key, "--json"))) == {
        "scope": scope,
        "key": key,
        "set": True,
        "value": "[Prod]",
        "revision": 1,
    }
    assert json.loads(ok(optionstore(services, "list", scope, "--json"))) == {
        "scope": scope,
        "revision": 1,
        "values": {key: "[Prod]"},
    }
    assert f'{key} = "[Prod]"' in ok(optionstore(services, "list", scope))
    answers = worker.read_everywhere("project_options", "get_value", project, key)
    assert set(answers.values()) == {"[Prod]"}

    unset_out = ok(optionstore(services, "unset", scope, key, "--wait"))
    unset_task = enqueued_task_id(unset_out)
    assert f"committed: {scope} at revision 2" in unset_out
    missing = optionstore(services, "get", scope, key)
    assert missing.returncode == 1
    assert "not set" in missing.stderr
    missing_json = optionstore(services, "get", scope, key, "--json")
    assert missing_json.returncode == 1
    assert json.loads(missing_json.stdout)["set"] is False

    history = json.loads(ok(optionstore(services, "history", scope, key, "--json")))
    assert [
        (h["scope"], h["key"], h["old_value"], h["new_value"], h["revision"], h["task_id"])
        for h in history
    ] == [
        (scope, key, None, "[Prod]", 1, set_task),
        (scope, key, "[Prod]", None, 2, unset_task),
    ]
    plain = ok(optionstore(services, "history", scope))
    assert set_task in plain
    assert unset_task in plain


def test_set_on_a_tag_keys_scope_adds_a_tag_key(services: Services, worker: Worker) -> None:
    """`set tagkeys:N KEY true --wait` adds the tag key, which every child then lists."""
    project = fresh_id()
    ok(optionstore(services, "set", f"tagkeys:{project}", "release", "true", "--wait"))
    answers = worker.read_everywhere("tag_keys", "all_keys", project)
    assert list(answers.values()) == [["release"]] * worker.concurrency


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["set", "project:{p}", "k", "not json"], "value"),
        (["set", "project:{p}", "k", "{'single': 'quotes'}"], "value"),
        (["set", "project:{p}", "k" * 65, "1"], "key"),
        (["unset", "project:{p}", ""], "key"),
        (["set", "proj:{p}", "k", "1"], "scope"),
        (["set", "project:0", "k", "1"], "scope"),
        (["get", "project:0{p}", "k"], "scope"),
        (["list", "users:{p}"], "scope"),
        (["history", "project:{p}/user:1"], "scope"),
    ],
    ids=[
        "not-json",
        "python-dict",
        "long-key",
        "empty-key",
        "kind",
        "id-0",
        "zero-pad",
        "plural",
        "order",
    ],
)
def test_bad_input_exits_2_naming_the_field(
    services: Services, backend: Any, args: list[str], field: str
) -> None:
    """Bad JSON, a bad key or a bad scope makes the command exit 2 with an error naming the
    field, and nothing is written."""
    project = fresh_id()
    result = optionstore(services, *(a.replace("{p}", str(project)) for a in args))
    assert result.returncode == 2, result
    assert f"{field}:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "enqueued" not in result.stdout
    assert backend.db.load_scope(f"project:{project}").revision == 0


def test_migrate_twice_is_idempotent(services: Services, fresh_database: str) -> None:
    """`migrate` on an empty database creates the schema; run again it changes nothing."""
    env = services.env(OPTIONS_DATABASE_URL=fresh_database)
    first = ok(optionstore(services, "migrate", env=env))
    assert f"schema at version {SCHEMA_VERSION} (was 0)" in first
    second = ok(optionstore(services, "migrate", env=env))
    assert f"schema at version {SCHEMA_VERSION} (up to date)" in second
    status = json.loads(ok(optionstore(services, "status", "--json", env=env)))
    assert status["schema_version"] == status["schema_expected"] == SCHEMA_VERSION


def test_concurrent_migrations_all_succeed_once(services: Services, fresh_database: str) -> None:
    """Four `migrate` processes started at once on an empty database all succeed, and exactly
    one of them applies the schema."""
    env = services.env(OPTIONS_DATABASE_URL=fresh_database)
    command = [sys.executable, "-m", "worker.cli", "migrate"]
    processes = [
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, f"{stdout}\n{stderr}"
    stdouts = [stdout for stdout, _ in outputs]
    assert sum("(was 0)" in out for out in stdouts) == 1, stdouts
    assert sum("(up to date)" in out for out in stdouts) == 3, stdouts
    with psycopg.connect(fresh_database) as conn:
        assert conn.execute("SELECT version FROM options_schema").fetchall() == [(SCHEMA_VERSION,)]
        (tables,) = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'options\\_%'"
        ).fetchone()  # type: ignore[misc]
    assert tables == 7  # schema, scope, value, history, write, clock, rollout


def test_status_json_reports_services_schema_and_processes(
    services: Services, worker: Worker
) -> None:
    """`status --json` parses as JSON and reports the schema version, a reachable Redis and
    every child of the running worker synced and not behind on the write of a `set --wait`."""
    group = fresh_id()
    ok(optionstore(services, "set", f"group:{group}", "k", "[1]", "--wait"))
    status = json.loads(ok(optionstore(services, "status", "--json")))
    assert status["schema_version"] == status["schema_expected"] == SCHEMA_VERSION
    assert status["redis"] == "up"
    assert status["database_url"] == services.database_url
    assert status["embedded"] is False
    reported = {p["pid"]: p for p in status["processes"]}
    children = worker.child_pids()
    assert children <= set(reported), status["processes"]
    # Not behind on this write (other tests' namespaces share the database, and a process hears
    # only its own: their writes may show as behind here, docs/operating.md).
    for pid in children:
        assert reported[pid]["synced"], reported[pid]
        assert not [b for b in reported[pid]["behind"] if b.startswith(f"group:{group}@")]


def test_status_on_an_unmigrated_database_does_not_call_redis_down(
    services: Services, worker: Worker, fresh_database: str
) -> None:
    """Each service's failure is reported under its own name: with Redis up and the database
    never migrated, `status` says Redis is up, the schema at 0, names the leader it read from
    Redis (the session's worker holds the lease of its namespace), and says what kept it from
    listing the processes."""
    env = services.env(OPTIONS_DATABASE_URL=fresh_database)

    def status_with_leader() -> dict[str, Any] | None:
        found: dict[str, Any] = json.loads(ok(optionstore(services, "status", "--json", env=env)))
        return found if found["leader"] is not None else None

    status = wait_for(status_with_leader, timeout=30, message="a status naming the leader")
    assert status["schema_version"] == 0
    assert status["redis"] == "up"
    assert status["leader"] and not status["leader"].startswith("unknown"), status["leader"]
    assert status["processes"] == []
    assert status["processes_error"] == "NotMigrated"


def test_status_never_prints_passwords(services: Services) -> None:
    """With passwords in the database, Redis and broker URLs, `status` (plain and --json)
    prints none of them."""
    if services.name != "machine":
        pytest.skip("needs a server that accepts any password (the machine's, trust auth)")
    parts = urlsplit(services.database_url)
    # libpq's sslpassword is a secret too; unused here (no encrypted client key), so harmless.
    database_url = urlunsplit(
        parts._replace(
            netloc=f"{parts.username}:s3cret@{parts.hostname}:{parts.port}",
            query="sslpassword=ssl-s3cret",
        )
    )
    redis_parts = urlsplit(services.redis_url)
    redis_url = urlunsplit(redis_parts._replace(netloc=f":r3dis-pw@{redis_parts.netloc}"))
    env = services.env(
        OPTIONS_DATABASE_URL=database_url,
        OPTIONS_REDIS_URL=redis_url,
        CELERY_BROKER_URL=redis_url,
    )
    as_json = optionstore(services, "status", "--json", env=env)
    status = json.loads(ok(as_json))
    assert status["schema_version"] == SCHEMA_VERSION  # it did connect with that URL
    assert status["database_url"] == database_url.replace("ssl-s3cret", "***").replace(
        "s3cret", "***"
    )
    assert status["redis_url"] == redis_url.replace("r3dis-pw", "***")
    plain = optionstore(services, "status", env=env)
    ok(plain)
    for output in (as_json.stdout, as_json.stderr, plain.stdout, plain.stderr):
        assert "s3cret" not in output
        assert "r3dis-pw" not in output


def test_status_into_a_closed_pipe_exits_without_a_traceback(services: Services) -> None:
    """`optionstore status | head -1`: a reader that leaves before the output is written
    gets no traceback on stderr, and the command exits non-zero without one."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "status"],
        cwd=ROOT,
        env=services.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before the first line is printed
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    assert process.returncode == 1
