"""Canary rollouts on real prefork workers on the machine's services: one child of three serves
a canary value, the leader reverts a change that breaks the tasks that read it and promotes a
harmless one, a write supersedes a rollout, a child started mid-window learns it, and a rollout
whose leader is killed mid-window still ends on a value history shows. The rules alone are in
test_rollout_rules.py, the requests in test_rollout_requests.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from store.redis.presence import Presence
from tests.conftest import Services, Worker, fresh_id, wait_for
from tests.test_broadcast import isolated, reports
from tests.test_cli import ok, optionstore
from tests.test_fleet_duties import FleetWorker, _leader_pid

# One target is enough here (the machine's services, as in CI): these tests exercise the
# worker's processes and the leader, not the servers.
pytestmark = pytest.mark.parametrize("services", ["machine"], indirect=True)


@pytest.fixture(scope="module")
def own(services: Services) -> Iterator[Services]:
    """A database and namespace of this module's own: a percentage counts the live
    processes of the namespace, which must be this module's worker alone."""
    with isolated(services) as found:
        yield found


@pytest.fixture(scope="module")
def three_children(own: Services) -> Iterator[Worker]:
    """One prefork worker with three children in process mode."""
    running = Worker(
        own,
        concurrency=3,
        extra_env={"OPTIONS_LOCAL_CACHE": "process"},
    ).start()
    wait_for(
        lambda: len([r for r in reports(own).values() if r.synced]) == 3,
        timeout=60,
        message="three children to subscribe",
    )
    yield running
    running.stop()


def _row(services: Services, rollout_id: int) -> dict[str, Any]:
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT state, decision, figures, members FROM options_rollout WHERE id = %s",
            (rollout_id,),
        ).fetchone()
    assert row is not None
    return {"state": row[0], "decision": row[1], "figures": row[2], "members": row[3]}


def _start(worker: Worker, project: int, key: str, value: str, *flags: str) -> int:
    out = ok(
        optionstore(
            worker.services,
            *("set", f"project:{project}", key, json.dumps(value)),
            *flags,
            env=worker.env,
        )
    )
    found = re.search(r"started rollout (\d+):", out)
    assert found, out
    return int(found.group(1))


def _wait_serving(worker: Worker, rollout_id: int, pids: set[int], since: int) -> None:
    """Every one of ``pids`` follows the rollout (its `rollout.serving` event names it)."""

    def following() -> bool:
        seen = {
            e["pid"]
            for e in worker.events("rollout.serving", since=since)
            if rollout_id in e.get("rollouts", [])
        }
        return pids <= seen

    wait_for(following, timeout=30, message=f"processes {sorted(pids)} to follow the rollout")


def _check_round(worker: Worker, project: int, key: str, bad: str, n: int = 6) -> list[Any]:
    """``n`` probe.check tasks, held 0.1 s each so every child gets some: (pid, value) each,
    the bad value for those that failed on it."""
    pending = [worker.send("probe.check", project, key, bad, 0.1) for _ in range(n)]
    answers = []
    for result in pending:
        try:
            answer = result.get(timeout=30, propagate=True)
            answers.append((answer["pid"], answer["result"]))
        except RuntimeError as exc:
            found = re.search(r"pid (\d+) read the bad value", str(exc))
            assert found, exc
            answers.append((int(found.group(1)), bad))
    return answers


def _history(worker: Worker, project: int, key: str) -> list[dict[str, Any]]:
    out = ok(
        optionstore(worker.services, "history", f"project:{project}", key, "--json", env=worker.env)
    )
    entries: list[dict[str, Any]] = json.loads(out)
    return entries


def _everyone_reads(worker: Worker, project: int, key: str, value: Any) -> None:
    wait_for(
        lambda: (
            set(worker.read_everywhere("project_options", "get_value", project, key).values())
            == {value}
        ),
        timeout=30,
        interval=0.2,
        message=f"every process to read {value!r}",
    )


