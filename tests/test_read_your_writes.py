"""Read-your-writes tokens (``options_after``) and ``store.snapshot()``, against one real prefork
worker in process mode whose consumers apply ``slow:`` values 10 ms late (tests/slow_apply.py)
and drop ``swallowed:`` broadcasts on the way (tests/broadcast_hooks.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import chain

import store
from store.errors import InvalidToken
from store.tokens import MAX_SCOPES
from tests.conftest import ROOT, Services, Worker, amqp_url, fresh_id, wait_for
from tests.test_broadcast import isolated

ROUNDS = 500
UNTOKENED_ROUNDS = 100

# One target is enough here (the machine's services, as in CI): these tests exercise the
# worker's processes, not the servers.
pytestmark = pytest.mark.parametrize("services", ["machine"], indirect=True)


@pytest.fixture(scope="module")
def ryw_worker(services: Services) -> Iterator[Worker]:
    """Two prefork children in process mode, on a queue of their own."""
    running = Worker(
        services,
        extra_env={
            "OPTIONS_LOCAL_CACHE": "process",
            "OPTIONS_TASK_QUEUE": f"{services.namespace}.ryw",
        },
        include="tests.probe_tasks,tests.slow_apply,tests.broadcast_hooks",
    ).start()
    yield running
    running.stop()


def _write(worker: Worker, project: int, key: str, value: Any) -> dict[str, Any]:
    result: dict[str, Any] = worker.call("options.set_project_option", project, key, value)
    return result


def _read_twice(worker: Worker, project: int, key: str, **options: Any) -> list[dict[str, Any]]:
    """The same read sent twice at once, each holding its child 5 ms: most rounds one runs in
    the child that made the write and one in the other, which heard the write only by its
    broadcast (a child picks up a task only when idle)."""
    pending = [
        worker.send("probe.read", "project_options", "get_value", [project, key], 0.005, **options)
        for _ in range(2)
    ]
    return [answer.get(timeout=30, propagate=True) for answer in pending]


def _warm_both_children(worker: Worker, project: int, key: str) -> None:
    """Both children hold ``project``'s scope (process mode keeps it across tasks)."""
    worker.read_everywhere("project_options", "get_value", project, key)


def test_a_task_with_the_write_token_reads_the_write_every_round(ryw_worker: Worker) -> None:
    project, key = fresh_id(), "ryw"
    _write(ryw_worker, project, key, "slow:0")
    _warm_both_children(ryw_worker, project, key)
    stale, pids = [], set()
    for round_ in range(1, ROUNDS + 1):
        value = f"slow:{round_}"
        written = _write(ryw_worker, project, key, value)
        for answer in _read_twice(ryw_worker, project, key, headers=store.options_after(written)):
            pids.add(answer["pid"])
            if answer["result"] != value:
                stale.append((round_, answer))
    assert stale == [], (
        f"{len(stale)} tokened reads of {ROUNDS} rounds missed the write: {stale[:5]}"
    )
    assert len(pids) == 2  # both children read, every round's write made in one of them


def test_without_the_token_some_tasks_read_the_value_before_the_write(
    ryw_worker: Worker,
) -> None:
    # The same rounds as above, without the header: the other child still applies the
    # broadcast 10 ms after the write returned, so the guarantee is the token's doing.
    project, key = fresh_id(), "ryw"
    _write(ryw_worker, project, key, "slow:0")
    _warm_both_children(ryw_worker, project, key)
    stale = 0
    for round_ in range(1, UNTOKENED_ROUNDS + 1):
        value = f"slow:{round_}"
        _write(ryw_worker, project, key, value)
        stale += sum(answer["result"] != value for answer in _read_twice(ryw_worker, project, key))
    assert stale > 0, f"every untokened read of {UNTOKENED_ROUNDS} rounds saw its write"


def test_a_chain_that_starts_with_a_write_passes_its_token_on(ryw_worker: Worker) -> None:
    project, key = fresh_id(), "chained"
    _write(ryw_worker, project, key, "slow:0")
    _warm_both_children(ryw_worker, project, key)
    producer = ryw_worker.producer
    for round_ in range(1, 21):
        value = f"slow:{round_}"
        steps = chain(
            producer.signature("options.set_project_option", args=[project, key, value]),
            producer.signature("probe.read_chained", args=[project, key]),
        )
        answer = steps.apply_async().get(timeout=30)
        assert answer["token"] == {f"project:{project}": answer["write"]["revision"]}
        assert answer["result"] == value, f"round {round_}: {answer}"


