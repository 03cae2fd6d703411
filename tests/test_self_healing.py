"""Self-healing (guarantee 8): a Redis that went back in time is repaired by the relay's
reconciler, and a lost broadcast is noticed through the heartbeat's high-water marks, a reload
message for changes too large to carry, and publisher confirms on AMQP."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis

from store.broadcast.codec import (
    HEARTBEAT,
    RELOAD,
    MalformedMessage,
    ReloadMessage,
    decode,
    encode_announcement,
)
from store.broadcast.exchange import reload_exchange
from store.local import PROCESS
from store.model.scopes import project_scope
from store.model.writes import Write
from store.options_store import OptionsStore
from store.redis.presence import Presence
from tests.conftest import (
    Services,
    Worker,
    amqp_url,
    fresh_id,
    read_in_new_process,
    wait_for,
)
from worker.duties.reconcile import Reconciler

# The bound of guarantee 8, as a deadline on a wait.
ROLLBACK_BOUND_S = 10.0
HEARTBEAT_DEADLINE_S = 5.0


def _write(backend: OptionsStore, project: int, key: str, value: Any) -> int:
    result = backend.commit(Write(project_scope(project), {key: json.dumps(value)}, ()))
    # The reconciler judges announced commits only: mark this one now, not a moment later.
    backend.db.marks.flush()
    return result.revision


def _reconciler(backend: OptionsStore, **options: Any) -> Reconciler:
    assert backend.redis is not None
    return Reconciler(postgres=backend.db, cache=backend.redis, settle=0.0, **options)


def _restore_older(backend: OptionsStore, project: int, key: str, value: Any) -> int:
    """Commit ``value`` and put back the scope's hash as it was before: returns the revision."""
    assert backend.redis is not None
    client = backend.redis.client
    name = backend.redis.key(f"project:{project}")
    dumped = client.dump(name)
    assert dumped is not None, "the scope was not cached"
    revision = _write(backend, project, key, value)
    client.restore(name, 0, dumped, replace=True)
    return revision


@pytest.fixture
def process_backend(backend: OptionsStore) -> Iterator[OptionsStore]:
    """The in-process store with a process-wide local cache, as a `process` mode worker has."""
    backend.local.set_mode(PROCESS)
    yield backend
    backend.local.set_mode("task")


def test_reconciler_repairs_a_hash_restored_from_an_old_dump(backend: OptionsStore) -> None:
    """A scope hash restored from a DUMP taken before the last write is made a floor, so the
    next reader loads the committed value from PostgreSQL."""
    project = fresh_id()
    _write(backend, project, "k", "old")
    assert backend.load(f"project:{project}").values == {"k": "old"}
    revision = _restore_older(backend, project, "k", "new")
    assert backend.load(f"project:{project}").values == {"k": "old"}, "the rollback took"
    reconciler = _reconciler(backend)
    assert reconciler.run_once() >= 1
    assert backend.redis is not None
    assert backend.redis.revisions([f"project:{project}"]) == {f"project:{project}": revision}
    state = backend.load(f"project:{project}")
    assert (state.revision, state.values) == (revision, {"k": "new"})
    assert reconciler.run_once() == 0 or backend.load(f"project:{project}").values == {"k": "new"}


def test_reconciler_leaves_current_and_absent_hashes_alone(backend: OptionsStore) -> None:
    """A hash at PostgreSQL's revision and a scope Redis does not hold are not touched."""
    current, absent = fresh_id(), fresh_id()
    _write(backend, current, "k", 1)
    _write(backend, absent, "k", 1)
    assert backend.redis is not None
    backend.redis.client.delete(backend.redis.key(f"project:{absent}"))
    reconciler = _reconciler(backend)
    reconciler.run_once()
    found = backend.redis.revisions([f"project:{current}", f"project:{absent}"])
    assert found == {f"project:{current}": 1, f"project:{absent}": None}
    assert backend.load(f"project:{current}").values == {"k": 1}


