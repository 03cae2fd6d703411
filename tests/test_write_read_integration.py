"""Every write task, sent by name to a real prefork worker, read back inside its children."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import ResultSet

from store.errors import InvalidOption, RevisionConflict
from store.redis.cache import REVISION_FIELD, STALE_FIELD
from tests.conftest import Services, Worker, fresh_id, wait_for

RESULT_FIELDS = {"scope", "revision", "changed"}
# Values a JSON producer can send that are easy to mangle on the way through the caches.
AWKWARD_VALUE = {
    "nul": "a\x00b",
    "snowman": "\u2603 \U0001f600",
    "float": 1.5,
    "big": 2**64,
    "negative": -7,
    "flags": [None, True, False],
    "empty": {},
    "nested": {"b": [1, {"a": "z"}]},
}


def unique_key(prefix: str) -> str:
    """A global option key no other test writes (global options outlive a test)."""
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


def nested(depth: int) -> Any:
    """A value whose containers nest ``depth`` levels deep (lists, with one object)."""
    value: Any = "leaf"
    for level in range(depth):
        value = {"k": value} if level == depth // 2 else [value]
    return value


def everywhere(worker: Worker, reader: str, method: str, *args: Any) -> Any:
    """The answer every prefork child gives to the same read; fails if two children disagree."""
    answers = worker.read_everywhere(reader, method, *args)
    assert len(answers) == worker.concurrency
    distinct = {json.dumps(answer, sort_keys=True) for answer in answers.values()}
    assert len(distinct) == 1, f"children disagree: {answers}"
    return next(iter(answers.values()))


def check_result(result: dict[str, Any], scope: str, *, changed: bool = True) -> int:
    """Assert the contract's result shape and return its revision."""
    assert set(result) >= RESULT_FIELDS, result
    assert result["scope"] == scope
    assert type(result["revision"]) is int
    assert result["revision"] >= 1
    assert result["changed"] is changed
    return int(result["revision"])


def write_events(worker: Worker, task_id: str) -> list[dict[str, Any]]:
    """The ``option.write`` events the worker logged for ``task_id``."""
    events = []
    for line in worker.log().splitlines():
        if task_id not in line or not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:  # a line the worker is still writing
            continue
        if event.get("event") == "option.write" and event.get("task_id") == task_id:
            events.append(event)
    return events


def wait_for_write_events(worker: Worker, task_id: str, count: int) -> list[dict[str, Any]]:
    """Wait until the worker has logged ``count`` write events for ``task_id``; return them."""

    def logged() -> list[dict[str, Any]] | None:
        events = write_events(worker, task_id)
        return events if len(events) >= count else None

    events: list[dict[str, Any]] = wait_for(
        logged, timeout=30, message=f"{count} option.write events for {task_id}"
    )
    assert len(events) == count, events
    return events


def revision_of(backend: Any, scope: str) -> int:
    return int(backend.db.load_scope(scope).revision)


# -- every write task, read back in every child -----------------------------------------------


def test_global_option_set_and_unset_by_name_are_read_in_every_child(worker: Worker) -> None:
    """set_option and unset_option sent by name change what options.get_value/get_all_values
    return in every child."""
    key = unique_key("it:global")
    first = worker.call("options.set_option", key, AWKWARD_VALUE)
    set_revision = check_result(first, "global")

    assert everywhere(worker, "options", "get_value", key) == AWKWARD_VALUE
    assert everywhere(worker, "options", "get_all_values")[key] == AWKWARD_VALUE

    second = worker.call("options.unset_option", key)
    assert check_result(second, "global") > set_revision
    assert everywhere(worker, "options", "get_value", key, "fallback") == "fallback"
    assert key not in everywhere(worker, "options", "get_all_values")


