"""The connections each kind of process holds, idle, against the documented budget
(docs/topologies.md, "Connection budget"); and that they do not grow with the number of workers."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import psutil
import pytest
import redis

from store.redis.presence import Presence
from tests.conftest import Services, Worker, wait_for

# Idle, before any write: (Redis, PostgreSQL) connections per process, at most.
BUDGET = {
    # Celery's: the task consumer (2: a blocking take, and its acknowledgements), the control
    # channel's subscription (1), its event publisher (1: worker heartbeats). The store's: its
    # Redis client (1: the lease, the host's report, the reconciler and the judge take turns
    # on it), the host's one subscription to the reload exchange, relayed to the children (2:
    # its subscription, and its channel's client, which kombu refreshes the exchange's binding
    # with). The leader also publishes heartbeats (1) and reads PostgreSQL from its two duty
    # threads (2, given back after a minute idle)
    "leader": (8, 2),
    "follower": (7, 0),
    # none: it follows the exchange and reports through its parent's relay (a Unix socket),
    # and gives back the Redis connections of its cache reads and of Celery's Redis result
    # backend once idle. No PostgreSQL until a read misses Redis or a task writes
    "child": (0, 0),
}


def _ports(services: Services) -> tuple[int, int]:
    redis_port = urlsplit(services.redis_url).port or 6379
    database = urlsplit(services.database_url)
    return redis_port, database.port or 5432


def _open_ports(pid: int, port: int) -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def _count(pid: int, port: int, *, besides: int | None = None) -> int:
    """Connections of ``pid`` to ``port``; with ``besides``, less those it shares with that
    process (a child forked after its parent connected holds the parent's sockets too: the
    server counts each once, as the parent's)."""
    ours = _open_ports(pid, port)
    return len(ours - _open_ports(besides, port)) if besides is not None else len(ours)


@pytest.fixture(scope="module")
def two_workers(services: Services) -> Iterator[list[Worker]]:
    if services.name != "machine":
        pytest.skip("counted on the machine's services (TCP); the embedded PostgreSQL is a socket")
    # Queues of their own: the session's worker must not answer the tasks meant for these.
    workers = [
        Worker(
            services,
            concurrency=2,
            extra_env={"OPTIONS_TASK_QUEUE": f"{services.namespace}.budget{index}"},
        ).start()
        for index in range(2)
    ]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def test_idle_connections_stay_within_budget_and_do_not_grow_with_workers(
    services: Services, two_workers: list[Worker]
) -> None:
    """With two workers idle, each main process and each child holds at most its budget of
    Redis and PostgreSQL connections, the same whichever worker it belongs to: a child closes
    the Redis connections its reads opened once it is idle."""
    redis_port, postgres_port = _ports(services)
    mains = [w.process.pid for w in two_workers if w.process is not None]

    def counts() -> dict[str, list[tuple[int, int]]]:
        found: dict[str, list[tuple[int, int]]] = {"main": [], "child": []}
        for main in mains:
            found["main"].append((_count(main, redis_port), _count(main, postgres_port)))
            for child in psutil.Process(main).children():
                found["child"].append(
                    (
                        _count(child.pid, redis_port, besides=main),
                        _count(child.pid, postgres_port, besides=main),
                    )
                )
        return found

    presence = Presence(redis.Redis.from_url(services.redis_url), namespace=services.namespace)

    def subscribed() -> set[int] | None:
        children = {c.pid for main in mains for c in psutil.Process(main).children()}
        synced = {r.pid for r in presence.processes() if r.synced}
        return children if len(children) == 4 and children <= synced else None

    wait_for(subscribed, timeout=30, interval=0.5, message="every child to subscribe")
    # A read in every child (from Redis: this process filled the scope there first), then
    # idle: each must give back the connection its read opened.
    import store

    store.configure(
        database_url=services.database_url,
        redis_url=services.redis_url,
        namespace=services.namespace,
    )
    store.options.get_value("budget")
    for worker in two_workers:
        worker.read_everywhere("options", "get_value", "budget")

    def idle_within_child_budget() -> dict[str, list[tuple[int, int]]] | None:
        found = counts()
        within = all(r <= BUDGET["child"][0] for r, _ in found["child"])
        return found if within and len(found["child"]) == 4 else None

    found = wait_for(
        idle_within_child_budget,
        timeout=20,
        interval=0.5,
        message="every idle child to hold at most its budget of Redis connections",
    )
    print(f"\nidle connections (Redis, PostgreSQL): {found}")
    for redis_count, postgres_count in found["child"]:
        assert redis_count <= BUDGET["child"][0] and postgres_count <= BUDGET["child"][1], found
    leader_redis, leader_pg = BUDGET["leader"]
    for redis_count, postgres_count in found["main"]:
        assert redis_count <= leader_redis and postgres_count <= leader_pg, found
    # The second worker costs what the first does: one leader, one follower.
    assert sorted(found["main"])[0][0] <= BUDGET["follower"][0], found
