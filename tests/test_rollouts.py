"""Canary rollouts: the rules (selectors, thresholds, the judgement) on their own, then real
prefork workers on the machine's services, where one child of three serves a canary value,
the leader reverts a change that breaks the tasks that read it and promotes a harmless one,
and a rollout whose leader is killed mid-window still ends on a value history shows."""

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

from store.errors import InvalidOption
from store.local import LocalCache, ScopeState
from store.model.scopes import Scope
from store.model.writes import set_write
from store.redis.presence import Presence
from store.rollouts.model import MAX_SAMPLES, Health, Selector, Thresholds, judge
from store.rollouts.overlay import FAILSAFE_AFTER, Entry, Overlay, parse_mirror
from store.rollouts.records import MAX_HEALTH_BYTES, MAX_MIRROR_BYTES, parse_health
from tests.conftest import Services, Worker, fresh_id, wait_for
from tests.test_broadcast import isolated, reports
from tests.test_cli import ok, optionstore
from tests.test_fleet_duties import FleetWorker, _leader_pid

# -- the rules, without services ----------------------------------------------------------


def test_a_selector_is_parsed_and_a_bad_one_names_the_canary_field() -> None:
    """Selectors are queue:NAME, host:GLOB or percent:N (or N%); anything else is refused
    with an error naming ``canary``."""
    assert Selector.parse("queue:billing") == Selector("queue", "billing")
    assert Selector.parse("25%") == Selector("percent", "25")
    for bad in ("", "pid:3", "percent:0", "percent:101", "percent:x", "host:", 7):
        with pytest.raises(InvalidOption) as raised:
            Selector.parse(bad)
        assert raised.value.field == "canary"


def test_each_process_decides_from_its_own_identity() -> None:
    """A queue selector matches a process that consumes it, a host glob its host name, a
    percentage the processes chosen at the start: the same ones for the same live set."""
    queue, host = Selector.parse("queue:fast"), Selector.parse("host:web-*")
    assert queue.matches(host="a", identity="a:1", queues=["fast"], members=[])
    assert not queue.matches(host="a", identity="a:1", queues=["slow"], members=[])
    assert host.matches(host="web-3", identity="web-3:9", queues=[], members=[])
    assert not host.matches(host="db-1", identity="db-1:9", queues=[], members=[])
    share = Selector.parse("percent:34")
    live = [f"h:{pid}" for pid in range(100, 103)]
    chosen = share.choose("7", live)
    assert len(chosen) == 1
    assert chosen == share.choose("7", list(reversed(live)))
    assert share.matches(host="h", identity=chosen[0], queues=[], members=chosen)
    assert share.choose("7", []) == []


def test_thresholds_have_defaults_and_bad_overrides_name_their_field() -> None:
    """Unset thresholds take the defaults; a negative, non-finite or non-number override is
    refused naming the threshold."""
    assert Thresholds.from_options({"min_tasks": None}) == Thresholds()
    assert Thresholds.from_options({"failure_ratio": 3}).failure_ratio == 3
    for name, value in (("failure_ratio", -1), ("min_tasks", 0.5), ("p95_ratio", float("nan"))):
        with pytest.raises(InvalidOption) as raised:
            Thresholds.from_options({name: value})
        assert raised.value.field == name


def test_the_judgement_reverts_on_a_breach_and_promotes_a_healthy_canary() -> None:
    """A canary failing 4.2 times as often as the baseline is reverted with that figure in its
    reason; a healthy one is promoted at the window's end; one with too few tasks is
    reverted then, as not judged."""
    thresholds = Thresholds(min_tasks=10)
    canary = Health(tasks=100, failures=21, processes=1)
    baseline = Health(tasks=200, failures=10, processes=2)
    verdict = judge(thresholds, canary, baseline, elapsed=30, window=120)
    assert verdict.decision == "revert"
    assert verdict.reason == "auto-revert: failure ratio 4.2x the baseline over 30 s"
    healthy = Health(tasks=100, failures=5, processes=1)
    assert judge(thresholds, healthy, baseline, elapsed=30, window=120).decision is None
    ended = judge(thresholds, healthy, baseline, elapsed=121, window=120)
    assert ended.decision == "promote"
    assert ended.reason.startswith("auto-promote: failure ratio 1.0x")
    idle = judge(thresholds, Health(), baseline, elapsed=121, window=120)
    assert idle.decision == "revert"
    assert idle.reason == "auto-revert: 0 canary tasks over 120 s, 10 needed to judge"