def test_project_option_written_by_name_is_read_in_every_child(worker: Worker) -> None:
    """A set_project_option sent by name is what every prefork child then reads."""
    project = fresh_id()
    result = worker.call("options.set_project_option", project, "mail:subject_prefix", "[Prod]")
    assert result["scope"] == f"project:{project}"
    assert result["changed"] is True
    answers = worker.read_everywhere("project_options", "get_value", project, "mail:subject_prefix")
    assert len(answers) == 2
    assert set(map(str, answers.values())) == {"[Prod]"}


def test_project_options_by_name_cover_get_all_values_bulk_and_unset(worker: Worker) -> None:
    """set/unset_project_option move project_options.get_value, get_all_values and
    get_value_bulk forward in every child, one revision per changed write."""
    project, other, unset_project = fresh_id(), fresh_id(), fresh_id()
    scope = f"project:{project}"
    assert check_result(worker.call("options.set_project_option", project, "a", 1), scope) == 1
    assert (
        check_result(worker.call("options.set_project_option", project, "b", AWKWARD_VALUE), scope)
        == 2
    )
    worker.call("options.set_project_option", other, "a", "other")

    assert everywhere(worker, "project_options", "get_value", project, "b") == AWKWARD_VALUE
    assert everywhere(worker, "project_options", "get_all_values", project) == {
        "a": 1,
        "b": AWKWARD_VALUE,
    }
    bulk = everywhere(
        worker, "project_options", "get_value_bulk", [project, other, unset_project], "a"
    )
    assert bulk == {str(project): 1, str(other): "other"}

    unset = worker.call("options.unset_project_option", project, "a")
    assert check_result(unset, scope) == 3
    assert everywhere(worker, "project_options", "get_value", project, "a", "gone") == "gone"
    assert everywhere(worker, "project_options", "get_all_values", project) == {"b": AWKWARD_VALUE}
    assert everywhere(worker, "project_options", "get_value_bulk", [project, other], "a") == {
        str(other): "other"
    }


def test_user_options_by_name_keep_user_and_user_project_scopes_apart(worker: Worker) -> None:
    """set_user_option with and without a project writes user:U and user:U/project:P
    separately, and unset_user_option removes only its own scope's key, in every child."""
    user, project = fresh_id(), fresh_id()
    plain = worker.call("options.set_user_option", user, None, "timezone", "UTC")
    check_result(plain, f"user:{user}")
    scoped = worker.call("options.set_user_option", user, project, "timezone", "Europe/Paris")
    check_result(scoped, f"user:{user}/project:{project}")

    assert everywhere(worker, "user_options", "get_value", user, None, "timezone") == "UTC"
    assert (
        everywhere(worker, "user_options", "get_value", user, project, "timezone") == "Europe/Paris"
    )
    assert everywhere(worker, "user_options", "get_all_values", user, None) == {"timezone": "UTC"}
    assert everywhere(worker, "user_options", "get_all_values", user, project) == {
        "timezone": "Europe/Paris"
    }

    removed = worker.call("options.unset_user_option", user, project, "timezone")
    check_result(removed, f"user:{user}/project:{project}")
    assert everywhere(worker, "user_options", "get_all_values", user, project) == {}
    assert everywhere(worker, "user_options", "get_value", user, None, "timezone") == "UTC"

    removed = worker.call("options.unset_user_option", user, None, "timezone")
    check_result(removed, f"user:{user}")
    assert everywhere(worker, "user_options", "get_value", user, None, "timezone", "-") == "-"


def test_group_meta_by_name_returns_values_not_rows(worker: Worker) -> None:
    """set/unset_group_meta sent by name change group_meta.get_value (the value itself, or
    the default when missing) and get_value_bulk in every child."""
    group, other, missing = fresh_id(), fresh_id(), fresh_id()
    check_result(
        worker.call("options.set_group_meta", group, "jira:issue", {"id": 7}), f"group:{group}"
    )
    worker.call("options.set_group_meta", other, "jira:issue", {"id": 8})

    assert everywhere(worker, "group_meta", "get_value", group, "jira:issue") == {"id": 7}
    assert everywhere(worker, "group_meta", "get_value", missing, "jira:issue", "none") == "none"
    assert everywhere(
        worker, "group_meta", "get_value_bulk", [group, other, missing], "jira:issue"
    ) == {str(group): {"id": 7}, str(other): {"id": 8}}

    check_result(worker.call("options.unset_group_meta", group, "jira:issue"), f"group:{group}")
    assert everywhere(worker, "group_meta", "get_value", group, "jira:issue") is None
    assert everywhere(worker, "group_meta", "get_value_bulk", [group, other], "jira:issue") == {
        str(other): {"id": 8}
    }


