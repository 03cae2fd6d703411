"""What the fault suite checks afterwards: what PostgreSQL holds, what every process reads and
reports, and what `optionstore status` says."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from store.model.writes import WriteResult
from store.redis.presence import lagging
from tests.conftest import ROOT, wait_for
from tests.faults.fleet import FaultWorker, Fleet, Stream, reports

FIGURES: list[dict[str, Any]] = []


def record(fault: str, **figures: Any) -> dict[str, Any]:
    """Print one fault's figures and append them, as a JSON line, to $OPTIONS_FAULT_REPORT."""
    line = {"fault": fault, **figures}
    FIGURES.append(line)
    print(f"\nFAULT {json.dumps(line, sort_keys=True)}")
    target = os.environ.get("OPTIONS_FAULT_REPORT")
    if target:
        with Path(target).open("a") as out:
            out.write(json.dumps(line, sort_keys=True) + "\n")
    return line


def kill_mid_stream(
    worker: FaultWorker,
    database_url: str,
    writes: Sequence[tuple[str, str, list[Any]]],
    kill: Callable[[], None],
    after: int,
) -> tuple[float, int]:
    """Send ``writes``; once ``after`` of them have committed, call ``kill`` (so the kill lands
    inside the stream). Returns when the kill happened and how many had committed by then."""
    ids = [task_id for task_id, _, _ in writes]
    stream = Stream(worker.producer, writes)
    with psycopg.connect(database_url, autocommit=True) as conn:

        def count() -> int:
            query = "SELECT count(*) FROM options_write WHERE task_id = ANY(%s)"
            row = conn.execute(query, (ids,)).fetchone()
            return int(row[0]) if row else 0

        stream.start()
        wait_for(
            lambda: count() >= after,
            timeout=60,
            interval=0.001,
            message=f"{after} writes of the stream to commit",
        )
        kill()
        killed_at = time.monotonic()
        done = count()
    stream.finish()
    return killed_at, done


def committed(database_url: str, task_ids: Iterable[str]) -> set[str]:
    """The task ids that have an options_write record (their write committed)."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT task_id FROM options_write WHERE task_id = ANY(%s)", (list(task_ids),)
        ).fetchall()
    return {row[0] for row in rows}


def history_counts(database_url: str, task_ids: Iterable[str]) -> dict[str, int]:
    """How many options_history rows each task id wrote."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT task_id, count(*) FROM options_history WHERE task_id = ANY(%s)"
            " GROUP BY task_id",
            (list(task_ids),),
        ).fetchall()
    return {row[0]: int(row[1]) for row in rows}


def snapshot(database_url: str, scope: str) -> tuple[int, dict[str, Any]]:
    """(revision, decoded values) of a scope, as PostgreSQL has it."""
    with psycopg.connect(database_url, connect_timeout=5) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        row = conn.execute(
            "SELECT revision FROM options_scope WHERE scope = %s", (scope,)
        ).fetchone()
        values = conn.execute(
            "SELECT key, value FROM options_value WHERE scope = %s", (scope,)
        ).fetchall()
    return (int(row[0]) if row else 0), dict(values)


