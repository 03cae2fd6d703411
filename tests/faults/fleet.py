"""Real workers for the fault suite, the producers that load them, and their logs."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from store.redis.cache import redis_client
from store.redis.presence import Presence, ProcessReport
from tests.conftest import Services, Worker, wait_for


def producer_app(broker_url: str, result_backend: str, queue: str) -> Celery:
    """A Celery app that only sends tasks by name, as a producer that imports nothing of ours
    (on amqps://, but the transport that reads the URL's TLS parameters)."""
    app = Celery("faults-producer", broker=broker_url, backend=result_backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
    )
    if broker_url.startswith("amqps"):
        # The transport that takes the URL's TLS parameters and checks the certificate's name.
        app.conf.broker_transport = "store.transport.amqps:Transport"
    if broker_url.startswith("amqp"):
        # Publisher confirms: a send returns once the broker has the task, not before.
        app.conf.broker_transport_options = {"confirm_publish": True}
    return app


class FaultWorker(Worker):
    """A test Worker whose results go to a backend no fault touches, and that can be killed."""

    def __init__(self, services: Services, *, result_backend: str, **options: Any) -> None:
        super().__init__(services, **options)
        self.result_backend = result_backend
        self.env["CELERY_RESULT_BACKEND"] = result_backend
        self.producer = producer_app(self.broker_url, result_backend, self.queue)

    def kill(self) -> None:
        """kill -9 of the whole worker: its main process and every child."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def exited(self) -> bool:
        """Whether the worker's main process has exited (it was started and is gone)."""
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # the broker may be the thing that is down
            super().stop()
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def pids(self) -> set[int]:
        """The processes that run tasks and hold caches."""
        assert self.process is not None
        return self.child_pids() if self.pool == "prefork" else {self.process.pid}


@dataclass
class Fleet:
    """Workers sharing one database, one cache and one namespace, and where their results go."""

    services: Services
    result_backend: str
    workers: list[FaultWorker] = field(default_factory=list)
    # Reads that raised inside a worker process while the suite waited for convergence.
    failed_reads: list[str] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def start(self, **options: Any) -> FaultWorker:
        worker = FaultWorker(self.services, result_backend=self.result_backend, **options)
        self.stack.callback(worker.stop)
        worker.start()
        self.workers.append(worker)
        wait_synced(self, worker.pids())
        return worker

    def pids(self) -> set[int]:
        return set().union(*(w.pids() for w in self.workers if w.process is not None))

    def presence(self) -> Presence:
        return Presence(redis_client(self.services.redis_url), namespace=self.namespace)

    @property
    def namespace(self) -> str:
        return self.services.namespace


@contextlib.contextmanager
def fleet(database_url: str, cache_url: str, result_backend: str) -> Iterator[Fleet]:
    """A fleet on a fresh namespace; every worker it started is stopped on the way out."""
    own = Fleet(Services("faults", database_url, cache_url), result_backend)
    with own.stack:
        yield own


def wait_synced(own: Fleet, pids: set[int], *, timeout: float = 60.0) -> None:
    """Wait until each of ``pids`` reports a live subscription to the reload exchange."""

    def synced() -> bool:
        found = reports(own)
        return all(pid in found and found[pid].synced for pid in pids)

    wait_for(synced, timeout=timeout, interval=0.05, message=f"{sorted(pids)} to subscribe")


def reports(own: Fleet) -> dict[int, ProcessReport]:
    """The fleet's process reports by pid (none while the cache Redis is down)."""
    try:
        return {report.pid: report for report in own.presence().processes()}
    except redis.RedisError:  # the cache may be the thing that is down
        return {}


def project_writes(
    prefix: str, projects: Sequence[int], *, count: int, keys: int
) -> list[tuple[str, str, list[Any]]]:
    """``count`` writes of ``set_project_option`` spread over ``projects`` and ``keys`` keys,
    each with a task id (``<prefix>-<n>-<tag>``) and a value unique to this run."""
    tag = uuid.uuid4().hex[:8]
    return [
        (
            f"{prefix}-{i:04d}-{tag}",
            "options.set_project_option",
            [projects[i % len(projects)], f"k{i % keys}", f"w{i}-{tag}"],
        )
        for i in range(count)
    ]


class Stream(threading.Thread):
    """A producer: sends writes by name, in order, optionally paced; a send the broker refuses
    is sent again with the same task id until it is taken (producer-side at least once)."""

    def __init__(
        self,
        app: Celery,
        writes: Sequence[tuple[str, str, list[Any]]],
        *,
        per_second: float | None = None,
        give_up_after: float = 180.0,
        gate: threading.Barrier | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.app = app
        self.writes = writes
        self.per_second = per_second
        self.give_up_after = give_up_after
        self.gate = gate
        self.sent: list[str] = []
        self.refused = 0
        self.failure: BaseException | None = None
        # Held around each send: held() waits for the send under way to be answered.
        self._sending = threading.Lock()

    def run(self) -> None:
        try:
            if self.gate is not None:
                self.gate.wait(timeout=60)  # every producer starts at once
            started = time.monotonic()
            for number, (task_id, name, args) in enumerate(self.writes):
                if self.per_second:
                    pause = started + number / self.per_second - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)  # pacing the load, not waiting for an outcome
                with self._sending:
                    self._send(task_id, name, args)
                self.sent.append(task_id)
        except BaseException as exc:  # surfaced by finish()
            self.failure = exc

    def _send(self, task_id: str, name: str, args: list[Any]) -> None:
        deadline = time.monotonic() + self.give_up_after
        while True:
            try:
                self.app.send_task(
                    name,
                    args=args,
                    task_id=task_id,
                    retry=True,
                    retry_policy={"max_retries": 1, "interval_start": 0.1},
                )
                return
            except Exception:
                self.refused += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No send under way, and none starting, for the length of the block."""
        with self._sending:
            yield

    def finish(self, timeout: float = 240.0) -> list[str]:
        self.join(timeout)
        assert not self.is_alive(), "the producer is still sending"
        if self.failure is not None:
            raise AssertionError(f"the producer gave up: {self.failure!r}") from self.failure
        return self.sent
