"""A Redis Cluster of three primaries (each with a replica) as the shared cache and the process
reports, the broker on RabbitMQ: a prefork worker writes, reads and reports through it; a scope
hash that went back in time is repaired, a lost broadcast is noticed through the heartbeat's
marks (read from the cluster), and a primary killed under writes is replaced by its replica
with no write lost."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from store.model.scopes import project_scope
from store.model.writes import Write
from store.postgres.store import PostgresStore, Snapshot
from store.redis.cache import RedisCache
from store.transient import redis_unavailable
from tests.conftest import Services, amqp_url, fresh_id, read_in_new_process, wait_for
from tests.faults.checks import (
    committed,
    optionstore,
    read_all,
    record,
    snapshot,
    status,
    wait_converged,
    wait_status_converged,
    writes_through_fault,
)
from tests.faults.cluster_servers import RedisClusterGroup
from tests.faults.fleet import FaultWorker, Fleet, project_writes, wait_synced
from tests.faults.servers import PostgresServer
from tests.faults.test_sentinel_failover import replicated
from tests.faults.topology_servers import Server
from worker.duties.reconcile import Reconciler

WRITES = 300
PER_SECOND = 40.0
KEYS = 4
# The bounds of guarantees 8 (a cache that went back in time) and 4 (a process that may have
# missed a broadcast), and the convergence after a failover's last commit, as deadlines.
ROLLBACK_BOUND_S = 10.0
HEARTBEAT_DEADLINE_S = 5.0
CONVERGE_BOUND_S = 10.0


@dataclass
class ClusterServices(Services):
    """A fault fleet's services with the cache on a cluster: the broker (and so the reload
    exchange) on the machine's RabbitMQ, as a cluster cache requires."""

    @property
    def broker_url(self) -> str:
        return amqp_url()


@contextlib.contextmanager
def fleet(database_url: str, cache_url: str, result_backend: str) -> Iterator[Fleet]:
    """A fleet on a fresh namespace; every worker it started is stopped on the way out."""
    own = Fleet(ClusterServices("faults", database_url, cache_url), result_backend)
    with own.stack:
        yield own


@pytest.fixture
def redis_cluster(scratch: Path) -> Iterator[RedisClusterGroup]:
    """Three primaries and three replicas of this test's own."""
    group = RedisClusterGroup(scratch / f"cluster-{uuid.uuid4().hex[:8]}").start()
    yield group
    group.close()


@pytest.fixture
def tls_cluster(scratch: Path) -> Iterator[RedisClusterGroup]:
    """Three primaries and three replicas that speak TLS only, the cluster bus too."""
    group = RedisClusterGroup(scratch / f"cluster-tls-{uuid.uuid4().hex[:8]}", tls=True).start()
    yield group
    group.close()


def cluster_worker(own: Fleet, stable: PostgresServer, **options: Any) -> FaultWorker:
    """A prefork worker with two children, its cache on the cluster and its broker on the
    machine's RabbitMQ (a vhost of this test run's own)."""
    worker = FaultWorker(own.services, result_backend=stable.redis_url, concurrency=2, **options)
    own.stack.callback(worker.stop)
    worker.start()
    own.workers.append(worker)
    wait_synced(own, worker.pids())
    return worker


def primary_serving(group: RedisClusterGroup, cache: RedisCache, scope: str) -> Server:
    """The node that is the primary of ``scope``'s hash slot now."""
    port = int(cache.client.cluster.get_node_from_key(cache.key(scope)).port)
    return next(node for node in group.nodes if node.port == port)