def test_a_canary_that_breaks_its_tasks_is_reverted(three_children: Worker) -> None:
    """Canary to one child of three: only it reads the new value; the probe tasks fail there,
    the leader reverts on the failure ratio, every child reads the old value, and history
    shows the canary value and the revert with its figures."""
    worker, project, key = three_children, fresh_id(), "feature"
    worker.call("options.set_project_option", project, key, "old")
    since = len(worker.log())
    rollout_id = _start(
        worker, project, key, "bad", "--canary", "percent:34", "--watch", "120s", "--min-tasks", "8"
    )
    members = _row(worker.services, rollout_id)["members"]
    assert len(members) == 1
    canary = int(members[0].rsplit(":", 1)[1])
    children = worker.child_pids()
    assert canary in children
    _wait_serving(worker, rollout_id, children, since)

    answers: list[Any] = []
    while not ({pid for pid, _ in answers} >= {canary} and len({p for p, _ in answers}) >= 2):
        answers += _check_round(worker, project, key, "bad", n=3)
        assert len(answers) < 8, answers  # below --min-tasks: the leader cannot revert yet
    assert {value for pid, value in answers if pid == canary} == {"bad"}
    assert {value for pid, value in answers if pid != canary} == {"old"}
    # Watching (too few canary tasks to judge yet): in `status`, with live figures.
    status = json.loads(ok(optionstore(worker.services, "status", "--json", env=worker.env)))
    assert rollout_id in [r["id"] for r in status["rollouts"]]

    def live_figures() -> bool:
        listing = json.loads(ok(optionstore(worker.services, "rollouts", "--json", env=worker.env)))
        figures = next(r for r in listing if r["id"] == rollout_id)["figures"]
        return figures["canary"]["failures"] > 0 and figures["baseline"]["tasks"] > 0

    wait_for(live_figures, timeout=30, message="the canary's failures in `rollouts`")

    def reverted() -> bool:
        _check_round(worker, project, key, "bad", n=3)
        return _row(worker.services, rollout_id)["state"] != "watching"

    wait_for(reverted, timeout=90, interval=0, message="the leader to end the rollout")
    row = _row(worker.services, rollout_id)
    assert row["state"] == "reverted", row
    assert row["decision"].startswith("auto-revert: failure ratio "), row
    assert row["figures"]["canary"]["failures"] >= 8
    assert row["figures"]["baseline"]["failures"] == 0
    _everyone_reads(worker, project, key, "old")
    listing = json.loads(ok(optionstore(worker.services, "rollouts", "--json", env=worker.env)))
    shown = next(r for r in listing if r["id"] == rollout_id)
    assert (shown["state"], shown["decision"]) == ("reverted", row["decision"])
    plain = ok(optionstore(worker.services, "rollouts", env=worker.env))
    assert re.search(rf"^{rollout_id}\s+reverted\s", plain, re.MULTILINE), plain

    entries = _history(worker, project, key)
    started = [e for e in entries if e["origin"] == "canary"]
    ended = [e for e in entries if e["origin"] == "canary-end"]
    assert [(e["old_value"], e["new_value"]) for e in started] == [("old", "bad")]
    assert [(e["old_value"], e["new_value"], e["reason"]) for e in ended] == [
        ("bad", "old", row["decision"])
    ]


def test_a_harmless_canary_is_promoted_to_every_process(three_children: Worker) -> None:
    """With a value the probe tasks accept, only the canary child reads it during the window;
    at its end the leader promotes it through the write path and every child reads it."""
    worker, project, key = three_children, fresh_id(), "feature"
    worker.call("options.set_project_option", project, key, "old")
    since = len(worker.log())
    rollout_id = _start(
        worker, project, key, "good", "--canary", "percent:34", "--watch", "8s", "--min-tasks", "3"
    )
    canary = int(_row(worker.services, rollout_id)["members"][0].rsplit(":", 1)[1])
    _wait_serving(worker, rollout_id, worker.child_pids(), since)
    answers = _check_round(worker, project, key, "never", n=6)
    assert _row(worker.services, rollout_id)["state"] == "watching"
    assert {value for pid, value in answers if pid == canary} <= {"good"}
    assert {value for pid, value in answers if pid != canary} == {"old"}

    def promoted() -> bool:
        _check_round(worker, project, key, "never", n=3)
        return _row(worker.services, rollout_id)["state"] != "watching"

    wait_for(promoted, timeout=90, interval=0, message="the leader to end the rollout")
    row = _row(worker.services, rollout_id)
    assert row["state"] == "promoted", row
    assert row["decision"].startswith("auto-promote: "), row
    _everyone_reads(worker, project, key, "good")
    promotion = [e for e in _history(worker, project, key) if e["origin"] == "rollout"]
    assert [(e["new_value"], e["task_id"]) for e in promotion] == [
        ("good", f"rollout:{rollout_id}:promote")
    ]


def test_a_write_during_the_window_supersedes_the_rollout(three_children: Worker) -> None:
    """A write of the key during the window ends the rollout as superseded at the leader's
    next round, with no promotion: every child then reads that write, and history records the
    canary value and its end, canary value -> that write."""
    worker, project, key = three_children, fresh_id(), "feature"
    worker.call("options.set_project_option", project, key, "old")
    since = len(worker.log())
    rollout_id = _start(worker, project, key, "canary", "--canary", "percent:34", "--watch", "120s")
    _wait_serving(worker, rollout_id, worker.child_pids(), since)
    worker.call("options.set_project_option", project, key, "newer")
    wait_for(
        lambda: _row(worker.services, rollout_id)["state"] != "watching",
        timeout=30,
        message="the leader to end the rollout",
    )
    row = _row(worker.services, rollout_id)
    assert row["state"] == "superseded", row
    _everyone_reads(worker, project, key, "newer")
    ended = [e for e in _history(worker, project, key) if e["origin"] == "canary-end"]
    assert [(e["old_value"], e["new_value"]) for e in ended] == [("canary", "newer")]
    assert _history(worker, project, key)[-1]["origin"] == "canary-end"


