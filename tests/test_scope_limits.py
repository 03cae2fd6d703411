"""What one scope may hold (OPTIONS_MAX_SCOPE_KEYS, OPTIONS_MAX_SCOPE_BYTES): refused in
PostgreSQL under the scope's lock, for writes sent by name to a real prefork worker, for writers
racing, for scopes over a limit from before it, through the command line, and after the
migration that counts what every scope already holds."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery.exceptions import TimeoutError as ResultTimeout

from store.errors import InvalidOption
from store.model.scopes import Scope, project_scope
from store.model.validation import MAX_ID
from store.model.writes import many_write, set_write
from store.postgres.schema import MIGRATIONS, migrate
from store.postgres.store import PostgresStore
from store.settings import Settings
from tests.conftest import ROOT, Services, Worker, fresh_database, fresh_id, wait_for

MAX_KEYS = 50
MAX_BYTES = 4000


@pytest.fixture(scope="module")
def limited(services: Services) -> Iterator[Worker]:
    """A prefork worker whose scopes hold at most 50 keys and 4,000 bytes, on its own queue."""
    running = Worker(
        services,
        extra_env={
            "OPTIONS_MAX_SCOPE_KEYS": str(MAX_KEYS),
            "OPTIONS_MAX_SCOPE_BYTES": str(MAX_BYTES),
            "OPTIONS_TASK_QUEUE": f"{services.namespace}.limits",
        },
    ).start()
    yield running
    running.stop()


def call_all(worker: Worker, calls: list[tuple[str, list[Any]]]) -> list[Any]:
    """Send every call at once, then wait for each result."""
    sent = [worker.send(name, *args) for name, args in calls]
    return [result.get(timeout=60, propagate=True) for result in sent]


def refused(worker: Worker, backend: Any, name: str, *args: Any, field: str) -> InvalidOption:
    """Send a write the scope has no room for: it fails at once naming ``field``, is not
    retried, and leaves its scope as it was."""
    scope = _scope_of(name, args)
    before = backend.db.load_scope(scope)
    history = len(backend.db.history(scope, limit=10_000))
    result = worker.send(name, *args)
    with pytest.raises(Exception) as info:
        result.get(timeout=15, propagate=True)
    assert not isinstance(info.value, ResultTimeout), "the task neither failed nor succeeded"
    assert isinstance(info.value, InvalidOption), repr(info.value)
    assert info.value.field == field
    wait_for(
        lambda: f"[{result.id}] raised unexpected" in worker.log(),
        timeout=10,
        message=f"the worker to log the failure of {result.id}",
    )
    lines = [line for line in worker.log().splitlines() if result.id in line]
    assert not [line for line in lines if "retry" in line.lower()], lines
    assert backend.db.write_records([result.id]) == {}
    assert backend.db.load_scope(scope) == before
    assert len(backend.db.history(scope, limit=10_000)) == history
    return info.value


def _scope_of(name: str, args: tuple[Any, ...]) -> str:
    if name == "options.set_many":
        return str(args[0])
    kind = "tagkeys" if "tag_key" in name else "project"
    return f"{kind}:{args[0]}"


def counts(backend: Any, scope: str) -> tuple[int, int]:
    """The scope's key count and value bytes as options_apply keeps them, checked against a
    count of its rows."""
    with backend.db.connection() as conn:
        kept = conn.execute(
            "SELECT key_count, value_bytes FROM options_scope WHERE scope = %s", (scope,)
        ).fetchone()
        counted = conn.execute(
            "SELECT count(*), coalesce(sum(octet_length(value::text)), 0) FROM options_value"
            " WHERE scope = %s",
            (scope,),
        ).fetchone()
    assert kept == counted
    return int(kept[0]), int(kept[1])


def test_a_full_scope_refuses_a_new_key_and_still_takes_unsets_and_replacements(
    limited: Worker, backend: Any
) -> None:
    """Fifty small writes fill a scope; the next new key is refused naming `key` (a single set)
    or `values` (a set_many), nothing written; a same-size replacement, a set_many that swaps a
    key for another and an unset still land, and the unset makes room again."""
    project = fresh_id()
    scope = f"project:{project}"
    call_all(
        limited, [("options.set_project_option", [project, f"k{i:02d}", i % 10]) for i in range(50)]
    )
    assert counts(backend, scope)[0] == MAX_KEYS

    error = refused(
        limited, backend, "options.set_project_option", project, "one-more", 1, field="key"
    )
    assert str(error) == (
        f"key: scope {scope} would hold 51 keys, more than 50 (OPTIONS_MAX_SCOPE_KEYS); "
        "nothing was written"
    )
    error = refused(
        limited, backend, "options.set_many", scope, {"one-more": 1, "k00": 5}, [], field="values"
    )
    assert "would hold 51 keys, more than 50 (OPTIONS_MAX_SCOPE_KEYS)" in str(error)
    answers = limited.read_everywhere("project_options", "get_value", project, "one-more")
    assert set(answers.values()) == {None}

    limited.call("options.set_project_option", project, "k00", 9)  # same size: 1 byte
    limited.call("options.set_many", scope, {"swapped": 1}, ["k01"])
    assert counts(backend, scope)[0] == MAX_KEYS
    limited.call("options.unset_project_option", project, "k02")
    limited.call("options.set_project_option", project, "one-more", 1)
    values = backend.db.load_scope(scope).values
    assert len(values) == MAX_KEYS
    assert (values["k00"], values["swapped"], values["one-more"]) == ("9", "1", "1")
    assert "k01" not in values and "k02" not in values


def test_tag_keys_count_against_the_key_limit(limited: Worker, backend: Any) -> None:
    """A project's tag keys are a scope like any other: the 51st is refused naming `key`, and a
    removal makes room for it."""
    project = fresh_id()
    call_all(limited, [("options.add_tag_key", [project, f"tag{i:02d}"]) for i in range(50)])
    error = refused(limited, backend, "options.add_tag_key", project, "tag50", field="key")
    assert f"scope tagkeys:{project} would hold 51 keys, more than 50" in str(error)
    limited.call("options.remove_tag_key", project, "tag00")
    limited.call("options.add_tag_key", project, "tag50")
    assert counts(backend, f"tagkeys:{project}") == (MAX_KEYS, MAX_KEYS * len("true"))


def test_a_scope_at_its_byte_limit_refuses_growth_and_takes_smaller_values(
    limited: Worker, backend: Any
) -> None:
    """Values that add up to exactly 4,000 encoded bytes fit; one more byte is refused naming the
    field, counted in UTF-8 bytes (an "é" is two); a replacement of the same size or smaller
    lands, and a smaller one makes room."""
    project = fresh_id()
    scope = f"project:{project}"
    big = "x" * 1990  # 1,992 bytes encoded, with its quotes
    limited.call("options.set_many", scope, {"a": big, "b": big}, [])
    limited.call("options.set_project_option", project, "c", "x" * 14)  # 16 bytes: 4,000 in all
    assert counts(backend, scope) == (3, MAX_BYTES)

    error = refused(limited, backend, "options.set_project_option", project, "d", 1, field="key")
    assert str(error) == (
        f"key: scope {scope} would hold 4,001 bytes of encoded values, more than 4,000 "
        "(OPTIONS_MAX_SCOPE_BYTES); nothing was written"
    )
    refused(limited, backend, "options.set_project_option", project, "c", "é" * 8, field="key")
    refused(limited, backend, "options.set_many", scope, {"a": big + "y"}, [], field="values")

    limited.call("options.set_project_option", project, "c", "é" * 7)  # 16 bytes again
    limited.call("options.set_project_option", project, "a", "small")
    limited.call("options.set_project_option", project, "d", 1)
    assert counts(backend, scope) == (4, 1992 + len('"small"') + 16 + 1)


def test_a_scope_over_the_limits_from_before_stays_shrinkable(
    limited: Worker, backend: Any
) -> None:
    """A scope that holds more than the limits (written before they were lowered) refuses any
    write that grows it, and takes every write that does not: an unset, a same-size
    replacement, a set_many that removes more than it adds."""
    project = fresh_id()
    scope = f"project:{project}"
    # Written in this process, under the default limits (10,000 keys, 16 MiB).
    backend.commit(many_write(Scope.parse(scope), {f"k{i:02d}": "v" * 100 for i in range(60)}, []))
    assert counts(backend, scope) == (60, 60 * 102)

    error = refused(limited, backend, "options.set_project_option", project, "new", 1, field="key")
    assert "would hold 61 keys, more than 50" in str(error)
    error = refused(
        limited, backend, "options.set_project_option", project, "k00", "v" * 101, field="key"
    )
    assert "would hold 6,121 bytes of encoded values, more than 4,000" in str(error)

    limited.call("options.unset_project_option", project, "k00")
    limited.call("options.set_project_option", project, "k01", "w" * 100)
    limited.call("options.set_many", scope, {"new": 1}, ["k02", "k03"])
    assert counts(backend, scope) == (58, 57 * 102 + 1)
    assert backend.db.load_scope(scope).values["k01"] == json.dumps("w" * 100)


def _waiting_on_a_lock(services: Services) -> int:
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%options_apply%'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_two_set_many_racing_cannot_together_pass_the_key_limit(
    limited: Worker, backend: Any, services: Services
) -> None:
    """Two set_many of 15 new keys each, sent to a scope of 30 keys while its row is locked, so
    both wait in their worker children at once: one commits, the other is refused naming
    `values`, and the scope holds 45 keys, the winner's."""
    project = fresh_id()
    scope = f"project:{project}"
    limited.call("options.set_many", scope, {f"k{i:02d}": i for i in range(30)}, [])
    batches = {side: {f"{side}{i:02d}": i for i in range(15)} for side in ("a", "b")}
    with psycopg.connect(services.database_url) as conn:
        conn.execute("SELECT 1 FROM options_scope WHERE scope = %s FOR UPDATE", (scope,))
        sent = {
            side: limited.send("options.set_many", scope, batch, [])
            for side, batch in batches.items()
        }
        wait_for(
            lambda: _waiting_on_a_lock(services) >= 2,
            message="both writes to wait on the scope's row lock",
        )
        conn.rollback()
    outcomes: dict[str, Any] = {}
    for side, result in sent.items():
        try:
            outcomes[side] = result.get(timeout=15, propagate=True)
        except InvalidOption as exc:
            outcomes[side] = exc
    refusals = [side for side, outcome in outcomes.items() if isinstance(outcome, InvalidOption)]
    assert len(refusals) == 1, outcomes
    loser = refusals[0]
    assert outcomes[loser].field == "values"
    assert "would hold 60 keys, more than 50" in str(outcomes[loser])
    winner = "b" if loser == "a" else "a"
    values = backend.db.load_scope(scope).values
    assert len(values) == 45
    assert set(batches[winner]) <= set(values)
    assert not set(batches[loser]) & set(values)
    assert counts(backend, scope)[0] == 45


