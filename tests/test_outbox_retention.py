"""The outbox's row claims and backoff, retention of write records and history, and the leader
lease, against real PostgreSQL and Redis (each test on a database of its own)."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
import redis

from store.model.scopes import project_scope
from store.model.writes import set_write
from store.postgres.store import PostgresStore
from store.settings import Settings
from tests.conftest import Services, fresh_id
from worker.duties.lease import ALONE, FOLLOWER, LEADER, LeaderLease
from worker.duties.retention import Retention

DAY = 24 * 3600


def _commit_unannounced(db: PostgresStore, value: Any = 1) -> str:
    """Commit one change and announce nothing, as a writer that died after its commit."""
    result, _ = db.apply(set_write(project_scope(fresh_id()), "k", value))
    return result.task_id


def _age_writes(db: PostgresStore, task_ids: list[str], seconds: float) -> None:
    with db.connection() as conn:
        conn.execute(
            "UPDATE options_write SET committed_at = committed_at - make_interval(secs => %s)"
            " WHERE task_id = ANY(%s)",
            (seconds, task_ids),
        )


def _row(db: PostgresStore, task_id: str) -> tuple[int, float | None, bool] | None:
    """(attempts, seconds until the next attempt, announced) of a write record."""
    with db.connection() as conn:
        row = conn.execute(
            "SELECT attempts, extract(epoch FROM next_attempt_at - clock_timestamp()),"
            " announced_at IS NOT NULL FROM options_write WHERE task_id = %s",
            (task_id,),
        ).fetchone()
    if row is None:
        return None
    return int(row[0]), None if row[1] is None else float(row[1]), bool(row[2])


def _claim(db: PostgresStore) -> list[str]:
    return [
        result.task_id
        for result, _ in db.claim_unannounced(older_than=1, limit=100, backoff=5, max_backoff=60)
    ]


def test_a_claimed_row_is_not_claimed_again_before_its_backoff(db: PostgresStore) -> None:
    """A relay's claim hides a row from every other claim until its next attempt, which moves
    away exponentially (5, 10, 20, ... s, capped) with each attempt."""
    task_id = _commit_unannounced(db)
    assert _claim(db) == []  # still within the writer's grace period
    _age_writes(db, [task_id], 10)
    for attempt, delay in [(1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (6, 60)]:
        assert _claim(db) == [task_id]
        assert _claim(db) == []  # a second relay finds nothing due
        row = _row(db, task_id)
        assert row is not None
        attempts, wait, announced = row
        assert attempts == attempt and not announced
        assert wait is not None and delay - 1 < wait <= delay
        with db.connection() as conn:  # time passes
            conn.execute(
                "UPDATE options_write SET next_attempt_at = clock_timestamp() WHERE task_id = %s",
                (task_id,),
            )
    db.mark_announced([task_id])
    assert _claim(db) == []


def test_retention_prunes_announced_records_only(db: PostgresStore) -> None:
    """Write records older than the retention are deleted once announced, never before; younger
    ones stay."""
    old_announced = [_commit_unannounced(db) for _ in range(25)]
    old_unannounced = _commit_unannounced(db)
    young = _commit_unannounced(db)
    db.mark_announced([*old_announced, young])
    _age_writes(db, [*old_announced, old_unannounced], 8 * DAY)
    retention = Retention(postgres=db, write_age=7 * DAY, history_age=90 * DAY, batch=10)
    writes, _ = retention.run_once()
    assert writes == 25  # in batches of 10
    assert all(_row(db, task_id) is None for task_id in old_announced)
    assert _row(db, old_unannounced) is not None
    assert _row(db, young) is not None
    assert retention.run_once() == (0, 0)  # not due again yet


def test_retention_keeps_the_latest_change_of_every_key(db: PostgresStore) -> None:
    """History entries past the retention are deleted when a newer entry of their key exists;
    the latest change of each key stays however old, and young entries stay."""
    scope = project_scope(fresh_id())
    for value in range(30):
        db.apply(set_write(scope, "busy", value))
    db.apply(set_write(scope, "once", "x"))
    with db.connection() as conn:
        conn.execute(
            "UPDATE options_history SET changed_at = changed_at - interval '100 days'"
            " WHERE scope = %s AND revision <= 20",
            (scope.name,),
        )
    retention = Retention(postgres=db, write_age=7 * DAY, history_age=90 * DAY, batch=7)
    _, history = retention.run_once()
    kept = [(e.key, e.new_value) for e in db.history(scope.name, limit=1000)]
    # "busy" revisions 1..20 were old: all superseded and deleted; 21..30 are young.
    assert history == 20
    assert kept == [("busy", value) for value in range(20, 30)] + [("once", "x")]
    with db.connection() as conn:
        conn.execute("UPDATE options_history SET changed_at = changed_at - interval '100 days'")
    retention = Retention(postgres=db, write_age=7 * DAY, history_age=90 * DAY, batch=7)
    retention.run_once()
    assert [(e.key, e.new_value) for e in db.history(scope.name)] == [
        ("busy", 29),
        ("once", "x"),
    ]


def test_write_retention_must_outlive_redelivery() -> None:
    """OPTIONS_WRITE_RETENTION defaults to 7 days and is refused below an hour and ten
    visibility timeouts; OPTIONS_HISTORY_RETENTION defaults to 90 days."""
    settings = Settings.from_environ({})
    assert (settings.write_retention, settings.history_retention) == (7 * DAY, 90 * DAY)
    assert Settings.from_environ({"OPTIONS_WRITE_RETENTION": "7200"}).write_retention == 7200
    for bad in (
        {"OPTIONS_WRITE_RETENTION": "600"},
        {"OPTIONS_WRITE_RETENTION": "7200", "OPTIONS_VISIBILITY_TIMEOUT": "3600"},
    ):
        with pytest.raises(ValueError, match="OPTIONS_WRITE_RETENTION"):
            Settings.from_environ(bad)


def test_one_lease_holder_and_a_clean_handover(services: Services) -> None:
    """Of two processes claiming one lease, one leads; when it releases, the other takes it at
    its next claim; a lease store that cannot be reached makes a process act alone."""
    client = redis.Redis.from_url(services.redis_url)
    namespace = f"{services.namespace}-{uuid.uuid4().hex[:6]}"
    first = LeaderLease(client, namespace=namespace, ttl=3.0)
    second = LeaderLease(client, namespace=namespace, ttl=3.0)
    try:
        assert first.claim() == LEADER and first.leading
        assert second.claim() == FOLLOWER and not second.leading
        assert first.claim() == LEADER  # renewed
        assert client.get(first.key) == first.token.encode()
        assert 0 < int(client.pttl(first.key)) <= 3000
        first.release()
        assert not first.leading and client.get(first.key) is None
        assert second.claim() == LEADER and first.claim() == FOLLOWER
    finally:
        second.release()
    unreachable = LeaderLease(
        redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5),
        namespace=namespace,
    )
    assert unreachable.claim() == ALONE and unreachable.leading


def test_a_forked_child_holds_no_lease(services: Services) -> None:
    """A child forked from the lease holder has a token of its own and is a follower."""
    client = redis.Redis.from_url(services.redis_url)
    lease = LeaderLease(client, namespace=f"{services.namespace}-{uuid.uuid4().hex[:6]}")
    assert lease.claim() == LEADER
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once
        ok = not lease.leading and lease.claim() == FOLLOWER
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    try:
        assert answer == b"1"
        assert lease.leading and client.get(lease.key) == lease.token.encode()
    finally:
        lease.release()
