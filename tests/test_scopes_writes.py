"""Canonical scope names, the Write each helper builds, and what a commit does with it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from store.errors import InvalidOption
from store.model.scopes import (
    GLOBAL,
    GROUP,
    PROJECT,
    USER,
    Scope,
    global_scope,
    group_scope,
    project_scope,
    tag_keys_scope,
    user_scope,
)
from store.model.writes import (
    TAG_KEY_PRESENT,
    Write,
    add_tag_key_write,
    many_write,
    remove_tag_key_write,
    set_write,
    unset_write,
)
from tests.conftest import fresh_id

MAX_ID = 2**63 - 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("global", global_scope()),
        ("project:42", project_scope(42)),
        ("user:7", user_scope(7, None)),
        ("user:7/project:42", user_scope(7, 42)),
        ("group:9", group_scope(9)),
        ("tagkeys:42", tag_keys_scope(42)),
        (f"project:{MAX_ID}", project_scope(MAX_ID)),
        (f"user:{MAX_ID}/project:1", user_scope(MAX_ID, 1)),
    ],
)
def test_canonical_scope_round_trips(text: str, expected: Scope) -> None:
    """Every canonical scope name parses to the scope its helper builds and prints back as is."""
    scope = Scope.parse(text)
    assert scope == expected
    assert str(scope) == scope.name == text
    assert Scope.parse(str(scope)) == scope


def test_parsed_scope_exposes_kind_and_ids() -> None:
    """A parsed scope carries its kind, id and, for a per-project user scope, the project id."""
    assert (Scope.parse("global").kind, Scope.parse("global").id) == (GLOBAL, None)
    assert Scope.parse("project:42").kind == PROJECT
    both = Scope.parse("user:7/project:42")
    assert (both.kind, both.id, both.project_id) == (USER, 7, 42)
    assert Scope.parse("user:7").project_id is None
    assert Scope.parse("group:9").kind == GROUP
    assert Scope.parse("tagkeys:42").is_tag_keys
    assert not Scope.parse("project:42").is_tag_keys


def test_scopes_of_different_kinds_with_one_id_differ() -> None:
    """project:1, group:1, tagkeys:1 and user:1 are four scopes, not one."""
    names = {
        s.name for s in (project_scope(1), group_scope(1), tag_keys_scope(1), user_scope(1, None))
    }
    assert len(names) == 4
    assert user_scope(1, None) != user_scope(1, 2)


@pytest.mark.parametrize(
    "text",
    [
        "project:042",
        "project:0",
        "Project:1",
        "GLOBAL",
        " global",
        "global\n",
        "project:",
        "project",
        "project:1/x",
        "project:+1",
        "project:-1",
        "project:1.0",
        "project:1 ",
        "project:٤٢",  # Arabic-Indic digits: int() would take them, the contract does not
        "user:7/project:0",
        "user:7/project:",
        "user:7/project:042",
        "user:0",
        "user:7/group:1",
        "project:42/user:7",
        "group:",
        "tagkeys:0",
        "project:9223372036854775808",
        "project:99999999999999999999",
        "",
    ],
)
def test_non_canonical_scope_is_rejected(text: str) -> None:
    """Anything but the one canonical spelling of a scope is rejected naming the scope field."""
    with pytest.raises(InvalidOption) as caught:
        Scope.parse(text)
    assert caught.value.field == "scope"
    assert str(caught.value).startswith("scope: ")


def test_leading_zero_error_suggests_the_canonical_name() -> None:
    """project:042 is rejected with a message that names the canonical project:42."""
    with pytest.raises(InvalidOption, match="'project:42'"):
        Scope.parse("project:042")


@pytest.mark.parametrize("text", [None, 42, b"global", ["global"]])
def test_scope_that_is_not_a_string_is_rejected(text: object) -> None:
    """A scope that is not a str is rejected naming the scope field."""
    with pytest.raises(InvalidOption) as caught:
        Scope.parse(text)
    assert caught.value.field == "scope"


def test_scope_error_names_the_callers_field() -> None:
    """Scope.parse reports the field name it is given (the CLI's SCOPE argument, say)."""
    with pytest.raises(InvalidOption) as caught:
        Scope.parse("project:0", field="SCOPE")
    assert caught.value.field == "SCOPE"


def test_user_scope_names_the_bad_id() -> None:
    """user_scope rejects a bad user id as user_id and a bad project id as project_id."""
    with pytest.raises(InvalidOption) as caught:
        user_scope(0, None)
    assert caught.value.field == "user_id"
    with pytest.raises(InvalidOption) as caught:
        user_scope(1, True)
    assert caught.value.field == "project_id"


# -- writes -------------------------------------------------------------------


def test_write_helpers_build_the_expected_writes() -> None:
    """set/unset/add_tag_key/remove_tag_key build one-key Writes with canonical JSON text."""
    scope = project_scope(3)
    assert set_write(scope, "k", {"b": 2, "a": 1}) == Write(scope, {"k": '{"a":1,"b":2}'})
    assert unset_write(scope, "k") == Write(scope, unsets=("k",))
    tags = tag_keys_scope(3)
    assert add_tag_key_write(tags, "browser") == Write(tags, {"browser": TAG_KEY_PRESENT})
    assert remove_tag_key_write(tags, "browser") == Write(tags, unsets=("browser",))
    assert many_write(scope, {"a": 1}, ["b"]).keys == ["a", "b"]


# -- commits (real PostgreSQL and Redis) --------------------------------------


def _task_id() -> str:
    return f"test-{uuid.uuid4()}"


def test_commit_moves_the_revision_by_one_per_change(backend: Any) -> None:
    """Each changing write moves its scope's revision by exactly one; the first is revision 1."""
    scope = project_scope(fresh_id())
    first = backend.commit(set_write(scope, "a", 1), task_id=_task_id())
    second = backend.commit(set_write(scope, "a", 2), task_id=_task_id())
    third = backend.commit(unset_write(scope, "a"), task_id=_task_id())
    assert (first.revision, second.revision, third.revision) == (1, 2, 3)
    assert first.changed and second.changed and third.changed
    assert first.scope == scope.name


def test_commit_of_the_current_value_changes_nothing(backend: Any) -> None:
    """Setting a key to its value (any key order) or unsetting a missing key keeps the revision."""
    scope = project_scope(fresh_id())
    backend.commit(set_write(scope, "a", {"x": 1, "y": 2}), task_id=_task_id())
    same = backend.commit(set_write(scope, "a", {"y": 2, "x": 1}), task_id=_task_id())
    missing = backend.commit(unset_write(scope, "nope"), task_id=_task_id())
    assert (same.changed, same.revision, same.changes) == (False, 1, {})
    assert (missing.changed, missing.revision) == (False, 1)
    assert backend.db.load_scope(scope.name).revision == 1


def test_set_many_commits_as_one_revision(backend: Any) -> None:
    """set_many of several sets and unsets lands as a single revision with every change in it."""
    scope = user_scope(fresh_id(), fresh_id())
    backend.commit(many_write(scope, {"a": 1, "b": 2, "c": 3}, []), task_id=_task_id())
    result = backend.commit(many_write(scope, {"a": 10, "b": 2}, ["c", "gone"]), task_id=_task_id())
    assert result.revision == 2
    assert result.changes == {"a": "10", "c": None}
    snapshot = backend.db.load_scope(scope.name)
    assert (snapshot.revision, snapshot.values) == (2, {"a": "10", "b": "2"})


def test_commit_with_a_known_task_id_returns_the_recorded_result(backend: Any) -> None:
    """A task id run again returns its first result and writes nothing, even after newer writes."""
    scope = group_scope(fresh_id())
    task_id = _task_id()
    first = backend.commit(set_write(scope, "k", "old"), task_id=task_id)
    backend.commit(set_write(scope, "k", "new"), task_id=_task_id())
    again = backend.commit(set_write(scope, "k", "old"), task_id=task_id)
    assert (again.revision, again.changed, again.changes) == (1, True, first.changes)
    assert backend.db.load_scope(scope.name).values == {"k": '"new"'}
    record, first_run = backend.db.apply(set_write(scope, "k", "old"), task_id=task_id)
    assert not first_run
    assert record.revision == 1


def test_history_records_old_and_new_values_in_revision_order(backend: Any) -> None:
    """Every change is in the scope's history with its old value, new value and task id."""
    scope = project_scope(fresh_id())
    ids = [_task_id() for _ in range(3)]
    backend.commit(set_write(scope, "k", 1), task_id=ids[0])
    backend.commit(set_write(scope, "k", [2]), task_id=ids[1])
    backend.commit(unset_write(scope, "k"), task_id=ids[2])
    entries = backend.db.history(scope.name, "k")
    assert [(e.revision, e.old_value, e.new_value, e.task_id) for e in entries] == [
        (1, None, 1, ids[0]),
        (2, 1, [2], ids[1]),
        (3, [2], None, ids[2]),
    ]


@pytest.mark.parametrize(
    "value",
    [
        "nul\x00inside",
        "emoji 🎉 and ünïcödé",
        'quote " backslash \\ newline \n',
        2**63 + 5,
        -1.5e-300,
        {"nested": [{"deep": [None, True, 0.1]}], "": "empty key"},
    ],
)
def test_values_round_trip_through_postgres_and_redis(backend: Any, value: object) -> None:
    """A committed value reads back equal from PostgreSQL and then from the refilled Redis."""
    import store

    project = fresh_id()
    backend.commit(set_write(project_scope(project), "k", value), task_id=_task_id())
    store.clear_local_cache()
    assert store.project_options.get_value(project, "k") == value  # Redis miss: PostgreSQL
    store.clear_local_cache()
    assert backend.redis.get(f"project:{project}") is not None
    assert store.project_options.get_value(project, "k") == value  # from Redis