def test_tag_keys_by_name_are_listed_sorted_and_invalidated_on_change(worker: Worker) -> None:
    """add_tag_key and remove_tag_key sent by name change tag_keys.all_keys (sorted) in
    every child, and adding a present key changes nothing."""
    project = fresh_id()
    scope = f"tagkeys:{project}"
    for key in ("server_name", "browser", "level"):
        check_result(worker.call("options.add_tag_key", project, key), scope)
    assert everywhere(worker, "tag_keys", "all_keys", project) == [
        "browser",
        "level",
        "server_name",
    ]

    again = worker.call("options.add_tag_key", project, "level")
    assert check_result(again, scope, changed=False) == 3
    removed = worker.call("options.remove_tag_key", project, "browser")
    assert check_result(removed, scope) == 4
    assert everywhere(worker, "tag_keys", "all_keys", project) == ["level", "server_name"]


def test_set_many_by_name_sets_and_unsets_in_one_revision(worker: Worker, backend: Any) -> None:
    """set_many sent by name sets and unsets several keys of one scope in a single revision,
    and every child reads the whole result."""
    project = fresh_id()
    scope = f"project:{project}"
    worker.call("options.set_project_option", project, "old", "x")
    result = worker.call("options.set_many", scope, {"a": 1, "b": [2], "c": None}, ["old"])
    assert check_result(result, scope) == 2
    assert everywhere(worker, "project_options", "get_all_values", project) == {
        "a": 1,
        "b": [2],
        "c": None,
    }
    revisions = {entry.revision for entry in backend.db.history(scope)}
    assert revisions == {1, 2}

    user = fresh_id()
    for_user = worker.call("options.set_many", f"user:{user}/project:{project}", {"k": True}, [])
    assert check_result(for_user, f"user:{user}/project:{project}") == 1
    assert everywhere(worker, "user_options", "get_value", user, project, "k") is True


# -- input rules -------------------------------------------------------------------------------


def expect_rejected(worker: Worker, backend: Any, name: str, args: list[Any], field: str) -> Any:
    """Send a bad task by name: it fails at once naming ``field``, unretried, writing nothing."""
    result = worker.send(name, *args)
    with pytest.raises(Exception) as info:
        result.get(timeout=15, propagate=True)
    assert not isinstance(info.value, ResultTimeout), "the task neither failed nor succeeded"
    assert result.state == "FAILURE"
    assert f"{field}:" in str(info.value), f"error does not name {field!r}: {info.value}"
    assert isinstance(info.value, InvalidOption), repr(info.value)
    assert info.value.field == field
    # The log line of the failure lands just after the result; then there must be no retry.
    wait_for(
        lambda: f"[{result.id}] raised unexpected" in worker.log(),
        timeout=10,
        message=f"the worker to log the failure of {result.id}",
    )
    lines = [line for line in worker.log().splitlines() if result.id in line]
    assert not [line for line in lines if "retry" in line.lower()], lines
    assert backend.db.write_records([result.id]) == {}
    return info.value


LONG_KEY = "k" * 65
LONG_TAG = "t" * 33


class BadCall(NamedTuple):
    """A task sent with bad input: the field its error must name, the scope it must not touch."""

    name: str
    make_args: Callable[[int], list[Any]]
    field: str
    scope: str | None  # formatted with p=<the test's fresh id>


