"""A PostgreSQL that went back in time (a failover to a replica that lacked the last commit) is
noticed by the relay's reconciler and by the next write to the scope, and the scope is
rebased past every revision announced of it, so the caches take what PostgreSQL holds."""

from __future__ import annotations

import json
from typing import Any

from store.model.scopes import project_scope
from store.model.writes import Write
from store.options_store import OptionsStore
from tests.conftest import fresh_id
from worker.duties.reconcile import Reconciler


def _write(backend: OptionsStore, project: int, value: Any) -> int:
    result = backend.commit(Write(project_scope(project), {"k": json.dumps(value)}, ()))
    backend.db.marks.flush()
    return result.revision


def _lose_last_commit(backend: OptionsStore, project: int, value: Any) -> None:
    """Put the scope back one revision in PostgreSQL, as a replica that lacked its last commit
    would hold it after a failover (the database's clock does not go back: it lagged by less
    than a round)."""
    scope = f"project:{project}"
    with backend.db.connection() as conn, conn.transaction():
        (revision,) = conn.execute(
            "SELECT revision FROM options_scope WHERE scope = %s", (scope,)
        ).fetchone() or (0,)
        conn.execute(
            "UPDATE options_scope SET revision = %s WHERE scope = %s", (revision - 1, scope)
        )
        conn.execute(
            "UPDATE options_value SET value = %s, revision = %s WHERE scope = %s AND key = 'k'",
            (json.dumps(value), revision - 1, scope),
        )
        conn.execute(
            "DELETE FROM options_write WHERE scope = %s AND revision = %s", (scope, revision)
        )


def _reconciler(backend: OptionsStore) -> Reconciler:
    return Reconciler(
        postgres=backend.db,
        cache=backend.redis,
        settle=0.0,
        rebase=lambda scope, above: backend.rebase(scope, above=above),
    )


def test_a_recent_commit_lost_by_postgres_is_rebased_by_the_reconciler(
    backend: OptionsStore,
) -> None:
    """The scope announced at revision 2, then found at 1 in PostgreSQL: one reconciler round
    moves it to 4 with PostgreSQL's values, and Redis and readers follow."""
    project = fresh_id()
    scope = f"project:{project}"
    _write(backend, project, "kept")
    assert _write(backend, project, "lost") == 2
    assert backend.load(scope).values == {"k": "lost"}
    _lose_last_commit(backend, project, "kept")
    assert backend.load(scope).values == {"k": "lost"}, "Redis still holds the lost commit"
    _reconciler(backend).run_once()
    assert backend.db.revisions([scope]) == {scope: 4}
    backend.local.clear()
    state = backend.load(scope)
    assert (state.revision, state.values) == (4, {"k": "kept"})


def test_a_write_at_a_revision_announced_before_wins(backend: OptionsStore) -> None:
    """PostgreSQL hands out revision 2 again: the write moves the scope past it at once, and
    every reader then reads that write, not the lost one."""
    project = fresh_id()
    scope = f"project:{project}"
    _write(backend, project, "kept")
    _write(backend, project, "lost")
    _lose_last_commit(backend, project, "kept")
    assert _write(backend, project, "after") == 2
    assert backend.db.revisions([scope]) == {scope: 4}
    backend.local.clear()
    state = backend.load(scope)
    assert (state.revision, state.values) == (4, {"k": "after"})
    assert backend.redis is not None
    assert backend.redis.revisions([scope]) == {scope: 4}


def test_a_current_database_is_left_alone(backend: OptionsStore) -> None:
    """Rounds over a database that lost nothing rebase nothing and only move the clock."""
    project = fresh_id()
    scope = f"project:{project}"
    _write(backend, project, 1)
    reconciler = _reconciler(backend)
    reconciler.run_once()
    assert backend.redis is not None
    record = backend.redis.record(backend.db.database_id())
    tick = record.clock()
    reconciler.run_once()
    assert record.clock() > tick
    assert backend.db.revisions([scope]) == {scope: 1}