@pytest.mark.faults
def test_cluster_cache_serves_a_prefork_fleet(
    stable: PostgresServer, redis_cluster: RedisClusterGroup
) -> None:
    """With the cache on a redis+cluster:// URL, writes through a prefork worker land in
    hash-tagged scope hashes spread over the shards, every child reads them, `status` lists
    every process converged and `set --wait` counts each one."""
    database_url = stable.new_database()
    with fleet(database_url, redis_cluster.url, stable.redis_url) as own:
        worker = cluster_worker(own, stable)
        cache = RedisCache(url=redis_cluster.url, prefix=own.namespace)
        projects = [fresh_id() for _ in range(12)]
        for n, project in enumerate(projects):
            worker.call("options.set_project_option", project, "k", n)
        for n, project in enumerate(projects[:3]):
            assert all(v == {"k": n} for v in read_all(worker, project).values())
        # Each scope's hash is on its own slot, and the scopes use more than one shard.
        shards = set()
        for project in projects:
            scope = f"project:{project}"
            key = cache.key(scope)
            assert key == f"{own.namespace}:scope:{{{scope}}}"
            cached = cache.get(scope)
            if cached is not None:  # a read fills it; a write alone moves only a cached hash
                assert cached.revision == snapshot(database_url, scope)[0]
            shards.add(primary_serving(redis_cluster, cache, scope).port)
        assert len(shards) > 1, shards
        assert cache.get(f"project:{projects[0]}") is not None
        report = wait_status_converged(own)
        assert {p["pid"] for p in report["processes"]} == worker.pids()
        done = optionstore(worker, "set", f"project:{projects[0]}", "k", "100", "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"applied by {len(worker.pids())} live worker processes" in done.stdout
        assert all(v == {"k": 100} for v in read_all(worker, projects[0]).values())
        assert status(worker)["converged"] is True


@pytest.mark.faults
def test_cluster_primary_killed_under_writes(
    stable: PostgresServer, redis_cluster: RedisClusterGroup
) -> None:
    """kill -9 of the primary that holds the written scopes, under a stream of 300 writes:
    its replica takes over, every write commits once, every process then reads and reports
    what PostgreSQL holds (within 10 s of the last commit), and `set --wait` counts them all."""
    database_url = stable.new_database()
    projects = [fresh_id(), fresh_id()]
    writes = project_writes("cluster", projects, count=WRITES, keys=KEYS)
    ids = [task_id for task_id, _, _ in writes]
    with fleet(database_url, redis_cluster.url, stable.redis_url) as own:
        worker = cluster_worker(own, stable)
        cache = RedisCache(url=redis_cluster.url, prefix=own.namespace)
        old = primary_serving(redis_cluster, cache, f"project:{projects[0]}")
        replica = redis_cluster.replica_of(old)
        assert replica is not None
        killed: list[float] = []
        promoted: list[float] = []

        def kill_primary() -> None:
            # Once the replica holds all the primary has (Redis replicates asynchronously: what
            # a primary took in its last milliseconds may be missing on the replica promoted,
            # which the reconciler repairs from PostgreSQL; this test counts writes lost).
            with contextlib.closing(old.client()) as client:
                sent = int(client.info("replication")["master_repl_offset"])
                wait_for(
                    lambda: replicated(client, sent),
                    timeout=30,
                    interval=0.01,
                    message="the replica to hold everything written so far",
                )
            killed.append(time.monotonic())
            old.kill()

        def promotion() -> float:
            wait_for(
                lambda: redis_cluster.roles().get(replica.port, ("", None))[0] == "primary",
                timeout=60,
                interval=0.05,
                message="the replica to take over",
            )
            wait_for(redis_cluster.ok, timeout=60, message="cluster ok")
            promoted.append(time.monotonic() - killed[0])
            return killed[0]

        done = writes_through_fault(
            own,
            worker,
            database_url,
            projects,
            writes,
            between_sends=kill_primary,
            fault=promotion,
            build_up=WRITES // 3,
            per_second=PER_SECOND,
            converge_timeout=CONVERGE_BOUND_S,
            when="after the failover",
        )
        # The promoted replica holds each scope at PostgreSQL's revision (or not at all).
        for project in projects:
            scope = f"project:{project}"
            cached = cache.get(scope)
            truth = snapshot(database_url, scope)
            assert cached is None or cached.revision == truth[0], (cached, truth)
        converge_s = wait_converged(own, database_url, projects)
        # The leader saw a primary change (its run ids) and checked every scope again.
        assert worker.events("reconcile.redis_restarted"), "no full check after the failover"
        # `set --wait` counts every process through reports on the cluster as it is now.
        waited = optionstore(worker, "set", f"project:{projects[0]}", "after", "1", "--wait")
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert f"applied by {len(worker.pids())} live worker processes" in waited.stdout
        fallbacks = worker.log().count('"cache.fallback"')
        failed_steps = worker.log().count('"cache.announce_failed"')
    assert not own.failed_reads, own.failed_reads
    assert set(done.counts) == set(ids)
    assert set(done.counts.values()) == {1}, "a write is in history more than once"
    record(
        "Redis Cluster failover (a primary kill -9), cache and reports",
        writes=len(ids),
        lost=len(ids) - len(committed(database_url, ids)),
        committed_when_killed=done.committed_at_fault,
        promoted_s=round(promoted[0], 2),
        cache_steps_failed=failed_steps,
        read_fallbacks=fallbacks,
        all_committed_s=round(done.committed_s, 2),
        converge_s=round(done.converge_s, 2),
        converged_again_s=round(converge_s, 2),
    )


@pytest.mark.faults
def test_cluster_hash_gone_back_is_repaired(
    stable: PostgresServer, redis_cluster: RedisClusterGroup
) -> None:
    """A scope's hash on the cluster restored from a DUMP taken before the last write: a new
    process and every task of the running worker read the committed value within 10 s."""
    database_url = stable.new_database()
    with fleet(database_url, redis_cluster.url, stable.redis_url) as own:
        worker = cluster_worker(own, stable)
        cache = RedisCache(url=redis_cluster.url, prefix=own.namespace)
        project = fresh_id()
        name = cache.key(f"project:{project}")
        worker.call("options.set_project_option", project, "k", "old")
        answers = worker.read_everywhere("project_options", "get_value", project, "k")
        assert set(answers.values()) == {"old"}
        dumped = cache.client.dump(name)
        assert dumped is not None, "the scope was not cached"
        worker.call("options.set_project_option", project, "k", "new")
        cache.client.restore(name, 0, dumped, replace=True)
        restored = time.monotonic()
        wait_for(
            lambda: read_in_new_process(own.services, project, "k") == "new",
            timeout=ROLLBACK_BOUND_S,
            interval=0.05,
            message="a new process to read the committed value",
        )
        new_process_s = time.monotonic() - restored
        wait_for(
            lambda: (
                set(worker.read_everywhere("project_options", "get_value", project, "k").values())
                == {"new"}
            ),
            timeout=ROLLBACK_BOUND_S - new_process_s,
            interval=0,
            message="every running process to read the committed value",
        )
        record(
            "Redis Cluster: a scope hash restored from an older DUMP",
            new_process_s=round(new_process_s, 2),
            every_process_s=round(time.monotonic() - restored, 2),
        )


@pytest.mark.faults
def test_cluster_swallowed_broadcast_is_noticed(
    stable: PostgresServer, redis_cluster: RedisClusterGroup
) -> None:
    """A reload message lost on the way reaches no process, yet every process-mode cache
    serves the new value within the heartbeat deadline: the leader builds the heartbeat's marks
    from the announcement record on the cluster."""
    database_url = stable.new_database()
    with fleet(database_url, redis_cluster.url, stable.redis_url) as own:
        worker = cluster_worker(
            own,
            stable,
            extra_env={"OPTIONS_LOCAL_CACHE": "process"},
            include="tests.probe_tasks,tests.broadcast_hooks",
        )
        project = fresh_id()

        def everywhere() -> set[Any]:
            answers = worker.read_everywhere("project_options", "get_value", project, "k")
            return set(answers.values())

        worker.call("options.set_project_option", project, "k", "old")
        wait_for(lambda: everywhere() == {"old"}, timeout=30, message="every cache to hold old")
        since = len(worker.log())
        worker.call("options.set_project_option", project, "k", "swallowed:new")
        written = time.monotonic()
        wait_for(
            lambda: everywhere() == {"swallowed:new"},
            timeout=HEARTBEAT_DEADLINE_S,
            interval=0,
            message="every process cache to serve the value whose broadcast was lost",
        )
        noticed_s = time.monotonic() - written
        assert not worker.events("broadcast.applied", since=since), "the broadcast was not lost"
        assert worker.events("broadcast.missed", since=since)
        record("Redis Cluster: a broadcast swallowed", every_process_s=round(noticed_s, 2))


@pytest.mark.faults
def test_cluster_over_tls(stable: PostgresServer, tls_cluster: RedisClusterGroup) -> None:
    """With the cache on a rediss+cluster:// URL (TLS only, checked against the cluster's CA),
    a prefork worker's writes are read in every child and `status` shows every process
    converged; a plaintext client gets nothing from the cluster."""
    database_url = stable.new_database()
    with fleet(database_url, tls_cluster.url, stable.redis_url) as own:
        worker = cluster_worker(own, stable)
        projects = [fresh_id() for _ in range(4)]
        for n, project in enumerate(projects):
            worker.call("options.set_project_option", project, "k", n)
            assert all(v == {"k": n} for v in read_all(worker, project).values())
        report = wait_status_converged(own)
        assert {p["pid"] for p in report["processes"]} == worker.pids()
        node = tls_cluster.nodes[0]
        plain = redis.Redis("127.0.0.1", node.port, socket_timeout=2, socket_connect_timeout=2)
        with contextlib.closing(plain), pytest.raises(redis.RedisError):
            plain.ping()


def scope_off_the_record_shard(
    group: RedisClusterGroup, cache: RedisCache, database: str
) -> tuple[str, Server]:
    """A project scope whose hash is on another shard than ``database``'s announcement
    record, and the primary that holds the record."""
    record_key = cache.record(database).announced_key
    record_port = int(cache.client.cluster.get_node_from_key(record_key).port)
    scope = next(
        name
        for name in (f"project:{n}" for n in range(1, 1000))
        if primary_serving(group, cache, name).port != record_port
    )
    return scope, next(node for node in group.nodes if node.port == record_port)


@contextlib.contextmanager
def refusing_writes(node: Server) -> Iterator[None]:
    """``node`` full (OOM: maxmemory below what it holds) for the block: every write refused."""
    with contextlib.closing(node.client()) as client:
        client.config_set("maxmemory", 1)
        try:
            yield
        finally:
            client.config_set("maxmemory", 0)


@pytest.mark.faults
def test_cluster_scope_moves_while_the_record_shard_refuses_writes(
    redis_cluster: RedisClusterGroup,
) -> None:
    """The shard of the announcement record full (OOM) while a scope's shard is healthy: a
    write's cache step still moves the scope's hash (a reader never gets the old value from
    it), and reports the failed record as transient, for the relay to record it later."""
    cache = RedisCache(url=redis_cluster.url, prefix=f"ns-{uuid.uuid4().hex[:8]}")
    scope, record_node = scope_off_the_record_shard(redis_cluster, cache, "db-1")
    assert cache.fill(scope, Snapshot(1, {"k": '"old"'}))
    with refusing_writes(record_node):
        with pytest.raises(redis.RedisError) as refused:
            cache.apply(scope, 2, {"k": '"new"'}, task_id="t2", database="db-1")
        assert redis_unavailable(refused.value), refused.value
        cached = cache.get(scope)
        assert cached is not None
        assert (cached.revision, cached.values) == (2, {"k": '"new"'})
    # The relay's second try records the announcement; the hash is already there.
    again = cache.apply(scope, 2, {"k": '"new"'}, task_id="t2", database="db-1")
    assert (again.outcome, again.announced, again.by) == ("old", 0, "")
    assert cache.record("db-1").page(cursor=0, count=10)[1] == {scope: 2}


@pytest.mark.faults
def test_plain_url_at_a_cluster_node_is_not_redis_down(redis_cluster: RedisClusterGroup) -> None:
    """A redis:// URL naming one node of a cluster (the redis+cluster:// scheme forgotten):
    the MOVED its node answers for a scope on another shard is not taken for Redis down, which
    would hide the wrong URL behind PostgreSQL reads and a relay that never finishes."""
    node = redis_cluster.primaries()[0]
    plain = RedisCache(url=f"redis://127.0.0.1:{node.port}/0", prefix="ns")
    assert not plain.cluster
    moved: list[redis.RedisError] = []
    for n in range(1, 1000):
        try:
            plain.get(f"project:{n}")
        except redis.RedisError as exc:
            moved.append(exc)
            break
    assert moved, "every scope was on the node the URL names"
    assert isinstance(moved[0], redis.exceptions.MovedError), repr(moved[0])
    assert not redis_unavailable(moved[0])


@pytest.mark.faults
def test_cluster_hash_behind_is_repaired_while_the_record_shard_refuses_writes(
    stable: PostgresServer, redis_cluster: RedisClusterGroup
) -> None:
    """The shard of the announcement record full (OOM), so the reconciler cannot move the
    database's clock there: a scope's hash behind PostgreSQL on a healthy shard is repaired all
    the same (guarantee 8 does not wait for another shard)."""
    db = PostgresStore(conninfo=stable.new_database())
    try:
        cache = RedisCache(url=redis_cluster.url, prefix=f"ns-{uuid.uuid4().hex[:8]}")
        scope, record_node = scope_off_the_record_shard(redis_cluster, cache, db.database_id())
        written = project_scope(int(scope.split(":")[1]))
        old, _ = db.apply(Write(written, {"k": '"old"'}, ()), task_id=uuid.uuid4().hex)
        assert cache.fill(scope, Snapshot(old.revision, {"k": '"old"'}))
        # Committed and announced, but the hash missed it (a cache step that failed).
        new, _ = db.apply(Write(written, {"k": '"new"'}, ()), task_id=uuid.uuid4().hex)
        db.mark_announced([old.task_id, new.task_id])
        reconciler = Reconciler(postgres=db, cache=cache, settle=0.0)
        with refusing_writes(record_node):
            reconciler.run_once()
            assert cache.revisions([scope]) == {scope: new.revision}
        assert cache.get(scope) is None, "the hash is a floor: the next reader loads PostgreSQL"
    finally:
        db.close()
