"""Fleet figures on real prefork workers: propagation of a commit, visibility of a write task.

Workers run with ``OPTIONS_LOCAL_CACHE=process`` and every child holds the scope in its local
cache, so a child serves the new value only once it has applied the broadcast: the moment each
child applied it is read from that child's own ``broadcast.applied`` log event.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench import rawfanout
from bench.env import (
    Services,
    Worker,
    forget_results,
    iso_to_epoch,
    producer,
    wait_for,
)
from bench.figures import Figure, Series
from bench.reads import KEY, PROJECT_ID, option_values, seed_scope
from store.broadcast.consumer import REPORT_SPREAD, ReloadConsumer

REP_TIMEOUT = 20.0

# A process reports what it applied report_interval after it applied it, stretched by its own
# share of REPORT_SPREAD: rounds wait past that, so that a sample is not timed while the fleet
# is still writing the previous round's reports (what a fleet does after one change, not
# while the next one arrives 30 ms later).
_REPORTED_WITHIN = (
    ReloadConsumer.__init__.__kwdefaults__["report_interval"] * (1 + REPORT_SPREAD)  # type: ignore[index]
)


def settle() -> None:
    """Wait between two rounds: past the processes' reports, then 0-20 ms more at random."""
    time.sleep(_REPORTED_WITHIN + 0.01 + random.random() * 0.02)


