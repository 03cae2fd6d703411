"""Redis answering but refusing (full at maxmemory with noeviction, or busy with a script):
reads answer from PostgreSQL and writes commit, exactly as with Redis down."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import store
import tasks
from store.transient import redis_unavailable
from tests.conftest import fresh_id, wait_for
from tests.faults.checks import committed, record, snapshot
from tests.faults.fleet import fleet
from tests.faults.servers import PostgresServer, RedisServer

READS = 50
# The task's run(): the Write it commits, without an app to send through.
SET_PROJECT_OPTION = tasks.WRITE_TASKS["options.set_project_option"]


def fill_until_oom(client: redis.Redis) -> int:
    """Cap the server a little above what it holds, with noeviction, write until Redis refuses
    with OOM, then keep it over its cap; returns how many keys it took."""
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(used + 512 * 1024))
    for n in range(100_000):
        try:
            client.set(f"ballast:{n}", "x" * 4096)
        except redis.exceptions.OutOfMemoryError:
            # Client buffers come and go inside used_memory: a cap well below what it holds
            # keeps Redis refusing for the whole test, not only until a buffer is freed.
            client.config_set("maxmemory", str(used // 2))
            return n
    pytest.fail("Redis never refused a write at maxmemory")


@pytest.fixture
def in_process(stable: PostgresServer) -> Iterator[Any]:
    """A function pointing this process's store at a fresh database and a Redis given to it."""
    database_url = stable.new_database()

    def configure(cache_url: str, namespace: str | None = None) -> Any:
        return store.configure(
            database_url=database_url,
            redis_url=cache_url,
            namespace=namespace or f"t{uuid.uuid4().hex[:10]}",
        )

    yield configure
    store.clear_local_cache()


@pytest.mark.faults
def test_redis_full_reads_answer_from_postgres_and_writes_commit(
    stable: PostgresServer, own_redis: Any, in_process: Any
) -> None:
    """With the cache Redis full (OOM, noeviction), reads in this process and in a worker child
    answer from PostgreSQL, and a write task commits and leaves its outbox row for the relay."""
    cache: RedisServer = own_redis()
    database_url = in_process(cache.url).db.conninfo
    projects = [fresh_id() for _ in range(READS)]
    client = redis.Redis.from_url(cache.url)
    with fleet(database_url, cache.url, stable.redis_url) as own:
        backend = in_process(cache.url, own.namespace)  # the worker's Redis keys
        for n, project in enumerate(projects):
            # Each announce leaves Redis a floor (no values): a read must load from PostgreSQL.
            backend.commit(SET_PROJECT_OPTION(project, "k", n))
        worker = own.start(concurrency=2, broker_url=stable.redis_url)
        ballast = fill_until_oom(client)
        before = dict(backend.stats)
        answers = []
        for project in projects:
            store.clear_local_cache()
            answers.append(store.project_options.get_value(project, "k"))
        postgres_reads = backend.stats["postgres_reads"] - before["postgres_reads"]
        assert answers == list(range(READS))
        # Redis holds projects[0] now (the fill got in: its first write is a DEL, which Redis
        # allows at maxmemory); the write's delta starts with an HSET, which it refuses.
        project = projects[0]
        task_id = f"oom-{uuid.uuid4().hex[:8]}"
        result = worker.producer.send_task(
            "options.set_project_option", args=[project, "during", "oom"], task_id=task_id
        ).get(timeout=60)
        assert result["changed"]
        in_worker = worker.call("probe.read", "project_options", "get_value", [project, "during"])
        refused = [
            e
            for e in worker.events("cache.announce_failed")
            if e.get("scope") == f"project:{project}"
        ]
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("ballast:still-full", "x")
        log = worker.log()
    assert in_worker["result"] == "oom"
    assert snapshot(database_url, f"project:{project}")[1]["during"] == "oom"
    assert committed(database_url, [task_id]) == {task_id}
    assert refused, f"the worker did not log the refused Redis update: {log[-3000:]}"
    assert any("OOM" in str(e.get("error")) for e in refused), refused
    record(
        "redis full (OOM, noeviction)",
        writes=1,
        lost=0,
        in_process_reads=READS,
        postgres_reads=postgres_reads,
        wrong_reads=sum(a != n for n, a in enumerate(answers)),
        ballast_keys=ballast,
        redis_updates_refused_logged=len(refused),
    )


