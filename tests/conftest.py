"""Fixtures: real PostgreSQL and Redis (embedded, and the machine's when named), real workers.

Every test that needs services runs once per target: ``embedded`` (the embedded default, always
available) and ``machine`` (the services named by OPTIONS_TEST_DATABASE_URL and
OPTIONS_TEST_REDIS_URL; skipped when unset, a failure under CI=true).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

if TYPE_CHECKING:
    from store.postgres.store import PostgresStore
    from store.signing.keys import Keyring

from tests.processes import (
    ROOT,
    log_events,
    poll_until,
    start_group,
    stop_group,
    worker_command,
)

__all__ = ["ROOT"]  # where tests that import ROOT from here have always found it

IN_CI = os.environ.get("CI") == "true"

# The test process is hermetic: whatever the shell exports, the code under test only sees what
# a fixture hands it, and `import worker` lands on this run's own embedded servers.
for _name in (
    "OPTIONS_DATABASE_URL",
    "OPTIONS_REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "OPTIONS_LOCAL_CACHE",
    "OPTIONS_NAMESPACE",
    "OPTIONS_TASK_QUEUE",
    "OPTIONS_REGISTRY",
    "OPTIONS_REGISTRY_STRICT",
    "OPTIONS_SIGNING_KEY_FILE",
    "OPTIONS_UNSIGNED_WRITES",
):
    os.environ.pop(_name, None)
STATE_DIR = Path(tempfile.mkdtemp(prefix="optionstore-tests-"))
os.environ["OPTIONS_STATE_DIR"] = str(STATE_DIR)
os.environ.setdefault("OPTIONS_LOG_FORMAT", "json")
# Every worker of this run and every producer in it (this process, the commands it runs) signs
# and checks with one key: the tested default is signing on. tests/test_signing*.py cover a
# worker without one, and the embedded default's own.
SIGNING_KEY = f"tests-{uuid.uuid4().hex}"
os.environ["OPTIONS_SIGNING_KEY"] = SIGNING_KEY


def run_keyring() -> Keyring:
    """The keys of this run: what a test signs a raw message with."""
    from store.signing.keys import Keyring

    return Keyring([SIGNING_KEY])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from store.embedded import stop_embedded

    stop_embedded(STATE_DIR)


def wait_for(
    condition: Callable[[], Any],
    *,
    timeout: float = 30.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test at the deadline."""
    try:
        return poll_until(condition, timeout=timeout, interval=interval, what=message)
    except TimeoutError as exc:
        pytest.fail(str(exc))


def fresh_id() -> int:
    """An id no other test uses, so tests share one database without cleaning it."""
    return random.randint(10**9, 2**62)


@dataclass
class Services:
    """One target: where PostgreSQL and Redis are, and the names that isolate this run on them."""

    name: str
    database_url: str
    redis_url: str
    namespace: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")

    @property
    def broker_url(self) -> str:
        return self.redis_url

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIONS_", "CELERY_"))}
        env.update(
            OPTIONS_DATABASE_URL=self.database_url,
            OPTIONS_REDIS_URL=self.redis_url,
            CELERY_BROKER_URL=self.broker_url,
            CELERY_RESULT_BACKEND=self.redis_url,
            OPTIONS_NAMESPACE=self.namespace,
            OPTIONS_TASK_QUEUE=f"{self.namespace}.tasks",
            OPTIONS_STATE_DIR=str(STATE_DIR),
            OPTIONS_LOG_FORMAT="json",
            OPTIONS_SIGNING_KEY=SIGNING_KEY,
            # The tests read broadcast.applied, a debug event.
            OPTIONS_LOG_LEVEL="debug",
            PYTHONPATH=str(ROOT),
        )
        env.update(extra)
        return env


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _machine_services() -> Iterator[Services]:
    database_url = os.environ.get("OPTIONS_TEST_DATABASE_URL")
    redis_url = os.environ.get("OPTIONS_TEST_REDIS_URL")
    if not (database_url and redis_url):
        if IN_CI:
            pytest.fail("CI=true but OPTIONS_TEST_DATABASE_URL / OPTIONS_TEST_REDIS_URL are unset")
        pytest.skip(
            "machine services not named (OPTIONS_TEST_DATABASE_URL, OPTIONS_TEST_REDIS_URL)"
        )
    name = f"optionstore_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    services = Services("machine", _with_database(database_url, name), redis_url)
    try:
        yield services
    finally:
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{services.namespace}*", count=1000):
            client.delete(key)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def target_services(name: str) -> Iterator[Services]:
    """The target ``name`` ("embedded" or "machine"), migrated, with a namespace of its own."""
    from store.embedded import ensure_embedded
    from store.postgres.schema import migrate

    if name == "embedded":
        found = ensure_embedded(STATE_DIR)
        target = Services("embedded", found.database_url, found.redis_url)
        migrate(target.database_url)
        yield target
        return
    for target in _machine_services():
        migrate(target.database_url)
        yield target


@pytest.fixture(scope="session", params=["embedded", "machine"])
def services(request: pytest.FixtureRequest) -> Iterator[Services]:
    yield from target_services(request.param)


@pytest.fixture
def backend(services: Services) -> Iterator[Any]:
    """The in-process store, pointed at ``services``."""
    import store

    configured = store.configure(
        database_url=services.database_url,
        redis_url=services.redis_url,
        namespace=services.namespace,
    )
    yield configured
    store.clear_local_cache()


