"""The local cache per thread and per process, and the read path local -> Redis -> PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

import store
from store.errors import InvalidOption, StoreUnavailable
from store.local import PROCESS, TASK, LocalCache, ScopeMap, ScopeState
from store.model.scopes import group_scope, project_scope
from store.model.writes import set_write
from store.options_store import OptionsStore
from store.postgres.store import PostgresStore
from store.readers import ProjectOptions
from store.redis.cache import REVISION_FIELD, STALE_FIELD, RedisCache
from tests.conftest import Services, fresh_id

CLOSED_REDIS = "redis://127.0.0.1:1/0"
CLOSED_POSTGRES = "postgresql://postgres@127.0.0.1:1/optionstore"
WAIT = 10.0  # seconds a thread waits for its cue before the test fails


def _task_id() -> str:
    return f"test-{uuid.uuid4()}"


def _state(value: object) -> ScopeState:
    return ScopeState(1, {"k": value})


def _run_in_thread(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread, errors


def _join(thread: threading.Thread, errors: list[BaseException]) -> None:
    thread.join(WAIT)
    assert not thread.is_alive(), "thread did not finish"
    if errors:
        raise errors[0]


# -- LocalCache (pure) ----------------------------------------------------------


def test_end_task_in_one_thread_keeps_another_threads_cache() -> None:
    """In task mode in a threads-pool worker, a thread ending its task does not empty a cache
    another thread is reading."""
    cache = LocalCache(TASK)
    cache.set_mode(TASK, one_task_at_a_time=False)  # what the worker's start does for threads
    reader_filled = threading.Event()
    other_ended = threading.Event()
    seen: dict[str, Any] = {}

    def reader() -> None:
        cache.scopes["project:1"] = _state("reader")
        reader_filled.set()
        assert other_ended.wait(WAIT)
        seen["after"] = cache.scopes.get("project:1")

    def other() -> None:
        assert reader_filled.wait(WAIT)
        cache.scopes["project:1"] = _state("other")
        cache.end_task()
        seen["other_after_end"] = dict(cache.scopes)
        other_ended.set()

    reading, reading_errors = _run_in_thread(reader)
    ending, ending_errors = _run_in_thread(other)
    _join(ending, ending_errors)
    _join(reading, reading_errors)
    assert seen["other_after_end"] == {}
    assert seen["after"] is not None
    assert seen["after"].values == {"k": "reader"}


def test_the_id_index_follows_every_change_of_a_scope_map() -> None:
    """A project's or group's values are found by id exactly while its scope is in the map:
    after a set, a replacement, a pop, a del and a clear; other kinds are not indexed."""
    scopes = ScopeMap()
    scopes["project:7"] = _state("a")
    scopes["group:7"] = _state("g")
    scopes["user:7/project:7"] = _state("u")
    scopes["tagkeys:7"] = _state("t")
    assert scopes.projects == {7: {"k": "a"}} and scopes.groups == {7: {"k": "g"}}
    scopes["project:7"] = _state("b")
    assert scopes.projects == {7: {"k": "b"}}
    assert scopes.pop("project:7", None) is not None
    assert scopes.projects == {} and scopes.pop("project:7", None) is None
    del scopes["group:7"]
    assert scopes.groups == {}
    scopes["project:8"] = _state("c")
    scopes.clear()
    assert scopes.projects == {} and scopes.groups == {} and dict(scopes) == {}


def test_switching_to_per_thread_maps_empties_the_shared_one() -> None:
    """The readers' hit path looks in the shared map first: a worker that switches to
    per-thread maps (a threads pool) must not leave states there to go stale."""
    cache = LocalCache(TASK)
    cache.scopes["project:1"] = _state("before")
    assert cache.shared.projects == {1: {"k": "before"}}
    cache.set_mode(TASK, one_task_at_a_time=False)
    assert cache.shared.projects == {} and cache.scopes is not cache.shared


def test_clear_empties_every_threads_cache() -> None:
    """clear() (store.clear_local_cache, a missed broadcast) empties the maps of all threads."""
    cache = LocalCache(TASK)
    filled = threading.Event()
    cleared = threading.Event()
    seen: dict[str, Any] = {}

    def reader() -> None:
        cache.scopes["project:1"] = _state(1)
        filled.set()
        assert cleared.wait(WAIT)
        seen["after"] = dict(cache.scopes)

    thread, errors = _run_in_thread(reader)
    assert filled.wait(WAIT)
    cache.scopes["project:2"] = _state(2)
    cache.clear()
    cleared.set()
    _join(thread, errors)
    assert seen["after"] == {}
    assert cache.scopes == {}


def test_drop_removes_one_scope_from_every_thread() -> None:
    """drop(scope) removes that scope from all threads' maps and keeps the others."""
    cache = LocalCache(TASK)
    filled = threading.Event()
    dropped = threading.Event()
    seen: dict[str, Any] = {}

    def reader() -> None:
        cache.scopes["project:1"] = _state(1)
        cache.scopes["project:2"] = _state(2)
        filled.set()
        assert dropped.wait(WAIT)
        seen["after"] = sorted(cache.scopes)

    thread, errors = _run_in_thread(reader)
    assert filled.wait(WAIT)
    cache.drop("project:1")
    dropped.set()
    _join(thread, errors)
    assert seen["after"] == ["project:2"]


