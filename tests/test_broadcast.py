"""Broadcasts between real workers: in-task visibility, convergence reports, process-mode caches
fed by broadcasts alone, reconnects, and the outbox relay, on a Redis and a RabbitMQ broker."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import kombu
import psutil
import psycopg
import pytest
import redis

from store.postgres.schema import migrate
from store.redis.presence import Presence, ProcessReport
from tests.conftest import ROOT, Services, Worker, amqp_url, fresh_id, wait_for

CONCURRENCY = 3
# The relay's documented bound: a commit is re-announced once it is older than the grace
# period, checked every second by the worker's main process (worker/duties/relay.py).
RELAY_GRACE_S = 2.0
RELAY_INTERVAL_S = 1.0

# -- services and processes ------------------------------------------------------------------


@contextlib.contextmanager
def isolated(services: Services, broker: str | None = None) -> Iterator[Services]:
    """A database and a namespace of their own on the target's servers, removed afterwards
    (with the queues and exchanges the namespace left on a RabbitMQ ``broker``).

    ``status`` and ``--wait`` judge every recent write of the database against every process
    of the namespace, so a fleet that must count its own processes needs both to itself.
    """
    name = f"optionstore_b_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(services.database_url)
    own = Services(services.name, urlunsplit(parts._replace(path=f"/{name}")), services.redis_url)
    try:
        migrate(own.database_url)
        yield own
    finally:
        client = redis_client(own.redis_url)
        for pattern in (f"{own.namespace}*", f"_kombu.binding.{own.namespace}*"):
            for key in client.scan_iter(match=pattern, count=1000):
                client.delete(key)
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if broker and urlsplit(broker).scheme.startswith("amqp"):
            _forget_amqp_names(broker, own.namespace)


def _forget_amqp_names(broker: str, namespace: str) -> None:
    """Delete the durable task queues and exchanges the namespace's workers declared."""
    with kombu.Connection(broker, connect_timeout=5) as conn:
        for suffix in ("tasks", "writer", "faulty"):
            with conn.channel() as channel:
                channel.queue_delete(f"{namespace}.{suffix}")
            with conn.channel() as channel:
                channel.exchange_delete(f"{namespace}.{suffix}")
        with conn.channel() as channel:
            channel.exchange_delete(f"{namespace}.reload")


@functools.cache
def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def processes_of(worker: Worker) -> set[int]:
    """The pids that run tasks and hold caches: the children of prefork, else the worker."""
    assert worker.process is not None
    return worker.child_pids() if worker.pool == "prefork" else {worker.process.pid}


def reports(services: Services) -> dict[int, ProcessReport]:
    presence = Presence(redis_client(services.redis_url), namespace=services.namespace)
    return {report.pid: report for report in presence.processes()}


def wait_synced(services: Services, pids: set[int]) -> dict[int, ProcessReport]:
    """Wait until every one of ``pids`` reports a live subscription; return their reports."""

    def synced() -> dict[int, ProcessReport] | None:
        found = reports(services)
        ready = {pid: found[pid] for pid in pids if pid in found and found[pid].synced}
        return ready if set(ready) == pids else None

    result: dict[int, ProcessReport] = wait_for(
        synced, timeout=30, message=f"processes {sorted(pids)} to subscribe"
    )
    return result


def wait_applied(
    services: Services, pids: set[int], scope: str, revision: int, *, timeout: float = 15.0
) -> dict[int, ProcessReport]:
    """Wait until every one of ``pids`` reports ``scope`` at ``revision`` or later."""

    def applied() -> dict[int, ProcessReport] | None:
        found = reports(services)
        done = {
            pid: found[pid]
            for pid in pids
            if pid in found and found[pid].revisions.get(scope, 0) >= revision
        }
        return done if set(done) == pids else None

    result: dict[int, ProcessReport] = wait_for(
        applied, timeout=timeout, message=f"{sorted(pids)} to apply {scope}@{revision}"
    )
    return result


def start(services: Services, **options: Any) -> Worker:
    """Start a worker and wait until each of its processes has subscribed to broadcasts."""
    worker = Worker(services, **options)
    try:
        worker.start()
        wait_synced(services, processes_of(worker))
    except BaseException:  # pytest.fail included: never leave a worker running
        worker.stop()
        raise
    return worker


