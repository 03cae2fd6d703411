"""Races on the local cache: thread maps registered while others scan them, and loads that
straddle a desync/resync."""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import store
from store.local import PROCESS, TASK, LocalCache, ScopeState
from store.model.scopes import project_scope
from store.model.writes import set_write
from store.options_store import OptionsStore
from store.postgres.store import PostgresStore
from store.redis.cache import RedisCache
from tests.conftest import Services, Worker, fresh_id

WAIT = 10.0  # seconds a thread waits for its cue before the test fails
CHURN_THREADS = 3000  # short-lived threads in the in-process churn test


# -- the registry of per-thread maps ---------------------------------------------------------


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every few microseconds, so interleavings that are rare under load are not."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def test_thread_maps_can_be_scanned_while_threads_start_and_end(fast_switching: None) -> None:
    """drop, apply_change, clear and all_maps never fail while threads register maps and die."""
    cache = LocalCache(TASK)
    errors: list[BaseException] = []
    done = threading.Event()
    scans = [0]

    def scan() -> None:
        revision = 1
        while not done.is_set():
            try:
                cache.drop("project:1")
                revision += 1
                cache.apply_change("project:1", revision, {"k": revision}, ())
                for scopes in cache.all_maps():
                    scopes.get("project:1")
                if revision % 50 == 0:
                    cache.clear()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                return
            scans[0] += 1

    def touch() -> None:
        cache.holder.scopes["project:1"] = ScopeState(1, {"k": 1})

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    try:
        started = 0
        while started < CHURN_THREADS and not errors:
            batch = [threading.Thread(target=touch) for _ in range(50)]
            for thread in batch:
                thread.start()
            for thread in batch:
                thread.join(WAIT)
            started += len(batch)
        del batch, thread  # the last ended threads, so nothing here keeps them
    finally:
        done.set()
        scanner.join(WAIT)
    assert not scanner.is_alive(), "the scanning thread did not finish"
    assert errors == []
    assert scans[0] > 0
    # Ended threads' maps are not scanned any more: the shared map and this thread's are left.
    assert len(list(cache.all_maps())) == 2


def test_threads_pool_worker_survives_thread_churn(services: Services) -> None:
    """A threads-pool worker serves concurrent writes, reads and thread churn without an error."""
    # A queue of its own: the session's prefork worker must not take these tasks.
    worker = Worker(
        services,
        pool="threads",
        concurrency=32,
        extra_env={"OPTIONS_TASK_QUEUE": f"{services.namespace}.threads"},
    ).start()
    try:
        worker.call("probe.switch_interval", 1e-5)
        projects = [fresh_id() for _ in range(8)]
        writes, reads, churns = [], [], []
        for round_ in range(40):
            for i, project in enumerate(projects):
                writes.append(
                    worker.send("options.set_project_option", project, "k", round_ * 10 + i)
                )
            reads.append(
                worker.send("probe.read", "project_options", "get_value_bulk", [projects, "k"])
            )
            churns.append(worker.send("probe.churn", projects, "k", 50))
        results = [w.get(timeout=120, propagate=True) for w in writes]
        assert all(r["scope"].startswith("project:") and r["changed"] for r in results)
        for answer in (r.get(timeout=120, propagate=True) for r in reads):
            assert set(answer["result"]) <= {str(p) for p in projects}
        for answer in (c.get(timeout=120, propagate=True) for c in churns):
            assert answer["errors"] == []
        # Every process converges on a last write, as before the churn.
        final = worker.call("options.set_project_option", projects[0], "k", "final")
        assert final["changed"]
        answers = worker.read_everywhere("project_options", "get_value", projects[0], "k")
        assert set(answers.values()) == {"final"}
        log = worker.log()
        assert "changed size during iteration" not in log
        assert worker.events("broadcast.lost", "cache.announce_failed") == []
    finally:
        worker.stop()


# -- loads that straddle a desync/resync ----------------------------------------------------


@pytest.fixture
def process_mode(backend: OptionsStore) -> Iterator[OptionsStore]:
    """The in-process store with one map for every thread, kept across reads."""
    backend.local.set_mode(PROCESS)
    yield backend
    backend.local.resync()
    backend.local.set_mode(TASK)


@pytest.fixture
def elsewhere(services: Services) -> Iterator[OptionsStore]:
    """Another process's store on the same services: its writes reach this one by broadcast only."""
    other = OptionsStore()
    other.configure(
        postgres=PostgresStore(conninfo=services.database_url, max_size=2),
        redis_cache=RedisCache(url=services.redis_url, prefix=services.namespace),
    )
    yield other
    other.db.close()


def _one(project: int) -> Any:
    return store.project_options.get_value(project, "k")


def _bulk(project: int) -> Any:
    return store.project_options.get_value_bulk([project], "k").get(project)


@pytest.mark.parametrize("read", [_one, _bulk], ids=["get_value", "get_value_bulk"])
@pytest.mark.parametrize("deaf_at_start", [False, True], ids=["synced", "unsynced"])
def test_load_straddling_a_desync_is_not_kept(
    process_mode: OptionsStore,
    elsewhere: OptionsStore,
    monkeypatch: pytest.MonkeyPatch,
    read: Callable[[int], Any],
    deaf_at_start: bool,
) -> None:
    """A state loaded across a desync/resync, while a change was committed unheard, is not kept."""
    local = process_mode.local
    project = fresh_id()
    elsewhere.commit(set_write(project_scope(project), "k", "old"), task_id=f"t-{uuid.uuid4()}")
    loaded, release = threading.Event(), threading.Event()
    load_many = process_mode.load_many

    def held_load(*args: Any, **kwargs: Any) -> dict[str, ScopeState]:
        states = load_many(*args, **kwargs)
        if not loaded.is_set():  # only the first load straddles
            loaded.set()
            assert release.wait(WAIT), "the test never released the load"
        return states

    monkeypatch.setattr(process_mode, "load_many", held_load)
    if deaf_at_start:
        local.desync()
    answer: list[Any] = []
    reader = threading.Thread(target=lambda: answer.append(read(project)), daemon=True)
    reader.start()
    assert loaded.wait(WAIT), "the read never loaded"
    if not deaf_at_start:
        local.desync()
    # Committed while this process is deaf: it never hears the broadcast.
    elsewhere.commit(set_write(project_scope(project), "k", "new"), task_id=f"t-{uuid.uuid4()}")
    local.resync()
    release.set()
    reader.join(WAIT)
    assert not reader.is_alive(), "the read did not finish"
    assert answer == ["old"]  # the straddling read itself began before the change
    assert read(project) == "new"
    assert _one(project) == "new"