def test_with_the_broadcast_lost_a_tokened_task_loads_the_write_from_the_store(
    ryw_worker: Worker,
) -> None:
    project, key = fresh_id(), "lost"
    _write(ryw_worker, project, key, "before")
    _warm_both_children(ryw_worker, project, key)
    since = len(ryw_worker.log())
    # Dropped on the way (tests/broadcast_hooks.py): only Redis and PostgreSQL have it.
    written = _write(ryw_worker, project, key, "swallowed:after")
    token = store.options_after(written)
    answers = [
        ryw_worker.send(
            "probe.read", "project_options", "get_value", [project, key], 0.2, headers=token
        )
        for _ in range(4)  # held 0.2 s each: both children answer
    ]
    found = [answer.get(timeout=30) for answer in answers]
    assert {answer["result"] for answer in found} == {"swallowed:after"}
    assert len({answer["pid"] for answer in found}) == 2
    scope = f"project:{project}"
    # The child that held the old state waited out the bound, then loaded it.
    loaded = wait_for(
        lambda: [
            event
            for event in ryw_worker.events("token.caught_up", since=since)
            if event.get("outcomes", {}).get(scope) == "loaded"
        ],
        timeout=10,
        message="a token.caught_up event with the scope loaded",
    )
    assert loaded


def test_snapshot_returns_the_same_value_before_and_after_a_write_arrives(
    ryw_worker: Worker, services: Services
) -> None:
    project, key = fresh_id(), "snap"
    _write(ryw_worker, project, key, "old")
    _warm_both_children(ryw_worker, project, key)
    marker = f"{services.namespace}:marker:{uuid.uuid4().hex}"
    pending = ryw_worker.send("probe.snapshot_twice", project, key, marker, "new")
    client = redis.Redis.from_url(services.redis_url)
    wait_for(lambda: client.get(marker), timeout=30, message="the task's first read")
    _write(ryw_worker, project, key, "new")
    answer = pending.get(timeout=30)
    assert answer["plain"] == "new"  # the broadcast arrived while the task ran
    assert (answer["first"], answer["second"]) == ("old", "old")
    assert answer["same_view"] is True


@pytest.mark.parametrize(
    ("token", "field"),
    [
        ("project:1=5", "options_after"),
        ({"project:01": 5}, "options_after['project:01']"),
        ({"nowhere:1": 5}, "options_after['nowhere:1']"),
        ({"project:1": True}, "options_after['project:1']"),
        ({"project:1": 0}, "options_after['project:1']"),
        ({"project:1": 2**63}, "options_after['project:1']"),
        ({f"project:{n}": 1 for n in range(1, MAX_SCOPES + 2)}, "options_after"),
    ],
)
def test_a_malformed_token_fails_the_task_naming_the_field_before_its_body(
    ryw_worker: Worker, services: Services, token: Any, field: str
) -> None:
    marker = f"{services.namespace}:marker:{uuid.uuid4().hex}"
    result = ryw_worker.send("probe.mark", marker, headers={"options_after": token})
    with pytest.raises(InvalidToken) as refused:
        result.get(timeout=30, propagate=True)
    assert refused.value.field == field
    assert redis.Redis.from_url(services.redis_url).get(marker) is None  # the body never ran