BAD_CALLS = [
    BadCall("options.set_option", lambda p: [LONG_KEY, 1], "key", "global"),
    BadCall("options.set_option", lambda p: ["", 1], "key", "global"),
    BadCall("options.set_option", lambda p: ["bell\x07key", 1], "key", "global"),
    BadCall("options.unset_option", lambda p: [LONG_KEY], "key", "global"),
    BadCall("options.set_project_option", lambda p: [p, 5, 1], "key", "project:{p}"),
    BadCall("options.set_project_option", lambda p: [p, "k", nested(33)], "value", "project:{p}"),
    BadCall("options.set_project_option", lambda p: [0, "k", 1], "project_id", None),
    BadCall("options.set_project_option", lambda p: [True, "k", 1], "project_id", None),
    BadCall("options.set_project_option", lambda p: [2**63, "k", 1], "project_id", None),
    BadCall("options.set_project_option", lambda p: [str(p), "k", 1], "project_id", "project:{p}"),
    BadCall("options.set_project_option", lambda p: [1.0, "k", 1], "project_id", None),
    BadCall("options.unset_project_option", lambda p: [-p, "k"], "project_id", None),
    BadCall("options.set_user_option", lambda p: [p, 0, "k", 1], "project_id", "user:{p}"),
    BadCall("options.set_user_option", lambda p: [False, None, "k", 1], "user_id", None),
    BadCall("options.unset_user_option", lambda p: [p, None, LONG_KEY], "key", "user:{p}"),
    BadCall("options.set_group_meta", lambda p: [2**63, "k", 1], "group_id", None),
    BadCall("options.unset_group_meta", lambda p: [p, ""], "key", "group:{p}"),
    BadCall("options.add_tag_key", lambda p: [p, LONG_TAG], "key", "tagkeys:{p}"),
    BadCall("options.remove_tag_key", lambda p: [p, LONG_TAG], "key", "tagkeys:{p}"),
    BadCall(
        "options.set_many",
        lambda p: [f"project:{p}", {"a": 1, "b": 2, "c": nested(33)}, []],
        "values['c']",
        "project:{p}",
    ),
    BadCall("options.set_many", lambda p: [f"tagkeys:{p}", {"a": 1}, []], "scope", "tagkeys:{p}"),
    BadCall("options.set_many", lambda p: [f"project:0{p}", {"a": 1}, []], "scope", None),
    BadCall(
        "options.set_many",
        lambda p: [f"project:{p}", {"a": 1}, ["a"]],
        "unset[0]",
        "project:{p}",
    ),
    BadCall("options.set_many", lambda p: [f"project:{p}", {}, []], "values", "project:{p}"),
    BadCall("options.set_many", lambda p: [f"project:{p}", [1], []], "values", "project:{p}"),
    BadCall("options.set_many", lambda p: [f"project:{p}", {"a": 1}, "a"], "unset", "project:{p}"),
    # OPTIONS_MAX_WRITE_KEYS (10,000 by default): one key past it, counted over values and unset.
    BadCall(
        "options.set_many",
        lambda p: [
            f"project:{p}",
            {f"k{i}": i for i in range(9_000)},
            [f"u{i}" for i in range(1_001)],
        ],
        "values",
        "project:{p}",
    ),
]


@pytest.mark.parametrize(
    "bad", BAD_CALLS, ids=[f"{b.name.removeprefix('options.')}-{b.field}" for b in BAD_CALLS]
)
def test_bad_payload_sent_by_name_fails_at_once_naming_the_field(
    worker: Worker, backend: Any, bad: BadCall
) -> None:
    """A task sent by name with bad input fails at once with an error naming the field, is not
    retried, and leaves PostgreSQL untouched."""
    project = fresh_id()
    args = bad.make_args(project)
    global_before = revision_of(backend, "global")
    expect_rejected(worker, backend, bad.name, args, bad.field)
    if bad.scope == "global":
        # Global options outlive a test: the bad key must leave no trace, the revision stays.
        snapshot = backend.db.load_scope("global")
        assert args[0] not in snapshot.values
        assert backend.db.history("global", args[0]) == []
        assert snapshot.revision == global_before
    elif bad.scope is not None:
        scope_name = bad.scope.format(p=project)
        assert backend.db.load_scope(scope_name).revision == 0
        assert backend.db.history(scope_name) == []


