"""Fleet scale on this machine: W workers x 16 prefork children (16 to 256 children, as
memory allows) on a Redis of their own (broker and cache), the run's PostgreSQL. Per process
and in total: idle broker deliveries/s, idle Redis commands/s, Redis and PostgreSQL
connections; and propagation to all of them against raw kombu fanout to as many processes, in
the same run.

``OPTIONS_HOST_RELAY`` (default on) is the workers' as this process's environment says: run
once with ``OPTIONS_HOST_RELAY=0`` for the figures of one subscription per child."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench.env import Services, Worker, celery_services, producer, wait_for
from bench.figures import Figure, Series
from bench.fleet import Fleet, _propagation_at
from bench.reads import PROJECT_ID, option_values, seed_scope

# (workers, children per worker); a shape runs only while memory allows it (_fits)
SHAPES = ((1, 16), (2, 16), (4, 16), (8, 16), (16, 16))
QUICK_SHAPES = SHAPES
# What one more worker child and its raw fanout peer take, at most: a shape runs only if the
# memory available before it holds this much per child and RESERVE besides.
MEMORY_PER_CHILD = 60 * 2**20
RESERVE = 2 * 2**30
IDLE_SECONDS = 10.0


class _Redis:
    """A redis-server of the benchmark's own: the fleet's traffic is all that it counts."""

    def __init__(self) -> None:
        from store.embedded import _redis_binary

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory = Path(tempfile.mkdtemp(prefix="bench-scale-redis-"))
        self.process = subprocess.Popen(
            [
                str(_redis_binary()),
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(self.directory), "--maxclients", "20000"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url)
        wait_for(self._answers, timeout=30, what="the benchmark's redis-server")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def commands(self) -> int:
        return int(self.client.info("stats")["total_commands_processed"])

    def clients(self) -> int:
        return int(self.client.info("clients")["connected_clients"])

    def own_clients(self) -> int:
        """The connections of this process (the benchmark's own store, producer and probes):
        counted by the server, not the fleet's."""
        import psutil

        return sum(
            1
            for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == self.port and c.status == psutil.CONN_ESTABLISHED
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class _Workers:
    """Several workers of one namespace, read as one host: their logs and their processes."""

    def __init__(self, workers: list[Worker], namespace: str) -> None:
        self.workers = workers
        self.namespace = namespace

    def events(self) -> list[dict[str, Any]]:
        return [event for worker in self.workers for event in worker.events()]


def _idle(
    run: Services, server: _Redis, namespace: str, pids: list[int], mains: list[int]
) -> dict[str, Any]:
    """Idle costs over IDLE_SECONDS, nothing being written."""
    messages_before = _messages(server, namespace, pids)
    commands_before = server.commands()
    time.sleep(IDLE_SECONDS)
    commands = (server.commands() - commands_before) / IDLE_SECONDS
    deliveries = (_messages(server, namespace, pids) - messages_before) / IDLE_SECONDS
    with psycopg.connect(run.database_url) as conn:
        (postgres,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchone()  # type: ignore[misc]
    processes = len(pids) + len(mains)
    connections = server.clients()
    fleet_connections = connections - server.own_clients()
    return {
        "processes_children": len(pids),
        "processes_main": len(mains),
        "broker_deliveries_per_s": deliveries,
        "broker_deliveries_per_s_per_process": deliveries / len(pids),
        "redis_commands_per_s": commands,
        "redis_commands_per_s_per_process": commands / processes,
        "redis_connections": fleet_connections,
        "redis_connections_benchmark": connections - fleet_connections,
        "redis_connections_per_process": fleet_connections / processes,
        "postgres_connections": int(postgres),
        "postgres_connections_per_process": int(postgres) / processes,
    }


def _messages(server: _Redis, namespace: str, pids: list[int]) -> int:
    """Messages every child's consumer has received so far (its report counts them, whether
    it reports for itself or through its host's relay)."""
    from store.redis.presence import Presence

    reports = Presence(server.client, namespace=namespace).processes()
    return sum(report.messages for report in reports if report.pid in pids)


def _fits(children: int) -> bool:
    import psutil

    return bool(psutil.virtual_memory().available >= children * MEMORY_PER_CHILD + RESERVE)


@contextlib.contextmanager
def scale_fleet(
    run: Services, server: _Redis, *, label: str, workers: int, children: int, idle: list[Any]
) -> Iterator[Fleet]:
    namespace = run.namespace(label)
    backend = run.configure_store(namespace, broker_url=run.broker_url)
    seed_scope(backend, PROJECT_ID, option_values(10))
    started: list[Worker] = []
    pids: list[int] = []
    try:
        for index in range(workers):
            worker = Worker(
                run, namespace, concurrency=children, local_cache="process", log_level="debug"
            )
            worker.hostname = f"{namespace}-{index}@{socket.gethostname()}"
            started.append(worker.start())
            # One at a time: the imports of 16 workers' children at once take two cores longer
            # than one worker's wait.
            pids += worker.wait_synced(backend)
        pids.sort()
        mains = [worker.process.pid for worker in started if worker.process is not None]
        running = Fleet(
            _Workers(started, namespace), backend, producer(run, started[0].queue), pids
        )  # type: ignore[arg-type]
        running.warm(PROJECT_ID, "mail:subject_prefix")
        idle.append(_idle(run, server, namespace, pids, mains))
        # Children that lost their parent's relay and subscribed for themselves (none, when
        # the relay holds): their connections and reports are in the figures above.
        idle[-1]["relay_lost"] = sum(
            1
            for worker in started
            for event in worker.log.read()
            if event.get("event") == "broadcast.relay_lost"
        )
        yield running
    finally:
        for worker in started:
            worker.stop()


def scale(run: Services, *, quick: bool) -> list[Figure]:
    server = _Redis()
    own = replace(run, redis_url=server.url, broker_url=server.url, broker="redis")
    figures: list[Figure] = []
    idle: list[dict[str, Any]] = []
    try:
        # The producers send to the benchmark's Redis, and read their results there.
        with celery_services(server.url, server.url):
            for workers, children in QUICK_SHAPES if quick else SHAPES:
                count = workers * children
                if not _fits(count):
                    print(f"bench: scale {count} skipped: not enough memory", file=sys.stderr)
                    break
                figures += _propagation_at(
                    own,
                    count,
                    10 if quick else 60,
                    goal="<= 1.3x",
                    host=lambda w=workers, c=children: scale_fleet(
                        own, server, label=f"scale{w * c}", workers=w, children=c, idle=idle
                    ),
                    name=f"propagation_scale_{count}",
                    title=f"propagation at scale: {workers} workers x {children} children",
                    who=(
                        f"{workers} `celery worker --concurrency {children}` in one namespace "
                        f"({count} prefork children, OPTIONS_LOCAL_CACHE=process, "
                        f"OPTIONS_HOST_RELAY={os.environ.get('OPTIONS_HOST_RELAY') or '1'}) "
                        "on a Redis of the benchmark's own"
                    ),
                )
                figures[-1].extra["idle"] = idle[-1]
    finally:
        server.stop()
    first, last = idle[0], idle[-1]
    for metric, unit in (
        ("broker_deliveries_per_s_per_process", "deliveries/s"),
        ("redis_commands_per_s_per_process", "commands/s"),
        ("redis_connections_per_process", "connections"),
        ("postgres_connections_per_process", "connections"),
    ):
        figures.append(
            Figure(
                name=f"idle_{metric}",
                title=f"idle, per process, {last['processes_children']} children: {metric}",
                baseline_title=f"the same at {first['processes_children']} children",
                value=Series(unit, [last[metric]]),
                baseline=Series(unit, [first[metric]]),
                goal="<= 1.2x",
                method=(
                    f"{IDLE_SECONDS:.0f} s with nothing written, after every child subscribed "
                    "and holding one scope; the benchmark's own redis-server counts commands "
                    "(INFO) and clients (less the benchmark process's own); deliveries are the "
                    "messages the processes' own reports "
                    "count; PostgreSQL connections from pg_stat_activity of the run's database. "
                    "Per process: over children and main processes (deliveries: children)"
                ),
                extra={"all_shapes": idle},
            )
        )
    return figures
