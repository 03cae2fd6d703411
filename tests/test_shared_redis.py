"""A Redis broker that is also the cache's server: a write's cache update and its broadcast go
to Redis as one script, the broadcast leaving once the cache holds the change."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

import store
from store.model.scopes import project_scope
from store.model.writes import set_write
from store.redis.cache import server_identity
from tests.conftest import Services, fresh_id, wait_for

WRITES = 20


def _on_db(url: str, db: int) -> str:
    """``url`` (a redis:// URL) with database ``db``."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{db}" if url.startswith("redis://") else url


@pytest.fixture
def shared(services: Services) -> Iterator[Any]:
    """This process's store, publishing through a broker URL that names the cache's server."""
    configured = store.configure(
        database_url=services.database_url,
        redis_url=services.redis_url,
        broker_url=_on_db(services.broker_url, 1),
        namespace=f"t{uuid.uuid4().hex[:10]}",
    )
    yield configured
    store.clear_local_cache()


def test_one_server_reached_one_way_is_one_identity() -> None:
    """Pools for one address and user are one server, whatever the database; another port,
    another user or TLS is not; a Sentinel pool is no identity at all (its server moves)."""
    pool = redis.ConnectionPool.from_url
    same = server_identity(pool("redis://127.0.0.1:6379/0"))
    assert same is not None
    assert server_identity(pool("redis://127.0.0.1:6379/1")) == same
    assert server_identity(pool("redis://127.0.0.1:6380/0")) != same
    assert server_identity(pool("redis://ana:pw@127.0.0.1:6379/0")) != same
    assert server_identity(pool("rediss://127.0.0.1:6379/0")) != same
    sentinel = Sentinel([("127.0.0.1", 26379)])  # type: ignore[no-untyped-call]
    assert server_identity(SentinelConnectionPool("mymaster", sentinel)) is None  # type: ignore[no-untyped-call]


def test_the_cache_script_publishes_the_broadcast_after_moving_the_cache(
    services: Services, shared: Any
) -> None:
    """Redis runs each write's cache update and its broadcast as one script from this process:
    no PUBLISH of its own, and inside the script the PUBLISH comes after the cache's HSET. A
    process that hears the change and loads the scope from Redis finds it there."""
    topics = shared.publisher.topics_on(shared.redis.client)
    assert topics, "the broker and the cache name one server: the publisher should share it"
    project = fresh_id()
    # Loads the script into Redis: the first run of a new script's digest fails NOSCRIPT.
    assert shared.propagate(shared.db.apply(set_write(project_scope(project), "k", -1))[0])
    key = shared.redis.key(f"project:{project}")
    seen: list[dict[str, Any]] = []
    monitor = redis.Redis.from_url(services.redis_url).monitor()
    monitor.__enter__()
    watching = threading.Event()

    def watch() -> None:
        watching.set()
        while True:
            try:
                command = monitor.next_command()
            except (redis.ConnectionError, OSError, ValueError):
                return
            if key in command["command"] or any(t in command["command"] for t in topics):
                seen.append(command)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_for(watching.is_set, message="the MONITOR to start")
    for n in range(WRITES):
        assert shared.propagate(shared.db.apply(set_write(project_scope(project), "k", n))[0])

    def all_published() -> bool:
        return sum(c["command"].startswith("PUBLISH") for c in seen) == WRITES

    wait_for(all_published, message=f"{WRITES} PUBLISH commands in the MONITOR")
    monitor.connection.disconnect()
    order = [(c["client_type"], c["command"].split(" ", 1)[0].upper()) for c in seen]
    script_runs = [i for i, (kind, name) in enumerate(order) if name == "EVALSHA"]
    assert len(script_runs) == WRITES, order
    assert all(kind == "lua" for kind, name in order if name == "PUBLISH"), order
    for start, end in zip(script_runs, [*script_runs[1:], len(order)], strict=True):
        inside = [name for _, name in order[start + 1 : end]]
        assert "PUBLISH" in inside and inside.index("PUBLISH") > inside.index("HSET"), inside
