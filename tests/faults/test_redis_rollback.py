"""Redis, as the shared cache, killed and restarted from an RDB that lacks the last write: the
relay's reconciler sees the new run id and repairs the scope, so no process serves the old
value for longer than 10 s."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import fresh_id, read_in_new_process, wait_for
from tests.faults.checks import record
from tests.faults.fleet import fleet
from tests.faults.servers import PostgresServer, RedisServer

ROLLBACK_BOUND_S = 10.0


@pytest.mark.faults
def test_redis_restarted_from_an_older_rdb(stable: PostgresServer, scratch: Path) -> None:
    """kill -9 of the cache Redis and a restart from an RDB saved before the last write: a new
    process and every task of the running worker read the committed value within 10 s."""
    cache = RedisServer(scratch / f"redis-rdb-{uuid.uuid4().hex[:8]}", appendonly=False).start()
    try:
        database_url = stable.new_database()
        project = fresh_id()
        with fleet(database_url, cache.url, stable.redis_url) as own:
            worker = own.start(broker_url=stable.redis_url, concurrency=2)

            def everywhere() -> set[Any]:
                answers = worker.read_everywhere("project_options", "get_value", project, "k")
                return set(answers.values())

            worker.call("options.set_project_option", project, "k", "saved")
            assert everywhere() == {"saved"}
            client = redis.Redis.from_url(cache.url)
            client.save()
            worker.call("options.set_project_option", project, "k", "committed")
            assert everywhere() == {"committed"}
            cache.close()  # kill -9: what is not in the RDB is gone
            cache.start()
            back = time.monotonic()
            key = f"{own.namespace}:scope:project:{project}"
            assert client.exists(key), "the RDB did not hold the scope"
            wait_for(
                lambda: read_in_new_process(own.services, project, "k") == "committed",
                timeout=ROLLBACK_BOUND_S,
                interval=0.05,
                message="a new process to read the committed value",
            )
            new_process_s = time.monotonic() - back
            wait_for(
                lambda: everywhere() == {"committed"},
                timeout=ROLLBACK_BOUND_S - new_process_s,
                interval=0,
                message="every task of the running worker to read the committed value",
            )
            workers_s = time.monotonic() - back
            repaired = worker.events("reconcile.repaired")
            assert any(event.get("scope") == f"project:{project}" for event in repaired)
    finally:
        cache.close()
    record(
        "redis restarted from an older RDB (cache; kill -9)",
        new_process_s=round(new_process_s, 2),
        running_workers_s=round(workers_s, 2),
    )