def test_eight_writers_at_once_fill_a_scope_to_its_limit_and_no_further(
    db: PostgresStore,
) -> None:
    """Eight threads each add 10 keys at the same moment to a scope of 20 with a limit of 50:
    exactly three commit and the scope ends at 50 keys."""
    store = PostgresStore(conninfo=db.conninfo, max_size=8, max_scope_keys=MAX_KEYS)
    scope = project_scope(fresh_id())
    store.apply(many_write(scope, {f"k{i:02d}": i for i in range(20)}, []))
    start = threading.Barrier(8)

    def add(writer: int) -> bool:
        write = many_write(scope, {f"w{writer}-{i}": i for i in range(10)}, [])
        start.wait()
        try:
            store.apply(write)
        except InvalidOption as exc:
            assert exc.field == "values"
            return False
        return True

    try:
        with ThreadPoolExecutor(8) as pool:
            committed = list(pool.map(add, range(8)))
        assert committed.count(True) == 3
        assert len(store.load_scope(scope.name).values) == MAX_KEYS
    finally:
        store.close()


def test_the_migration_counts_what_every_scope_already_holds(services: Services) -> None:
    """Migration 0010 backfills each scope's key count and value bytes (UTF-8 bytes of each
    value's JSON text) from the rows written before it, an emptied scope at zero; options_apply
    keeps them exact from then on, and an over-limit scope from before can shrink."""
    before = MIGRATIONS.index("0010_scope_limits.sql")
    with fresh_database(services, "sl", migrated=False) as url:
        assert migrate(url, version=before) == (0, before)
        written: dict[str, dict[str, str | None]] = {
            "project:1": {"a": '"é"', "b": "[1,2,3]", "c": '{"k":null}'},
            "tagkeys:1": {"x": "true", "y": "true"},
            "group:5": {"gone": "1"},
            "user:7/project:1": {f"k{i:02d}": '"' + "v" * 100 + '"' for i in range(60)},
        }
        removed = {"group:5": ["gone"], "project:1": ["c"]}
        with psycopg.connect(url, autocommit=True) as conn:

            def old_apply(scope: str, keys: list[str], values: list[str | None]) -> None:
                conn.execute(
                    "SELECT * FROM options_apply(%s, %s, %s::text[], %s::text[])",
                    (scope, f"t-{uuid.uuid4()}", keys, values),
                )

            for scope, values in written.items():
                old_apply(scope, list(values), list(values.values()))
            for scope, keys in removed.items():
                old_apply(scope, keys, [None] * len(keys))
        expected = {
            "project:1": (2, len('"é"'.encode()) + len("[1,2,3]")),
            "tagkeys:1": (2, 8),
            "group:5": (0, 0),
            "user:7/project:1": (60, 60 * 102),
        }
        assert migrate(url) == (before, len(MIGRATIONS))
        with psycopg.connect(url) as conn:
            found = dict(
                (scope, (int(keys), int(size)))
                for scope, keys, size in conn.execute(
                    "SELECT scope, key_count, value_bytes FROM options_scope"
                )
            )
        assert found == expected

        store = PostgresStore(conninfo=url, max_scope_keys=MAX_KEYS)
        try:
            legacy = Scope.parse("user:7/project:1")
            with pytest.raises(InvalidOption, match="would hold 61 keys"):
                store.apply(set_write(legacy, "new", 1))
            store.apply(many_write(legacy, {"new": 1}, ["k00", "k01"]))
            store.apply(set_write(Scope.parse("project:1"), "a", "éé"))
            with store.connection() as conn:
                kept = conn.execute(
                    "SELECT scope, key_count, value_bytes FROM options_scope ORDER BY scope"
                ).fetchall()
                counted = conn.execute(
                    "SELECT s.scope, count(v.key), coalesce(sum(octet_length(v.value::text)), 0)"
                    " FROM options_scope s LEFT JOIN options_value v ON v.scope = s.scope"
                    " GROUP BY s.scope ORDER BY s.scope"
                ).fetchall()
            assert kept == counted
        finally:
            store.close()


