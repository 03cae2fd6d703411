"""Fleet scale on a Redis Cluster: W workers x C prefork children with the cache and the process
reports on a cluster of the benchmark's own (three primaries, each with a replica), the broker
outside it (the run's). Per process, what it costs the cluster idle (commands/s, connections
per primary) and under writes (commands per write): the figures docs/topologies.md takes to a
fleet of 100,000 processes."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.env import Services, Worker, celery_services, forget_results, producer, wait_for
from bench.figures import Figure, Series
from bench.reads import KEY, PROJECT_ID, option_values, seed_scope
from tests.faults.cluster_servers import RedisClusterGroup

# (workers, children per worker)
SHAPES = ((2, 8), (4, 16))
QUICK_SHAPES = ((1, 4), (2, 8))
IDLE_SECONDS = 10.0
WRITES = 200
# Scopes each child reads: enough to land on every shard.
SCOPES = 12


class _Primaries:
    """The cluster's primaries as one server: commands and clients summed, clients per node."""

    def __init__(self, group: RedisClusterGroup) -> None:
        self.group = group

    def _info(self, section: str) -> list[dict[str, Any]]:
        found = []
        for node in self.group.primaries():
            with contextlib.closing(node.client()) as client:
                found.append(client.info(section))
        return found

    def commands(self) -> int:
        return sum(int(info["total_commands_processed"]) for info in self._info("stats"))

    def clients(self) -> list[int]:
        return [int(info["connected_clients"]) for info in self._info("clients")]


@contextlib.contextmanager
def cluster_fleet(
    run: Services, cache: Services, *, label: str, workers: int, children: int
) -> Iterator[tuple[list[Worker], list[int], Any]]:
    """Workers on the cluster cache, every child synced and holding connections to every
    shard (it has read ``SCOPES`` scopes)."""
    namespace = cache.namespace(label)
    backend = cache.configure_store(namespace, broker_url=run.broker_url)
    for n in range(SCOPES):
        seed_scope(backend, PROJECT_ID + n, option_values(10))
    started: list[Worker] = []
    try:
        for index in range(workers):
            worker = Worker(cache, namespace, concurrency=children, local_cache="task")
            # The result backend stays a single Redis (the run's): Celery has no cluster one.
            worker.env["CELERY_RESULT_BACKEND"] = run.redis_url
            worker.hostname = f"{namespace}-{index}@{socket.gethostname()}"
            started.append(worker.start())
        pids = sorted(pid for worker in started for pid in worker.wait_synced(backend))
        app = producer(run, started[0].queue)
        seen: set[int] = set()
        task_ids: list[str] = []

        def every_child_read() -> bool:
            pending = [
                app.send_task("bench.warm", args=[PROJECT_ID + n, KEY, 0.05])
                for _ in range(len(pids))
                for n in range(SCOPES)
            ]
            for result in pending:
                seen.add(result.get(timeout=60)["pid"])
                task_ids.append(result.id)
            return set(pids) <= seen

        wait_for(every_child_read, timeout=180, what="every child to read every scope")
        forget_results(run, task_ids)
        yield started, pids, app
    finally:
        for worker in started:
            worker.stop()


def _measure(
    primaries: _Primaries, pids: list[int], workers: list[Worker], app: Any, run: Services
) -> dict[str, Any]:
    processes = len(pids) + len(workers)
    before = primaries.commands()
    time.sleep(IDLE_SECONDS)
    idle = (primaries.commands() - before) / IDLE_SECONDS
    clients = primaries.clients()
    # Writes, one at a time, each to one of the scopes every child holds: what the cluster
    # does per write (the write itself, and the reports of the processes that applied it).
    started = time.monotonic()
    before = primaries.commands()
    task_ids = []
    for n in range(WRITES):
        result = app.send_task(
            "options.set_project_option", args=[PROJECT_ID + n % SCOPES, "bench:n", n]
        )
        result.get(timeout=60)
        task_ids.append(result.id)
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # the last reports (20 ms after a change, at most every 250 ms)
    written = primaries.commands() - before - idle * (elapsed + 1.0)
    forget_results(run, task_ids)
    return {
        "processes_children": len(pids),
        "processes_main": len(workers),
        "primaries": len(clients),
        "idle_commands_per_s": idle,
        "idle_commands_per_s_per_process": idle / processes,
        "connections_per_primary": clients,
        "connections_per_primary_per_process": max(clients) / processes,
        "writes_per_s": WRITES / elapsed,
        "commands_per_write": written / WRITES,
        "commands_per_write_per_process": written / WRITES / processes,
    }


def scale_cluster(run: Services, *, quick: bool) -> list[Figure]:
    directory = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    group = RedisClusterGroup(directory).start()
    cache = replace(run, redis_url=group.url)
    primaries = _Primaries(group)
    shapes: list[dict[str, Any]] = []
    try:
        # The producers send to the run's broker and read results from the run's Redis.
        with celery_services(run.broker_url, run.redis_url):
            for workers, children in QUICK_SHAPES if quick else SHAPES:
                label = f"cluster{workers * children}"
                with cluster_fleet(run, cache, label=label, workers=workers, children=children) as (
                    started,
                    pids,
                    app,
                ):
                    shapes.append(_measure(primaries, pids, started, app, run))
    finally:
        group.close()
        shutil.rmtree(directory, ignore_errors=True)
    first, last = shapes[0], shapes[-1]
    figures = []
    for metric, unit in (
        ("idle_commands_per_s_per_process", "commands/s"),
        ("connections_per_primary_per_process", "connections"),
        ("commands_per_write_per_process", "commands"),
    ):
        figures.append(
            Figure(
                name=f"cluster_{metric}",
                title=f"Redis Cluster, per process, {last['processes_children']} children: "
                f"{metric}",
                baseline_title=f"the same at {first['processes_children']} children",
                value=Series(unit, [last[metric]]),
                baseline=Series(unit, [first[metric]]),
                goal="<= 1.2x",
                method=(
                    f"a cluster of {last['primaries']} primaries (each with a replica) of the "
                    "benchmark's own as cache and reports, the run's broker; every child has "
                    f"read {SCOPES} scopes (every shard); {IDLE_SECONDS:.0f} s with nothing "
                    f"written, then {WRITES} writes one at a time (task mode); commands (INFO) "
                    "summed over the primaries, idle commands taken out; per process: over "
                    "children and main processes; connections: the busiest primary's"
                ),
                extra={"all_shapes": shapes},
            )
        )
    return figures