def test_process_mode_keeps_entries_across_tasks_and_threads() -> None:
    """In process mode one map serves every thread and end_task() keeps it; clear() empties it."""
    cache = LocalCache(PROCESS)
    cache.scopes["global"] = _state("kept")
    cache.end_task()
    assert cache.scopes["global"].values == {"k": "kept"}
    seen: dict[str, Any] = {}

    def other() -> None:
        seen["global"] = cache.scopes.get("global")
        cache.end_task()

    thread, errors = _run_in_thread(other)
    _join(thread, errors)
    assert seen["global"] is cache.scopes["global"]
    assert "global" in cache.scopes
    cache.clear()
    assert cache.scopes == {}


def test_task_mode_end_task_empties_the_threads_own_cache() -> None:
    """In task mode end_task() starts the thread's next task with an empty cache."""
    cache = LocalCache(TASK)
    cache.scopes["global"] = _state(1)
    cache.end_task()
    assert cache.scopes == {}


def test_unknown_mode_is_rejected() -> None:
    """A local cache mode other than task or process is a ValueError."""
    with pytest.raises(ValueError, match="task"):
        LocalCache("thread")


# -- the layered read path (real PostgreSQL and Redis) ---------------------------


class Spy:
    """Wraps a real bound method and counts the calls that go through it."""

    def __init__(self, target: Callable[..., Any]) -> None:
        self.target = target
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.target(*args, **kwargs)


@pytest.fixture
def spies(backend: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Spy]:
    found = {
        "redis_get_encoded": Spy(backend.redis.get_encoded),
        "redis_fill": Spy(backend.redis.fill),
        "postgres": Spy(backend.db.load_scopes),
    }
    monkeypatch.setattr(backend.redis, "get_encoded", found["redis_get_encoded"])
    monkeypatch.setattr(backend.redis, "fill", found["redis_fill"])
    monkeypatch.setattr(backend.db, "load_scopes", found["postgres"])
    return found


def _calls(spies: dict[str, Spy]) -> tuple[int, int, int]:
    return spies["redis_get_encoded"].calls, spies["postgres"].calls, spies["redis_fill"].calls


def test_read_path_local_then_redis_then_postgres(backend: Any, spies: dict[str, Spy]) -> None:
    """A local hit touches nothing; a local miss asks Redis; a Redis miss loads and refills."""
    project = fresh_id()
    scope = project_scope(project).name
    result = backend.commit(set_write(project_scope(project), "k", {"v": 1}), task_id=_task_id())
    store.clear_local_cache()
    base = _calls(spies)

    # Redis holds only the commit's floor: the read goes on to PostgreSQL and refills Redis.
    assert store.project_options.get_value(project, "k") == {"v": 1}
    assert _calls(spies) == (base[0] + 1, base[1] + 1, base[2] + 1)
    raw = backend.redis.client.hgetall(backend.redis.key(scope))
    assert raw[REVISION_FIELD] == str(result.revision).encode()
    assert STALE_FIELD not in raw
    assert raw[b"k"] == b'{"v":1}'

    # Local hit: neither Redis nor PostgreSQL.
    assert store.project_options.get_value(project, "k") == {"v": 1}
    assert store.project_options.get_all_values(project) == {"k": {"v": 1}}
    assert _calls(spies) == (base[0] + 1, base[1] + 1, base[2] + 1)

    # Local miss (next task): Redis answers, PostgreSQL is not asked.
    store.clear_local_cache()
    assert store.project_options.get_value(project, "k") == {"v": 1}
    assert _calls(spies) == (base[0] + 2, base[1] + 1, base[2] + 1)


