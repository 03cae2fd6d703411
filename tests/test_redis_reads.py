"""Commands on a pooled connection below redis-py's command layer (store/redis/direct.py: a
first read's HGETALL, a process's report) answer what redis-py answers, and hand a failed
connection back to it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from store.redis import direct
from store.redis.cache import RedisCache
from store.redis.presence import Presence
from tests.conftest import Services


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def cache(services: Services, request: pytest.FixtureRequest) -> Iterator[RedisCache]:
    url = services.redis_url
    url += ("&" if "?" in url else "?") + f"protocol={request.param}"
    cache = RedisCache(url=url, prefix=f"{services.namespace}:{uuid.uuid4().hex[:8]}")
    yield cache
    keys = list(cache.client.scan_iter(f"{cache.prefix}:*"))
    if keys:
        cache.client.delete(*keys)
    cache.client.close()


def _seed(cache: RedisCache, scope: str, fields: dict[str, bytes]) -> str:
    key = cache.key(scope)
    cache.client.hset(key, mapping={b"\x00rev": b"3", **{k.encode(): v for k, v in fields.items()}})
    return key


def test_the_pooled_read_is_redis_pys_read(cache: RedisCache) -> None:
    key = _seed(cache, "project:1", {"a": b'"x"', "b": b"[1,2]", "c": b"{}"})
    assert direct.hgetall(cache.client, key) == cache.client.hgetall(key)
    assert direct.hgetall(cache.client, cache.key("project:404")) == {}
    encoded = cache.get_encoded(["project:1"])["project:1"]
    assert encoded is not None
    assert (encoded.revision, encoded.keys, encoded.array) == (
        3,
        ["a", "b", "c"],
        b'["x",[1,2],{}]',
    )


def test_a_killed_connection_is_replaced(cache: RedisCache, services: Services) -> None:
    key = _seed(cache, "project:2", {"a": b"1"})
    direct.hgetall(cache.client, key)  # the pool now holds one idle connection
    killer = redis.Redis.from_url(services.redis_url)
    try:
        before = cache.client.client_id()
        assert killer.client_kill_filter(_id=before) == 1
        assert direct.hgetall(cache.client, key) == {b"\x00rev": b"3", b"a": b"1"}
        assert cache.client.client_id() != before
    finally:
        killer.close()


def test_a_connection_failing_mid_read_hands_the_read_to_redis_py(
    cache: RedisCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = _seed(cache, "project:5", {"a": b"5"})
    pool = cache.client.connection_pool
    connection = pool.get_connection()
    pool.release(connection)  # the next read takes this one
    sock = connection._sock
    assert sock is not None
    failures: list[str] = []
    real = connection.read_response

    def fails_once(*args: object, **kwargs: object) -> object:
        if not failures:
            failures.append("read")
            raise redis.ConnectionError("connection reset mid-reply (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(connection, "read_response", fails_once)
    assert direct.hgetall(cache.client, key) == {b"\x00rev": b"3", b"a": b"5"}
    assert failures == ["read"]
    # The failed connection's socket was closed (its reply was half read), not reused.
    assert sock.fileno() == -1


def test_a_reply_error_is_raised_and_the_connection_stays_usable(cache: RedisCache) -> None:
    key = cache.key("project:3")
    cache.client.set(key, "not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        direct.hgetall(cache.client, key)
    other = _seed(cache, "project:4", {"a": b"2"})
    assert direct.hgetall(cache.client, other) == {b"\x00rev": b"3", b"a": b"2"}


def test_a_report_of_thousands_of_revisions_is_written_whole(cache: RedisCache) -> None:
    presence = Presence(cache.client, namespace=cache.prefix, ttl=30.0)
    revisions = {f"project:{n}": n for n in range(5000)}
    fields = {"kind": "worker", "pid": 7}
    assert presence.report(hostname="h", pid=7, fields=fields, revisions=revisions)
    # Not new the second time; 3,000 revisions forgotten, 10 moved on.
    moved = {f"project:{n}": n + 1 for n in range(4990, 5000)}
    forgotten = [f"project:{n}" for n in range(3000)]
    assert not presence.report(hostname="h", pid=7, fields={}, revisions=moved, forgotten=forgotten)
    (report,) = presence.processes()
    assert report.revisions == {**{f"project:{n}": n for n in range(3000, 4990)}, **moved}
    assert 29_000 < cache.client.pttl(presence.key("h", 7)) <= 30_000
    # Redis lost the hash: the next report says so.
    cache.client.delete(presence.key("h", 7))
    assert presence.report(hostname="h", pid=7, fields=fields, revisions=moved)


def _connections_used(cache: RedisCache, *, threads: int = 8, rounds: int = 200) -> set[int]:
    """The server's ids of the connections ``threads`` threads' commands went out on, each
    thread starting at the same moment."""
    import threading

    seen: set[int] = set()
    done: list[int] = []
    failed: list[BaseException] = []
    start = threading.Barrier(threads)

    def run() -> None:
        try:
            start.wait()
            for _ in range(rounds):
                seen.add(cache.client.client_id())
                direct.hgetall(cache.client, cache.key("project:turns"))
            done.append(rounds)
        except BaseException as exc:  # reported by the test, not lost with the thread
            failed.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failed, failed
    assert done == [rounds] * threads
    return seen


def test_threads_that_take_turns_share_one_connection(cache: RedisCache) -> None:
    """A prefork worker's main process (store.runtime.runs_no_tasks): however its threads'
    commands line up, Redis sees one connection from it; without turns, several."""
    assert len(_connections_used(cache)) > 1
    cache.take_turns()
    assert len(_connections_used(cache)) == 1
    cache.share_connections()
    assert len(_connections_used(cache)) > 1


def test_a_child_forked_from_a_process_that_takes_turns_shares_again(
    services: Services,
) -> None:
    """The children run tasks: their threads must not wait on one connection."""
    import os
    import select

    from store.process import StoreProcess

    runtime = StoreProcess()
    runtime.configure(
        database_url=services.database_url,
        redis_url=services.redis_url,
        namespace=f"{services.namespace}turns",
    )
    cache = runtime.store.redis
    assert cache is not None
    try:
        runtime.runs_no_tasks()
        assert isinstance(cache.client.connection_pool, redis.BlockingConnectionPool)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            try:
                blocking = isinstance(cache.client.connection_pool, redis.BlockingConnectionPool)
                used = len(_connections_used(cache))
                os.write(write, f"{int(blocking)} {used}".encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as answer:
            ready, _, _ = select.select([answer], [], [], 60)
            assert ready, "the forked child never answered"
            blocking, used = (int(part) for part in answer.read().split())
        os.waitpid(child, 0)
        assert (blocking, used > 1) == (0, True)
        assert len(_connections_used(cache)) == 1  # the parent still takes turns
    finally:
        runtime.stop()
        runtime.store.db.close()