def test_values_at_the_limits_are_accepted_and_read_back(worker: Worker, backend: Any) -> None:
    """A 64-character key, a 32-character tag key, a value nested exactly 32 deep and the
    largest id (2**63-1) are accepted and read back in every child."""
    largest = 2**63 - 1
    key = ("limit:" + uuid.uuid4().hex * 2)[:64]
    tag = ("tag" + uuid.uuid4().hex)[:32]
    deepest = nested(32)

    check_result(
        worker.call("options.set_project_option", largest, key, deepest), f"project:{largest}"
    )
    check_result(worker.call("options.add_tag_key", largest, tag), f"tagkeys:{largest}")
    check_result(worker.call("options.set_group_meta", largest, key, 1), f"group:{largest}")
    user_scope = f"user:{largest}/project:{largest}"
    check_result(worker.call("options.set_user_option", largest, largest, key, "u"), user_scope)

    assert everywhere(worker, "project_options", "get_value", largest, key) == deepest
    assert tag in everywhere(worker, "tag_keys", "all_keys", largest)
    assert everywhere(worker, "group_meta", "get_value_bulk", [largest], key) == {str(largest): 1}
    assert everywhere(worker, "user_options", "get_value", largest, largest, key) == "u"
    assert json.loads(backend.db.load_scope(f"project:{largest}").values[key]) == deepest


def test_value_size_limit_comes_from_the_environment(services: Services, backend: Any) -> None:
    """With OPTIONS_MAX_VALUE_BYTES=1000 a value encoding to 1000 bytes is written and one of
    1001 bytes fails naming the field, unretried, writing nothing."""
    small = Worker(
        services,
        pool="solo",
        concurrency=1,
        extra_env={
            "OPTIONS_MAX_VALUE_BYTES": "1000",
            "OPTIONS_TASK_QUEUE": f"{services.namespace}.small",
        },
    )
    try:
        small.start()
        project = fresh_id()
        fits = "x" * 998  # 1000 bytes once quoted
        result = small.call("options.set_project_option", project, "fits", fits)
        check_result(result, f"project:{project}")
        expect_rejected(
            small, backend, "options.set_project_option", [project, "big", fits + "x"], "value"
        )
        expect_rejected(
            small,
            backend,
            "options.set_many",
            [f"project:{project}", {"ok": 1, "big": fits + "x"}, []],
            "values['big']",
        )
        snapshot = backend.db.load_scope(f"project:{project}")
        assert snapshot.revision == 1
        assert snapshot.values == {"fits": json.dumps(fits)}
    finally:
        small.stop()


def test_wrong_number_of_arguments_fails_clearly(worker: Worker, backend: Any) -> None:
    """A task sent with too few or too many arguments fails at once with a TypeError that says
    so, and writes nothing."""
    project = fresh_id()
    missing = worker.send("options.set_project_option", project, "k")
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'value'"):
        missing.get(timeout=15)
    extra = worker.send("options.unset_project_option", project, "k", "surplus")
    with pytest.raises(TypeError, match="positional arguments but 3 were given"):
        extra.get(timeout=15)
    assert missing.state == extra.state == "FAILURE"
    assert backend.db.load_scope(f"project:{project}").revision == 0


@pytest.mark.parametrize(
    ("name", "make_args"),
    [
        ("options.set_project_option", lambda p: [p, "k", "\ud800"]),
        ("options.set_project_option", lambda p: [p, "bad\udfffkey", 1]),
    ],
    ids=["value", "key"],
)
def test_lone_surrogate_fails_at_once_and_writes_nothing(
    worker: Worker, backend: Any, name: str, make_args: Any
) -> None:
    """A string with a lone surrogate (valid JSON escape, not Unicode) fails the task at once,
    unretried, and writes nothing."""
    project = fresh_id()
    result = worker.send(name, *make_args(project))
    with pytest.raises(InvalidOption):
        result.get(timeout=15)
    assert result.state == "FAILURE"
    wait_for(lambda: f"[{result.id}] raised unexpected" in worker.log(), timeout=10)
    assert not [
        line for line in worker.log().splitlines() if result.id in line and "retry" in line.lower()
    ]
    assert backend.db.load_scope(f"project:{project}").revision == 0


