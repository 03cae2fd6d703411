"""Reads around a PostgreSQL restart or outage, where Redis cannot answer: the first read after
the restart, and a scope a process followed through a change before the outage."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.conftest import fresh_id, wait_for
from tests.faults.checks import read_all, reported_behind, wait_converged
from tests.faults.fleet import fleet
from tests.faults.servers import PostgresServer, RedisServer


@pytest.mark.faults
def test_first_read_after_a_postgres_restart_answers(
    stable: PostgresServer, own_postgres: PostgresServer, own_redis: Any
) -> None:
    """After PostgreSQL restarts, the first read in each process that has to go to PostgreSQL
    answers."""
    broker: RedisServer = own_redis()
    own_postgres.start()
    database_url = own_postgres.new_database()
    before, after = fresh_id(), fresh_id()
    with fleet(database_url, own_postgres.redis_url, stable.redis_url) as own:
        worker = own.start(broker_url=broker.url, concurrency=2)
        worker.call("options.set_project_option", before, "k", 1)
        worker.call("options.set_project_option", after, "k", 2)
        # Each process reads `before` from PostgreSQL (Redis holds only the writer's floor),
        # so each one's pool now holds a connection.
        wait_converged(own, database_url, [before])
        try:
            own_postgres.stop()
        finally:
            own_postgres.start()
        # `after` was never read: Redis holds a floor, every process must ask PostgreSQL.
        answers = read_all(worker, after)
    assert answers == {pid: {"k": 2} for pid in answers}


@pytest.mark.faults
def test_scope_followed_through_a_change_is_served_during_an_outage(
    stable: PostgresServer, own_postgres: PostgresServer, own_redis: Any
) -> None:
    """A process that read a scope and then applied its next change serves the changed value
    while PostgreSQL is down and Redis no longer holds the scope."""
    broker: RedisServer = own_redis()
    own_postgres.start()
    database_url = own_postgres.new_database()
    project = fresh_id()
    with fleet(database_url, own_postgres.redis_url, stable.redis_url) as own:
        worker = own.start(broker_url=broker.url, concurrency=2)
        worker.call("options.set_project_option", project, "k", 1)
        wait_converged(own, database_url, [project])  # every process has read revision 1
        worker.call("options.set_project_option", project, "k", 2)
        # Heard, not read: every process applies revision 2 from its broadcast.
        wait_for(
            lambda: not reported_behind(own, database_url, [project]),
            timeout=30,
            message="every process to apply revision 2",
        )
        try:
            own_postgres.stop()
            redis.Redis.from_url(own_postgres.redis_url).delete(
                f"{own.namespace}:scope:project:{project}"
            )
            answers = read_all(worker, project)
        finally:
            own_postgres.start()
    assert answers == {pid: {"k": 2} for pid in answers}