def test_get_value_bulk_returns_only_ids_that_have_the_key(
    backend: Any, spies: dict[str, Spy]
) -> None:
    """get_value_bulk maps only the projects that have the key, cached or not, in one load."""
    has, other, empty, cached = fresh_id(), fresh_id(), fresh_id(), fresh_id()
    backend.commit(set_write(project_scope(has), "k", "a"), task_id=_task_id())
    backend.commit(set_write(project_scope(other), "x", "b"), task_id=_task_id())
    backend.commit(set_write(project_scope(cached), "k", False), task_id=_task_id())
    store.clear_local_cache()
    assert store.project_options.get_value(cached, "k") is False  # one scope cached locally
    before = spies["redis_get_encoded"].calls
    assert store.project_options.get_value_bulk([has, other, empty, cached], "k") == {
        has: "a",
        cached: False,
    }
    assert spies["redis_get_encoded"].calls == before + 1  # the three uncached scopes at once
    assert store.project_options.get_value_bulk([], "k") == {}


def test_get_value_bulk_keeps_null_values(backend: Any) -> None:
    """A key set to JSON null is present in get_value_bulk, unlike a key never set."""
    with_null, without = fresh_id(), fresh_id()
    backend.commit(set_write(group_scope(with_null), "k", None), task_id=_task_id())
    store.clear_local_cache()
    assert store.group_meta.get_value_bulk([with_null, without], "k") == {with_null: None}


def _store_on(
    *,
    postgres: PostgresStore,
    redis_cache: RedisCache | None,
    grace_period: float = 300.0,
) -> OptionsStore:
    layered = OptionsStore()
    layered.configure(postgres=postgres, redis_cache=redis_cache, grace_period=grace_period)
    return layered


@pytest.fixture
def closing() -> Iterator[list[PostgresStore]]:
    """PostgreSQL stores a test opened, closed when it ends."""
    opened: list[PostgresStore] = []
    yield opened
    for postgres in opened:
        postgres.close()


def test_redis_down_reads_go_to_postgres_and_log_fallback(
    backend: Any, services: Services, closing: list[PostgresStore]
) -> None:
    """With Redis unreachable, a read is answered by PostgreSQL and logs cache.fallback."""
    project = fresh_id()
    backend.commit(set_write(project_scope(project), "k", "from postgres"), task_id=_task_id())
    postgres = PostgresStore(conninfo=services.database_url)
    closing.append(postgres)
    layered = _store_on(
        postgres=postgres,
        redis_cache=RedisCache(url=CLOSED_REDIS, prefix=services.namespace, socket_timeout=1.0),
    )
    with capture_logs() as events:
        assert ProjectOptions(layered).get_value(project, "k") == "from postgres"
    fallbacks = [e for e in events if e["event"] == "cache.fallback"]
    assert len(fallbacks) == 1
    assert fallbacks[0]["layer"] == "redis"
    assert fallbacks[0]["to"] == "postgres"
    assert fallbacks[0]["log_level"] == "warning"


def test_redis_down_a_write_still_commits(
    backend: Any, services: Services, closing: list[PostgresStore]
) -> None:
    """With Redis unreachable a commit succeeds, logs the failed announce, stays in the outbox."""
    postgres = PostgresStore(conninfo=services.database_url)
    closing.append(postgres)
    layered = _store_on(
        postgres=postgres,
        redis_cache=RedisCache(url=CLOSED_REDIS, prefix=services.namespace, socket_timeout=1.0),
    )
    scope = project_scope(fresh_id())
    task_id = _task_id()
    with capture_logs() as events:
        result = layered.commit(set_write(scope, "k", 1), task_id=task_id)
    try:
        assert result.changed
        assert backend.db.load_scope(scope.name).values == {"k": "1"}
        failed = [e for e in events if e["event"] == "cache.announce_failed"]
        assert [e["layer"] for e in failed] == ["redis"]
        record = backend.db.write_records([task_id])[task_id]
        assert record[1] is False, "a write Redis refused was marked announced"
    finally:
        # Leave no outbox work behind for other tests: nobody reads this scope.
        backend.db.mark_announced([task_id])


def test_postgres_down_reads_are_served_from_redis(
    backend: Any, services: Services, closing: list[PostgresStore]
) -> None:
    """With PostgreSQL unreachable, a scope Redis holds is read from Redis without error."""
    project = fresh_id()
    backend.commit(set_write(project_scope(project), "k", "cached"), task_id=_task_id())
    store.clear_local_cache()
    store.project_options.get_value(project, "k")  # Redis now holds the scope
    down = PostgresStore(conninfo=CLOSED_POSTGRES, timeout=1.0)
    closing.append(down)
    layered = _store_on(
        postgres=down, redis_cache=RedisCache(url=services.redis_url, prefix=services.namespace)
    )
    assert ProjectOptions(layered).get_value(project, "k") == "cached"