@pytest.mark.parametrize(
    ("make_args", "field"),
    [
        (lambda p: [p, "k", "\ud800"], "value"),
        (lambda p: [p, "bad\udfffkey", 1], "key"),
    ],
    ids=["value", "key"],
)
def test_lone_surrogate_error_names_the_field(
    worker: Worker, backend: Any, make_args: Any, field: str
) -> None:
    """A lone surrogate in a key or value is bad input, so its error names that field."""
    expect_rejected(worker, backend, "options.set_project_option", make_args(fresh_id()), field)


def test_rejection_reaches_the_producer_as_invalid_option(worker: Worker) -> None:
    """A producer waiting on a rejected task gets InvalidOption (a ValueError) with its field."""
    result = worker.send("options.set_project_option", fresh_id(), LONG_KEY, 1)
    with pytest.raises(InvalidOption) as info:
        result.get(timeout=15)
    assert info.value.field == "key"
    assert isinstance(info.value, ValueError)


# -- idempotent re-runs ------------------------------------------------------------------------


def test_rerun_with_the_same_task_id_returns_the_first_result(worker: Worker, backend: Any) -> None:
    """Running a write again under its task id (a redelivery) returns the first run's revision,
    adds no history and does not move the revision."""
    project = fresh_id()
    scope = f"project:{project}"
    task_id = str(uuid.uuid4())
    first = worker.send("options.set_project_option", project, "k", "v", task_id=task_id)
    first_result = first.get(timeout=30)
    assert check_result(first_result, scope) == 1

    first.forget()  # so the second get() waits for the second run's own result
    second = worker.send("options.set_project_option", project, "k", "v", task_id=task_id)
    second_result = second.get(timeout=30)
    events = wait_for_write_events(worker, task_id, 2)
    assert [e["first_run"] for e in events] == [True, False]
    assert second_result["revision"] == first_result["revision"] == 1
    assert second_result["scope"] == scope
    assert revision_of(backend, scope) == 1
    history = backend.db.history(scope, "k")
    assert [(h.revision, h.task_id) for h in history] == [(1, task_id)]


def test_concurrent_redeliveries_of_one_task_commit_once(worker: Worker, backend: Any) -> None:
    """Two copies of one task (same id) running at once commit one revision and one history
    entry between them."""
    project = fresh_id()
    scope = f"project:{project}"
    worker.call("options.set_project_option", project, "k", "before")
    task_id = str(uuid.uuid4())
    copies = [
        worker.send("options.set_many", scope, {"k": "after", "j": 2}, [], task_id=task_id)
        for _ in range(2)
    ]
    events = wait_for_write_events(worker, task_id, 2)
    assert sorted(e["first_run"] for e in events) == [False, True]
    assert {e["revision"] for e in events} == {2}
    assert copies[0].get(timeout=10)["revision"] == 2
    assert revision_of(backend, scope) == 2
    history = backend.db.history(scope)
    assert [h.revision for h in history] == [1, 2, 2]
    assert {(h.key, h.old_value, h.new_value, h.task_id) for h in history[1:]} == {
        ("k", "before", "after", task_id),
        ("j", None, 2, task_id),
    }


def test_late_rerun_does_not_bring_back_an_older_value(worker: Worker, backend: Any) -> None:
    """A write re-run after a newer write returns its old result and leaves the newer value."""
    project = fresh_id()
    scope = f"project:{project}"
    task_id = str(uuid.uuid4())
    older = worker.send("options.set_project_option", project, "k", "older", task_id=task_id)
    assert older.get(timeout=30)["revision"] == 1
    assert worker.call("options.set_project_option", project, "k", "newer")["revision"] == 2

    older.forget()
    rerun = worker.send("options.set_project_option", project, "k", "older", task_id=task_id)
    assert rerun.get(timeout=30)["revision"] == 1
    wait_for_write_events(worker, task_id, 2)
    assert revision_of(backend, scope) == 2
    assert everywhere(worker, "project_options", "get_value", project, "k") == "newer"