def latest_writes(database_url: str, scopes: Sequence[str]) -> list[tuple[WriteResult, bool]]:
    """The newest changing write of each scope and whether it was announced."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (scope) task_id, scope, revision, changed, changes,"
            " extract(epoch FROM committed_at), announced_at IS NOT NULL"
            " FROM options_write WHERE changed AND scope = ANY(%s)"
            " ORDER BY scope, revision DESC",
            (list(scopes),),
        ).fetchall()
    return [
        (WriteResult(r[1], int(r[2]), bool(r[3]), dict(r[4]), r[0], float(r[5])), bool(r[6]))
        for r in rows
    ]


def wait_committed(
    database_url: str, task_ids: Sequence[str], *, timeout: float, what: str = "writes"
) -> None:
    """Wait until every one of ``task_ids`` has committed; on the deadline, name the missing."""
    missing: set[str] = set(task_ids)

    def done() -> bool:
        with contextlib.suppress(psycopg.OperationalError):
            missing.difference_update(committed(database_url, missing))
        return not missing

    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            sample = sorted(missing)[:10]
            pytest.fail(f"{len(missing)} of {len(task_ids)} {what} never committed: {sample}")
        time.sleep(0.05)


def results(backend_url: str, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The result each task stored in the (Redis) result backend, for those that have one."""
    client = redis.Redis.from_url(backend_url)
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(task_ids), 1000):
        chunk = task_ids[start : start + 1000]
        for task_id, raw in zip(
            chunk, client.mget([f"celery-task-meta-{t}" for t in chunk]), strict=True
        ):
            if raw is not None:
                found[task_id] = json.loads(raw)
    return found


# -- convergence ------------------------------------------------------------------------------


def read_all(worker: FaultWorker, project: int) -> dict[int, Any]:
    """project_options.get_all_values(project) as every process of ``worker`` answers it."""
    return worker.read_everywhere("project_options", "get_all_values", project)


def broker_drained(client: redis.Redis, queue: str) -> bool:
    """Nothing left in the broker: no queued write, none unacknowledged, none taken by a
    consumer and not yet recorded (store/transport/redis.py)."""
    taken = [key for key in client.scan_iter(match="unacked.taken.*") if client.llen(key)]
    return client.llen(queue) == 0 and client.hlen("unacked") == 0 and not taken


def reclaimed(worker: FaultWorker) -> int:
    """How many writes this worker's sweeps put back after a consumer that had taken them
    went away (store/transport/redis.py logs each sweep that moved any)."""
    found = re.findall(r"Restored (\d+) task\(s\) taken off the queue", worker.log())
    return sum(int(n) for n in found)


def stale_reads(worker: FaultWorker, database_url: str, projects: list[int]) -> dict[str, Any]:
    """What any process reads that differs from PostgreSQL, read once (no waiting)."""
    stale: dict[str, Any] = {}
    for project in projects:
        truth = snapshot(database_url, f"project:{project}")[1]
        for pid, values in read_all(worker, project).items():
            wrong = {k: (v, truth.get(k)) for k, v in values.items() if truth.get(k) != v}
            missing = sorted(set(truth) - set(values))
            if wrong or missing:
                stale[f"{pid}/project:{project}"] = {"read (and truth)": wrong, "missing": missing}
    return stale


def reported_behind(own: Fleet, database_url: str, projects: Sequence[int]) -> list[str]:
    """Which live process does not yet report the latest write of each project as applied."""
    scopes = [f"project:{p}" for p in projects]
    pids = own.pids()
    found = [r for pid, r in reports(own).items() if pid in pids]
    faults = [
        f"{name} has not applied {missing}"
        for name, missing in lagging(found, latest_writes(database_url, scopes)).items()
        if missing
    ]
    faults += [
        f"pid {pid} does not report itself synced"
        for pid in pids - {r.pid for r in found if r.synced}
    ]
    return faults


def behind(own: Fleet, database_url: str, projects: Sequence[int]) -> list[str]:
    """What still differs from PostgreSQL: a process's reads, or its report (empty: converged)."""
    faults: list[str] = []
    truth = {p: snapshot(database_url, f"project:{p}")[1] for p in projects}
    for worker in own.workers:
        for project in projects:
            try:
                answers = read_all(worker, project)
            except Exception as exc:  # the read raised inside a worker process
                own.failed_reads.append(f"project:{project}: {type(exc).__name__}: {exc}")
                faults.append(f"a read of project:{project} failed: {exc!r}")
                continue
            for pid, values in answers.items():
                if values != truth[project]:
                    stale = {k: v for k, v in values.items() if truth[project].get(k) != v}
                    faults.append(f"pid {pid} reads project:{project} {stale} (truth differs)")
    return faults + reported_behind(own, database_url, projects)