def test_a_bad_canary_request_is_refused_naming_its_field(three_children: Worker) -> None:
    """A malformed selector, a missing --watch, or a second rollout of the same key exits 2
    naming the field, and records nothing."""
    worker, project = three_children, fresh_id()
    scope = f"project:{project}"
    for flags, field in (
        (("--canary", "pid:1", "--watch", "5s"), "canary"),
        (("--canary", "percent:10"), "watch"),
        (("--watch", "5s"), "watch"),
        (("--canary", "queue:x", "--watch", "soon"), "watch"),
        (("--canary", "queue:x", "--watch", "5s", "--failure-ratio", "-2"), "failure_ratio"),
    ):
        result = optionstore(worker.services, "set", scope, "k", "1", *flags, env=worker.env)
        assert result.returncode == 2, result
        assert f"invalid input: {field}:" in result.stderr, result.stderr
    with psycopg.connect(worker.services.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM options_rollout WHERE scope = %s", (scope,)
        ).fetchone()
    assert row is not None and row[0] == 0
    first = _start(worker, project, "k", "a", "--canary", "queue:none", "--watch", "60s")
    again = optionstore(
        worker.services,
        "set",
        scope,
        "k",
        "2",
        "--canary",
        "queue:x",
        "--watch",
        "5s",
        env=worker.env,
    )
    assert again.returncode == 2 and "invalid input: key:" in again.stderr, again
    aborted = json.loads(
        ok(optionstore(worker.services, "rollouts", "abort", str(first), "--json", env=worker.env))
    )
    assert aborted["state"] == "aborted"


def test_a_child_started_mid_window_learns_the_rollout(three_children: Worker) -> None:
    """With every child of the worker's queue a canary, a child killed mid-window is replaced
    by one that learns the active rollout from the store and serves the canary value; after an
    abort every child reads the old value. (Last of this worker's tests: it changes a child.)"""
    worker, project, key = three_children, fresh_id(), "feature"
    worker.call("options.set_project_option", project, key, "old")
    since = len(worker.log())
    rollout_id = _start(
        worker, project, key, "canary", "--canary", f"queue:{worker.queue}", "--watch", "120s"
    )
    before = worker.child_pids()
    _wait_serving(worker, rollout_id, before, since)
    doomed = min(before)
    os.kill(doomed, signal.SIGKILL)

    def replaced_pool() -> set[int] | None:
        pids = worker.child_pids()
        return pids if len(pids) == 3 and doomed not in pids else None

    replaced: set[int] = wait_for(
        replaced_pool, timeout=60, message="the pool to replace the killed child"
    )
    # The killed child's report lingers until it expires: not a live process any more.
    Presence(
        redis.Redis.from_url(worker.services.redis_url), namespace=worker.services.namespace
    ).remove(socket.gethostname(), doomed)
    newcomer = (replaced - before).pop()
    _wait_serving(worker, rollout_id, {newcomer}, since)
    assert _row(worker.services, rollout_id)["state"] == "watching"
    _everyone_reads(worker, project, key, "canary")
    ok(optionstore(worker.services, "rollouts", "abort", str(rollout_id), env=worker.env))
    _everyone_reads(worker, project, key, "old")


@pytest.fixture
def machine(services: Services) -> Iterator[Services]:
    """A database and namespace of this test's own: the leader killed is one of its workers."""
    with isolated(services) as found:
        yield found


def test_a_rollout_whose_leader_is_killed_mid_window_still_ends(machine: Services) -> None:
    """Two prefork workers; the lease holder is killed (its whole process group) during the
    window: the other takes over, ends the rollout, and every surviving process reads the
    value the last history entry of the key shows."""
    workers = [FleetWorker(machine, pool="prefork", concurrency=2) for _ in range(2)]
    try:
        for each in workers:
            each.start()
        wait_for(
            lambda: len([r for r in reports(machine).values() if r.synced]) == 4,
            timeout=120,
            message="four children to subscribe",
        )
        wait_for(lambda: _leader_pid(machine), timeout=30, message="a leader")
        project, key = fresh_id(), "feature"
        workers[0].call("options.set_project_option", project, key, "old")
        rollout_id = _start(
            workers[0],
            project,
            key,
            "good",
            *("--canary", "percent:50", "--watch", "10s", "--min-tasks", "2"),
        )
        leader = _leader_pid(machine)
        doomed = next(w for w in workers if w.pid == leader)
        survivor = next(w for w in workers if w is not doomed)
        offset = len(survivor.log())
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.process.wait(timeout=30)  # type: ignore[union-attr]
        assert _row(machine, rollout_id)["state"] == "watching"  # killed mid-window

        def ended() -> bool:
            _check_round(survivor, project, key, "never", n=2)
            return _row(machine, rollout_id)["state"] != "watching"

        wait_for(ended, timeout=90, interval=0, message="the rollout to end")
        row = _row(machine, rollout_id)
        assert row["state"] in {"promoted", "reverted"}, row
        assert survivor.events("rollout.ended", since=offset), "the survivor ended it"
        last = _history(survivor, project, key)[-1]
        _everyone_reads(survivor, project, key, last["new_value"])
    finally:
        for each in workers:
            each.stop()