def test_writing_the_current_value_again_changes_nothing(worker: Worker, backend: Any) -> None:
    """A second task writing the value already there returns changed False at the same
    revision and adds no history."""
    project = fresh_id()
    scope = f"project:{project}"
    first = worker.call("options.set_project_option", project, "k", {"a": [1, 2]})
    second = worker.call("options.set_project_option", project, "k", {"a": [1, 2]})
    assert check_result(first, scope) == 1
    assert check_result(second, scope, changed=False) == 1
    again = worker.call("options.unset_project_option", project, "absent")
    assert check_result(again, scope, changed=False) == 1
    assert revision_of(backend, scope) == 1
    assert len(backend.db.history(scope)) == 1


# -- ordering under concurrent writers ---------------------------------------------------------


def test_concurrent_writers_move_revisions_forward_without_gaps(
    worker: Worker, backend: Any
) -> None:
    """200 writes of one scope racing over two children give revisions 1..200 with no gap or
    duplicate; Redis never runs ahead of PostgreSQL nor shows a value from another revision;
    every child reads the last revision's value."""
    writes = 200
    project = fresh_id()
    scope = f"project:{project}"
    redis_key = backend.redis.key(scope)
    samples: list[tuple[int, bool, bytes | None, int]] = []
    done = threading.Event()

    def sample() -> None:
        # Redis first, then PostgreSQL: a revision Redis shows must already be committed.
        while not done.is_set():
            raw = backend.redis.client.hgetall(redis_key)
            pg_revision = revision_of(backend, scope)
            if raw:
                samples.append(
                    (int(raw[REVISION_FIELD]), STALE_FIELD in raw, raw.get(b"k"), pg_revision)
                )

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        results = []
        for number in range(writes):
            results.append(worker.send("options.set_project_option", project, "k", number))
            if number % 20 == 0:  # readers refill Redis from PostgreSQL while writers race
                results.append(
                    worker.send("probe.read", "project_options", "get_value", [project, "k"])
                )
        outcomes = ResultSet(results).join(timeout=120)
    finally:
        done.set()
        sampler.join(timeout=10)

    write_outcomes = [o for o in outcomes if "scope" in o]
    assert len(write_outcomes) == writes
    changed = [o for o in write_outcomes if o["changed"]]
    assert len(changed) == writes  # every value differs from the one before it
    assert sorted(o["revision"] for o in write_outcomes) == list(range(1, writes + 1))

    history = backend.db.history(scope, "k", limit=10 * writes)
    assert [h.revision for h in history] == list(range(1, writes + 1))
    value_at = {h.revision: h.new_value for h in history}
    final = backend.db.load_scope(scope)
    assert final.revision == writes
    assert json.loads(final.values["k"]) == value_at[writes]

    assert samples, "the sampler never saw the scope in Redis"
    seen = [revision for revision, _, _, _ in samples]
    assert seen == sorted(seen), "the Redis revision went backwards"
    for revision, stale, raw_value, pg_revision in samples:
        assert revision <= pg_revision, f"Redis at r{revision} before PostgreSQL committed it"
        if not stale and revision > 0:
            assert raw_value is not None
            assert json.loads(raw_value) == value_at[revision], f"wrong value cached at r{revision}"

    assert everywhere(worker, "project_options", "get_value", project, "k") == value_at[writes]
    cached = backend.redis.client.hgetall(redis_key)
    assert int(cached.get(REVISION_FIELD, 0)) <= writes
    if cached and STALE_FIELD not in cached:
        assert int(cached[REVISION_FIELD]) == writes
        assert json.loads(cached[b"k"]) == value_at[writes]


