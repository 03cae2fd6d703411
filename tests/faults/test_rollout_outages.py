"""A canary rollout while its Redis, or its PostgreSQL, is down: every process goes back to the
stored value (it cannot confirm the rollout, or the leader cannot renew the rollouts' copy), and
serves the canary value again once the server is back and the rollout still watches."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from store.rollouts.records import MIRROR_TTL
from tests.conftest import wait_for
from tests.faults.fleet import FaultWorker, fleet
from tests.faults.servers import PostgresServer, RedisServer
from tests.test_cli import ok, optionstore


def _everyone_reads(worker: FaultWorker, project: int, key: str, value: Any) -> None:
    wait_for(
        lambda: (
            set(worker.read_everywhere("project_options", "get_value", project, key).values())
            == {value}
        ),
        timeout=60,
        interval=0.2,
        message=f"every process to read {value!r}",
    )


def _start(worker: FaultWorker, project: int, key: str) -> str:
    """A rollout of "canary" to every child of ``worker`` (its queue); returns its id."""
    out = ok(
        optionstore(
            worker.services,
            *("set", f"project:{project}", key, json.dumps("canary")),
            *("--canary", f"queue:{worker.queue}", "--watch", "300s"),
            env=worker.env,
        )
    )
    found = re.search(r"started rollout (\d+):", out)
    assert found, out
    return found.group(1)


def _abort(worker: FaultWorker, rollout_id: str) -> None:
    ok(optionstore(worker.services, "rollouts", "abort", rollout_id, env=worker.env))


@pytest.mark.faults
def test_a_rollout_while_its_redis_is_down(stable: PostgresServer, own_redis: Any) -> None:
    """Canary to every child (their queue); the cache's Redis stopped mid-window: within the
    fail-safe every child reads the stored value, from PostgreSQL; Redis back, every child
    serves the canary value again; an abort then brings every child back to the stored one."""
    cache: RedisServer = own_redis()
    broker: RedisServer = own_redis()
    database_url = stable.new_database()
    project, key = 4242, "feature"
    with fleet(database_url, cache.url, stable.redis_url) as own:
        worker = own.start(broker_url=broker.url, concurrency=2)
        worker.call("options.set_project_option", project, key, "old")
        rollout_id = _start(worker, project, key)
        _everyone_reads(worker, project, key, "canary")

        cache.stop()
        _everyone_reads(worker, project, key, "old")
        cache.start()
        _everyone_reads(worker, project, key, "canary")

        _abort(worker, rollout_id)
        _everyone_reads(worker, project, key, "old")


@pytest.mark.faults
def test_a_rollout_while_its_postgres_is_down(
    stable: PostgresServer, own_postgres: PostgresServer, own_redis: Any
) -> None:
    """PostgreSQL stopped mid-window: the leader cannot read the rollouts, its copy in Redis
    expires (MIRROR_TTL) and every child goes back to the stored value (from Redis); PostgreSQL
    back, the rollout resumes and every child serves the canary value again."""
    broker: RedisServer = own_redis()
    database_url = own_postgres.new_database()
    project, key = 4343, "feature"
    with fleet(database_url, own_postgres.redis_url, stable.redis_url) as own:
        worker = own.start(broker_url=broker.url, concurrency=2)
        worker.call("options.set_project_option", project, key, "old")
        rollout_id = _start(worker, project, key)
        _everyone_reads(worker, project, key, "canary")
        own_postgres.stop()
        try:
            wait_for(
                lambda: (
                    set(
                        worker.read_everywhere(
                            "project_options", "get_value", project, key
                        ).values()
                    )
                    == {"old"}
                ),
                timeout=MIRROR_TTL + 60,
                interval=0.5,
                message="every process to read the stored value",
            )
        finally:
            own_postgres.start()
        _everyone_reads(worker, project, key, "canary")
        _abort(worker, rollout_id)
        _everyone_reads(worker, project, key, "old")