def test_a_scope_under_rollout_leaves_the_hit_index_and_notes_its_reads() -> None:
    """A canary process serves the canary value of a watched key (by name, through the
    Python path), a baseline process the old one; both note the rollout for the running
    task; a scope without a rollout stays in the id index of the C hit."""
    overlay = Overlay()
    local = LocalCache("process", wrap=overlay.wrap)
    overlay.active = {"project:1": {"k": Entry(5, True, "new")}}
    local.scopes["project:1"] = ScopeState(3, {"k": "old", "other": 1})
    local.scopes["project:2"] = ScopeState(3, {"k": "plain"})
    assert 1 not in local.scopes.project_reads
    assert local.scopes.project_reads[2] == {"k": "plain"}
    overlay.task_started()
    assert local.scopes["project:1"].values.get("k") == "new"
    assert local.scopes["project:1"].values.get("other") == 1
    overlay.task_ended()
    assert overlay._counts[5].tasks == 1
    overlay.active = {"project:1": {"k": Entry(5, False, "new")}}
    local.drop_scopes(["project:1"])
    local.scopes["project:1"] = ScopeState(3, {"k": "old"})
    assert local.scopes["project:1"].values["k"] == "old"


class _DownRedis:
    """A Redis client whose every command fails as a lost connection does (a unit-test fake:
    the real outage is the documented fallback, not a test of a server)."""

    def get(self, key: str) -> bytes:
        raise redis.ConnectionError("connection refused")


def test_a_process_that_cannot_confirm_its_rollouts_serves_the_stored_value() -> None:
    """Redis unreachable: a canary process keeps its canary value for up to FAILSAFE_AFTER
    seconds after its last confirmation, then drops it and serves the stored value."""
    overlay = Overlay()
    local = LocalCache("process", wrap=overlay.wrap)
    overlay.active = {"project:1": {"k": Entry(5, True, "new")}}
    local.scopes["project:1"] = ScopeState(3, {"k": "old"})
    down: Any = _DownRedis()
    overlay.refresh(down, "ns", local)
    assert local.scopes["project:1"].values["k"] == "new"  # confirmed moments ago
    overlay._confirmed_at -= FAILSAFE_AFTER + 1
    overlay._next_refresh = 0.0
    overlay.refresh(down, "ns", local)
    assert overlay.active == {}
    assert "project:1" not in local.scopes
    local.scopes["project:1"] = ScopeState(3, {"k": "old"})
    assert local.scopes["project:1"].values["k"] == "old"


def test_reports_and_the_copy_of_rollouts_are_bounded_and_checked() -> None:
    """A process's health report and the leader's copy of the rollouts come from Redis, which
    any process writes: oversized or malformed ones are ignored, never trusted."""
    good = {"tasks": 3, "failures": 1, "retries": 0, "runtimes": [0.01, 0.02], "canary": True}
    parsed = parse_health(json.dumps(good))
    assert parsed is not None and parsed[0] is True and parsed[1].failures == 1
    for bad in (
        {**good, "tasks": -1},
        {**good, "failures": True},
        {**good, "runtimes": [float("nan")]},
        {**good, "runtimes": [0.1] * (MAX_SAMPLES + 1)},
        {**good, "retries": 2**60},
        [1, 2],
    ):
        assert parse_health(json.dumps(bad)) is None, bad
    assert parse_health("x" * (MAX_HEALTH_BYTES + 1)) is None
    assert parse_health("{not json") is None
    entry = {"id": 1, "scope": "global", "key": "k", "value": 1, "selector": "host:*"}
    assert parse_mirror(json.dumps({"rollouts": [{**entry, "members": []}]})) != []
    assert parse_mirror(json.dumps({"rollouts": [{**entry, "members": [3]}]})) == []
    assert parse_mirror(json.dumps({"rollouts": [{**entry, "id": "1", "members": []}]})) == []
    assert parse_mirror(b" " * (MAX_MIRROR_BYTES + 1)) == []
    assert parse_mirror(None) == []


