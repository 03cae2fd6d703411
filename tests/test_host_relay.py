"""Per-host fan-in on real prefork workers: the main process relays the reload exchange to its
children and reports for all of them; a child that loses the relay (its channel closed, its
parent killed -9) falls back to its own subscription and keeps converging."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import psutil
import pytest
import redis

from store.broadcast.codec import SIGNATURE_HEADER, ReloadMessage, encode
from store.broadcast.consumer import REPORTED_SCOPES
from store.broadcast.exchange import reload_exchange
from store.broadcast.frames import ALIVE, HELLO, MESSAGE, REPORT, BadFrame, FrameReader, frame
from store.broadcast.relay import ALIVE_EVERY, HostRelay
from store.redis.presence import Presence
from tests.conftest import Services, fresh_id, run_keyring, wait_for
from tests.faults.servers import RedisServer
from tests.test_broadcast import (
    cli,
    isolated,
    processes_of,
    redis_client,
    reports,
    start,
    wait_applied,
    wait_synced,
)

CONCURRENCY = 3


def report_keys(services: Services) -> dict[str, dict[bytes, bytes]]:
    client: redis.Redis = redis_client(services.redis_url)
    return {
        key.decode(): client.hgetall(key)
        for key in client.scan_iter(match=f"{services.namespace}:proc:*", count=500)
    }


def relay_lost(worker: object, since: int = 0) -> set[int]:
    return {event["pid"] for event in worker.events("broadcast.relay_lost", since=since)}  # type: ignore[attr-defined]


def test_frames_arrive_whole_in_order_and_a_frame_over_the_bound_ends_the_stream() -> None:
    """The relay's frames come out whole and in order however the stream splits them, and a
    frame longer than the reader's bound, or of an unknown kind, is refused."""
    left, right = socket.socketpair()
    with left, right:
        reader = FrameReader(max_bytes=100)
        data = frame(HELLO, b'{"pid": 7}') + frame(MESSAGE, b"x" * 100) + frame(MESSAGE, b"y")
        got: list[tuple[bytes, bytes]] = []
        for i in range(0, len(data), 7):  # split mid-header and mid-payload
            left.sendall(data[i : i + 7])
            got += reader.feed(right)
        assert got == [(HELLO, b'{"pid": 7}'), (MESSAGE, b"x" * 100), (MESSAGE, b"y")]
        left.sendall(frame(MESSAGE, b"z" * 101))
        with pytest.raises(BadFrame, match="more than 100"):
            reader.feed(right)
        left.sendall(b"?" + b"\0\0\0\0")
        with pytest.raises(BadFrame, match="unknown kind"):
            FrameReader(max_bytes=100).feed(right)
        left.close()
        with pytest.raises(EOFError):
            FrameReader(max_bytes=100).feed(right)


def test_a_host_report_lists_each_child_and_drops_one_taken_out(services: Services) -> None:
    """One host's report reads back as one process report per child, each with its own
    revisions; a child taken out of it (it reports for itself now) is no longer listed."""
    presence = Presence(redis_client(services.redis_url), namespace=services.namespace)
    main = fresh_id() % 2**22
    fields = {"kind": "worker", "pool": "prefork", "mode": "task", "synced": True}
    try:
        created = presence.report_host(
            hostname="host-a",
            pid=main,
            children={11: {**fields, "messages": 3}, 12: {**fields, "synced": False}},
            revisions={11: {"project:1": 5, "user:7/project:42": 2}, 12: {"project:1": 4}},
        )
        assert created
        again = presence.report_host(hostname="host-a", pid=main, children={}, revisions={})
        assert not again
        found = {r.pid: r for r in presence.processes() if r.hostname == "host-a"}
        assert set(found) == {11, 12}
        assert found[11].revisions == {"project:1": 5, "user:7/project:42": 2}
        assert found[11].messages == 3 and found[11].synced
        assert found[12].revisions == {"project:1": 4} and not found[12].synced
        presence.remove_child("host-a", main, 12)
        assert {r.pid for r in presence.processes() if r.hostname == "host-a"} == {11}
    finally:
        presence.remove("host-a", main)