class Worker:
    """A real `celery -A worker worker` process with prefork children, and a producer for it."""

    def __init__(
        self,
        services: Services,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        extra_env: dict[str, str] | None = None,
        broker_url: str | None = None,
        include: str = "tests.probe_tasks",
    ) -> None:
        from celery import Celery

        self.services = services
        self.broker_url = broker_url or services.broker_url
        self.env = services.env(CELERY_BROKER_URL=self.broker_url, **(extra_env or {}))
        self.queue = self.env["OPTIONS_TASK_QUEUE"]
        self.log_path = Path(tempfile.mkstemp(prefix=f"worker-{pool}-", suffix=".log")[1])
        self.pool = pool
        self.concurrency = concurrency
        self.include = include
        self.process: subprocess.Popen[bytes] | None = None
        self.producer = Celery("producer", broker=self.broker_url, backend=services.redis_url)
        self.producer.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            task_default_queue=self.queue,
        )

    def start(self) -> Worker:
        command = worker_command(
            pool=self.pool,
            concurrency=self.concurrency,
            queue=self.queue,
            hostname=f"{self.services.namespace}-{self.pool}@%h",
            include=self.include,
            loglevel="INFO",
        )
        self.process = start_group(command, env=self.env, log_path=self.log_path)
        self.call("probe.pid", timeout=90)
        return self

    def stop(self) -> None:
        stop_group(self.process, timeout=20)
        if self.broker_url.startswith("amqp"):
            # A durable task queue on the shared RabbitMQ outlives the test run otherwise.
            with self.producer.connection_for_write() as conn:
                conn.default_channel.queue_delete(self.queue)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, *names: str, since: int = 0) -> list[dict[str, Any]]:
        """The structured events called one of ``names`` in the log, from offset ``since``."""
        return log_events(self.log()[since:], *names)

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.producer.send_task(name, args=list(args), **options)

    def call(self, name: str, *args: Any, timeout: float = 30.0) -> Any:
        """Send a task by name and wait for its result (raising the task's error)."""
        try:
            return self.send(name, *args).get(timeout=timeout, propagate=True)
        except Exception:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            raise

    def child_pids(self) -> set[int]:
        import psutil

        assert self.process is not None
        return {child.pid for child in psutil.Process(self.process.pid).children(recursive=True)}

    def read_everywhere(self, reader: str, method: str, *args: Any) -> dict[int, Any]:
        """Run the same read in every child (prefork) or in the worker (solo/threads)."""
        expected = self.child_pids() if self.pool == "prefork" else {self.process.pid}  # type: ignore[union-attr]
        answers: dict[int, Any] = {}

        def all_answered() -> bool:
            pending = [
                self.send("probe.read", reader, method, list(args), 0.2)
                for _ in range(self.concurrency * 2)
            ]
            for result in pending:
                answer = result.get(timeout=30)
                answers[answer["pid"]] = answer["result"]
            return expected <= set(answers)

        wait_for(
            all_answered,
            timeout=60,
            interval=0,
            message=f"every process to answer {reader}.{method}",
        )
        return {pid: answers[pid] for pid in expected}


def read_in_new_process(services: Services, project: int, key: str) -> Any:
    """What a freshly configured process (no local cache, no floors) reads first."""
    code = (
        "import json, store; "
        f"store.configure(database_url={services.database_url!r}, "
        f"redis_url={services.redis_url!r}, namespace={services.namespace!r}); "
        f"print(json.dumps(store.project_options.get_value({project}, {key!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=services.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)  # its only line: the store's events go to stderr


def amqp_url() -> str:
    """The machine's RabbitMQ (OPTIONS_TEST_AMQP_URL); skips, or fails under CI=true, if unset."""
    url = os.environ.get("OPTIONS_TEST_AMQP_URL")
    if not url:
        if IN_CI:
            pytest.fail("CI=true but OPTIONS_TEST_AMQP_URL is unset")
        pytest.skip("RabbitMQ not named (OPTIONS_TEST_AMQP_URL)")
    return url


@pytest.fixture(scope="session")
def worker(services: Services) -> Iterator[Worker]:
    """A prefork worker with 2 children on ``services``, shared by the tests of one target."""
    running = Worker(services).start()
    yield running
    running.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def worker_serving_metrics(services: Services, queue: str) -> Iterator[tuple[Worker, int]]:
    """A prefork worker serving its metrics on a free port (yielded with it), on a task queue
    of its own (``<namespace>.<queue>``): the session's worker must not answer its tasks."""
    port = free_port()
    worker = Worker(
        services,
        extra_env={
            "OPTIONS_METRICS_PORT": str(port),
            "OPTIONS_TASK_QUEUE": f"{services.namespace}.{queue}",
        },
    ).start()
    try:
        yield worker, port
    finally:
        worker.stop()


@contextlib.contextmanager
def fresh_database(services: Services, label: str, *, migrated: bool = True) -> Iterator[str]:
    """The URL of a new database on the target's PostgreSQL server (migrated unless told not
    to), dropped after."""
    from store.postgres.schema import migrate

    name = f"optionstore_{label}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = urlunsplit(urlsplit(services.database_url)._replace(path=f"/{name}"))
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(services: Services) -> Iterator[PostgresStore]:
    """A PostgresStore on a fresh, migrated database of the target's server."""
    from store.postgres.store import PostgresStore

    with fresh_database(services, "o") as url:
        postgres = PostgresStore(conninfo=url)
        try:
            yield postgres
        finally:
            postgres.close()