# -- real workers ---------------------------------------------------------------------------

pytestmark_machine = pytest.mark.parametrize("services", ["machine"], indirect=True)


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


@pytestmark_machine
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

    entries = _history(worker, project, key)
    started = [e for e in entries if e["origin"] == "canary"]
    ended = [e for e in entries if e["origin"] == "canary-end"]
    assert [(e["old_value"], e["new_value"]) for e in started] == [("old", "bad")]
    assert [(e["old_value"], e["new_value"], e["reason"]) for e in ended] == [
        ("bad", "old", row["decision"])
    ]


@pytestmark_machine
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


@pytestmark_machine
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


@pytestmark_machine
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


@pytestmark_machine
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
    if services.name != "machine":
        pytest.skip("fleet tests run on the machine target (two cores: not twice)")
    with isolated(services) as found:
        yield found


@pytestmark_machine
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


# -- apply --canary and the helper (no worker: what is recorded) --------------------------------


def _rollouts_of(services: Services, scope: str) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT key, state, reason FROM options_rollout WHERE scope = %s ORDER BY key",
            (scope,),
        ).fetchall()
    return [(str(k), str(s), r) for k, s, r in rows]


def test_apply_with_a_canary_starts_a_rollout_per_value(
    services: Services, backend: Any, tmp_path: Any
) -> None:
    """`apply FILE --canary … --yes` records one rollout per value the file changes, each with
    the file named in its reason; a file that removes a key is refused naming ``canary``, and
    records nothing."""
    project = fresh_id()
    scope = f"project:{project}"
    removing = tmp_path / "removing.json"
    removing.write_text(
        json.dumps({"optionstore": 1, "scopes": {scope: {"values": {"a": 1}, "unset": ["gone"]}}})
    )
    backend.commit(set_write(Scope.parse(scope), "gone", 1), task_id=f"seed-{project}")
    refused = optionstore(
        services, "apply", str(removing), "--canary", "host:*", "--watch", "60s", "--yes"
    )
    assert refused.returncode == 2 and "invalid input: canary:" in refused.stderr, refused
    assert _rollouts_of(services, scope) == []

    desired = tmp_path / "desired.json"
    desired.write_text(
        json.dumps({"optionstore": 1, "scopes": {scope: {"values": {"a": 1, "b": "x"}}}})
    )
    out = ok(
        optionstore(
            services, "apply", str(desired), "--canary", "host:*", "--watch", "60s", "--yes"
        )
    )
    assert out.count("started rollout") == 2, out
    assert _rollouts_of(services, scope) == [
        ("a", "watching", "apply desired.json"),
        ("b", "watching", "apply desired.json"),
    ]


def test_the_helper_starts_a_rollout_and_refuses_bad_input_naming_the_field(
    services: Services, backend: Any
) -> None:
    """``tasks.start_rollout`` records a rollout with its thresholds and its canary entry in
    history; bad input raises InvalidOption naming the field and records nothing."""
    import tasks

    project = fresh_id()
    scope = f"project:{project}"
    for kwargs, field in (
        ({"canary": "nope", "watch": 5}, "canary"),
        ({"canary": "host:*", "watch": "soon"}, "watch"),
        ({"canary": "host:*", "watch": 5, "failure_ratio": -1}, "failure_ratio"),
        ({"canary": "host:*", "watch": 5, "bogus": 1}, "thresholds"),
        ({"canary": "host:*", "watch": 5, "reason": "two\nlines"}, "reason"),
    ):
        with pytest.raises(InvalidOption) as raised:
            tasks.start_rollout(scope, "k", 1, **kwargs)
        assert raised.value.field == field
    assert _rollouts_of(services, scope) == []
    started = tasks.start_rollout(
        scope, "k", {"on": True}, canary="host:*", watch="2m", min_tasks=3, reason="try it"
    )
    assert started["state"] == "watching"
    assert started["watch_seconds"] == 120
    assert started["thresholds"]["min_tasks"] == 3
    assert started["new_value"] == {"on": True} and started["old_set"] is False
    entries = backend.db.history(scope, "k")
    assert [(e.origin, e.new_value, e.reason) for e in entries] == [
        ("canary", {"on": True}, "canary to host:*: try it")
    ]