def first_answers(worker: Worker, reader: str, method: str, *args: Any) -> dict[int, Any]:
    """Each process's first ``probe.stats`` answer to the same read, after this call began."""
    expected = processes_of(worker)
    answers: dict[int, dict[str, Any]] = {}

    def round_trips(answer: dict[str, Any]) -> int:
        return int(answer["before"]["redis_reads"] + answer["before"]["postgres_reads"])

    def everyone() -> bool:
        pending = [
            worker.send("probe.stats", reader, method, list(args), 0.2)
            for _ in range(worker.concurrency * 2)
        ]
        for result in pending:
            answer = result.get(timeout=30)
            known = answers.get(answer["pid"])
            # Counters only grow: the answer with the fewest round trips before it ran first.
            if known is None or round_trips(answer) < round_trips(known):
                answers[answer["pid"]] = answer
        return expected <= set(answers)

    wait_for(everyone, timeout=60, interval=0, message=f"every process to answer {method}")
    return {pid: answers[pid] for pid in expected}


def cli(worker: Worker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=worker.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


# -- fleets ----------------------------------------------------------------------------------


@dataclass
class Fleet:
    """A worker under test and, when it runs a single process, a writer beside it."""

    services: Services
    worker: Worker
    writer: Worker | None = None

    def pids(self) -> set[int]:
        """Every process of the namespace: each one reports itself and must converge."""
        return processes_of(self.worker) | (processes_of(self.writer) if self.writer else set())

    def write(self, project: int, key: str, value: Any) -> dict[str, Any]:
        """Set a project option by task name, from a process other than a busy poller."""
        result: dict[str, Any] = (self.writer or self.worker).call(
            "options.set_project_option", project, key, value
        )
        return result


@dataclass
class ProcessFleet:
    """Process-mode readers, a normal writer and a writer that never announces, one namespace."""

    services: Services
    readers: Worker
    writer: Worker
    faulty: Worker

    @property
    def workers(self) -> list[Worker]:
        return [self.readers, self.writer, self.faulty]


@pytest.fixture(scope="module", params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, services: Services) -> str:
    """The broker URL: the target's Redis, or the machine's RabbitMQ (machine target only)."""
    if request.param == "redis":
        return services.broker_url
    if services.name != "machine":
        pytest.skip("the RabbitMQ variant runs on the machine target")
    return amqp_url()


@pytest.fixture(scope="module", params=["prefork", "solo", "threads"])
def fleet(request: pytest.FixtureRequest, services: Services, broker: str) -> Iterator[Fleet]:
    """A task-mode worker of one pool; solo and threads get a writer, since they are one process."""
    pool = request.param
    with isolated(services, broker) as own, contextlib.ExitStack() as stack:
        concurrency = 1 if pool == "solo" else CONCURRENCY
        worker = start(own, pool=pool, concurrency=concurrency, broker_url=broker)
        stack.callback(worker.stop)
        writer = None
        if pool != "prefork":
            # A pool unlike the worker's, so the two celery node names differ.
            writer = start(
                own,
                pool="threads" if pool == "solo" else "solo",
                concurrency=1,
                broker_url=broker,
                extra_env={"OPTIONS_TASK_QUEUE": f"{own.namespace}.writer"},
            )
            stack.callback(writer.stop)
        yield Fleet(own, worker, writer)


@pytest.fixture(scope="module")
def process_fleet(services: Services, broker: str) -> Iterator[ProcessFleet]:
    """Three process-mode children to read, and two single-process writers beside them."""
    with isolated(services, broker) as own, contextlib.ExitStack() as stack:
        readers = start(
            own,
            pool="prefork",
            concurrency=CONCURRENCY,
            broker_url=broker,
            extra_env={"OPTIONS_LOCAL_CACHE": "process"},
        )
        stack.callback(readers.stop)
        writer = start(
            own,
            pool="solo",
            concurrency=1,
            broker_url=broker,
            extra_env={"OPTIONS_TASK_QUEUE": f"{own.namespace}.writer"},
        )
        stack.callback(writer.stop)
        faulty = start(
            own,
            pool="threads",
            concurrency=1,
            broker_url=broker,
            extra_env={"OPTIONS_TASK_QUEUE": f"{own.namespace}.faulty"},
            include="tests.probe_tasks,tests.skip_announce",
        )
        stack.callback(faulty.stop)
        yield ProcessFleet(own, readers, writer, faulty)


# -- in-task visibility and convergence ------------------------------------------------------


def test_running_task_sees_a_write_made_elsewhere(fleet: Fleet) -> None:
    """A running task that polls an option sees a write made elsewhere before it finishes."""
    project, key = fresh_id(), "poll"
    fleet.write(project, key, "old")
    marker = f"{fleet.services.namespace}:marker:{uuid.uuid4().hex}"
    polling = fleet.worker.send(
        "probe.poll", "project_options", "get_value", [project, key], "new", marker, 20.0
    )
    wait_for(
        lambda: redis_client(fleet.services.redis_url).get(marker),
        timeout=30,
        message="the polling task to take its first read",
    )
    fleet.write(project, key, "new")
    answer = polling.get(timeout=40)
    assert answer["pid"] in processes_of(fleet.worker)
    # In task mode a task keeps its first read: only the broadcast can move it on.
    assert answer["first"] == "old"
    assert answer["last"] == "new", answer


def test_status_and_wait_show_every_process_converged(fleet: Fleet) -> None:
    """After a write, `status --json` shows every process converged and `set --wait` succeeds."""
    project = fresh_id()
    fleet.write(project, "k", 0)
    expected = fleet.pids()
    if fleet.worker.pool == "prefork":
        assert expected == fleet.worker.child_pids()
        assert len(expected) == CONCURRENCY

    def converged() -> dict[str, Any] | None:
        done = cli(fleet.worker, "status", "--json")
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        listed = {process["pid"] for process in report["processes"]}
        return report if report["converged"] and listed == expected else None

    report = wait_for(converged, timeout=30, interval=0.2, message="status to show convergence")
    for process in report["processes"]:
        assert process["converged"] is True, process
        assert process["synced"] is True, process
        assert process["behind"] == [], process

    done = cli(fleet.worker, "set", f"project:{project}", "k", "1", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"applied by {len(expected)} live worker processes" in done.stdout, done.stdout


def test_status_counts_the_reads_each_process_sent_past_its_cache(fleet: Fleet) -> None:
    """A process reports how many reads it sent to Redis and PostgreSQL: `status --json` shows
    at least the round trips a task in it counted."""
    project = fresh_id()
    fleet.write(project, "k", 0)
    answer = fleet.worker.send("probe.stats", "project_options", "get_value", [project, "k"]).get(
        timeout=30
    )
    made = answer["after"]["redis_reads"] + answer["after"]["postgres_reads"]
    assert made >= 1, answer

    def reported() -> dict[str, Any] | None:
        done = cli(fleet.worker, "status", "--json")
        assert done.returncode == 0, done.stderr
        for process in json.loads(done.stdout)["processes"]:
            if process["pid"] == answer["pid"]:
                sent = process["redis_reads"] + process["postgres_reads"]
                return process if sent >= made else None
        return None

    wait_for(reported, timeout=30, interval=0.2, message="status to count the process's reads")


# -- process-mode caches and the outbox relay ------------------------------------------------


def test_process_cache_is_moved_on_by_the_broadcast_alone(process_fleet: ProcessFleet) -> None:
    """In process mode each child's next read returns a new value with no Redis or SQL read."""
    fleet = process_fleet
    pids = fleet.readers.child_pids()
    project, key = fresh_id(), "mode"
    fleet.writer.call("options.set_project_option", project, key, "before")
    warm = first_answers(fleet.readers, "project_options", "get_value", project, key)
    assert {answer["result"] for answer in warm.values()} == {"before"}
    assert {answer["mode"] for answer in warm.values()} == {"process"}

    result = fleet.writer.call("options.set_project_option", project, key, "after")
    wait_applied(fleet.services, pids, result["scope"], result["revision"])

    answers = first_answers(fleet.readers, "project_options", "get_value", project, key)
    for pid, answer in answers.items():
        assert answer["result"] == "after", (pid, answer)
        assert answer["after"] == answer["before"], (pid, answer)


def _write_row(services: Services, task_id: str) -> tuple[float, bool, float]:
    """(committed_at, announced, age in seconds) of a write task's record."""
    with psycopg.connect(services.database_url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM committed_at), announced_at IS NOT NULL,"
            " extract(epoch FROM clock_timestamp() - committed_at)"
            " FROM options_write WHERE task_id = %s",
            (task_id,),
        ).fetchone()
    assert row is not None, f"no write recorded for task {task_id}"
    return float(row[0]), bool(row[1]), float(row[2])


def test_commit_left_unannounced_is_relayed(process_fleet: ProcessFleet) -> None:
    """A write committed by a process that never announces it still reaches every process."""
    fleet = process_fleet
    pids = fleet.readers.child_pids()
    project, key = fresh_id(), "relayed"
    fleet.writer.call("options.set_project_option", project, key, "before")
    warm = first_answers(fleet.readers, "project_options", "get_value", project, key)
    assert {answer["result"] for answer in warm.values()} == {"before"}

    sent = fleet.faulty.send("options.set_project_option", project, key, "after")
    result = sent.get(timeout=30)
    committed_at, announced, age = _write_row(fleet.services, sent.id)
    # The relay only takes commits older than its grace period.
    assert not announced or age >= RELAY_GRACE_S
    wait_for(
        lambda: (
            (result["scope"], result["revision"])
            in {(e["scope"], e["revision"]) for e in fleet.faulty.events("fault.skip_announce")}
        ),
        timeout=10,
        message="the faulty worker to log fault.skip_announce",
    )

    bound = RELAY_GRACE_S + RELAY_INTERVAL_S
    wait_applied(fleet.services, pids, result["scope"], result["revision"], timeout=15)
    delay = time.time() - committed_at
    print(f"\nrelayed change reached all {len(pids)} readers {delay:.2f}s after its commit")
    print(f"(documented bound: grace {RELAY_GRACE_S}s + interval {RELAY_INTERVAL_S}s = {bound}s)")

    wait_for(
        lambda: _write_row(fleet.services, sent.id)[1],
        timeout=15,
        message="announced_at to be set",
    )

    def relayed() -> list[dict[str, Any]]:
        return [
            e
            for worker in fleet.workers
            for e in worker.events("outbox.relayed")
            if e["scope"] == result["scope"] and e["revision"] == result["revision"]
        ]

    wait_for(relayed, timeout=10, message="an outbox.relayed event")

    answers = first_answers(fleet.readers, "project_options", "get_value", project, key)
    for pid, answer in answers.items():
        assert answer["result"] == "after", (pid, answer)
        assert answer["after"] == answer["before"], (pid, answer)


# -- reconnects ------------------------------------------------------------------------------


def _holder_ports(worker: Worker, server_port: int) -> dict[int, int]:
    """Local port -> pid of each connection to ``server_port`` opened by the processes that
    hold the worker's reload subscriptions: the main process when it relays the exchange to
    its children (the default), else each child."""
    assert worker.process is not None

    def ports(pid: int) -> set[int]:
        return {
            conn.laddr.port
            for conn in psutil.Process(pid).net_connections(kind="tcp")
            if conn.raddr and conn.raddr.port == server_port
        }

    main = worker.process.pid
    if worker.env.get("OPTIONS_HOST_RELAY", "1") != "0":
        return dict.fromkeys(ports(main), main)
    # Sockets a child inherited through fork are the parent's: leave them alone.
    inherited = ports(main)
    return {port: pid for pid in worker.child_pids() for port in ports(pid) - inherited}


def _cut_redis_subscriptions(worker: Worker) -> set[int]:
    """Kill, by id, the pub/sub clients the subscription holders have on the broker Redis."""
    client = redis.Redis.from_url(worker.broker_url)
    owners = _holder_ports(worker, urlsplit(worker.broker_url).port or 6379)
    cut = set()
    for entry in client.client_list(_type="pubsub"):
        port = int(entry["addr"].rsplit(":", 1)[1])
        if port in owners:
            client.client_kill_filter(_id=entry["id"])
            cut.add(owners[port])
    return cut


def _cut_amqp_connections(worker: Worker) -> set[int]:
    """Close, through rabbitmqctl, the AMQP connections the subscription holders opened."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl is not installed here")
    owners = _holder_ports(worker, urlsplit(worker.broker_url).port or 5672)

    def ctl(*args: str) -> str:
        done = subprocess.run(
            [rabbitmqctl, "-q", *args], capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode != 0:
            pytest.skip(f"rabbitmqctl {args[0]} failed here: {done.stderr.strip()[:200]}")
        return done.stdout

    cut = set()
    for line in ctl("list_connections", "--no-table-headers", "pid", "peer_port").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) in owners:
            ctl("close_connection", parts[0], "optionstore test: cut")
            cut.add(owners[int(parts[1])])
    return cut


@pytest.mark.parametrize("fleet", ["prefork"], indirect=True)
def test_cut_connection_drops_then_resubscribes(fleet: Fleet) -> None:
    """When the worker's subscription to the exchange is cut (the main process's, which relays
    it), the loss is logged, every child stops caching until it is subscribed again, and all
    keep up."""
    worker = fleet.worker
    assert worker.process is not None
    pids = worker.child_pids()
    before = wait_synced(fleet.services, pids)
    since = len(worker.log())

    if urlsplit(worker.broker_url).scheme.startswith("amqp"):
        cut = _cut_amqp_connections(worker)
    else:
        cut = _cut_redis_subscriptions(worker)
    assert cut == {worker.process.pid}, f"found broker connections for {sorted(cut)}"

    def recovered() -> bool:
        lost: set[int] = set()
        back: set[int] = set()
        names = ("broadcast.lost", "broadcast.deafened", "broadcast.subscribed")
        for event in worker.events(*names, since=since):
            if event["event"] != "broadcast.subscribed":
                lost.add(event["pid"])
            elif event["pid"] in lost:
                back.add(event["pid"])
        return worker.process.pid in lost and pids <= back  # type: ignore[union-attr]

    wait_for(
        recovered,
        timeout=30,
        message="broadcast.lost in the main process, then broadcast.deafened and "
        "broadcast.subscribed per child",
    )

    def advanced() -> bool:
        now = reports(fleet.services)
        return all(
            pid in now and now[pid].synced and now[pid].synced_at > before[pid].synced_at
            for pid in pids
        )

    wait_for(advanced, timeout=15, message="every child's synced_at to advance")

    project = fresh_id()
    result = fleet.write(project, "after-cut", "seen")
    wait_applied(fleet.services, pids, result["scope"], result["revision"])
    values = worker.read_everywhere("project_options", "get_value", project, "after-cut")
    assert set(values.values()) == {"seen"}


# -- a paused process ------------------------------------------------------------------------


def test_a_child_paused_past_the_deadline_reads_the_current_value_in_its_first_task(
    services: Services,
) -> None:
    """A process-mode child stopped (SIGSTOP) past the heartbeat deadline while 200 commits land
    serves none of its old cache in the first task after SIGCONT, though that task may run
    before its consumer has applied what queued up meanwhile."""
    with isolated(services) as own, contextlib.ExitStack() as stack:
        reader = start(
            own, pool="prefork", concurrency=1, extra_env={"OPTIONS_LOCAL_CACHE": "process"}
        )
        stack.callback(reader.stop)
        writer = start(
            own,
            pool="solo",
            concurrency=1,
            extra_env={"OPTIONS_TASK_QUEUE": f"{own.namespace}.writer"},
        )
        stack.callback(writer.stop)
        project, key = fresh_id(), "k"
        writer.call("options.set_project_option", project, key, 0)
        first = reader.call("probe.read", "project_options", "get_value", [project, key])
        assert first["result"] == 0  # cached now: process mode keeps it across tasks
        (child,) = reader.child_pids()
        process = psutil.Process(child)
        process.suspend()
        stopped_at = time.monotonic()
        try:
            for n in range(1, 201):
                writer.call("options.set_project_option", project, key, n)
            # Past the consumer's deadline (5 s): heartbeats went by unheard too.
            wait_for(lambda: time.monotonic() - stopped_at > 6.5, timeout=30, interval=0.1)
            # Queued for the child before it runs again: its first task races its consumer.
            pending = reader.send("probe.read", "project_options", "get_value", [project, key])
        finally:
            process.resume()
        answer = pending.get(timeout=30)
        assert answer["pid"] == child
        assert answer["result"] == 200, answer
