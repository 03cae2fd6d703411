"""The operators' workflow on real services and a real worker: declared options, audit, explain,
revert, plan/apply with drift, and an export/apply/export round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import store
from store.errors import InvalidOption
from store.model.scopes import Scope
from store.model.writes import set_write
from tests.conftest import ROOT, Services, Worker, fresh_database, fresh_id, wait_for

REGISTRY = """
[options."mail:subject_prefix"]
scopes = ["project"]
type = "string"
maxLength = 16
default = "[Sentry]"
description = "Prefix of notification mail subjects"

[options."rate:limit"]
scopes = ["project", "global"]
type = "integer"
minimum = 0
maximum = 100

[options."ui:theme"]
scopes = ["project"]
enum = ["light", "dark"]

[options."system:frozen"]
scopes = ["global"]
type = "boolean"
read_only = true
default = false

[options."old:flag"]
deprecated = true
type = "boolean"
"""


class Ops:
    """A strict-registry worker on its own queue, and the ``optionstore`` command pointed at it."""

    def __init__(self, services: Services, registry: Path) -> None:
        self.services = services
        self.extra = {
            "OPTIONS_REGISTRY": str(registry),
            "OPTIONS_REGISTRY_STRICT": "1",
            "OPTIONS_TASK_QUEUE": f"{services.namespace}.ops",
        }
        self.worker = Worker(services, extra_env=self.extra)

    def env(self, **extra: str) -> dict[str, str]:
        return self.services.env(**{**self.extra, **extra})

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            cwd=ROOT,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def ok(self, *args: str, **extra: str) -> str:
        done = self.run(*args, **extra)
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


@pytest.fixture(scope="module")
def ops(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    path = tmp_path_factory.mktemp("registry") / "options.toml"
    path.write_text(REGISTRY)
    running = Ops(services, path)
    running.worker.start()
    yield running
    running.worker.stop()


def history(ops: Ops, scope: str, key: str | None = None) -> list[dict[str, Any]]:
    return ops.json("history", scope, *([key] if key else []))  # type: ignore[no-any-return]


def test_options_lists_the_declarations(ops: Ops) -> None:
    """`options` prints each declaration (key, scopes, type, default, flags) as a table and as
    JSON, with the registry's file and strict mode."""
    text = ops.ok("options")
    assert "mail:subject_prefix" in text and "string (max 16)" in text
    assert "read_only" in text and "deprecated" in text
    listed = ops.json("options")
    assert listed["strict"] is True
    declared = {d["key"]: d for d in listed["options"]}
    assert declared["rate:limit"]["schema"] == {"type": "integer", "minimum": 0, "maximum": 100}
    assert declared["mail:subject_prefix"]["default"] == "[Sentry]"
    assert "default" not in declared["ui:theme"]


def test_strict_registry_refuses_an_undeclared_key(ops: Ops) -> None:
    """Under strict mode an undeclared key is refused by the CLI and by the task sent by name,
    naming the field; nothing is written and the task is not retried."""
    scope = f"project:{fresh_id()}"
    done = ops.run("set", scope, "mail:subjet_prefix", '"[x]"')
    assert done.returncode == 2
    assert "key: 'mail:subjet_prefix' is not a declared option" in done.stderr
    project = int(scope.split(":")[1])
    result = ops.worker.send("options.set_project_option", project, "mail:subjet_prefix", "x")
    with pytest.raises(InvalidOption) as raised:
        result.get(timeout=30, propagate=True)
    assert raised.value.field == "key"
    assert result.state == "FAILURE"
    assert history(ops, scope) == []


def test_a_value_of_the_wrong_type_is_refused(ops: Ops) -> None:
    """A value outside its declared schema (type, maximum, enum, read-only) is refused by the
    CLI and by the write task, with the field named, and nothing is written."""
    project = fresh_id()
    scope = f"project:{project}"
    for key, value, message in (
        ("rate:limit", '"fast"', "value: must be of type integer, got string"),
        ("rate:limit", "101", "value: must be at most 100"),
        ("ui:theme", '"blue"', "value: must be one of 'light', 'dark'"),
    ):
        done = ops.run("set", scope, key, value)
        assert done.returncode == 2, done.stdout
        assert message in done.stderr
    frozen = ops.run("set", "global", "system:frozen", "true")
    assert "key: 'system:frozen' is read-only at runtime" in frozen.stderr
    result = ops.worker.send("options.set_many", scope, {"rate:limit": "fast"}, [])
    with pytest.raises(InvalidOption) as raised:
        result.get(timeout=30, propagate=True)
    assert raised.value.field == "values['rate:limit']"
    assert history(ops, scope) == []