@pytest.mark.faults
def test_redis_full_under_a_broker_on_it_still_broadcasts(
    stable: PostgresServer, own_redis: Any
) -> None:
    """With the broker on the cache's Redis server and that Redis full, the script that moves
    the cache and publishes is refused: the write commits, its broadcast still goes out (a
    plain PUBLISH, which Redis takes at maxmemory), and its outbox row stays unannounced for
    the relay, which brings the cache forward later."""
    cache: RedisServer = own_redis()
    backend = store.configure(
        database_url=stable.new_database(),
        redis_url=cache.url,
        broker_url=cache.url.rsplit("/", 1)[0] + "/1",
        namespace=f"t{uuid.uuid4().hex[:10]}",
    )
    project = fresh_id()
    try:
        backend.commit(SET_PROJECT_OPTION(project, "k", "before"))
        # Refilled from PostgreSQL: the next write's script starts with an HSET, which Redis
        # refuses at maxmemory (a script whose first write is a DEL would run to its end).
        store.clear_local_cache()
        assert store.project_options.get_value(project, "k") == "before"
        assert backend.redis.get(f"project:{project}") is not None
        topics = backend.publisher.topics_on(backend.redis.client)
        assert topics, "the broker names the cache's server: its broadcasts ride on the script"
        subscriber = redis.Redis.from_url(cache.url).pubsub()
        subscriber.psubscribe(*topics)
        wait_for(lambda: subscriber.get_message(timeout=0.1), message="the subscription")
        client = redis.Redis.from_url(cache.url)
        fill_until_oom(client)
        task_id = f"oom-{uuid.uuid4().hex[:8]}"
        result = backend.commit(SET_PROJECT_OPTION(project, "k", "during"), task_id=task_id)
        heard = wait_for(
            lambda: subscriber.get_message(ignore_subscribe_messages=True, timeout=0.1),
            message="the broadcast of the write made while Redis was full",
        )
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("ballast:still-full", "x")
        subscriber.close()
        record_of_write = backend.db.write_records([task_id]).get(task_id)
    finally:
        store.clear_local_cache()
    body = json.loads(base64.b64decode(json.loads(heard["data"])["body"]))
    assert (body["scope"], body["revision"], body["set"]) == (
        f"project:{project}",
        result.revision,
        {"k": "during"},
    )
    assert record_of_write is not None and not record_of_write[1], "left for the relay"
    record("redis full (OOM) under a broker on it", writes=1, lost=0, broadcasts_heard=1)


@pytest.mark.faults
def test_redis_busy_with_a_script_reads_answer_from_postgres(
    own_redis: Any, in_process: Any
) -> None:
    """While Redis answers BUSY to every command (a long script), reads answer from
    PostgreSQL instead of raising."""
    cache: RedisServer = own_redis()
    backend = in_process(cache.url)
    project = fresh_id()
    backend.commit(SET_PROJECT_OPTION(project, "k", "from-postgres"))
    client = redis.Redis.from_url(cache.url)
    client.config_set("lua-time-limit", "10")

    def run_forever() -> None:
        with pytest.raises(redis.RedisError):  # ended by SCRIPT KILL below
            client.eval("while true do end", 0)

    runner = threading.Thread(target=run_forever, daemon=True)
    runner.start()
    probe = redis.Redis.from_url(cache.url, socket_timeout=5)

    def busy() -> bool:
        try:
            probe.ping()
        except redis.exceptions.ResponseError as exc:
            assert redis_unavailable(exc)
            return True
        return False

    try:
        wait_for(busy, timeout=30, message="Redis to answer BUSY")
        answers = []
        for _ in range(READS):
            store.clear_local_cache()
            answers.append(store.project_options.get_value(project, "k"))
    finally:
        probe.script_kill()
        runner.join(timeout=30)
    assert answers == ["from-postgres"] * READS
    record("redis busy (script)", reads=READS, wrong_reads=READS - answers.count("from-postgres"))