def test_postgres_down_serves_last_known_value_within_grace(
    backend: Any, services: Services, closing: list[PostgresStore]
) -> None:
    """With PostgreSQL gone and no Redis, a value loaded within the grace period is still served."""
    project = fresh_id()
    backend.commit(set_write(project_scope(project), "k", "last known"), task_id=_task_id())
    up = PostgresStore(conninfo=services.database_url)
    down = PostgresStore(conninfo=CLOSED_POSTGRES, timeout=1.0)
    closing.extend([up, down])
    layered = _store_on(postgres=up, redis_cache=None, grace_period=300.0)
    reader = ProjectOptions(layered)
    assert reader.get_value(project, "k") == "last known"

    layered.postgres = down  # PostgreSQL goes away; configure() would forget last-known values
    layered.local.clear()  # the next task
    with capture_logs() as events:
        assert reader.get_value(project, "k") == "last known"
    fallbacks = [e for e in events if e["event"] == "cache.fallback"]
    assert len(fallbacks) == 1
    assert fallbacks[0]["layer"] == "postgres"
    assert fallbacks[0]["to"] == "last_known"
    assert fallbacks[0]["scope"] == f"project:{project}"


def test_postgres_down_beyond_grace_raises_store_unavailable(
    backend: Any, services: Services, closing: list[PostgresStore]
) -> None:
    """With PostgreSQL gone and the last-known value older than the grace period, reads raise."""
    project = fresh_id()
    backend.commit(set_write(project_scope(project), "k", "too old"), task_id=_task_id())
    up = PostgresStore(conninfo=services.database_url)
    down = PostgresStore(conninfo=CLOSED_POSTGRES, timeout=1.0)
    closing.extend([up, down])
    layered = _store_on(postgres=up, redis_cache=None, grace_period=0.0)
    reader = ProjectOptions(layered)
    assert reader.get_value(project, "k") == "too old"

    layered.postgres = down
    layered.local.clear()
    with pytest.raises(StoreUnavailable, match=f"project:{project}"):
        reader.get_value(project, "k")


def test_postgres_down_with_nothing_known_raises_store_unavailable(
    services: Services, closing: list[PostgresStore]
) -> None:
    """A scope never loaded cannot be served while PostgreSQL and Redis are both unreachable."""
    down = PostgresStore(conninfo=CLOSED_POSTGRES, timeout=1.0)
    closing.append(down)
    layered = _store_on(
        postgres=down,
        redis_cache=RedisCache(url=CLOSED_REDIS, prefix=services.namespace, socket_timeout=1.0),
    )
    with pytest.raises(StoreUnavailable):
        ProjectOptions(layered).get_value(fresh_id(), "k")


def test_project_read_with_a_string_id_is_rejected_even_when_cached(backend: Any) -> None:
    """A project id passed as a str is rejected naming project_id whether or not it is cached."""
    project = fresh_id()
    backend.commit(set_write(project_scope(project), "k", 1), task_id=_task_id())
    store.clear_local_cache()
    with pytest.raises(InvalidOption):
        store.project_options.get_value(str(project), "k")  # not cached: rejected
    assert store.project_options.get_value(project, "k") == 1  # now cached
    with pytest.raises(InvalidOption) as caught:
        store.project_options.get_value(str(project), "k")
    assert caught.value.field == "project_id"


def test_one_task_at_a_time_task_mode_uses_one_map_cleared_at_task_end() -> None:
    """A prefork child's task-mode cache is one map for every thread, emptied when its task ends."""
    cache = LocalCache(TASK)
    cache.set_mode(TASK, one_task_at_a_time=True)
    cache.scopes["project:1"] = ScopeState(1, {"k": 1})
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append("project:1" in cache.scopes))
    thread.start()
    thread.join()
    assert seen == [True]
    cache.end_task()
    assert cache.scopes == {}
    cache.set_mode(TASK, one_task_at_a_time=False)
    cache.scopes["project:2"] = ScopeState(1, {})
    other: list[bool] = []
    thread = threading.Thread(target=lambda: other.append("project:2" in cache.scopes))
    thread.start()
    thread.join()
    assert other == [False]