def test_declared_defaults_and_undeclared_reads_in_the_worker(ops: Ops) -> None:
    """In every worker child an unset declared key reads as its declared default, a caller's
    default wins over it, and reading an undeclared key logs one event per key per process."""
    project = fresh_id()
    worker = ops.worker
    declared = worker.read_everywhere(
        "project_options", "get_value", project, "mail:subject_prefix"
    )
    assert set(declared.values()) == {"[Sentry]"}
    given = worker.read_everywhere("project_options", "get_value", project, "rate:limit", 7)
    assert set(given.values()) == {7}
    since = len(worker.log())
    for _ in range(2):
        worker.read_everywhere("project_options", "get_value", project, "mail:subjet_prefix")
    events = worker.events("option.undeclared_read", since=since)
    keys = [(e.get("pid"), e["key"]) for e in events if e["key"] == "mail:subjet_prefix"]
    assert 1 <= len(keys) <= worker.concurrency


def test_set_with_a_reason_then_history_and_explain(ops: Ops) -> None:
    """`set --reason --actor` stores who and why with the change; history (table and JSON) and
    explain (scope row, registry default, unset) show them; producers' headers work the same."""
    project = fresh_id()
    scope = f"project:{project}"
    ops.ok("set", scope, "rate:limit", "42", "--reason", "incident 7", "--actor", "ana", "--wait")
    rows = history(ops, scope, "rate:limit")
    assert [(r["new_value"], r["actor"], r["reason"], r["revision"]) for r in rows] == [
        (42, "ana", "incident 7", 1)
    ]
    table = ops.ok("history", scope)
    assert "ana" in table and "incident 7" in table and "rev" in table

    explained = ops.json("explain", scope, "rate:limit")
    assert explained["source"] == "scope" and explained["value"] == 42
    assert (explained["revision"], explained["actor"], explained["reason"]) == (
        1,
        "ana",
        "incident 7",
    )
    text = ops.ok("explain", scope, "rate:limit")
    assert "from      scope" in text and "incident 7" in text and "r1" in text

    default = ops.json("explain", scope, "mail:subject_prefix")
    assert (default["source"], default["value"]) == ("registry default", "[Sentry]")
    unset = ops.run("explain", scope, "ui:theme", "--json")
    assert unset.returncode == 1 and json.loads(unset.stdout)["source"] == "unset"

    headers = {"optionstore_actor": "deploy-bot", "optionstore_reason": "release 3.1"}
    ops.worker.producer.send_task(
        "options.set_project_option", args=[project, "ui:theme", "dark"], headers=headers
    ).get(timeout=30)
    last = history(ops, scope, "ui:theme")[-1]
    assert (last["actor"], last["reason"]) == ("deploy-bot", "release 3.1")


def test_revert_a_scope_and_a_key(ops: Ops) -> None:
    """`revert --to R` shows the diff and writes nothing without --yes; with it, one set_many
    brings the scope (or key) back as at R and history records a revert with the reason."""
    scope = f"project:{fresh_id()}"
    ops.ok("set", scope, "rate:limit", "1", "--wait")
    ops.ok("set", scope, "ui:theme", '"dark"', "--wait")
    ops.ok("set", scope, "rate:limit", "2", "--wait")

    shown = ops.ok("revert", scope, "--to", "1")
    assert "- rate:limit = 2" in shown and "+ rate:limit = 1" in shown
    assert "+ ui:theme (unset)" in shown and "dry run" in shown
    assert len(history(ops, scope)) == 3

    ops.ok("revert", scope, "--to", "1", "--yes", "--reason", "bad rollout")
    assert ops.json("list", scope)["values"] == {"rate:limit": 1}
    rows = history(ops, scope)
    assert {r["revision"] for r in rows[3:]} == {4}
    assert {(r["reason"], r["origin"]) for r in rows[3:]} == {
        ("revert to r1: bad rollout", "revert")
    }

    key_revert = json.loads(ops.ok("revert", scope, "ui:theme", "--to", "2", "--yes", "--json"))
    assert key_revert["applied"] and key_revert["new_revision"] == 5
    assert ops.json("list", scope)["values"] == {"rate:limit": 1, "ui:theme": "dark"}
    nothing = ops.ok("revert", scope, "ui:theme", "--to", "5")
    assert "nothing to revert" in nothing


def test_a_revert_to_a_value_that_no_longer_validates_is_refused(ops: Ops, backend: Any) -> None:
    """A revert whose old value fails today's registry is an error naming the key, and nothing
    is written."""
    project = fresh_id()
    scope = Scope.parse(f"project:{project}")
    # Written before the registry capped rate:limit at 100 (directly: no registry here).
    backend.commit(set_write(scope, "rate:limit", 500))
    backend.commit(set_write(scope, "rate:limit", 50))
    done = ops.run("revert", scope.name, "--to", "1", "--yes")
    assert done.returncode == 2
    assert "values['rate:limit']: must be at most 100, got 500" in done.stderr
    assert ops.json("get", scope.name, "rate:limit")["revision"] == 2


