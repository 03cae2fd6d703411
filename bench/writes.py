"""Write throughput on one real worker: ``set_option`` and ``set_many`` against a no-op task.

Each batch is queued while the worker is not consuming (``cancel_consumer``), then released
(``add_consumer``): the clock runs from the release to the last task's ``date_done`` in the
result backend, so producing the messages is not part of the figure.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import psycopg

from bench.env import Services, Worker, forget_results, iso_to_epoch, producer, wait_for
from bench.figures import Figure, Series
from bench.noop_tasks import COMMIT_ROW_TABLE

CONCURRENCY = 2
MANY_KEYS = 1000


class Batches:
    """Runs batches of tasks through one worker and times them."""

    def __init__(self, run: Services, worker: Worker) -> None:
        self.run = run
        self.worker = worker
        self.producer = producer(run, worker.queue)
        self.redis = run.redis()
        self.task_ids: list[str] = []
        # CPU seconds and task count per task name and process group, for the breakdown.
        self.cpu: dict[str, dict[str, float]] = {}
        self.counts: dict[str, int] = {}

    def _groups(self) -> dict[str, list[Any]]:
        import psutil

        assert self.worker.process is not None
        main = psutil.Process(self.worker.process.pid)
        with psycopg.connect(self.run.database_url, autocommit=True) as conn:
            backends = [
                pid
                for (pid,) in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()"
                )
            ]
        redis_pid = int(self.redis.info("server")["process_id"])
        return {
            "worker_main": [main],
            "worker_children": main.children(recursive=True),
            "postgres_backends": [psutil.Process(pid) for pid in backends],
            "redis_server (shared)": [psutil.Process(redis_pid)],
        }

    @staticmethod
    def _cpu(groups: dict[str, list[Any]]) -> dict[str, float]:
        import psutil

        totals = {}
        for name, processes in groups.items():
            total = 0.0
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += times.user + times.system
            totals[name] = total
        return totals

    def _control(self, command: str) -> None:
        replies = getattr(self.producer.control, command)(
            self.worker.queue, destination=[self.worker.hostname], reply=True, timeout=10, limit=1
        )
        if not replies:
            raise RuntimeError(f"the worker did not answer {command}")

    def rate(self, name: str, calls: list[list[Any]]) -> float:
        """Tasks per second for ``calls`` of task ``name``, queued first, then released."""
        self._control("cancel_consumer")
        ids = [self.producer.send_task(name, args=args).id for args in calls]
        self.task_ids += ids
        keys = [f"celery-task-meta-{task_id}" for task_id in ids]
        groups = self._groups()
        cpu_before = self._cpu(groups)
        released = time.time()
        self._control("add_consumer")

        def finished() -> bool:
            self.worker.check_alive()
            return bool(self.redis.exists(*keys) == len(keys))

        wait_for(finished, timeout=600, what=f"{len(ids)} {name} tasks", interval=0.05)
        spent = self._cpu(groups)
        totals = self.cpu.setdefault(name, dict.fromkeys(spent, 0.0))
        for group, seconds in spent.items():
            totals[group] += seconds - cpu_before[group]
        self.counts[name] = self.counts.get(name, 0) + len(ids)
        metas = [json.loads(raw) for raw in self.redis.mget(keys)]
        failed = [m for m in metas if m["status"] != "SUCCESS"]
        if failed:
            raise RuntimeError(f"{len(failed)} {name} tasks failed: {failed[0]}")
        done = max(iso_to_epoch(m["date_done"]) for m in metas)
        return len(ids) / (done - released)


def throughput(run: Services, *, quick: bool) -> list[Figure]:
    namespace = run.namespace("writes")
    backend = run.configure_store(namespace)
    with psycopg.connect(run.database_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {COMMIT_ROW_TABLE}"
            " (serial bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
    worker = Worker(run, namespace, concurrency=CONCURRENCY).start()
    reps, noops, sets, manys = (2, 500, 300, 5) if quick else (7, 3000, 1500, 20)
    noop_rates: list[float] = []
    commit_rates: list[float] = []
    set_rates: list[float] = []
    many_rates: list[float] = []
    batches = None
    try:
        worker.wait_synced(backend)
        batches = Batches(run, worker)
        serial = 0

        def set_calls(count: int) -> list[list[Any]]:
            nonlocal serial
            serial += count
            return [[f"bench.throughput.{i % 100}", serial + i] for i in range(count)]

        def many_calls(count: int) -> list[list[Any]]:
            nonlocal serial
            serial += count * MANY_KEYS
            return [
                [
                    "project:9001",
                    {f"bulk.{j:04d}": serial + i * MANY_KEYS + j for j in range(MANY_KEYS)},
                    [],
                ]
                for i in range(count)
            ]

        # Warm-up: children import, connect and fill their pools.
        batches.rate("bench.noop", [[] for _ in range(100)])
        batches.rate("bench.commit_row", [[i] for i in range(100)])
        batches.rate("options.set_option", set_calls(100))
        batches.rate("options.set_many", many_calls(2))
        batches.cpu.clear()
        batches.counts.clear()
        for _ in range(reps):
            noop_rates.append(batches.rate("bench.noop", [[] for _ in range(noops)]))
            commit_rates.append(batches.rate("bench.commit_row", [[i] for i in range(sets)]))
            set_rates.append(batches.rate("options.set_option", set_calls(sets)))
            many_rates.append(batches.rate("options.set_many", many_calls(manys)) * MANY_KEYS)
    finally:
        worker.stop()
        if batches is not None:
            forget_results(run, batches.task_ids)
            batches.producer.close()
    common = (
        f"one `celery worker --concurrency {CONCURRENCY}` (prefork, default task-mode cache, Redis "
        "result backend), each batch queued while the worker's consumer was cancelled, then "
        "released with add_consumer; rate = tasks / (release to the last date_done)"
    )
    assert batches is not None
    cpu = {
        name: {group: seconds / batches.counts[name] * 1e6 for group, seconds in groups.items()}
        for name, groups in batches.cpu.items()
    }
    return [
        Figure(
            name="write_throughput",
            title="write throughput, `set_option` tasks per second, one worker",
            baseline_title="no-op task per second, same worker and broker",
            value=Series("tasks/s", set_rates, higher_is_better=True),
            baseline=Series("tasks/s", noop_rates, higher_is_better=True),
            goal=">= 0.6x",
            method=(
                f"{common}; {reps} batches of {sets} `set_option` (global scope, 100 keys, every "
                f"write a change) and {reps} of {noops} no-op tasks, interleaved; extra: CPU "
                "microseconds per task by process group (psutil), over the timed batches"
            ),
            extra={"cpu_us_per_task": cpu},
        ),
        Figure(
            name="write_throughput_floor",
            title="write throughput, `set_option` tasks per second, one worker",
            baseline_title="a task that only commits one row to PostgreSQL, per second",
            value=Series("tasks/s", set_rates, higher_is_better=True),
            baseline=Series("tasks/s", commit_rates, higher_is_better=True),
            # At most 1.3x the time per task of the least a durable write does, as visibility's
            # goal against its floor.
            goal=">= 0.77x",
            method=(
                f"{common}; the `set_option` batches above against {reps} batches of {sets} "
                "`bench.commit_row` tasks (one INSERT in its own transaction on a connection of "
                "the child's, synchronous_commit as the server has it: the WAL flush a durable "
                "write waits for), interleaved with the others"
            ),
        ),
        Figure(
            name="set_many",
            title=f"`set_many` of {MANY_KEYS:,} keys, options per second",
            baseline_title="`set_option` per second",
            value=Series("options/s", many_rates, higher_is_better=True),
            baseline=Series("options/s", set_rates, higher_is_better=True),
            goal=">= 20x",
            method=(
                f"{common}; {reps} batches of {manys} `set_many` tasks of {MANY_KEYS:,} changed "
                "keys each in one project scope; baseline: the `set_option` batches above"
            ),
        ),
    ]
