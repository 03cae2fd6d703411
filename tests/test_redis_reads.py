"""A first read's HGETALL on a pooled connection (RedisCache._hgetall, below redis-py's command
layer) reads what redis-py's own HGETALL reads, and hands a failed connection back to it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from store.redis.cache import RedisCache
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
    assert cache._hgetall(key) == cache.client.hgetall(key)
    assert cache._hgetall(cache.key("project:404")) == {}
    encoded = cache.get_encoded(["project:1"])["project:1"]
    assert encoded is not None
    assert (encoded.revision, encoded.keys, encoded.array) == (
        3,
        ["a", "b", "c"],
        b'["x",[1,2],{}]',
    )


def test_a_killed_connection_is_replaced(cache: RedisCache, services: Services) -> None:
    key = _seed(cache, "project:2", {"a": b"1"})
    cache._hgetall(key)  # the pool now holds one idle connection
    killer = redis.Redis.from_url(services.redis_url)
    try:
        before = cache.client.client_id()
        assert killer.client_kill_filter(_id=before) == 1
        assert cache._hgetall(key) == {b"\x00rev": b"3", b"a": b"1"}
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
    assert cache._hgetall(key) == {b"\x00rev": b"3", b"a": b"5"}
    assert failures == ["read"]
    # The failed connection's socket was closed (its reply was half read), not reused.
    assert sock.fileno() == -1


def test_a_reply_error_is_raised_and_the_connection_stays_usable(cache: RedisCache) -> None:
    key = cache.key("project:3")
    cache.client.set(key, "not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        cache._hgetall(key)
    other = _seed(cache, "project:4", {"a": b"2"})
    assert cache._hgetall(other) == {b"\x00rev": b"3", b"a": b"2"}