def test_plan_apply_and_drift(ops: Ops, tmp_path: Path) -> None:
    """`plan` shows the diff against the store; `apply --yes` writes it; a change made outside
    the file afterwards shows as drift (who, why) until the next apply."""
    scope = f"project:{fresh_id()}"
    ops.ok("set", scope, "ui:theme", '"light"', "--wait")
    desired = tmp_path / "desired.json"
    desired.write_text(
        json.dumps(
            {
                "optionstore": 1,
                "scopes": {scope: {"values": {"rate:limit": 10}, "unset": ["ui:theme"]}},
            }
        )
    )
    planned = ops.ok("plan", str(desired))
    assert "+ rate:limit = 10" in planned and "+ ui:theme (unset)" in planned
    assert "0 drifted" in planned

    applied = ops.run("apply", str(desired), "--yes")
    assert applied.returncode == 0, applied.stderr
    assert "committed: 1/1" in applied.stderr  # not a terminal: a plain count
    assert ops.json("list", scope)["values"] == {"rate:limit": 10}
    assert ops.json("plan", str(desired))["scopes"][0]["changes"] == []

    ops.ok("set", scope, "rate:limit", "20", "--actor", "bob", "--reason", "hotfix", "--wait")
    drift = ops.json("plan", str(desired))["scopes"][0]["drift"]
    assert [(d["key"], d["applied"], d["current"], d["actor"], d["reason"]) for d in drift] == [
        ("rate:limit", 10, 20, "bob", "hotfix")
    ]
    assert "drift in " + scope in ops.ok("plan", str(desired))
    ops.ok("apply", str(desired), "--yes")
    again = ops.json("plan", str(desired))["scopes"][0]
    assert again["drift"] == [] and again["changes"] == []
    assert ops.json("get", scope, "rate:limit")["value"] == 10


def generated(scopes: int, keys: int) -> dict[str, Any]:
    """A desired-state document of ``scopes`` fresh projects with ``keys`` options each."""
    kinds = [
        lambda i: i,
        lambda i: f"text {i} é",
        lambda i: [i, None, True],
        lambda i: {"n": i / 4},
        lambda i: None,
    ]
    return {
        "optionstore": 1,
        "scopes": {
            f"project:{fresh_id()}": {
                "prune": True,
                "values": {f"opt:{k:04d}": kinds[k % len(kinds)](k) for k in range(keys)},
            }
            for _ in range(scopes)
        },
    }


@pytest.fixture
def empty_store(services: Services) -> Iterator[Worker]:
    """A worker on a new, empty, migrated database of the target's PostgreSQL server."""
    with fresh_database(services, "rt") as url:
        running = Worker(Services(services.name, url, services.redis_url)).start()
        try:
            yield running
        finally:
            running.stop()


def test_export_apply_export_round_trip_of_10000_options(
    services: Services, worker: Worker, empty_store: Worker, tmp_path: Path
) -> None:
    """10,000 options over 100 scopes, applied and exported, then applied on an empty store
    and exported again, give the identical file (without a registry, nothing is refused)."""
    import time

    def cli(target: Worker, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            cwd=ROOT,
            env=target.env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done

    document = generated(100, 100)
    source = tmp_path / "source.json"
    source.write_text(json.dumps(document))
    timings = {}
    started = time.perf_counter()
    cli(worker, "apply", str(source), "--yes", "--timeout", "300")
    timings["apply (first store)"] = time.perf_counter() - started
    first = tmp_path / "first.json"
    started = time.perf_counter()
    cli(worker, "export", *document["scopes"], "-o", str(first))
    timings["export"] = time.perf_counter() - started
    assert json.loads(first.read_text()) == json.loads(json.dumps(document))

    started = time.perf_counter()
    applied = cli(empty_store, "apply", str(first), "--yes", "--timeout", "300")
    timings["apply (empty store)"] = time.perf_counter() - started
    assert "committed: 100/100" in applied.stderr
    started = time.perf_counter()
    second = cli(empty_store, "export", "--all").stdout
    timings["export --all"] = time.perf_counter() - started
    assert second == first.read_text()
    print(
        "round trip of 10,000 options over 100 scopes: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    )


def test_helpers_take_actor_and_reason(services: Services, ops: Ops, backend: Any) -> None:
    """The write tasks' ``apply_async`` (what the Python helpers are) takes ``actor=`` and
    ``reason=``, checks them and today's registry before enqueueing, and sends them as headers."""
    from celery import Celery

    import tasks

    producer = Celery("helpers", broker=services.broker_url)
    producer.conf.update(task_serializer="json", task_default_queue=ops.worker.queue)
    sending = store.runtime.task_app
    registered = tasks.register(producer)
    try:
        project = fresh_id()
        registered["options.set_project_option"].apply_async(
            [project, "rate:limit", 5], actor="svc", reason="migration"
        )
        with pytest.raises(InvalidOption, match="actor"):
            registered["options.set_project_option"].apply_async(
                [project, "rate:limit", 6], actor="bad\x00actor"
            )
    finally:
        store.runtime.task_app = sending  # the helpers go back to the app they sent through
    rows = wait_for(lambda: backend.db.history(f"project:{project}"), message="the write")
    assert [(r.new_value, r.actor, r.reason) for r in rows] == [(5, "svc", "migration")]
