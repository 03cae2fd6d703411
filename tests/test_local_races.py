"""Races on the local cache: thread maps registered while others scan them."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from store.local import TASK, LocalCache, ScopeState
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
    worker = Worker(services, pool="threads", concurrency=32).start()
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