def test_a_web_request_that_made_a_write_reads_it_back_after_catch_up(
    ryw_worker: Worker,
) -> None:
    project, rounds = fresh_id(), 50
    done = subprocess.run(
        [sys.executable, "-m", "tests.web_read_back", str(project), "web", str(rounds)],
        cwd=ROOT,
        env=ryw_worker.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["kind"] == "web"
    assert report["stale"]["with_catch_up"] == 0, report
    assert report["stale"]["without"] > 0, report  # the gap catch_up closes is there


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_a_worker_of_another_pool_catches_up_to_a_write_made_elsewhere(
    ryw_worker: Worker, services: Services, pool: str
) -> None:
    # Written by the prefork worker, read by a worker of another pool, whose process heard the
    # write only by its broadcast (applied 10 ms late).
    reader = Worker(
        services,
        pool=pool,
        concurrency=2 if pool == "threads" else 1,
        extra_env={
            "OPTIONS_LOCAL_CACHE": "process",
            "OPTIONS_TASK_QUEUE": f"{services.namespace}.ryw-{pool}",
        },
        include="tests.probe_tasks,tests.slow_apply",
    ).start()
    try:
        project, key = fresh_id(), "pools"
        _write(ryw_worker, project, key, "slow:0")
        reader.call("probe.read", "project_options", "get_value", [project, key])
        missed = {"with": 0, "without": 0}
        for round_ in range(1, 51):
            for way in ("with", "without"):
                value = f"slow:{way}:{round_}"
                written = _write(ryw_worker, project, key, value)
                headers = store.options_after(written) if way == "with" else None
                answer = reader.send(
                    "probe.read", "project_options", "get_value", [project, key], headers=headers
                ).get(timeout=30)
                missed[way] += answer["result"] != value
        assert missed["with"] == 0, missed
        assert missed["without"] > 0, missed
        refused = reader.send("probe.pid", headers={"options_after": {"global": -1}})
        with pytest.raises(InvalidToken):
            refused.get(timeout=30, propagate=True)
    finally:
        reader.stop()


def test_on_rabbitmq_the_token_travels_as_an_amqp_header(services: Services) -> None:
    # RabbitMQ carries the header as an AMQP table: the token must come out as it went in.
    broker = amqp_url()
    with isolated(services, broker) as own:
        rabbit = Worker(
            own,
            broker_url=broker,
            extra_env={"OPTIONS_LOCAL_CACHE": "process"},
            include="tests.probe_tasks,tests.slow_apply",
        ).start()
        try:
            project, key = fresh_id(), "amqp"
            _write(rabbit, project, key, "slow:0")
            _warm_both_children(rabbit, project, key)
            missed = {"with": 0, "without": 0}
            for round_ in range(1, 101):
                for way in ("with", "without"):
                    value = f"slow:{way}:{round_}"
                    written = _write(rabbit, project, key, value)
                    headers = store.options_after(written) if way == "with" else None
                    answers = _read_twice(rabbit, project, key, headers=headers)
                    missed[way] += sum(answer["result"] != value for answer in answers)
            assert missed["with"] == 0, missed
            assert missed["without"] > 0, missed
            steps = chain(
                rabbit.producer.signature("options.set_project_option", args=[project, key, 1]),
                rabbit.producer.signature("probe.read_chained", args=[project, key]),
            )
            answer = steps.apply_async().get(timeout=30)
            assert (answer["result"], answer["token"]) == (
                1,
                {f"project:{project}": answer["write"]["revision"]},
            )
            refused = rabbit.send("probe.pid", headers={"options_after": {"global": "1"}})
            with pytest.raises(InvalidToken) as error:
                refused.get(timeout=30, propagate=True)
            assert error.value.field == "options_after['global']"
        finally:
            rabbit.stop()


def test_catch_up_loads_a_scope_held_behind_and_runs_on_when_the_store_is_behind_too(
    backend: Any,
) -> None:
    from store.local import ScopeState
    from store.model.scopes import project_scope
    from store.model.writes import set_write

    project, key = fresh_id(), "loads"
    scope = project_scope(project).name
    result = backend.commit(set_write(project_scope(project), key, "current"))
    # Held one revision behind, and no consumer to bring the broadcast: loaded at the deadline.
    backend.local.scopes[scope] = ScopeState(result.revision - 1, {key: "older"})
    assert store.catch_up({scope: result.revision}, wait=0.05) == {scope: "loaded"}
    assert store.project_options.get_value(project, key) == "current"
    # Not held: loaded now, under the floor.
    backend.local.drop(scope)
    assert store.catch_up({scope: result.revision}) == {scope: "loaded"}
    # A revision no layer has (PostgreSQL went back in time, or a forged header): the task
    # runs on the newest state there is, and the floor goes back, so the scope is cached again.
    ahead = result.revision + 1000
    assert store.catch_up({scope: ahead}, wait=0.01) == {scope: "behind"}
    assert store.project_options.get_value(project, key) == "current"
    assert backend.local.floors[scope] == result.revision
    assert backend.local.scopes[scope].revision == result.revision
