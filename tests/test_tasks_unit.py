"""The write tasks in process: input checks before enqueueing, the Writes they build, retries."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import psycopg
import psycopg_pool
import pytest
import redis
from celery.exceptions import Retry

import store
import tasks
import worker  # noqa: F401 (the project app: the helpers send through it)
from store.errors import InvalidOption, StoreUnavailable
from store.model.scopes import project_scope
from store.model.writes import TAG_KEY_PRESENT, Write
from store.postgres.store import PostgresStore
from tasks.base import WriteTask, worth_retrying
from tests.conftest import fresh_id

CONTRACT_TASKS = {
    "options.set_option": tasks.set_option,
    "options.unset_option": tasks.unset_option,
    "options.set_project_option": tasks.set_project_option,
    "options.unset_project_option": tasks.unset_project_option,
    "options.set_user_option": tasks.set_user_option,
    "options.unset_user_option": tasks.unset_user_option,
    "options.set_group_meta": tasks.set_group_meta,
    "options.unset_group_meta": tasks.unset_group_meta,
    "options.add_tag_key": tasks.add_tag_key,
    "options.remove_tag_key": tasks.remove_tag_key,
    "options.set_many": tasks.set_many,
}


def _task_id() -> str:
    return f"test-{uuid.uuid4()}"


class SentRecorder:
    """Stands in for app.send_task: records what would have reached the broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Any]] = []

    def __call__(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        self.sent.append((name, args, kwargs))
        return SimpleNamespace(id=options.get("task_id") or "recorded")


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> SentRecorder:
    recorder = SentRecorder()
    app = tasks.set_option.app
    assert not app.conf.task_always_eager
    monkeypatch.setattr(app, "send_task", recorder)
    return recorder


BAD_CALLS = [
    (tasks.set_option, ("", 1), "key"),
    (tasks.set_option, ("k", float("nan")), "value"),
    (tasks.unset_option, ("k" * 65,), "key"),
    (tasks.set_project_option, (0, "k", 1), "project_id"),
    (tasks.set_project_option, (True, "k", 1), "project_id"),
    (tasks.unset_project_option, ("1", "k"), "project_id"),
    (tasks.set_user_option, (0, None, "k", 1), "user_id"),
    (tasks.set_user_option, (1, 0, "k", 1), "project_id"),
    (tasks.unset_user_option, (1, 2**63, "k"), "project_id"),
    (tasks.set_group_meta, (1, "k", {1: 2}), "value"),
    (tasks.set_group_meta, (1, "k", (1, 2)), "value"),
    (tasks.unset_group_meta, (-1, "k"), "group_id"),
    (tasks.add_tag_key, (1, "t" * 33), "key"),
    (tasks.remove_tag_key, (1, ""), "key"),
    (tasks.set_many, ("tagkeys:1", {"a": 1}, []), "scope"),
    (tasks.set_many, ("project:01", {"a": 1}, []), "scope"),
    (tasks.set_many, ("global", {"a": 1}, ["a"]), "unset[0]"),
    (tasks.set_many, ("global", {"a": float("inf")}, []), "values['a']"),
    (tasks.set_many, ("global", [["a", 1]], []), "values"),
    (tasks.set_many, ("global", {}, []), "values"),
]


@pytest.mark.parametrize(
    ("task", "args", "field"), BAD_CALLS, ids=[f"{t.name}-{f}" for t, _, f in BAD_CALLS]
)
def test_delay_with_bad_input_raises_before_enqueueing(
    broker: SentRecorder, task: Any, args: tuple[Any, ...], field: str
) -> None:
    """delay() with input breaking a rule raises InvalidOption naming the field; nothing is sent."""
    with pytest.raises(InvalidOption) as caught:
        task.delay(*args)
    assert caught.value.field == field
    assert broker.sent == []


def test_apply_async_with_bad_keyword_input_raises_before_enqueueing(broker: SentRecorder) -> None:
    """apply_async(kwargs=...) is checked like positional args before anything is sent."""
    with pytest.raises(InvalidOption) as caught:
        tasks.set_project_option.apply_async(kwargs={"project_id": 0, "key": "k", "value": 1})
    assert caught.value.field == "project_id"
    with pytest.raises(TypeError):
        tasks.set_option.apply_async(args=["only-a-key"])
    assert broker.sent == []


def test_delay_with_good_input_is_sent_by_its_contract_name(broker: SentRecorder) -> None:
    """delay() with good input reaches send_task once, under the task's contract name."""
    tasks.set_project_option.delay(42, "k", {"v": 1})
    tasks.set_many.apply_async(args=["user:7/project:42", {"a": 1}, ["b"]])
    assert [(name, list(args), kwargs or {}) for name, args, kwargs in broker.sent] == [
        ("options.set_project_option", [42, "k", {"v": 1}], {}),
        ("options.set_many", ["user:7/project:42", {"a": 1}, ["b"]], {}),
    ]


def test_task_value_limit_follows_the_configured_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tasks apply the store's max_value_bytes (OPTIONS_MAX_VALUE_BYTES), to the byte."""
    monkeypatch.setattr(store.runtime, "max_value_bytes", lambda: 10)
    assert tasks.set_option.run("k", "x" * 8).sets == {"k": '"xxxxxxxx"'}
    with pytest.raises(InvalidOption) as caught:
        tasks.set_group_meta.run(1, "k", "x" * 9)
    assert caught.value.field == "value"
    with pytest.raises(InvalidOption) as caught:
        tasks.set_many.run("global", {"k": "x" * 9}, [])
    assert caught.value.field == "values['k']"


GOOD_CALLS = [
    (tasks.set_option, ("k", [1]), "global", {"k": "[1]"}, ()),
    (tasks.unset_option, ("k",), "global", {}, ("k",)),
    (tasks.set_project_option, (42, "k", "v"), "project:42", {"k": '"v"'}, ()),
    (tasks.unset_project_option, (42, "k"), "project:42", {}, ("k",)),
    (tasks.set_user_option, (7, None, "k", 1), "user:7", {"k": "1"}, ()),
    (tasks.set_user_option, (7, 42, "k", 1), "user:7/project:42", {"k": "1"}, ()),
    (tasks.unset_user_option, (7, None, "k"), "user:7", {}, ("k",)),
    (tasks.unset_user_option, (7, 42, "k"), "user:7/project:42", {}, ("k",)),
    (tasks.set_group_meta, (9, "k", None), "group:9", {"k": "null"}, ()),
    (tasks.unset_group_meta, (9, "k"), "group:9", {}, ("k",)),
    (tasks.add_tag_key, (42, "browser"), "tagkeys:42", {"browser": TAG_KEY_PRESENT}, ()),
    (tasks.remove_tag_key, (42, "browser"), "tagkeys:42", {}, ("browser",)),
    (tasks.set_many, ("group:9", {"a": 1}, ["b"]), "group:9", {"a": "1"}, ("b",)),
]


@pytest.mark.parametrize(
    ("task", "args", "scope", "sets", "unsets"),
    GOOD_CALLS,
    ids=[f"{t.name}-{s}" for t, _, s, _, _ in GOOD_CALLS],
)
def test_run_builds_the_write_for_its_canonical_scope(
    task: Any, args: tuple[Any, ...], scope: str, sets: dict[str, str], unsets: tuple[str, ...]
) -> None:
    """Each task's run() turns good arguments into a Write on the contract's canonical scope."""
    write = task.run(*args)
    assert write.scope.name == scope
    assert dict(write.sets) == sets
    assert write.unsets == unsets


def test_every_contract_task_is_registered_as_a_write_task() -> None:
    """The app knows all eleven contract names, each a WriteTask acknowledged late."""
    app = tasks.set_option.app
    for name, task in CONTRACT_TASKS.items():
        assert app.tasks[name] is task._get_current_object()
        assert isinstance(task, WriteTask)
        assert task.acks_late and task.reject_on_worker_lost
        assert task.max_retries is None


def test_invalid_input_is_not_a_transient_error() -> None:
    """InvalidOption (and ValueError at large) is outside the retry list; service errors are in."""
    assert not worth_retrying(InvalidOption("key", "too long"))
    assert not worth_retrying(ValueError("bad"))
    for error in (
        psycopg.OperationalError("connection refused"),
        psycopg_pool.PoolTimeout("no connection"),
        redis.exceptions.ConnectionError("down"),
        StoreUnavailable("down"),
    ):
        assert worth_retrying(error)
    for task in CONTRACT_TASKS.values():
        assert not any(
            issubclass(InvalidOption, kind) for kind in getattr(task, "autoretry_for", ()) or ()
        )


def test_backoff_is_jittered_below_a_growing_capped_ceiling() -> None:
    """The retry countdown is within [0, min(60, 0.5 * 2**retries)] seconds."""
    task = tasks.set_option
    for retries, ceiling in ((0, 0.5), (3, 4.0), (20, 60.0)):
        delays = [task.backoff(retries) for _ in range(200)]
        assert all(0 <= delay <= ceiling for delay in delays)
    assert max(task.backoff(20) for _ in range(200)) > 4.0  # the cap is 60, not the base


# -- eager runs against the real store ----------------------------------------------


def test_eager_run_commits_and_returns_the_contract_result(backend: Any) -> None:
    """A task applied eagerly commits its write and returns scope, revision and changed."""
    project = fresh_id()
    outcome = tasks.set_project_option.apply(args=[project, "k", {"a": 1}], task_id=_task_id())
    assert outcome.successful(), outcome.traceback
    result = outcome.get()
    assert (result["scope"], result["revision"], result["changed"]) == (
        f"project:{project}",
        1,
        True,
    )
    assert result["keys"] == ["k"]
    assert backend.db.load_scope(f"project:{project}").values == {"k": '{"a":1}'}
    assert store.project_options.get_value(project, "k") == {"a": 1}


def test_rerun_with_the_same_task_id_is_idempotent(backend: Any) -> None:
    """A second apply with the same task id returns the same revision and writes nothing."""
    project = fresh_id()
    task_id = _task_id()
    first = tasks.set_project_option.apply(args=[project, "k", "old"], task_id=task_id).get()
    newer = tasks.set_project_option.apply(args=[project, "k", "new"], task_id=_task_id()).get()
    again = tasks.set_project_option.apply(args=[project, "k", "old"], task_id=task_id).get()
    assert again["revision"] == first["revision"] == 1
    assert newer["revision"] == 2
    snapshot = backend.db.load_scope(f"project:{project}")
    assert (snapshot.revision, snapshot.values) == (
        2,
        {"k": '"new"'},
    )  # the redelivery undid nothing


def test_eager_run_with_bad_input_fails_at_once_and_writes_nothing(backend: Any) -> None:
    """A task run with bad input fails with InvalidOption, is not retried and writes nothing."""
    project = fresh_id()
    outcome = tasks.set_project_option.apply(args=[project, "", 1], task_id=_task_id())
    assert outcome.state == "FAILURE"
    assert isinstance(outcome.result, InvalidOption)
    assert outcome.result.field == "key"
    assert backend.db.load_scope(project_scope(project).name).revision == 0


def test_eager_run_with_postgres_down_is_retried_with_backoff(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that cannot reach PostgreSQL asks for a retry with a jittered countdown."""
    task = tasks.set_project_option._get_current_object()
    requested: list[dict[str, Any]] = []

    def record_retry(**options: Any) -> Retry:
        # Celery would re-run an eager task at once, forever (max_retries=None): record instead.
        requested.append(options)
        return Retry(exc=options.get("exc"), when=options.get("countdown"))

    down = PostgresStore(conninfo="postgresql://postgres@127.0.0.1:1/optionstore", timeout=1.0)
    monkeypatch.setattr(store.backend, "postgres", down)
    monkeypatch.setattr(task, "retry", record_retry)
    try:
        outcome = task.apply(args=[fresh_id(), "k", 1], task_id=_task_id())
    finally:
        down.close()
    assert outcome.state == "RETRY"
    assert len(requested) == 1
    assert worth_retrying(requested[0]["exc"])
    assert 0 <= requested[0]["countdown"] <= task.retry_backoff_base


def test_expected_revision_is_sent_as_a_keyword_and_checked_first(broker: SentRecorder) -> None:
    """A helper's expected_revision goes out as the task's keyword argument; a bad one is
    refused before anything is sent, naming the field."""
    tasks.set_project_option.apply_async([42, "k", 1], expected_revision=7)
    tasks.set_option.delay("k", 1, expected_revision=0)
    assert [(name, kwargs) for name, _, kwargs in broker.sent] == [
        ("options.set_project_option", {"expected_revision": 7}),
        ("options.set_option", {"expected_revision": 0}),
    ]
    for bad in (-1, True, "7", 2**63):
        with pytest.raises(InvalidOption) as caught:
            tasks.set_option.apply_async(["k", 1], expected_revision=bad)
        assert caught.value.field == "expected_revision"
    assert len(broker.sent) == 2


def test_a_write_fingerprint_differs_with_what_it_asks_for() -> None:
    """Two writes have one fingerprint only if scope, sets, unsets and expected revision match."""
    scope = project_scope(42)
    base = Write(scope, {"a": "1"}, ("b",))
    assert base.fingerprint == Write(scope, {"a": "1"}, ("b",)).fingerprint
    others = [
        Write(project_scope(43), {"a": "1"}, ("b",)),
        Write(scope, {"a": "2"}, ("b",)),
        Write(scope, {"a": "1"}, ()),
        Write(scope, {"a": "1"}, ("b",), expected_revision=3),
    ]
    assert len({base.fingerprint, *(w.fingerprint for w in others)}) == 5
