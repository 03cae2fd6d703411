"""One test per bug of the 2014 Sentry option managers (SPEC's table); each fails on the seed."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest

import store
import tasks
import worker  # noqa: F401 (the project app: the task helpers send through it)
from store.errors import InvalidOption
from store.model.scopes import global_scope, group_scope, project_scope, tag_keys_scope, user_scope
from store.model.writes import add_tag_key_write, remove_tag_key_write, set_write, unset_write
from store.postgres.store import Snapshot
from store.redis.cache import REVISION_FIELD, STALE_FIELD
from tests.conftest import fresh_id


def _task_id() -> str:
    return f"test-{uuid.uuid4()}"


# -- (a) Option.get_all_values never loaded from the database --------------------


def test_global_option_written_elsewhere_is_loaded_from_postgres(backend: Any) -> None:
    """A global option no cache has seen is read from PostgreSQL.

    The seed's get_all_values tested hasattr on a name __init__ always set, so it never queried
    the table: a fresh process saw {} until it called set_value itself.
    """
    key = f"seed.a.{fresh_id()}"
    store.clear_local_cache()
    assert store.options.get_value(key) is None
    # Another process commits straight to PostgreSQL; this process's caches never hear of it.
    backend.db.apply(set_write(global_scope(), key, {"on": True}), task_id=_task_id())
    backend.redis.client.delete(backend.redis.key("global"))  # a cold shared cache
    store.clear_local_cache()  # the next task
    assert store.options.get_value(key) == {"on": True}
    assert store.options.get_all_values()[key] == {"on": True}


def test_global_option_committed_by_another_process_is_read_in_the_next_task(
    backend: Any,
) -> None:
    """A global option another process committed and announced to Redis is read here.

    The seed returned {} from get_all_values in any process that had not written the key.
    """
    key = f"seed.a.{fresh_id()}"
    store.clear_local_cache()
    store.options.get_all_values()  # this task has the global scope locally, without the key
    result, _ = backend.db.apply(set_write(global_scope(), key, [1, 2]), task_id=_task_id())
    backend.redis.apply(result.scope, result.revision, result.changes)  # the writer's announce
    store.clear_local_cache()
    assert store.options.get_value(key) == [1, 2]
    assert store.options.get_all_values()[key] == [1, 2]


# -- (b) UserOption.unset_value left the cache stale ------------------------------


@pytest.mark.parametrize("with_project", [False, True], ids=["user", "user+project"])
def test_unset_user_option_is_seen_in_the_same_task(backend: Any, with_project: bool) -> None:
    """After a user option is unset, a read in the same task returns the default.

    The seed's unset_value returned early on hasattr(self, '_metadata'), a name never set,
    so the process-local cache kept serving the deleted value.
    """
    user = fresh_id()
    project = fresh_id() if with_project else None
    scope = user_scope(user, project)
    backend.commit(set_write(scope, "tz", "UTC"), task_id=_task_id())
    backend.commit(set_write(scope, "lang", "fr"), task_id=_task_id())
    store.clear_local_cache()
    assert store.user_options.get_value(user, project, "tz") == "UTC"
    assert scope.name in backend.local.scopes  # cached locally, as in the seed
    backend.commit(unset_write(scope, "tz"), task_id=_task_id())
    assert store.user_options.get_value(user, project, "tz", "default") == "default"
    assert store.user_options.get_all_values(user, project) == {"lang": "fr"}


# -- (c) ProjectOption.unset_value passed a project object for an id ---------------


def test_unset_project_option_by_id_removes_it_everywhere(backend: Any) -> None:
    """Unsetting by project id through the task removes the key from PostgreSQL and Redis.

    The seed's unset_value handed the project object to reload_cache, which expects an id and
    builds the '<table>:<id>' cache key from it; here the unset is by id and both caches
    lose the key.
    """
    project = fresh_id()
    scope = project_scope(project)
    backend.commit(set_write(scope, "mail:subject_prefix", "[Prod]"), task_id=_task_id())
    backend.commit(set_write(scope, "other", 1), task_id=_task_id())
    store.clear_local_cache()
    assert store.project_options.get_value(project, "mail:subject_prefix") == "[Prod]"
    cached = backend.redis.get(scope.name)
    assert cached is not None  # Redis holds the full scope
    assert "mail:subject_prefix" in cached.values

    write = tasks.unset_project_option.run(project, "mail:subject_prefix")
    assert write.scope == scope
    result = backend.commit(write, task_id=_task_id())

    assert result.changed
    assert "mail:subject_prefix" not in backend.db.load_scope(scope.name).values
    after = backend.redis.get(scope.name)
    assert after is not None
    assert after.revision == result.revision
    assert after.values == {"other": "1"}
    assert store.project_options.get_value(project, "mail:subject_prefix") is None
    store.clear_local_cache()
    assert store.project_options.get_value(project, "mail:subject_prefix") is None


def test_unset_project_option_with_an_object_is_rejected() -> None:
    """Passing a project object where the id belongs fails at once naming project_id.

    The seed accepted the object and silently invalidated the wrong cache key.
    """
    project = SimpleNamespace(id=5, pk=5)
    with pytest.raises(InvalidOption) as caught:
        tasks.unset_project_option.run(project, "k")
    assert caught.value.field == "project_id"


# -- (d) reload after commit could write an older state over a newer one ------------


def test_redis_fill_never_replaces_a_newer_snapshot(backend: Any) -> None:
    """A fill with an older revision than Redis holds is refused and changes nothing.

    The seed's reload_cache did cache.set() unconditionally: the slower of two reloads won.
    """
    cache = backend.redis
    scope = f"project:{fresh_id()}"
    assert cache.fill(scope, Snapshot(5, {"k": '"five"'}))
    assert not cache.fill(scope, Snapshot(4, {"k": '"four"'}))
    assert not cache.fill(scope, Snapshot(5, {"k": '"other five"'}))
    assert cache.get(scope) == Snapshot(5, {"k": '"five"'})
    assert cache.fill(scope, Snapshot(6, {"k": '"six"'}))
    assert cache.get(scope) == Snapshot(6, {"k": '"six"'})


def test_redis_apply_moves_forward_only_in_order(backend: Any) -> None:
    """apply() takes only the next revision; a repeat or an older one is 'old' and ignored."""
    cache = backend.redis
    scope = f"project:{fresh_id()}"
    cache.fill(scope, Snapshot(3, {"a": "1", "b": "2"}))
    assert cache.apply(scope, 4, {"a": "10", "b": None, "c": "3"}).outcome == "applied"
    assert cache.get(scope) == Snapshot(4, {"a": "10", "c": "3"})
    assert cache.apply(scope, 4, {"a": "99"}).outcome == "old"
    assert cache.apply(scope, 2, {"a": "99"}).outcome == "old"
    assert cache.get(scope) == Snapshot(4, {"a": "10", "c": "3"})


def test_redis_gap_leaves_a_floor_that_refuses_older_fills(backend: Any) -> None:
    """apply(N+2) over N leaves a floor: readers skip it, fill(N+1) is refused, fill(N+2) lands."""
    cache = backend.redis
    scope = f"project:{fresh_id()}"
    cache.fill(scope, Snapshot(7, {"k": "7"}))
    assert cache.apply(scope, 9, {"k": "9"}).outcome == "floor"
    raw = cache.client.hgetall(cache.key(scope))
    assert raw[REVISION_FIELD] == b"9"
    assert STALE_FIELD in raw
    assert cache.get(scope) is None  # readers go to PostgreSQL
    assert not cache.fill(scope, Snapshot(8, {"k": "8"}))
    assert cache.get(scope) is None
    assert (
        cache.apply(scope, 10, {"k": "10"}).outcome == "floor"
    )  # no values to build on: still a floor
    assert not cache.fill(scope, Snapshot(9, {"k": "9"}))
    assert cache.fill(scope, Snapshot(10, {"k": "10"}))
    assert cache.get(scope) == Snapshot(10, {"k": "10"})


def test_late_reload_cannot_undo_a_commit(backend: Any) -> None:
    """A reader that loaded revision 1 and fills after the commit of revision 2 changes nothing.

    In the seed, a reload that read the table before a concurrent commit and set the cache
    after it left the older state in the shared cache until the next write.
    """
    project = fresh_id()
    scope = project_scope(project)
    cache = backend.redis
    backend.commit(set_write(scope, "k", "one"), task_id=_task_id())
    cache.client.delete(cache.key(scope.name))  # the shared cache is empty (evicted, expired)

    loaded = backend.db.load_scope(scope.name)  # reader: revision 1 from PostgreSQL...
    assert loaded.revision == 1
    backend.commit(set_write(scope, "k", "two"), task_id=_task_id())  # ...writer: revision 2
    raw = cache.client.hgetall(cache.key(scope.name))
    assert (raw[REVISION_FIELD], STALE_FIELD in raw) == (b"2", True)  # a floor, no values

    assert not cache.fill(scope.name, loaded)  # ...the reader's late fill is refused
    store.clear_local_cache()
    assert store.project_options.get_value(project, "k") == "two"
    assert cache.get(scope.name) == Snapshot(2, {"k": '"two"'})


def test_reload_that_lands_before_the_commit_is_brought_forward(backend: Any) -> None:
    """A reader's fill of revision 1 that lands before the commit's apply is moved to revision 2."""
    project = fresh_id()
    scope = project_scope(project)
    cache = backend.redis
    backend.commit(set_write(scope, "k", "one"), task_id=_task_id())
    cache.client.delete(cache.key(scope.name))

    loaded = backend.db.load_scope(scope.name)
    assert cache.fill(scope.name, loaded)
    backend.commit(set_write(scope, "k", "two"), task_id=_task_id())
    assert cache.get(scope.name) == Snapshot(2, {"k": '"two"'})
    store.clear_local_cache()
    assert store.project_options.get_value(project, "k") == "two"


# -- (e) GroupMeta.get_value returned the row ---------------------------------------


def test_group_meta_get_value_returns_the_value_or_the_default(backend: Any) -> None:
    """group_meta.get_value returns the stored value, and the default when the key is missing.

    The seed's GroupMetaManager.get_value returned self.get(...), the GroupMeta row itself.
    """
    group = fresh_id()
    backend.commit(set_write(group_scope(group), "jira:issue", {"id": "OPS-1"}), task_id=_task_id())
    store.clear_local_cache()
    assert store.group_meta.get_value(group, "jira:issue") == {"id": "OPS-1"}
    assert store.group_meta.get_value(group, "missing") is None
    assert store.group_meta.get_value(group, "missing", "fallback") == "fallback"
    assert store.group_meta.get_value(fresh_id(), "jira:issue", 0) == 0


def test_group_meta_get_value_bulk_maps_ids_to_values(backend: Any) -> None:
    """group_meta.get_value_bulk returns {group_id: value} for the groups that have the key."""
    with_key, other_key, nothing = fresh_id(), fresh_id(), fresh_id()
    backend.commit(set_write(group_scope(with_key), "k", "v"), task_id=_task_id())
    backend.commit(set_write(group_scope(other_key), "x", "v"), task_id=_task_id())
    store.clear_local_cache()
    assert store.group_meta.get_value_bulk([with_key, other_key, nothing], "k") == {with_key: "v"}


# -- (f) TagKey.all_keys was cached 60 s with no invalidation ------------------------


def test_tag_keys_change_is_seen_at_once(backend: Any) -> None:
    """all_keys reflects an add or a remove immediately, even after it was cached, sorted.

    The seed cached all_keys for 60 seconds with a TODO for invalidation: a new tag key was
    invisible for up to a minute.
    """
    project = fresh_id()
    scope = tag_keys_scope(project)
    store.clear_local_cache()
    assert store.tag_keys.all_keys(project) == []
    backend.commit(add_tag_key_write(scope, "server_name"), task_id=_task_id())
    assert store.tag_keys.all_keys(project) == ["server_name"]
    assert scope.name in backend.local.scopes  # cached now
    backend.commit(add_tag_key_write(scope, "browser"), task_id=_task_id())
    backend.commit(add_tag_key_write(scope, "level"), task_id=_task_id())
    assert store.tag_keys.all_keys(project) == ["browser", "level", "server_name"]
    backend.commit(remove_tag_key_write(scope, "level"), task_id=_task_id())
    assert store.tag_keys.all_keys(project) == ["browser", "server_name"]
    store.clear_local_cache()  # the next task reads the shared cache
    assert backend.redis.get(scope.name) is not None
    assert store.tag_keys.all_keys(project) == ["browser", "server_name"]


def test_tag_keys_are_separate_from_project_options(backend: Any) -> None:
    """A tag key and a project option of one project live in different scopes."""
    project = fresh_id()
    backend.commit(add_tag_key_write(tag_keys_scope(project), "browser"), task_id=_task_id())
    store.clear_local_cache()
    assert store.project_options.get_all_values(project) == {}
    assert store.tag_keys.all_keys(project) == ["browser"]


def test_all_keys_returns_a_copy() -> None:
    """Mutating the list all_keys returned does not change what the next call returns."""
    from store.local import ScopeState

    state = ScopeState(1, {"b": True, "a": True})
    keys = state.sorted_keys()
    keys.append("zzz")
    assert state.sorted_keys() == ["a", "b"]