def test_the_command_line_shows_a_refusal(
    limited: Worker, backend: Any, services: Services, tmp_path: Path
) -> None:
    """`set --wait` and `apply --yes` on a full scope exit 2 and print the worker's refusal,
    naming `key` and `values`; nothing is written."""
    project = fresh_id()
    scope = f"project:{project}"
    limited.call("options.set_many", scope, {f"k{i:02d}": i for i in range(50)}, [])
    revision = backend.db.load_scope(scope).revision
    env = services.env(OPTIONS_TASK_QUEUE=limited.queue)

    def optionstore(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    done = optionstore("set", scope, "one-more", "1", "--wait", "--timeout", "20")
    assert done.returncode == 2, done
    assert (
        f"key: scope {scope} would hold 51 keys, more than 50 (OPTIONS_MAX_SCOPE_KEYS); "
        "nothing was written"
    ) in done.stderr

    desired = tmp_path / "desired.json"
    desired.write_text(
        json.dumps({"optionstore": 1, "scopes": {scope: {"values": {"a": 1, "b": 2}}}})
    )
    done = optionstore("apply", str(desired), "--yes", "--timeout", "20")
    assert done.returncode == 2, done
    assert f"values: scope {scope} would hold 52 keys, more than 50" in done.stderr
    assert backend.db.load_scope(scope).revision == revision


@pytest.mark.parametrize(
    ("name", "attribute", "default"),
    [
        ("OPTIONS_MAX_SCOPE_KEYS", "max_scope_keys", 10_000),
        ("OPTIONS_MAX_SCOPE_BYTES", "max_scope_bytes", 16 * 1024 * 1024),
    ],
)
def test_scope_limits_are_settings_checked_by_name(name: str, attribute: str, default: int) -> None:
    """Each scope limit has its default, is read from the environment or an override, and a
    value that is not an integer from 1 to 2**63-1 is refused naming the variable."""
    assert getattr(Settings.from_environ({}), attribute) == default
    assert getattr(Settings.from_environ({name: "7"}), attribute) == 7
    assert getattr(Settings.from_environ({}, **{attribute: 9}), attribute) == 9
    for bad, reason in (
        ("many", "must be an integer, got 'many'"),
        ("0", "must be at least 1, got 0"),
        (str(MAX_ID + 1), f"must be at most {MAX_ID}"),
    ):
        with pytest.raises(InvalidOption) as info:
            Settings.from_environ({name: bad})
        assert info.value.field == name
        assert reason in str(info.value)