# -- history -----------------------------------------------------------------------------------


def test_history_records_old_and_new_values_revisions_and_task_ids(
    worker: Worker, backend: Any
) -> None:
    """history(scope, key) lists each change of the key, old value to new, with its revision
    and the id of the task that made it; history(scope) also lists the other keys."""
    group = fresh_id()
    scope = f"group:{group}"
    steps: list[tuple[str, list[Any]]] = [
        ("options.set_group_meta", [group, "k", {"v": 1}]),
        ("options.set_group_meta", [group, "other", "x"]),
        ("options.set_group_meta", [group, "k", [2]]),
        ("options.set_group_meta", [group, "k", [2]]),  # unchanged: no history
        ("options.unset_group_meta", [group, "k"]),
        ("options.set_many", [scope, {"k": "again", "other": "y"}, []]),
    ]
    task_ids = []
    for name, args in steps:
        task_id = f"history-{uuid.uuid4()}"
        worker.send(name, *args, task_id=task_id).get(timeout=30)
        task_ids.append(task_id)

    entries = backend.db.history(scope, "k")
    assert [(e.old_value, e.new_value, e.revision, e.task_id) for e in entries] == [
        (None, {"v": 1}, 1, task_ids[0]),
        ({"v": 1}, [2], 3, task_ids[2]),
        ([2], None, 4, task_ids[4]),
        (None, "again", 5, task_ids[5]),
    ]
    assert all(e.scope == scope and e.key == "k" for e in entries)
    everything = backend.db.history(scope)
    assert [(e.key, e.revision) for e in everything if e.key == "other"] == [
        ("other", 2),
        ("other", 5),
    ]
    assert sorted(e.revision for e in everything) == [1, 2, 3, 4, 5, 5]


# -- compare-and-set and task ids ------------------------------------------------------------


def test_expected_revision_refuses_a_stale_write_and_takes_a_current_one(
    worker: Worker, backend: Any
) -> None:
    """A write sent with the revision its scope is no longer at fails at once with
    RevisionConflict, unretried, writing nothing; with the current revision it commits."""
    project = fresh_id()
    scope = f"project:{project}"
    first = worker.call("options.set_project_option", project, "k", 1)
    current = first["revision"]
    stale = worker.send(
        "options.set_project_option", project, "k", 2, kwargs={"expected_revision": current - 1}
    )
    with pytest.raises(Exception) as info:
        stale.get(timeout=15, propagate=True)
    assert isinstance(info.value, RevisionConflict), repr(info.value)
    assert (info.value.expected, info.value.current) == (current - 1, current)
    assert backend.db.load_scope(scope).revision == current
    assert backend.db.write_records([stale.id]) == {}
    fresh = worker.send(
        "options.set_project_option", project, "k", 3, kwargs={"expected_revision": current}
    ).get(timeout=15, propagate=True)
    assert fresh["revision"] == current + 1
    assert backend.db.load_scope(scope).values == {"k": "3"}


def test_a_task_id_reused_for_another_write_is_refused(worker: Worker, backend: Any) -> None:
    """The same task id again with the same write returns the recorded result; with another
    write it fails naming task_id, and that write is not made."""
    project = fresh_id()
    task_id = f"reused-{uuid.uuid4()}"
    first = worker.send("options.set_project_option", project, "k", 1, task_id=task_id)
    result = first.get(timeout=15, propagate=True)
    first.forget()  # the result backend keeps one result per id: wait for the next run's
    again = worker.send("options.set_project_option", project, "k", 1, task_id=task_id)
    assert again.get(timeout=15, propagate=True) == result
    again.forget()
    other = worker.send("options.set_project_option", project, "k", 2, task_id=task_id)
    with pytest.raises(Exception) as info:
        other.get(timeout=15, propagate=True)
    assert isinstance(info.value, InvalidOption), repr(info.value)
    assert info.value.field == "task_id"
    assert backend.db.load_scope(f"project:{project}").values == {"k": "1"}