def test_first_round_scans_scopes_outside_the_recent_window(backend: OptionsStore) -> None:
    """A reconciler that has not seen this Redis before checks every scope, not only the
    recently changed ones, page by page."""
    project = fresh_id()
    _write(backend, project, "k", "old")
    backend.load(f"project:{project}")
    revision = _restore_older(backend, project, "k", "new")
    # A window that finds nothing: only the scan over every scope can see the rollback.
    reconciler = _reconciler(backend, window=0.000001, page=50, urgent_page=50)
    assert backend.redis is not None

    def repaired() -> bool:
        reconciler.run_once()
        return backend.redis.revisions([f"project:{project}"])[f"project:{project}"] == revision  # type: ignore[union-attr]

    wait_for(repaired, timeout=30, interval=0, message="the scan to reach the scope")
    assert backend.load(f"project:{project}").values == {"k": "new"}


def test_marks_drop_a_state_whose_change_was_never_heard(process_backend: OptionsStore) -> None:
    """A process holding a scope older than a heartbeat's mark drops it and, with its floor
    raised, reloads the committed value even from a Redis that is behind."""
    backend = process_backend
    project = fresh_id()
    scope = f"project:{project}"
    _write(backend, project, "k", "old")
    assert backend.state(scope).values == {"k": "old"}
    # Committed and "announced" elsewhere; this process heard nothing, and Redis went back.
    revision = _restore_older(backend, project, "k", "new")
    backend.local.scopes[scope] = backend.load(scope)  # what a process that missed it holds
    assert backend.state(scope).values == {"k": "old"}
    beat = _reconciler(backend, mark_settle=0.0).heartbeat(origin="test")
    heard = ReloadMessage.from_body(json.loads(json.dumps(beat.to_body())))
    assert heard.kind == HEARTBEAT
    assert heard.marks is not None and heard.marks[scope] == revision
    assert backend.apply_message(heard) == "dropped"
    state = backend.state(scope)
    assert (state.revision, state.values) == (revision, {"k": "new"})
    assert backend.apply_message(heard) == "current"


def test_a_change_too_large_for_a_message_is_announced_as_a_reload(
    process_backend: OptionsStore,
) -> None:
    """A change over the message limit goes out as a small "reload this scope" message, which
    drops the scope in a process that holds it, so its next read loads the new value."""
    backend = process_backend
    project = fresh_id()
    scope = f"project:{project}"
    _write(backend, project, "k", "small")
    held = backend.state(scope)
    result = backend.db.apply(Write(project_scope(project), {"k": json.dumps("x" * 5000)}, ()))[0]
    text = encode_announcement(result, origin="test", max_bytes=4096)
    body = json.loads(text)
    assert body["kind"] == RELOAD and "set" not in body
    assert len(text) < 512
    assert decode(encode_announcement(result, origin="test", max_bytes=64 * 1024)).kind == "change"
    backend.local.scopes[scope] = held
    assert backend.apply_message(decode(text)) == "dropped"
    assert backend.state(scope).values == {"k": "x" * 5000}


def test_heartbeats_without_marks_and_bad_marks() -> None:
    """A heartbeat from before marks existed is still valid; malformed marks are rejected."""
    old = {"v": 1, "kind": "heartbeat", "sent_at": time.time(), "origin": "beacon:h:1"}
    assert ReloadMessage.from_body(old).marks is None
    for marks in ({"project:0": 1}, {"project:7": 0}, {"project:7": True}, ["project:7"]):
        with pytest.raises(MalformedMessage):
            ReloadMessage.from_body({**old, "marks": marks})
    with pytest.raises(MalformedMessage):
        ReloadMessage.from_body({**old, "marks": {}, "marks_complete": "yes"})
    reload_body = {**old, "kind": "reload", "scope": "user:7/project:42", "revision": 3}
    with pytest.raises(MalformedMessage):
        ReloadMessage.from_body(reload_body)  # no committed_at
    parsed = ReloadMessage.from_body({**reload_body, "committed_at": 1.0})
    assert (parsed.kind, parsed.scope, parsed.revision) == (RELOAD, "user:7/project:42", 3)


