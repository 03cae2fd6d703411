"""The services a run uses and the processes it starts (workers, producers), and their logs."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

from tests.processes import (
    ROOT,
    log_events,
    poll_until,
    start_group,
    stop_group,
    worker_command,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
# Every process of a run signs and checks with one key, as a production fleet does: the figures
# include the signatures' cost.
SIGNING_KEY = f"bench-{uuid.uuid4().hex}"


# -- services -------------------------------------------------------------------------------


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@dataclass
class Services:
    """PostgreSQL, Redis and the broker of one run, with the names that isolate it."""

    database_url: str
    redis_url: str
    broker_url: str
    broker: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    description: str = ""

    def namespace(self, label: str) -> str:
        return f"bench{self.run_id}.{label}"

    def env(self, namespace: str, **extra: str) -> dict[str, str]:
        """A worker's environment: only this run's services and names, nothing inherited."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIONS_", "CELERY_"))}
        env.update(
            OPTIONS_DATABASE_URL=self.database_url,
            OPTIONS_REDIS_URL=self.redis_url,
            CELERY_BROKER_URL=self.broker_url,
            CELERY_RESULT_BACKEND=self.redis_url,
            OPTIONS_NAMESPACE=namespace,
            OPTIONS_TASK_QUEUE=f"{namespace}.tasks",
            OPTIONS_LOG_FORMAT="json",
            OPTIONS_SIGNING_KEY=SIGNING_KEY,
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        # The relay's escape hatch, for figures of one subscription per child.
        if os.environ.get("OPTIONS_HOST_RELAY"):
            env["OPTIONS_HOST_RELAY"] = os.environ["OPTIONS_HOST_RELAY"]
        env.update(extra)
        return env

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def configure_store(self, namespace: str, **options: Any) -> Any:
        """The store of this process, publishing (with ``broker_url``) as a worker would."""
        import store
        from store.settings import broker_transport_for

        if options.get("broker_url"):
            options.setdefault("broker_transport", broker_transport_for(options["broker_url"]))
        options.setdefault("signing_key", SIGNING_KEY)
        return store.configure(
            database_url=self.database_url,
            redis_url=self.redis_url,
            namespace=namespace,
            **options,
        )


@contextlib.contextmanager
def services(*, embedded: bool, broker: str) -> Iterator[Services]:
    """A fresh database (dropped at the end) and a unique namespace, or the embedded servers."""
    from store.postgres.schema import migrate

    # This process's producers sign with the run's key too (resolved on their first send).
    os.environ["OPTIONS_SIGNING_KEY"] = SIGNING_KEY
    amqp_url = os.environ.get("OPTIONS_BENCH_AMQP_URL") or DEFAULT_AMQP_URL
    if embedded:
        from store.embedded import ensure_embedded, stop_embedded

        state_dir = Path(tempfile.mkdtemp(prefix="optionstore-bench-"))
        found = ensure_embedded(state_dir)
        migrate(found.database_url)
        broker_url = found.redis_url if broker == "redis" else amqp_url
        run = Services(
            found.database_url, found.redis_url, broker_url, broker, description="embedded"
        )
        try:
            yield run
        finally:
            _cleanup_broker(run)
            stop_embedded(state_dir)
            shutil.rmtree(state_dir, ignore_errors=True)
        return
    admin_url = os.environ.get("OPTIONS_BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("OPTIONS_BENCH_REDIS_URL") or DEFAULT_REDIS_URL
    name = f"optionstore_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    run = Services(
        _with_database(admin_url, name),
        redis_url,
        redis_url if broker == "redis" else amqp_url,
        broker,
        description="machine",
    )
    try:
        migrate(run.database_url)
        yield run
    finally:
        import store

        with contextlib.suppress(Exception):
            store.backend.db.close()
        _cleanup_broker(run)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _cleanup_broker(run: Services) -> None:
    client = run.redis()
    prefix = f"bench{run.run_id}"
    for pattern in (f"{prefix}*", f"_kombu.binding.{prefix}*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    if run.broker == "amqp":
        import kombu

        # Exchanges and task queues outlive their consumers on RabbitMQ; remove this run's.
        with kombu.Connection(run.broker_url) as conn:
            channel = conn.channel()
            for label in ("fleet4", "fleet32", "writes", "size"):
                ns = run.namespace(label)
                for exchange in (f"{ns}.reload", f"{ns}.rawfanout", f"{ns}.tasks"):
                    with contextlib.suppress(Exception):
                        channel.exchange_delete(exchange)
                        channel = conn.channel()
                with contextlib.suppress(Exception):
                    channel.queue_delete(f"{ns}.tasks")
                    channel = conn.channel()


@contextlib.contextmanager
def celery_services(broker_url: str, result_backend: str) -> Iterator[None]:
    """Point this process's Celery at ``broker_url`` and ``result_backend`` while the block
    runs: Celery prefers CELERY_BROKER_URL and CELERY_RESULT_BACKEND to a producer's own
    ``broker=`` argument."""
    names = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(CELERY_BROKER_URL=broker_url, CELERY_RESULT_BACKEND=result_backend)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def producer(run: Services, queue: str) -> Any:
    """A Celery app that sends tasks by name to ``queue`` and reads results from Redis."""
    from celery import Celery

    app = Celery("bench-producer", broker=run.broker_url, backend=run.redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=queue,
    )
    return app


def forget_results(run: Services, task_ids: list[str]) -> None:
    """Delete the result-backend entries of this run's tasks (they would expire in an hour)."""
    client = run.redis()
    for start in range(0, len(task_ids), 1000):
        chunk = task_ids[start : start + 1000]
        client.delete(*(f"celery-task-meta-{task_id}" for task_id in chunk))


# -- worker processes -----------------------------------------------------------------------


class Worker:
    """A real ``celery -A worker worker`` process group, with its JSON log in a file."""

    def __init__(
        self,
        run: Services,
        namespace: str,
        *,
        concurrency: int,
        local_cache: str = "task",
        pool: str = "prefork",
        app: str = "worker",
        include: str = "bench.noop_tasks",
        log_level: str = "info",
    ) -> None:
        self.run = run
        self.namespace = namespace
        # "debug" where the figure reads each process's broadcast.applied events.
        self.env = run.env(namespace, OPTIONS_LOCAL_CACHE=local_cache, OPTIONS_LOG_LEVEL=log_level)
        self.queue = self.env["OPTIONS_TASK_QUEUE"]
        self.concurrency = concurrency
        self.pool = pool
        self.app = app
        self.include = include
        self.hostname = f"{namespace}@{socket.gethostname()}"
        self.log_path = Path(tempfile.mkstemp(prefix=f"{namespace}-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None
        self.log = LogTail(self.log_path)

    def start(self) -> Worker:
        command = worker_command(
            pool=self.pool,
            concurrency=self.concurrency,
            queue=self.queue,
            hostname=self.hostname,
            include=self.include,
            loglevel="WARNING",
            app=self.app,
        )
        self.process = start_group(command, env=self.env, log_path=self.log_path)
        return self

    def wait_synced(self, run_store: Any, *, timeout: float = 180.0) -> list[int]:
        """Wait until every child reports its reload consumer subscribed; returns their pids."""
        import psutil

        from store.redis.presence import Presence

        presence = Presence(run_store.redis.client, namespace=self.namespace)
        expected = self.concurrency if self.pool == "prefork" else 1
        assert self.process is not None
        main = psutil.Process(self.process.pid)

        def synced() -> list[int] | None:
            self.check_alive()
            ours = {child.pid for child in main.children(recursive=True)}
            pids = [r.pid for r in presence.processes() if r.synced and r.pid in ours]
            return pids if len(pids) >= expected else None

        return wait_for(synced, timeout=timeout, what=f"{expected} synced processes")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker exited with {self.process.returncode}:\n{tail}")

    def events(self) -> list[dict[str, Any]]:
        """The JSON log events written since the last call (Celery's own lines are skipped)."""
        return self.log.read()

    def stop(self) -> None:
        stop_group(self.process, timeout=30)
        self.log_path.unlink(missing_ok=True)


class LogTail:
    """Reads the JSON lines appended to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        found: list[dict[str, Any]] = []
        for line in lines:
            if line.startswith(b"{"):
                found += log_events(line.decode(errors="replace"))
        return found


def wait_for(
    condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05
) -> Any:
    return poll_until(condition, timeout=timeout, interval=interval, what=what)


def iso_to_epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def prepare_process(run: Services) -> None:
    """Point this process's ``worker.app`` (the producer of ``set_option.delay()``) at the run's
    services and the 4-process fleet, then keep only warnings from the store's logging."""
    import logging

    os.environ.update(run.env(run.namespace("fleet4")))
    import worker  # noqa: F401 (the helpers send through its app, configured from the environment above)
    from worker.logging import configure_logging

    configure_logging(log_format="console", level=logging.WARNING)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": sys.version.split()[0],
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
        "code": _code_version(),
    }


def _code_version() -> str:
    """The commit measured, and whether the measured packages differed from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "store", "worker", "tasks", "celeryconfig.py"],
            check=False,
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' with uncommitted changes' if dirty else ''}"