def wait_converged(
    own: Fleet, database_url: str, projects: Sequence[int], *, timeout: float = 90.0
) -> float:
    """Wait until every live process reads what PostgreSQL holds and reports it applied;
    returns the seconds it took."""
    started = time.monotonic()
    last: list[str] = []

    def converged() -> bool:
        last[:] = behind(own, database_url, projects)
        return not last

    deadline = started + timeout
    while not converged():
        if time.monotonic() > deadline:
            pytest.fail(f"not converged after {timeout}s: {last[:10]}")
        time.sleep(0.05)
    return time.monotonic() - started


def optionstore(worker: FaultWorker, *args: str) -> subprocess.CompletedProcess[str]:
    """The `optionstore` command, run as an operator would, with the worker's environment."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=worker.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def status(worker: FaultWorker) -> dict[str, Any]:
    """`optionstore status --json`, run as an operator would, with the worker's environment."""
    done = optionstore(worker, "status", "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def wait_status_converged(own: Fleet, *, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until `status --json` lists exactly the live processes, all converged (the reports
    of killed processes expire on their own)."""
    pids = own.pids()
    found: dict[str, Any] = {}

    def converged() -> bool:
        found.update(status(own.workers[0]))
        listed = {p["pid"] for p in found["processes"]}
        return bool(found["converged"]) and listed == pids

    wait_for(converged, timeout=timeout, interval=0.5, message=f"status to show {sorted(pids)}")
    return found


@dataclass
class ThroughFault:
    """What a stream of writes through a fault came to (``writes_through_fault``)."""

    ids: list[str]
    committed_at_fault: int
    committed_s: float  # from the moment the fault routine returned, to every write committed
    converge_s: float  # to every process reading what PostgreSQL holds
    counts: dict[str, int]  # history rows per task id
    sends_refused: int


def writes_through_fault(
    own: Fleet,
    worker: FaultWorker,
    database_url: str,
    projects: list[int],
    writes: list[tuple[str, str, list[Any]]],
    *,
    fault: Callable[[], float],
    build_up: int,
    per_second: float,
    between_sends: Callable[[], None] | None = None,
    after_stream: Callable[[], None] | None = None,
    commit_timeout: float = 150.0,
    converge_timeout: float = 90.0,
    when: str,
) -> ThroughFault:
    """Warm every process on ``projects``, stream ``writes`` to ``worker``, and once
    ``build_up`` are sent run ``fault`` (it returns the moment commits are timed from). Then:
    every write was sent, every write commits, no process reads a stale value, every process
    converges (within ``converge_timeout`` of the last commit) and ``status`` says so. ``when``
    names the moment in the stale-read failure.
    ``between_sends`` runs first, while no send is under way (see the Sentinel test)."""
    ids = [task_id for task_id, _, _ in writes]
    for project in projects:
        worker.call("options.set_project_option", project, "warm", 0)
        read_all(worker, project)
    stream = Stream(worker.producer, writes, per_second=per_second)
    stream.start()
    wait_for(lambda: len(stream.sent) >= build_up, timeout=60, message="load to build up")
    at_fault = len(committed(database_url, ids))
    if between_sends is not None:
        with stream.held():
            between_sends()
    since = fault()
    sent = stream.finish()
    assert sent == ids
    if after_stream is not None:
        after_stream()
    wait_committed(database_url, ids, timeout=commit_timeout)
    committed_s = time.monotonic() - since
    stale = stale_reads(worker, database_url, projects)
    assert not stale, f"stale reads {when}, every write committed: {stale}"
    converge_s = wait_converged(own, database_url, projects, timeout=converge_timeout) + committed_s
    counts = history_counts(database_url, ids)
    wait_status_converged(own)
    return ThroughFault(ids, at_fault, committed_s, converge_s, counts, stream.refused)
