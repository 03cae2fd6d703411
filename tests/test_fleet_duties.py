"""Fleet-wide duties done once, by the lease holder: one heartbeat a second for the whole
namespace, a takeover within the heartbeat deadline when the holder dies, each outbox row
announced once, a failing row backed off; and the broker registry left tidy on a clean stop.
Real `celery worker` processes (solo pool) on the machine's PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import kombu
import pytest
import redis

from store.broadcast.exchange import reload_queue
from store.model.scopes import project_scope
from store.model.writes import set_write
from store.postgres.store import PostgresStore
from tests.conftest import Services, Worker, fresh_id, wait_for
from tests.processes import start_group, worker_command
from tests.refuse_announce import REFUSE_PREFIX
from tests.test_broadcast import isolated, reports


class FleetWorker(Worker):
    """A solo worker started without a probe task (another worker of the fleet, on the same
    queue, could answer it): readiness is its subscription report."""

    def start(self) -> FleetWorker:
        command = worker_command(
            pool=self.pool,
            concurrency=self.concurrency,
            queue=self.queue,
            hostname=f"{self.services.namespace}-{id(self)}@%h",
            include=self.include,
            loglevel="INFO",
        )
        self.process = start_group(command, env=self.env, log_path=self.log_path)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


@contextlib.contextmanager
def fleet(
    services: Services, size: int, include: str = "tests.probe_tasks"
) -> Iterator[list[FleetWorker]]:
    """``size`` solo workers in one namespace, each subscribed; all stopped on the way out."""
    workers = [
        FleetWorker(services, pool="solo", concurrency=1, include=include) for _ in range(size)
    ]
    try:
        for worker in workers:
            worker.start()
        pids = {w.pid for w in workers}
        # Eight workers importing Celery at once on two cores take a while.
        wait_for(
            lambda: all(pid in (found := reports(services)) and found[pid].synced for pid in pids),
            timeout=120,
            message=f"{size} workers to subscribe",
        )
        yield workers
    finally:
        for worker in workers:
            worker.stop()


class Listener(threading.Thread):
    """A process of our own bound to the reload exchange, noting what arrives and when."""

    def __init__(self, broker_url: str, namespace: str) -> None:
        super().__init__(daemon=True)
        self.broker_url = broker_url
        self.namespace = namespace
        self.heartbeats: list[tuple[float, str]] = []
        self.changes: Counter[tuple[str, int]] = Counter()
        self.stopping = threading.Event()

    def run(self) -> None:
        queue = reload_queue(self.namespace, f"listener-{os.getpid()}-{id(self)}")
        with (
            kombu.Connection(self.broker_url) as conn,
            conn.Consumer([queue], callbacks=[self._on_message], accept=["json"], no_ack=True),
        ):
            while not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)

    def _on_message(self, body: Any, message: Any) -> None:
        if body.get("kind") == "heartbeat" and str(body.get("origin", "")).startswith("heartbeat:"):
            self.heartbeats.append((time.monotonic(), body["origin"]))
        elif body.get("kind") == "change":
            self.changes[(body["scope"], body["revision"])] += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)

    def heartbeats_since(self, index: int) -> list[tuple[float, str]]:
        return list(self.heartbeats[index:])


@pytest.fixture
def machine(services: Services) -> Iterator[Services]:
    """A database and namespace of this test's own on the machine's services."""
    if services.name != "machine":
        pytest.skip("fleet tests run on the machine target (two cores: not twice)")
    with isolated(services) as own:
        yield own


@contextlib.contextmanager
def listening(services: Services) -> Iterator[Listener]:
    listener = Listener(services.broker_url, services.namespace)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


def _leader_pid(services: Services) -> int | None:
    holder = redis.Redis.from_url(services.redis_url).get(f"{services.namespace}:leader")
    return None if holder is None else int(holder.decode().split(":")[1])


def test_one_heartbeat_a_second_and_a_takeover_within_the_deadline(machine: Services) -> None:
    """Four workers in one namespace send one heartbeat a second between them, all from the
    lease holder; when it is killed another takes over and no surviving process desyncs."""
    with fleet(machine, 4) as workers, listening(machine) as listener:
        wait_for(lambda: len(listener.heartbeats) >= 3, timeout=30, message="heartbeats")
        start = len(listener.heartbeats)
        wait_for(
            lambda: (h := listener.heartbeats_since(start)) and h[-1][0] - h[0][0] >= 6,
            timeout=30,
            message="six seconds of heartbeats",
        )
        window = listener.heartbeats_since(start)
        span = window[-1][0] - window[0][0]
        rate = (len(window) - 1) / span
        origins = {origin for _, origin in window}
        print(f"\n{len(workers)} workers: {rate:.2f} heartbeats/s heard, from {origins}")
        assert len(origins) == 1
        assert rate < 1.5  # one sender at one a second, not four

        leader = _leader_pid(machine)
        assert origins == {o for o in origins if o.endswith(f":{leader}")}
        doomed = next(w for w in workers if w.pid == leader)
        survivors = [w for w in workers if w is not doomed]
        offsets = {id(w): len(w.log()) for w in survivors}
        before = len(listener.heartbeats)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.process.wait(timeout=30)  # type: ignore[union-attr]

        def taken_over() -> bool:
            return any(not o.endswith(f":{leader}") for _, o in listener.heartbeats_since(before))

        wait_for(taken_over, timeout=30, message="another worker to heartbeat")
        after = listener.heartbeats_since(before)
        old = [t for t, o in after if o.endswith(f":{leader}")]
        last_old = old[-1] if old else listener.heartbeats[before - 1][0]
        first_new = next(t for t, o in after if not o.endswith(f":{leader}"))
        print(f"takeover: {first_new - last_old:.2f}s between the last heartbeat and the next")
        new_leader = _leader_pid(machine)
        assert new_leader in {w.pid for w in survivors}

        # Past the consumers' 5 s deadline counted from the kill: any desync would show now.
        mark = len(listener.heartbeats)
        wait_for(
            lambda: (h := listener.heartbeats_since(mark)) and h[-1][0] - first_new >= 6,
            timeout=30,
            message="six more seconds of heartbeats",
        )
        assert {o.rsplit(":", 1)[1] for _, o in listener.heartbeats_since(mark)} == {
            str(new_leader)
        }
        for worker in survivors:
            lost = [
                e
                for e in worker.events("broadcast.lost", since=offsets[id(worker)])
                if "nothing heard" in str(e.get("error"))
            ]
            assert not lost, lost


def _attempt_times(workers: list[FleetWorker], event: str, task_id: str) -> list[float]:
    return sorted(
        datetime.fromisoformat(e["timestamp"]).timestamp()
        for w in workers
        for e in w.events(event)
        if e.get("task_id") == task_id
    )


def test_a_backlog_is_announced_once_and_a_failing_row_backs_off(machine: Services) -> None:
    """Eight workers and 1,000 committed but unannounced writes: each is announced exactly once
    (one publish per row), and a row whose broadcast always fails is retried at growing
    intervals by one relay at a time, not every second by all of them."""
    db = PostgresStore(conninfo=machine.database_url)
    include = "tests.probe_tasks,tests.refuse_announce"
    try:
        with fleet(machine, 8, include=include) as workers, listening(machine) as listener:
            wait_for(lambda: listener.heartbeats, timeout=30, message="a first heartbeat")
            # The writers "die" after their commits: nothing is announced.
            refused, _ = db.apply(set_write(project_scope(fresh_id()), "k", f"{REFUSE_PREFIX}x"))
            backlog = [
                db.apply(set_write(project_scope(fresh_id()), "k", n))[0] for n in range(1000)
            ]
            ids = [r.task_id for r in backlog]

            def pending() -> int:
                with db.connection() as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM options_write"
                        " WHERE task_id = ANY(%s) AND announced_at IS NULL",
                        (ids,),
                    ).fetchone()
                return int(row[0]) if row else -1

            wait_for(lambda: pending() == 0, timeout=120, message="the backlog to be announced")
            wanted = {(r.scope, r.revision) for r in backlog}
            wait_for(
                lambda: wanted <= set(listener.changes),
                timeout=30,
                message="every announcement to reach the listener",
            )
            publishes = Counter({key: listener.changes[key] for key in wanted})
            relayed = Counter(
                e["task_id"]
                for w in workers
                for e in w.events("outbox.relayed")
                if e.get("task_id") in set(ids)
            )
            relays = {
                w.pid
                for w in workers
                if any(e.get("task_id") in set(ids) for e in w.events("outbox.relayed"))
            }
            print(
                f"\n1000 rows: {sum(publishes.values())} publishes, {sum(relayed.values())}"
                f" outbox.relayed events, by {len(relays)} of 8 workers"
            )
            assert set(publishes.values()) == {1}
            assert set(relayed.values()) == {1} and len(relayed) == 1000

            def attempts() -> int:
                with db.connection() as conn:
                    row = conn.execute(
                        "SELECT attempts FROM options_write WHERE task_id = %s",
                        (refused.task_id,),
                    ).fetchone()
                return int(row[0]) if row else 0

            wait_for(
                lambda: attempts() >= 3, timeout=60, message="three attempts at the refused row"
            )
            times = _attempt_times(workers, "outbox.retry_later", refused.task_id)
            made = attempts()
            gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
            print(
                f"refused row: {made} attempts across the fleet,"
                f" {[round(g, 1) for g in gaps]} s apart"
            )
            # Each attempt is one claim by one relay (a logged attempt may still be on its way).
            assert made - 1 <= len(times) <= made
            # 5 s, then 10 s, ...: never sooner than the backoff the claim set.
            for number, gap in enumerate(gaps[:2]):
                assert gap >= 5 * 2**number - 0.5, gaps
    finally:
        db.close()


def _registry_entries(services: Services, queue: str) -> list[str]:
    client = redis.Redis.from_url(services.redis_url)
    return [
        token.decode()
        for token, entry in client.hgetall("unacked.taken").items()
        if entry.decode().split(":", 1)[-1] == queue
    ]


def test_a_clean_stop_leaves_no_registry_entry(machine: Services) -> None:
    """A worker registered in the broker's registry of taken lists removes its entry when it
    stops cleanly (SIGTERM, a warm shutdown)."""
    with fleet(machine, 1) as (worker,):
        entries = wait_for(
            lambda: _registry_entries(machine, worker.queue), timeout=30, message="a registry entry"
        )
        assert len(entries) == 1
        worker.stop()
        assert worker.process is not None and worker.process.returncode is not None
        assert _registry_entries(machine, worker.queue) == []