def child_frames(pid: int, scope: str) -> bytes:
    """A child's hello naming ``pid``, then its report of one applied revision of ``scope``."""
    report = {"fields": {"kind": "worker", "pool": "prefork"}, "revisions": {scope: 1}}
    return frame(HELLO, json.dumps({"pid": pid}).encode()) + frame(
        REPORT, json.dumps({**report, "forgotten": []}).encode()
    )


@contextlib.contextmanager
def reporting_relay(services: Services) -> Iterator[tuple[HostRelay, str, redis.Redis]]:
    """A started relay that reports to the target's Redis, the key of its host report and a
    client to read it with; stopped after."""
    presence = Presence(redis_client(services.redis_url), namespace=services.namespace)
    hostname = f"host-{fresh_id()}"
    relay = HostRelay(presence=presence, hostname=hostname, pool="prefork")
    relay.start()
    try:
        yield relay, presence.key(hostname, relay.pid), redis_client(services.redis_url)
    finally:
        relay.stop()


def test_a_child_cannot_report_as_another_process(services: Services) -> None:
    """The relay takes a child's pid from the kernel, not from its hello: a connection that
    claims another pid is closed and writes nothing, while one that tells the truth is listed
    in the host's report under its own pid."""
    forged = os.getpid() + 1  # a sibling's pid, say
    with (
        reporting_relay(services) as (relay, key, client),
        socket.socket(socket.AF_UNIX) as liar,
        socket.socket(socket.AF_UNIX) as honest,
    ):
        liar.settimeout(10)
        liar.connect(relay.path)
        liar.sendall(child_frames(forged, "project:1"))
        # Read by the relay once it answers the hello or closes the stream.
        closed = liar.recv(64) == b""

        honest.connect(relay.path)
        honest.sendall(child_frames(os.getpid(), "project:2"))
        wait_for(lambda: client.hexists(key, f"p:{os.getpid()}"), message="honest report")
        fields = set(client.hgetall(key))
        assert f"p:{forged}".encode() not in fields
        assert f"c:{forged}:project:1".encode() not in fields
        assert f"c:{os.getpid()}:project:2".encode() in fields
        assert closed, "a hello naming another pid was answered"


def test_a_stopped_relay_leaves_no_host_report_behind(services: Services) -> None:
    """Stopping the relay takes the host's report away once its last report is written, so
    none written on its way out brings it back: the hash is gone when stop returns, and stays
    gone."""
    with (
        reporting_relay(services) as (relay, key, client),
        socket.socket(socket.AF_UNIX) as child,
    ):
        child.connect(relay.path)
        child.sendall(child_frames(os.getpid(), "project:1"))
        wait_for(lambda: client.hexists(key, f"p:{os.getpid()}"), message="the host report")
        # A change due at the moment the relay stops.
        child.sendall(child_frames(os.getpid(), "project:2"))
        relay.stop()
        assert not client.exists(key)
        assert relay._reporter is not None and not relay._reporter.is_alive()
        assert not client.exists(key)


