"""Outbox marks made in bulk (store/postgres/marks.py): carried by the process's next write,
or flushed when none follows; on real PostgreSQL for the marks themselves, with a stand-in flush
for the thread's own rules."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from store.model.scopes import project_scope
from store.model.writes import set_write
from store.postgres.marks import AnnouncedMarks
from store.postgres.store import PostgresStore
from tests.conftest import fresh_id, wait_for


def _announced(db: PostgresStore, task_id: str) -> bool:
    with db.connection() as conn:
        row = conn.execute(
            "SELECT announced_at IS NOT NULL FROM options_write WHERE task_id = %s", (task_id,)
        ).fetchone()
    assert row is not None, f"no write record for {task_id}"
    return bool(row[0])


@pytest.fixture
def slow_marks(db: PostgresStore) -> Iterator[PostgresStore]:
    """The store with a linger far beyond any test: only a write (or a flush) marks."""
    db.marks.linger = 3600.0
    yield db


def test_the_next_write_marks_what_was_announced_before_it(slow_marks: PostgresStore) -> None:
    """A commit handed to the marks is marked by the same process's next write, in that
    write's own transaction; the second write stays unmarked until it is announced itself."""
    db = slow_marks
    first, _ = db.apply(set_write(project_scope(fresh_id()), "k", 1))
    db.marks.add(first.task_id)
    assert not _announced(db, first.task_id)
    second, _ = db.apply(set_write(project_scope(fresh_id()), "k", 2))
    assert _announced(db, first.task_id)
    assert not _announced(db, second.task_id)
    assert db.marks.pending() == 0


def test_a_failed_write_gives_its_marks_back(slow_marks: PostgresStore) -> None:
    """A write that fails (here: a value text PostgreSQL refuses as JSON) marks nothing, and
    the marks it carried wait for the next write."""
    db = slow_marks
    first, _ = db.apply(set_write(project_scope(fresh_id()), "k", 1))
    db.marks.add(first.task_id)
    write = set_write(project_scope(fresh_id()), "k", 3)
    broken = type(write)(write.scope, {"k": "not json"}, ())
    with pytest.raises(psycopg.Error):
        db.apply(broken)
    assert not _announced(db, first.task_id)
    assert db.marks.pending() == 1
    db.apply(set_write(project_scope(fresh_id()), "k", 4))
    assert _announced(db, first.task_id)


def test_marks_with_no_write_after_them_are_flushed(db: PostgresStore) -> None:
    """With no write after it, a mark is made by the thread, within its linger."""
    db.marks.linger = 0.05
    result, _ = db.apply(set_write(project_scope(fresh_id()), "k", 1))
    db.marks.add(result.task_id)
    wait_for(lambda: _announced(db, result.task_id), timeout=10, message="the flush")
    assert db.marks.pending() == 0


def test_a_transient_failure_keeps_the_marks_and_a_lasting_one_drops_them() -> None:
    """A flush that fails for a passing reason keeps the ids for the next try; one that fails
    for good leaves them to the relay instead of retrying forever."""
    calls: list[list[str]] = []
    outcomes = [psycopg.OperationalError("connection lost"), None]
    done = threading.Event()

    def flush(ids: list[str]) -> None:
        calls.append(list(ids))
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome
        done.set()

    marks = AnnouncedMarks(flush, linger=0.01)
    marks.add("a")
    assert done.wait(10), "the retry after the transient failure never came"
    assert calls == [["a"], ["a"]]
    assert marks.pending() == 0
    marks.close()

    def refuse(ids: list[str]) -> None:
        calls.append(list(ids))
        raise ValueError("not a passing condition")

    lasting = AnnouncedMarks(refuse, linger=0.01)
    lasting.add("b")
    wait_for(lambda: lasting.pending() == 0, timeout=10, message="the ids to be dropped")
    lasting.close()


def test_close_flushes_what_is_pending(db: PostgresStore) -> None:
    """Closing the store marks what it still holds."""
    db.marks.linger = 3600.0
    result, _ = db.apply(set_write(project_scope(fresh_id()), "k", str(uuid.uuid4())))
    db.marks.add(result.task_id)
    db.marks.close()
    assert _announced(db, result.task_id)


def test_a_write_and_a_load_survive_a_connection_killed_moments_ago(
    db: PostgresStore, services: Any
) -> None:
    """A pooled connection used under a second ago is not checked on checkout; if its backend
    died meanwhile (a restart, a failover, an administrator), the write or the scope load that
    gets it runs once more on a fresh connection instead of failing."""
    scope = project_scope(fresh_id())

    def kill_the_pooled_connection() -> None:
        with db.connection() as conn:
            pid = conn.info.backend_pid
        with psycopg.connect(services.database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    db.apply(set_write(scope, "k", "before"))
    kill_the_pooled_connection()
    result, first_run = db.apply(set_write(scope, "k", "after"))
    assert first_run and result.changed
    kill_the_pooled_connection()
    assert db.load_scope(scope.name).values == {"k": '"after"'}


def _plans(conn: psycopg.Connection[Any], call: str, args: tuple[Any, ...]) -> list[str]:
    """The plans of every statement ``call`` runs, as auto_explain reports them."""
    try:
        conn.execute("LOAD 'auto_explain'")
    except psycopg.Error as exc:  # not shipped with this server, or not a superuser
        pytest.skip(f"auto_explain cannot be loaded here: {exc}")
    for setting in (
        "auto_explain.log_min_duration = 0",
        "auto_explain.log_nested_statements = on",
        "auto_explain.log_level = notice",
    ):
        conn.execute(f"SET {setting}")
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute(call, args)
    return notices


def _mark_plan(plans: list[str]) -> str:
    found = [plan for plan in plans if "UPDATE options_write" in plan]
    assert len(found) == 1, plans
    return found[0]


def test_marking_looks_commits_up_by_primary_key_however_many_were_marked_before(
    db: PostgresStore,
) -> None:
    """A mark finds its commits by primary key, in a write and in a flush alike, on a session
    that has marked thousands before (whose plans PostgreSQL has cached). The partial index of
    unannounced commits still holds every commit marked since the last vacuum: scanning it
    made each write's cost grow with the writes before it."""
    with psycopg.connect(db.conninfo, autocommit=True) as conn:
        previous: list[str] | None = None
        for serial in range(1500):
            task_id = f"mark-plan-{serial}"
            conn.execute(
                "SELECT * FROM options_apply(%s, %s, %s::text[], %s::text[],"
                " NULL, NULL, NULL, %s::text[])",
                ("global", task_id, [f"k{serial % 10}"], [str(serial)], previous),
            )
            previous = [task_id]
        flushed = [f"mark-plan-{serial}" for serial in range(1500)]
        for _ in range(10):
            conn.execute("SELECT options_mark_announced(%s::text[])", (flushed,))
        write = _mark_plan(
            _plans(
                conn,
                "SELECT * FROM options_apply('global', 'mark-plan-last', ARRAY['k'], ARRAY['1'],"
                " NULL, NULL, NULL, %s::text[])",
                (previous,),
            )
        )
        flush = _mark_plan(
            _plans(conn, "SELECT options_mark_announced(%s::text[])", (["mark-plan-last"],))
        )
    for plan in (write, flush):
        assert "options_write_pkey" in plan, plan
        assert "options_write_unannounced" not in plan, plan