@dataclass
class Fleet:
    """A running worker, the store configured to publish to it, and what its children logged."""

    worker: Worker
    backend: Any
    producer: Any
    pids: list[int]
    applied: dict[tuple[str, int], list[dict[str, Any]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    writes: dict[str, int] = field(default_factory=dict)  # task id -> revision
    task_ids: list[str] = field(default_factory=list)

    def collect(self) -> None:
        for event in self.worker.events():
            name = event.get("event")
            if name == "broadcast.applied":
                self.applied[(event["scope"], event["revision"])].append(event)
            elif name == "option.write" and event.get("task_id"):
                self.writes[event["task_id"]] = event["revision"]

    def all_applied(self, scope: str, revision: int) -> list[dict[str, Any]]:
        """Wait until every child logged applying ``scope@revision``; returns their events."""

        def done() -> list[dict[str, Any]] | None:
            self.collect()
            events = self.applied.get((scope, revision), [])
            return events if len(events) >= len(self.pids) else None

        return wait_for(done, timeout=REP_TIMEOUT, what=f"{scope}@{revision}", interval=0.005)

    def warm(self, project_id: int | None, key: str) -> None:
        """Run reads until every child has answered one: each then caches the scope."""
        seen: set[int] = set()
        deadline = time.monotonic() + 120
        while not set(self.pids) <= seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"children {set(self.pids) - seen} never ran a warm-up read")
            pending = [
                self.producer.send_task("bench.warm", args=[project_id, key, 0.3])
                for _ in range(len(self.pids) * 2)
            ]
            for result in pending:
                seen.add(result.get(timeout=60)["pid"])
                self.task_ids.append(result.id)


@contextlib.contextmanager
def fleet(
    run: Services,
    label: str,
    concurrency: int,
    *,
    app: str = "worker",
    local_cache: str = "process",
) -> Iterator[Fleet]:
    """A worker of ``app`` (``bench.userapp``: a user's own app, installed) with its children
    subscribed and holding the benchmark's scope."""
    namespace = run.namespace(label)
    backend = run.configure_store(namespace, broker_url=run.broker_url)
    seed_scope(backend, PROJECT_ID, option_values(10))
    worker = Worker(
        run,
        namespace,
        concurrency=concurrency,
        local_cache=local_cache,
        app=app,
        include="" if app != "worker" else "bench.noop_tasks",
        log_level="debug",
    ).start()
    running = None
    try:
        pids = worker.wait_synced(backend)
        running = Fleet(worker, backend, producer(run, worker.queue), pids)
        running.warm(PROJECT_ID, KEY)
        yield running
    finally:
        worker.stop()
        if running is not None:
            forget_results(run, running.task_ids)
            running.producer.close()


def _processes(pids: list[int]) -> list[Any]:
    import psutil

    return [psutil.Process(pid) for pid in pids]


def _cpu_seconds(processes: list[Any]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def _idle_cpu(groups: dict[str, list[Any]], seconds: float = 2.0) -> dict[str, float]:
    """CPU seconds per second each group uses with no messages (heartbeats, polling, reports)."""
    before = {name: _cpu_seconds(group) for name, group in groups.items()}
    time.sleep(seconds)
    return {name: (_cpu_seconds(group) - before[name]) / seconds for name, group in groups.items()}


class _WriterTimes:
    """When the writer's COMMIT returned (from then on the change exists for other processes;
    the time before it, from the commit's timestamp taken inside the transaction, is mostly
    the WAL flush, which a raw fanout does not do) and when it handed the announcement to the
    broker (its publish, or the cache script that publishes it on a shared Redis): hooks on
    ``backend``'s write path."""

    def __init__(self, backend: Any) -> None:
        self.committed = self.published = 0.0
        apply, announce = backend.db.apply, backend.publisher.announce
        cache_apply = backend.redis.apply

        def timed_apply(*args: Any, **kwargs: Any) -> Any:
            done = apply(*args, **kwargs)
            self.committed = time.time()
            return done

        def timed_announce(result: Any) -> None:
            self.published = time.time()
            announce(result)

        def timed_cache_apply(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("announce"):
                self.published = time.time()
            return cache_apply(*args, **kwargs)

        backend.db.apply = timed_apply
        backend.publisher.announce = timed_announce
        backend.redis.apply = timed_cache_apply


def _propagation_at(
    run: Services,
    count: int,
    reps: int,
    *,
    host: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    name: str = "",
    title: str = "",
    who: str = "",
    goal: str = "<= 1.5x",
) -> list[Figure]:
    from store.model.scopes import project_scope
    from store.model.writes import set_write

    scope = project_scope(PROJECT_ID)
    ours: list[float] = []
    flush: list[float] = []
    after_publish: list[float] = []
    raw: list[float] = []
    outcomes: dict[str, int] = defaultdict(int)
    opened = host() if host is not None else fleet(run, f"fleet{count}", count)
    with opened as running:
        backend = running.backend
        times = _WriterTimes(backend)
        baseline = rawfanout.RawFanout(run, running.worker.namespace, count)
        try:
            baseline.wait_subscribed()
            groups = {"ours": _processes(running.pids), "raw": _processes(baseline.pids)}
            idle = _idle_cpu(groups)
            cpu: dict[str, list[float]] = {"ours": [], "raw": []}
            for i in range(-3, reps):  # three warm-up rounds, not recorded
                for ours_first in (True, False) if i % 2 == 0 else (False, True):
                    group = "ours" if ours_first else "raw"
                    cpu_before, started = _cpu_seconds(groups[group]), time.monotonic()
                    if ours_first:
                        value = f"[Prod {uuid.uuid4().hex[:8]}]"
                        result = backend.commit(
                            set_write(scope, KEY, value), task_id=f"bench-{uuid.uuid4()}"
                        )
                        events = running.all_applied(result.scope, result.revision)
                        applied = result.committed_at + max(e["lag_ms"] for e in events) / 1000
                        if i >= 0:
                            ours.append((applied - times.committed) * 1000)
                            flush.append((times.committed - result.committed_at) * 1000)
                            after_publish.append((applied - times.published) * 1000)
                            for e in events:
                                outcomes[e["outcome"]] += 1
                    else:
                        sent = baseline.publish(i + 10, rawfanout.body(scope.name, i, KEY))
                        received = baseline.all_received(i + 10)
                        if i >= 0:
                            raw.append((max(received) - sent) * 1000)
                    settle()
                    if i >= 0:
                        # CPU the group spent on this round, less what it burns when idle.
                        spent = _cpu_seconds(groups[group]) - cpu_before
                        spent -= idle[group] * (time.monotonic() - started)
                        cpu[group].append(spent)
        finally:
            baseline.stop()
    who = who or (
        f"{count} prefork children (one `celery worker --concurrency {count}`, "
        "OPTIONS_LOCAL_CACHE=process, every child holding the scope)"
    )
    method = (
        f"{who}; this process commits a "
        "one-key change with `store.backend.commit` (which publishes); each child's own "
        "`broadcast.applied` log event gives its apply time (lag_ms after the commit's "
        "clock_timestamp() in PostgreSQL); the sample is the last child's apply time minus the "
        "time the writer's COMMIT returned (extra.commit_flush: from the timestamp, taken "
        "inside the transaction, to that return; mostly the WAL flush). Baseline: "
        f"{count} processes each consuming an exclusive queue on a raw kombu fanout exchange "
        "(same broker), time from publish to the last process's callback. "
        f"{reps} rounds, alternating which goes first, 50-70 ms apart (past the reports of "
        "the round before). extra.cpu_us_...: CPU "
        "time (psutil) each process spent per round, less its idle rate"
    )
    extra = {
        "publish_to_all_applied_ms_median": statistics.median(after_publish),
        "commit_to_publish_ms_median": statistics.median(
            o - a for o, a in zip(ours, after_publish, strict=True)
        ),
        "commit_flush_ms_median": statistics.median(flush),
        "from_commit_timestamp_ratio_median": statistics.median(
            o + f for o, f in zip(ours, flush, strict=True)
        )
        / statistics.median(raw),
        "outcomes": dict(outcomes),
        # Kernel CPU accounting ticks at 10 ms: only the mean over every round means anything.
        "cpu_us_per_process_per_message_mean": {
            group: sum(values) / len(values) / count * 1e6 for group, values in cpu.items()
        },
        "idle_cpu_ms_per_s_all_processes": {group: rate * 1000 for group, rate in idle.items()},
    }
    return [
        Figure(
            name=name or f"propagation_{count}",
            title=title or f"propagation: commit to every process applied, {count} processes",
            baseline_title=f"raw kombu fanout to {count} processes",
            value=Series("ms", ours),
            baseline=Series("ms", raw),
            goal=goal,
            tail_in_goal=True,
            method=method,
            extra=extra,
        )
    ]


def propagation(run: Services, *, quick: bool) -> list[Figure]:
    # The project's own worker: within 1.3x of raw fanout, median and p99 (300 rounds: the
    # p99 is then the third worst, not the second).
    return _propagation_at(run, 4, 40 if quick else 300, goal="<= 1.3x") + _propagation_at(
        run, 32, 20 if quick else 300, goal="<= 1.3x"
    )


@dataclass
class _VisibilityParts:
    """One measure of each part of a visibility round, in milliseconds."""

    running: Fleet
    baseline: rawfanout.RawFanout
    key: str
    # task id -> (delay() returned, all applied)
    timeline: dict[str, tuple[float, float]] = field(default_factory=dict)

    def write(self) -> float:
        import tasks

        sent = tasks.set_option.delay(self.key, f"value-{uuid.uuid4().hex}")
        returned = time.time()
        self.running.task_ids.append(sent.id)

        def revision() -> int | None:
            self.running.collect()
            return self.running.writes.get(sent.id)

        rev = wait_for(revision, timeout=REP_TIMEOUT, what="the write", interval=0.005)
        events = self.running.all_applied("global", rev)
        seen = max(iso_to_epoch(e["timestamp"]) for e in events)
        self.timeline[sent.id] = (returned, seen)
        return (seen - returned) * 1000

    def noop(self) -> float:
        from bench import noop_tasks

        sent = noop_tasks.noop.delay()
        returned = time.time()
        started = sent.get(timeout=REP_TIMEOUT)
        self.running.task_ids.append(sent.id)
        return float((started - returned) * 1000)

    def apply(self) -> float:
        from store.model.scopes import project_scope
        from store.model.writes import set_write

        db = self.running.backend.db
        write = set_write(project_scope(PROJECT_ID + 1), self.key, f"floor-{uuid.uuid4().hex}")
        task_id = f"bench-floor-{uuid.uuid4()}"
        t0 = time.perf_counter()
        db.apply(write, task_id=task_id)
        spent = (time.perf_counter() - t0) * 1000
        db.mark_announced([task_id])  # never announced: no relay announces it mid-run
        return spent

    def fanout(self) -> float:
        seq = len(self.baseline.received) + 10
        sent_at = self.baseline.publish(seq, rawfanout.body("global", seq, self.key))
        return (max(self.baseline.all_received(seq)) - sent_at) * 1000


def visibility(run: Services, *, quick: bool) -> list[Figure]:
    import tasks

    reps = 40 if quick else 300
    key = "bench.visibility"
    samples: dict[str, list[float]] = {"write": [], "noop": [], "apply": [], "fanout": []}
    with fleet(run, "fleet4", 4) as running:
        # This process's worker.app sends to the fleet4 queue (see bench.env.prepare_process).
        assert tasks.set_option.app.conf.task_default_queue == running.worker.queue
        running.task_ids.append(tasks.set_option.delay(key, "warm-up").id)
        running.warm(None, key)
        baseline = rawfanout.RawFanout(run, running.worker.namespace, len(running.pids))
        try:
            baseline.wait_subscribed()
            parts = _VisibilityParts(running, baseline, key)
            for i in range(-3, reps):  # three warm-up rounds, not recorded
                order = list(samples)
                random.shuffle(order)
                for part in order:
                    sample = getattr(parts, part)()
                    if i >= 0:
                        samples[part].append(sample)
                    settle()
        finally:
            baseline.stop()
        timeline = {t: parts.timeline[t] for t in list(parts.timeline)[3:]}
        committed = _commit_times(running.backend, list(timeline))
    ours, noop, apply_rt, fanout = (samples[p] for p in ("write", "noop", "apply", "fanout"))
    to_commit = [(committed[t] - r) * 1000 for t, (r, _) in timeline.items()]
    from_commit = [(a - committed[t]) * 1000 for t, (_, a) in timeline.items()]
    floor = [a + b + c for a, b, c in zip(noop, apply_rt, fanout, strict=True)]
    method = (
        "one `celery worker --concurrency 4`, OPTIONS_LOCAL_CACHE=process, every child holding "
        "the global scope: a child reads the new value exactly once it has applied the "
        "broadcast (the writing child drops the scope and rereads from Redis, which the task "
        "updated before publishing). Sample: from `set_option.delay()` returning to the "
        "latest `broadcast.applied` timestamp of the 4 children for the task's revision. "
        f"{reps} rounds; in each, in random order 50-70 ms apart (past the reports of the "
        "part before): one write, one "
        "`noop.delay()` (returned to the time the no-op task started, its return value; same "
        "worker and broker), one `PostgresStore.apply` of a one-key change from this process "
        "(one options_apply round trip), and one raw kombu fanout to 4 processes (publish to "
        "the last callback). extra: the write's interval split at the commit's "
        "clock_timestamp() in PostgreSQL"
    )
    extra = {
        "returned_to_commit_ms_median": statistics.median(to_commit),
        "commit_to_all_applied_ms_median": statistics.median(from_commit),
        "floor_parts_ms_median": {
            "noop_enqueue_to_start": statistics.median(noop),
            "options_apply_round_trip": statistics.median(apply_rt),
            "raw_fanout_4": statistics.median(fanout),
        },
    }
    return [
        Figure(
            name="visibility",
            title="visibility: `set_option.delay()` returns to every process reads the new value",
            baseline_title="no-op task, enqueue to start",
            value=Series("ms", ours),
            baseline=Series("ms", noop),
            goal="<= 2x",
            tail_in_goal=True,
            method=method,
            extra=extra,
        ),
        Figure(
            name="visibility_floor",
            title="visibility (as above), against its physical floor",
            baseline_title=(
                "floor: no-op enqueue to start + one options_apply round trip + raw kombu "
                "fanout to 4 processes, summed per round"
            ),
            value=Series("ms", ours),
            baseline=Series("ms", floor),
            goal="<= 1.3x",
            tail_in_goal=True,
            method=method,
            extra=extra,
        ),
    ]


def _commit_times(backend: Any, task_ids: list[str]) -> dict[str, float]:
    with backend.db.connection() as conn:
        rows = conn.execute(
            "SELECT task_id, extract(epoch FROM committed_at) FROM options_write"
            " WHERE task_id = ANY(%s)",
            (task_ids,),
        ).fetchall()
    return {task_id: float(at) for task_id, at in rows}