def ended(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (what it sent before is read and dropped)."""
    sock.setblocking(False)
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        return False
    return True


def test_a_child_claiming_more_scopes_than_a_process_keeps_is_cut_off(services: Services) -> None:
    """A child's report of more revisions than a process keeps (REPORTED_SCOPES) is refused:
    its stream is closed and none of it reaches the host's report, which keeps listing the
    honest ones."""
    with (
        reporting_relay(services) as (relay, key, client),
        socket.socket(socket.AF_UNIX) as greedy,
        socket.socket(socket.AF_UNIX) as honest,
    ):
        greedy.settimeout(10)
        greedy.connect(relay.path)
        scopes = {f"project:{n}": 1 for n in range(REPORTED_SCOPES + 1)}
        body = {"fields": {"kind": "worker"}, "revisions": scopes, "forgotten": []}
        greedy.sendall(
            frame(HELLO, json.dumps({"pid": os.getpid()}).encode())
            + frame(REPORT, json.dumps(body).encode())
        )
        wait_for(
            lambda: ended(greedy),
            timeout=10,
            message="the stream of a child reporting too many scopes to end",
        )

        honest.connect(relay.path)
        honest.sendall(child_frames(os.getpid(), "user:1"))
        wait_for(lambda: client.hexists(key, f"c:{os.getpid()}:user:1"), message="honest report")
        fields = client.hkeys(key)
        assert not [f for f in fields if f.startswith(f"c:{os.getpid()}:project:".encode())]


def test_a_relay_without_redis_keeps_no_report_and_sleeps_between_events() -> None:
    """Without Redis (no presence) the relay keeps nothing of its children's reports: the
    revisions they send do not pile up, and its thread waits for the next event instead of
    finding a report always due."""
    relay = HostRelay(presence=None, hostname=f"host-{fresh_id()}", pool="prefork")
    relay.start()
    try:
        with socket.socket(socket.AF_UNIX) as child:
            child.settimeout(10)
            child.connect(relay.path)
            hello = frame(HELLO, json.dumps({"pid": os.getpid()}).encode())
            child.sendall(child_frames(os.getpid(), "project:1") + hello)
            answers = b""
            while len(answers) < 2 * len(frame(HELLO)):  # both hellos answered: report read
                got = child.recv(64)
                assert got, "the relay closed an honest child's stream"
                answers += got
            wait_for(
                lambda: relay._report_timeout() > 0 and not relay._unreported,
                timeout=5,
                message="the reporter left with time to sleep",
            )
    finally:
        relay.stop()


def test_a_redis_that_hangs_holds_back_no_frame_to_the_children(tmp_path: Path) -> None:
    """The host report waits on Redis on a thread of its own: with the report's Redis stopped
    (SIGSTOP: it accepts and never answers), a child still hears from its parent at least every
    ALIVE_EVERY (not the silence after which it gives up on it), and a child that connects
    meanwhile has its hello answered."""
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    presence = Presence(redis.Redis.from_url(server.url), namespace=f"hang{fresh_id()}")
    reporting = threading.Event()
    report_host = presence.report_host

    def entered(**kwargs: Any) -> bool:
        reporting.set()
        return report_host(**kwargs)

    presence.report_host = entered  # type: ignore[method-assign]
    relay = HostRelay(presence=presence, hostname=f"host-{fresh_id()}", pool="prefork")
    relay.start()
    assert server.process is not None
    try:
        with socket.socket(socket.AF_UNIX) as child, socket.socket(socket.AF_UNIX) as late:
            child.settimeout(2 * ALIVE_EVERY)
            child.connect(relay.path)
            reader = FrameReader(max_bytes=1 << 20)
            child.sendall(frame(HELLO, json.dumps({"pid": os.getpid()}).encode()))
            assert reader.feed(child)  # the hello answered
            os.kill(server.process.pid, signal.SIGSTOP)
            # A report falls due at once: from now on it waits on Redis for good.
            child.sendall(child_frames(os.getpid(), "project:1"))
            assert reporting.wait(10), "the host report never went to Redis"
            heard = [kind for kind, _ in reader.feed(child)]  # the second hello's answer
            started = time.monotonic()
            while time.monotonic() - started < 3 * ALIVE_EVERY:
                heard += [kind for kind, _ in reader.feed(child)]  # raises on 2 s of silence
            assert heard.count(ALIVE) >= 2, heard

            late.settimeout(2 * ALIVE_EVERY)
            late.connect(relay.path)
            late.sendall(frame(HELLO, json.dumps({"pid": os.getpid()}).encode()))
            assert FrameReader(max_bytes=1 << 20).feed(late)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        relay.stop()
        server.close()


def test_a_stream_that_fails_a_send_is_ended_not_left_with_a_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A send that fails for another reason than a full buffer (ENOBUFS, say) loses that
    frame: the child's stream is ended, so that it falls back, rather than left open to hear
    the next message as if none were missing."""
    relay = HostRelay(presence=None, hostname=f"host-{fresh_id()}", pool="prefork")
    relay.start()
    try:
        with socket.socket(socket.AF_UNIX) as child:
            child.settimeout(10)
            child.connect(relay.path)
            child.sendall(frame(HELLO, json.dumps({"pid": os.getpid()}).encode()))
            reader = FrameReader(max_bytes=1 << 20)
            assert reader.feed(child)  # the hello answered
            (held,) = list(relay._children.values())

            class Failing:
                def __init__(self, sock: socket.socket) -> None:
                    self.sock = sock

                def send(self, data: bytes) -> int:
                    raise OSError(errno.ENOBUFS, "No buffer space available")

                def __getattr__(self, name: str) -> object:
                    return getattr(self.sock, name)

            monkeypatch.setattr(held, "sock", Failing(held.sock))
            relay.forward(ReloadMessage.heartbeat(origin="lost"))
            monkeypatch.undo()
            wait_for(lambda: ended(child), timeout=10, message="the child's stream to end")
    finally:
        relay.stop()


def test_one_report_per_host_lists_every_child_in_status_and_wait(services: Services) -> None:
    """A prefork worker's children report through its main process, in one Redis hash, and
    `status` still lists each child with its position while `set --wait` counts each one."""
    with isolated(services) as own, contextlib.ExitStack() as stack:
        worker = start(own, pool="prefork", concurrency=CONCURRENCY)
        stack.callback(worker.stop)
        assert worker.process is not None
        children = processes_of(worker)
        project = fresh_id()
        result = worker.call("options.set_project_option", project, "k", "v1")
        wait_applied(own, children, result["scope"], result["revision"])

        keys = report_keys(own)
        assert list(keys) == [f"{own.namespace}:proc:{os.uname().nodename}:{worker.process.pid}"]
        (host,) = keys.values()
        assert host[b"relay"] == b"true"
        assert {f"p:{pid}".encode() for pid in children} <= set(host)

        done = cli(worker, "status", "--json")
        assert done.returncode == 0, done.stderr
        listed = {p["pid"]: p for p in json.loads(done.stdout)["processes"]}
        assert set(listed) == children
        for process in listed.values():
            assert process["synced"] is True, process
            assert process["scopes_applied"] >= 1, process

        done = cli(worker, "set", f"project:{project}", "k", '"v2"', "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"applied by {CONCURRENCY} live worker processes" in done.stdout, done.stdout


def test_a_child_whose_relay_closes_falls_back_and_keeps_converging(services: Services) -> None:
    """A child whose channel to its parent is closed says so once, subscribes for itself and
    reports for itself; it and its siblings apply every later write, and `status` lists each
    child once."""
    with isolated(services) as own, contextlib.ExitStack() as stack:
        worker = start(own, pool="prefork", concurrency=CONCURRENCY)
        stack.callback(worker.stop)
        children = processes_of(worker)
        since = len(worker.log())
        cut = worker.call("probe.cut_relay")
        assert cut in children

        wait_for(
            lambda: cut in relay_lost(worker, since),
            timeout=15,
            message="broadcast.relay_lost from the cut child",
        )
        assert relay_lost(worker, since) == {cut}
        wait_synced(own, children)
        own_key = f"{own.namespace}:proc:{os.uname().nodename}:{cut}"
        wait_for(
            lambda: own_key in report_keys(own),
            timeout=15,
            message="the cut child's own report",
        )

        project = fresh_id()
        for n in range(3):
            result = worker.call("options.set_project_option", project, "k", n)
            wait_applied(own, children, result["scope"], result["revision"])
        values = worker.read_everywhere("project_options", "get_value", project, "k")
        assert set(values.values()) == {2}
        listed = [r.pid for r in reports(own).values()]
        assert sorted(listed) == sorted(children)
        done = cli(worker, "set", f"project:{project}", "k", "3", "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"applied by {CONCURRENCY} live worker processes" in done.stdout, done.stdout


def test_children_of_a_main_process_killed_9_serve_nothing(services: Services) -> None:
    """kill -9 of a prefork worker's main process: every child is gone soon after (Celery's
    prefork children die with their parent) or has noticed the closed relay and falls back;
    none keeps serving from a cache no relay feeds."""
    with isolated(services) as own, contextlib.ExitStack() as stack:
        worker = start(own, pool="prefork", concurrency=CONCURRENCY)
        stack.callback(worker.stop)
        assert worker.process is not None
        children = processes_of(worker)
        for child in children:
            stack.callback(functools.partial(_kill, child))
        since = len(worker.log())
        os.kill(worker.process.pid, signal.SIGKILL)

        def settled() -> bool:
            lost = relay_lost(worker, since)
            return all(not _running(pid) or pid in lost for pid in children)

        wait_for(settled, timeout=15, message="every child gone, or fallen back")


def test_a_child_whose_parent_stops_answering_falls_back_within_the_deadline(
    services: Services,
) -> None:
    """A prefork worker's main process stopped (SIGSTOP: alive, but relaying nothing) while its
    child runs a task that keeps reading: the child notices the silence past the heartbeat
    deadline, falls back to its own subscription, and the running task sees a write committed
    meanwhile."""
    with isolated(services) as own, contextlib.ExitStack() as stack:
        reader = start(own, pool="prefork", concurrency=1)
        stack.callback(reader.stop)
        writer = start(
            own,
            pool="solo",
            concurrency=1,
            extra_env={"OPTIONS_TASK_QUEUE": f"{own.namespace}.writer"},
        )
        stack.callback(writer.stop)
        assert reader.process is not None
        main = psutil.Process(reader.process.pid)
        (child,) = processes_of(reader)
        project, key = fresh_id(), "k"
        writer.call("options.set_project_option", project, key, "old")
        marker = f"{own.namespace}:marker:{project}"
        polling = reader.send(
            "probe.poll", "project_options", "get_value", [project, key], "new", marker, 40.0
        )
        wait_for(
            lambda: redis_client(own.redis_url).get(marker),
            timeout=30,
            message="the polling task's first read",
        )
        since = len(reader.log())
        main.suspend()
        stack.callback(main.resume)
        wait_for(
            lambda: child in relay_lost(reader, since),
            timeout=20,
            message="broadcast.relay_lost from the child of the stopped worker",
        )
        writer.call("options.set_project_option", project, key, "new")
        answer = polling.get(timeout=60)
        assert answer["pid"] == child
        # Task mode: the task keeps its first read unless a broadcast moves it on, and only
        # its own subscription can bring one now.
        assert answer["first"] == "old"
        assert answer["last"] == "new", answer


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_the_relay_setting_is_read_as_a_flag_and_names_itself_when_bad() -> None:
    """OPTIONS_HOST_RELAY is on unless set to 0; anything but a flag is refused, by name."""
    from store.errors import InvalidOption
    from store.settings import Settings

    assert Settings.from_environ({}).host_relay is True
    assert Settings.from_environ({"OPTIONS_HOST_RELAY": "0"}).host_relay is False
    assert Settings.from_environ({}, host_relay="1").host_relay is True
    with pytest.raises(InvalidOption, match="OPTIONS_HOST_RELAY"):
        Settings.from_environ({"OPTIONS_HOST_RELAY": "sometimes"})


def test_with_the_relay_off_every_child_subscribes_and_reports_for_itself(
    services: Services,
) -> None:
    """OPTIONS_HOST_RELAY=0: each prefork child holds its own subscription and report, as
    before the relay, and applies every write."""
    with isolated(services) as own, contextlib.ExitStack() as stack:
        worker = start(own, pool="prefork", concurrency=2, extra_env={"OPTIONS_HOST_RELAY": "0"})
        stack.callback(worker.stop)
        children = processes_of(worker)
        keys = report_keys(own)
        host = os.uname().nodename
        assert set(keys) == {f"{own.namespace}:proc:{host}:{pid}" for pid in children}
        assert all(b"relay" not in fields for fields in keys.values())
        result = worker.call("options.set_project_option", fresh_id(), "k", "v")
        wait_applied(own, children, result["scope"], result["revision"])


def test_the_main_process_alone_drops_forged_and_malformed_messages(services: Services) -> None:
    """With the relay, the main process checks every message before a child hears it: a
    forged change (unsigned) and a malformed body (signed) are dropped and logged once each,
    by the main process alone; every child keeps the committed value in its cache, and the
    real write at the forged revision then reaches every child."""
    with isolated(services) as own, contextlib.ExitStack() as stack:
        worker = start(
            own,
            pool="prefork",
            concurrency=CONCURRENCY,
            extra_env={"OPTIONS_LOCAL_CACHE": "process"},
        )
        stack.callback(worker.stop)
        children = processes_of(worker)
        project = fresh_id()
        scope = f"project:{project}"
        first = worker.call("options.set_project_option", project, "k", "v1")
        wait_applied(own, children, scope, first["revision"])
        assert set(
            worker.read_everywhere("project_options", "get_value", project, "k").values()
        ) == {"v1"}
        since = len(worker.log())
        forged = ReloadMessage(
            "change", scope, first["revision"] + 1, {"k": "forged"}, (), time.time(), time.time()
        )
        malformed = b'{"v": 1, "kind": "change", "scope": 7}'
        exchange = reload_exchange(own.namespace)
        connection = stack.enter_context(kombu.Connection(own.broker_url))
        producer = kombu.Producer(connection.default_channel)
        for body, headers in (
            (encode(forged).encode(), {}),
            (malformed, {SIGNATURE_HEADER: run_keyring().sign(malformed)}),
        ):
            producer.publish(
                body,
                exchange=exchange,
                routing_key="",
                content_type="application/json",
                content_encoding="utf-8",
                headers=headers,
                declare=[exchange],
            )
        wait_for(
            lambda: (
                worker.events("broadcast.unverified", since=since)
                and worker.events("broadcast.malformed", since=since)
            ),
            timeout=15,
            message="the main process to drop both messages",
        )
        assert set(
            worker.read_everywhere("project_options", "get_value", project, "k").values()
        ) == {"v1"}

        real = worker.call("options.set_project_option", project, "k", "v2")
        assert real["revision"] == first["revision"] + 1
        wait_applied(own, children, scope, real["revision"])
        assert set(
            worker.read_everywhere("project_options", "get_value", project, "k").values()
        ) == {"v2"}
        # The stream is ordered: a child that had heard either message logged it before it
        # applied the real write. One process checked each.
        assert len(worker.events("broadcast.unverified", since=since)) == 1
        assert len(worker.events("broadcast.malformed", since=since)) == 1


def test_children_of_a_main_process_whose_consumer_is_stuck_stop_caching_within_the_deadline(
    services: Services,
) -> None:
    """The main process alive (its relay thread keeps each child's stream going) but its
    consumer stuck before it forwards a change (tests/stuck_relay.py): within the heartbeat
    deadline every child stops caching and reads the committed value, instead of serving its
    cached one for as long as the consumer is stuck."""
    with isolated(services) as own, contextlib.ExitStack() as stack:
        worker = start(
            own,
            pool="prefork",
            concurrency=CONCURRENCY,
            include="tests.probe_tasks,tests.stuck_relay",
            extra_env={"OPTIONS_LOCAL_CACHE": "process"},
        )
        stack.callback(worker.stop)
        children = processes_of(worker)
        project = fresh_id()
        first = worker.call("options.set_project_option", project, "k", "v1")
        wait_applied(own, children, first["scope"], first["revision"])
        assert read_all(worker, project) == {"v1"}
        since = len(worker.log())

        worker.call("options.set_project_option", project, "k", "stuck:v2")
        # STUCK (15 s) is three deadlines: a child still caching reads v1 past this wait.
        wait_for(
            lambda: read_all(worker, project) == {"stuck:v2"},
            timeout=10,
            interval=0.2,
            message="every child to read the committed value",
        )
        # Before a task (the exchange silent too long), or in the consumer's own loop.
        assert worker.events("broadcast.deafened", since=since)
        assert relay_lost(worker, since) == set()  # the parent lives: nobody fell back


def read_all(worker: object, project: int) -> set[object]:
    """What every child of ``worker`` reads of the project's option ``k``."""
    answers = worker.read_everywhere("project_options", "get_value", project, "k")  # type: ignore[attr-defined]
    return set(answers.values())