def test_a_publish_the_broker_refuses_leaves_the_commit_unannounced(services: Services) -> None:
    """On AMQP a publish is confirmed: one the broker refuses raises, and the outbox row stays
    unannounced for the relay instead of being marked announced and lost."""
    import store

    url = amqp_url()
    backend = store.configure(
        database_url=services.database_url,
        redis_url=services.redis_url,
        namespace=services.namespace,
        broker_url=url,
    )
    refusing = kombu.Queue(
        f"{services.namespace}.refusing",
        exchange=reload_exchange(services.namespace),
        routing_key="",
        durable=False,
        auto_delete=False,
        queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    with kombu.Connection(url) as conn:
        refusing(conn.default_channel).declare()
        try:
            project = fresh_id()
            result = backend.commit(
                Write(project_scope(project), {"k": json.dumps(1)}, ()), task_id=f"t-{project}"
            )
            record = backend.db.write_records([result.task_id]).get(result.task_id)
            assert record is not None
            assert record[1] is False, "a refused broadcast was marked announced"
        finally:
            refusing(conn.default_channel).delete()
            assert backend.publisher is not None
            backend.publisher.close()
            store.configure(
                database_url=services.database_url,
                redis_url=services.redis_url,
                namespace=services.namespace,
            )


def test_restored_cache_is_repaired_for_new_and_running_processes(
    services: Services, worker: Worker
) -> None:
    """After a scope's hash is restored from a DUMP taken before the last write, a new process
    and every task in the running (task mode) workers read the committed value within 10 s."""
    project = fresh_id()
    client = redis.Redis.from_url(services.redis_url)
    name = f"{services.namespace}:scope:project:{project}"
    worker.call("options.set_project_option", project, "k", "old")
    assert set(worker.read_everywhere("project_options", "get_value", project, "k").values()) == {
        "old"
    }
    dumped = client.dump(name)
    assert dumped is not None
    worker.call("options.set_project_option", project, "k", "new")
    client.restore(name, 0, dumped, replace=True)
    restored = time.monotonic()
    wait_for(
        lambda: read_in_new_process(services, project, "k") == "new",
        timeout=ROLLBACK_BOUND_S,
        interval=0.05,
        message="a new process to read the committed value",
    )
    new_process_s = time.monotonic() - restored
    wait_for(
        lambda: (
            set(worker.read_everywhere("project_options", "get_value", project, "k").values())
            == {"new"}
        ),
        timeout=ROLLBACK_BOUND_S - new_process_s,
        interval=0,
        message="every running process to read the committed value",
    )
    print(
        f"\nFIGURE restored DUMP ({services.name}): new process {new_process_s:.2f}s, "
        f"every worker process {time.monotonic() - restored:.2f}s"
    )


def test_a_swallowed_broadcast_is_noticed_by_process_caches(services: Services) -> None:
    """A reload message lost on the way (the publish returned, the outbox row is marked
    announced) reaches no process, yet every process-mode cache serves the new value within
    the heartbeat deadline, through the heartbeat's marks."""
    # A namespace (and task queue) of its own: the session's worker must not take its tasks.
    services = Services(services.name, services.database_url, services.redis_url)
    worker = Worker(
        services,
        extra_env={"OPTIONS_LOCAL_CACHE": "process"},
        include="tests.probe_tasks,tests.broadcast_hooks",
    ).start()
    try:
        project = fresh_id()

        def everywhere() -> set[Any]:
            answers = worker.read_everywhere("project_options", "get_value", project, "k")
            return set(answers.values())

        worker.call("options.set_project_option", project, "k", "old")
        presence = Presence(redis.Redis.from_url(services.redis_url), namespace=services.namespace)
        children = worker.child_pids()
        wait_for(
            lambda: (
                all(p.synced for p in presence.processes() if p.pid in children)
                and children <= {p.pid for p in presence.processes()}
            ),
            timeout=60,
            message="every child to subscribe, so that it caches what it reads",
        )
        wait_for(lambda: everywhere() == {"old"}, timeout=30, message="every cache to hold old")
        since = len(worker.log())
        result = worker.call("options.set_project_option", project, "k", "swallowed:new")
        written = time.monotonic()
        wait_for(
            lambda: everywhere() == {"swallowed:new"},
            timeout=HEARTBEAT_DEADLINE_S,
            interval=0,
            message="every process cache to serve the value whose broadcast was lost",
        )
        noticed_s = time.monotonic() - written
        assert not worker.events("broadcast.applied", since=since), "the broadcast was not lost"
        assert worker.events("broadcast.missed", since=since)
        print(
            f"\nFIGURE swallowed broadcast ({services.name}, revision {result['revision']}): "
            f"every process cache current after {noticed_s:.2f}s"
        )
    finally:
        worker.stop()
        client = redis.Redis.from_url(services.redis_url)
        for key in client.scan_iter(match=f"{services.namespace}*", count=1000):
            client.delete(key)
