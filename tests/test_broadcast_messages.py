"""Reload messages one by one: their checks, their ordering rules and their size, in units and
published straight onto a running worker's reload exchange."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kombu
import pytest

from store.broadcast.codec import (
    CHANGE,
    SIGNATURE_HEADER,
    MalformedMessage,
    ReloadMessage,
    decode,
    decode_redis_envelope,
    encode,
    encode_announcement,
    redis_envelope,
)
from store.broadcast.exchange import reload_exchange
from store.broadcast.publisher import Publisher
from store.local import PROCESS, TASK, LocalCache, ScopeState
from store.model.scopes import project_scope
from store.model.writes import WriteResult, many_write, set_write
from store.options_store import OptionsStore
from store.postgres.store import PostgresStore
from store.redis.cache import RedisCache
from tests.conftest import Services, Worker, amqp_url, fresh_id, run_keyring, wait_for
from tests.test_broadcast import first_answers, isolated, start, wait_applied, wait_synced

SCOPE = "project:42"


def change_body(**fields: Any) -> dict[str, Any]:
    """A well-formed change body, with ``fields`` replaced (a value of ``...`` removes one)."""
    body: dict[str, Any] = {
        "v": 1,
        "kind": CHANGE,
        "sent_at": 1_700_000_000.5,
        "origin": "test",
        "scope": SCOPE,
        "revision": 3,
        "set": {"k": "fake"},
        "unset": [],
        "committed_at": 1_700_000_000.25,
    }
    for name, value in fields.items():
        if value is ...:
            body.pop(name)
        else:
            body[name] = value
    return body


# Each malformed case: (id, body, the field its error names).
MALFORMED: list[tuple[str, object, str]] = [
    ("list", ["not", "an", "object"], "body"),
    ("string", "not an object", "body"),
    ("null", None, "body"),
    ("v-missing", change_body(v=...), "v"),
    ("v-2", change_body(v=2), "v"),
    ("v-text", change_body(v="1"), "v"),
    ("kind-unknown", change_body(kind="bogus"), "kind"),
    ("kind-missing", change_body(kind=...), "kind"),
    ("scope-padded", change_body(scope="project:007"), "scope"),
    ("scope-unknown", change_body(scope="planet:3"), "scope"),
    ("scope-number", change_body(scope=42), "scope"),
    ("scope-id-zero", change_body(scope="project:0"), "scope"),
    ("revision-0", change_body(revision=0), "revision"),
    ("revision-negative", change_body(revision=-1), "revision"),
    ("revision-text", change_body(revision="3"), "revision"),
    ("revision-bool", change_body(revision=True), "revision"),
    ("revision-float", change_body(revision=3.0), "revision"),
    ("revision-missing", change_body(revision=...), "revision"),
    ("set-list", change_body(set=[["k", 1]]), "set"),
    ("set-text", change_body(set="k"), "set"),
    ("set-missing", change_body(set=...), "set"),
    ("unset-text", change_body(unset="k"), "unset"),
    ("unset-object", change_body(unset={"k": 1}), "unset"),
    ("unset-numbers", change_body(unset=[1]), "unset"),
    ("committed_at-missing", change_body(committed_at=...), "committed_at"),
    ("committed_at-text", change_body(committed_at="now"), "committed_at"),
    ("committed_at-bool", change_body(committed_at=True), "committed_at"),
    ("sent_at-missing", change_body(sent_at=...), "sent_at"),
    ("origin-number", change_body(origin=7), "origin"),
]


# -- ReloadMessage.from_body -----------------------------------------------------------------


def test_from_body_reads_back_what_to_body_wrote() -> None:
    """A change survives to_body and from_body unchanged, and a heartbeat needs no scope."""
    message = ReloadMessage(CHANGE, SCOPE, 9, {"a": [1, {"b": None}]}, ("c",), 1.5, 2.5, "me")
    assert ReloadMessage.from_body(json.loads(json.dumps(message.to_body()))) == message
    beat = ReloadMessage.heartbeat(origin="beacon")
    assert ReloadMessage.from_body(beat.to_body()) == beat


@pytest.mark.parametrize(
    ("body", "field"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_from_body_rejects_a_malformed_body_naming_the_field(body: object, field: str) -> None:
    """Each malformed body is refused with an error that starts with the faulty field's name."""
    with pytest.raises(MalformedMessage) as caught:
        ReloadMessage.from_body(body)
    assert str(caught.value).startswith(f"{field}"), str(caught.value)


@pytest.mark.parametrize("field", ["sent_at", "committed_at"])
def test_from_body_rejects_a_number_too_large_for_a_float(field: str) -> None:
    """A timestamp that JSON can carry but a float cannot hold is a malformed message."""
    with pytest.raises(MalformedMessage, match=field):
        ReloadMessage.from_body(change_body(**{field: 10**400}))


# -- the wire --------------------------------------------------------------------------------


def test_the_codec_reads_back_what_it_wrote_on_either_broker() -> None:
    """A message encoded as an AMQP body, or inside kombu's envelope on Redis, decodes to itself."""
    message = ReloadMessage(CHANGE, SCOPE, 9, {"a": [1, {"b": "é"}]}, ("c",), 1.5, 2.5, "me")
    assert decode(encode(message)) == message
    assert decode(encode(message).encode()) == message
    assert decode_redis_envelope(redis_envelope(encode(message), "x.reload")) == message


def test_an_announcement_reads_back_as_the_change_it_announces() -> None:
    """The change text made from a write's JSON texts decodes as ReloadMessage.change makes
    it; over the size limit the same write is announced as a RELOAD of its revision."""
    changes: dict[str, str | None] = {"k": '{"n":[1,2.5,"\\u00e9"]}', "gone": None}
    result = WriteResult(SCOPE, 5, True, changes, "t", 1.25)
    heard = decode(encode_announcement(result, origin="me"))
    made = ReloadMessage.change(result, origin="me")
    assert heard == ReloadMessage(
        CHANGE, SCOPE, 5, {"k": {"n": [1, 2.5, "é"]}}, ("gone",), 1.25, heard.sent_at, "me"
    )
    assert (heard.sets, heard.unsets) == (made.sets, made.unsets)
    reload = decode(encode_announcement(result, origin="me", max_bytes=64))
    assert (reload.kind, reload.scope, reload.revision, reload.sets) == ("reload", SCOPE, 5, {})


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json", "not a kombu message"),
        (b"[1]", "not a kombu message"),
        (b'{"body": "e30="}', "not a kombu message"),
        (b'{"body": "e30=", "properties": {"body_encoding": "rot13"}}', "not a kombu message"),
        (redis_envelope("{oops", "x.reload").encode(), "undecodable body"),
        (redis_envelope('{"v": 2}', "x.reload").encode(), "v:"),
        (redis_envelope("[" * 100_000 + "]" * 100_000, "x.reload").encode(), "undecodable body"),
    ],
)
def test_the_codec_refuses_what_is_not_a_reload_message(data: bytes, error: str) -> None:
    """An envelope or a body that is not a reload message raises MalformedMessage, however
    deep or broken it is, never another error that would drop the subscription."""
    with pytest.raises(MalformedMessage, match=error):
        decode_redis_envelope(data)


def test_the_codec_refuses_a_body_of_another_type() -> None:
    """A pickled body is refused unread; its content type is what the log line shows."""
    with pytest.raises(MalformedMessage, match="undecodable body") as caught:
        decode(b"\x80\x04K\x01.", content_type="application/x-python-serialize")
    assert caught.value.context == {"content_type": "application/x-python-serialize"}


# -- LocalCache.apply_change and the revision floors -----------------------------------------


def test_apply_change_outcomes() -> None:
    """Only the direct successor is applied; an old or repeated revision changes nothing; a gap
    drops the scope; with nothing cached the floor still moves."""
    cache = LocalCache(PROCESS)
    assert cache.apply_change(SCOPE, 4, {"k": 1}, ()) == "absent"
    assert cache.floors[SCOPE] == 4
    assert SCOPE not in cache.scopes

    before = ScopeState(4, {"k": 1, "gone": True})
    cache.scopes[SCOPE] = before
    assert cache.apply_change(SCOPE, 5, {"k": 2, "new": "n"}, ("gone",)) == "applied"
    after = cache.scopes[SCOPE]
    assert (after.revision, after.values) == (5, {"k": 2, "new": "n"})
    # Swapped in whole: a reader holding the old state never sees half a change.
    assert (before.revision, before.values) == (4, {"k": 1, "gone": True})

    assert cache.apply_change(SCOPE, 5, {"k": "duplicate"}, ()) == "old"
    assert cache.apply_change(SCOPE, 3, {"k": "stale"}, ()) == "old"
    assert cache.scopes[SCOPE] is after
    assert cache.floors[SCOPE] == 5

    assert cache.apply_change(SCOPE, 7, {"k": 7}, ()) == "gap"
    assert SCOPE not in cache.scopes
    assert cache.floors[SCOPE] == 7


def test_apply_change_reaches_the_cache_of_every_thread() -> None:
    """In task mode in a threads-pool worker, a change reaches the scope another thread's
    running task has cached."""
    cache = LocalCache(TASK)
    cache.set_mode(TASK, one_task_at_a_time=False)  # what the worker's start does for threads
    cached = threading.Event()
    done = threading.Event()
    seen: list[ScopeState] = []

    def running_task() -> None:
        cache.scopes[SCOPE] = ScopeState(1, {"k": "old"})
        cached.set()
        done.wait(10)
        seen.append(cache.scopes[SCOPE])

    thread = threading.Thread(target=running_task)
    thread.start()
    try:
        assert cached.wait(10)
        assert SCOPE not in cache.scopes  # this thread's own map is empty
        assert cache.apply_change(SCOPE, 2, {"k": "new"}, ()) == "applied"
    finally:
        done.set()
        thread.join(10)
    assert (seen[0].revision, seen[0].values) == (2, {"k": "new"})


class CannedLoads(OptionsStore):
    """A store whose loads return canned states: one answer from Redis, one from PostgreSQL."""

    def __init__(self, *, redis: ScopeState, postgres: ScopeState) -> None:
        super().__init__()
        self.answers = {True: redis, False: postgres}
        self.loads: list[bool] = []

    def load_many(self, scopes: list[str], *, use_redis: bool = True) -> dict[str, ScopeState]:
        self.loads.append(use_redis)
        return dict.fromkeys(scopes, self.answers[use_redis])


class FloorRaisedAfterCheck(dict[str, int]):
    """Floors whose first lookup of a scope runs a whole broadcast right after it answers: the
    reload consumer's thread winning the race between a reader's floor check and its insert."""

    def __init__(self, cache: LocalCache, revision: int) -> None:
        super().__init__()
        self.cache = cache
        self.revision = revision
        self.raced = False

    def get(self, key: str, default: Any = None) -> Any:
        answer = super().get(key, default)
        if not self.raced:
            self.raced = True
            self.cache.apply_change(key, self.revision, {"k": "new"}, ())
        return answer


def test_older_load_than_the_floor_is_reloaded_from_postgres() -> None:
    """A Redis answer older than an announced revision is replaced by PostgreSQL's, then cached."""
    store = CannedLoads(redis=ScopeState(3, {"k": "old"}), postgres=ScopeState(4, {"k": "new"}))
    store.local.apply_change(SCOPE, 4, {"k": "new"}, ())
    state = store.state(SCOPE)
    assert (state.revision, state.values) == (4, {"k": "new"})
    assert store.loads == [True, False]
    assert store.local.scopes[SCOPE] is state


def test_older_load_than_the_floor_is_never_cached() -> None:
    """A load still older than an announced revision is served once but never cached."""
    old = ScopeState(3, {"k": "old"})
    store = CannedLoads(redis=old, postgres=old)
    store.local.apply_change(SCOPE, 4, {"k": "new"}, ())
    assert store.state(SCOPE) is old
    assert SCOPE not in store.local.scopes


def test_floor_raised_between_load_and_insert_uncaches_the_load() -> None:
    """A broadcast landing between a reader's floor check and its insert removes the insert."""
    old = ScopeState(3, {"k": "old"})
    store = CannedLoads(redis=old, postgres=old)
    store.local.floors = FloorRaisedAfterCheck(store.local, 4)
    store.state(SCOPE)
    assert SCOPE not in store.local.scopes


def test_floor_raised_between_bulk_load_and_insert_uncaches_the_load() -> None:
    """The bulk read path also removes a load a broadcast overtook before it was inserted."""
    old = ScopeState(3, {"k": "old"})
    store = CannedLoads(redis=old, postgres=old)
    store.local.floors = FloorRaisedAfterCheck(store.local, 4)
    store.states([SCOPE])
    assert SCOPE not in store.local.scopes


def test_bulk_read_older_than_the_floor_is_reloaded_from_postgres() -> None:
    """get_value_bulk's path, like get_value's, replaces a Redis answer older than the floor."""
    store = CannedLoads(redis=ScopeState(3, {"k": "old"}), postgres=ScopeState(4, {"k": "new"}))
    store.local.apply_change(SCOPE, 4, {"k": "new"}, ())
    assert store.states([SCOPE])[SCOPE].revision == 4


def quiet_store(services: Services) -> OptionsStore:
    """A store on ``services`` that commits to PostgreSQL and Redis and broadcasts nothing."""
    quiet = OptionsStore()
    quiet.configure(
        postgres=PostgresStore(conninfo=services.database_url, max_size=2),
        redis_cache=RedisCache(url=services.redis_url, prefix=services.namespace),
    )
    return quiet


def test_floor_sends_a_late_redis_answer_to_postgres(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With real services, a Redis answer from before an announced commit is not what is read."""
    quiet = quiet_store(services)
    try:
        scope = project_scope(fresh_id())
        quiet.commit(set_write(scope, "k", "v1"))
        late = quiet.db.load_scope(scope.name)  # taken before the next commit, served after it
        assert quiet.redis is not None
        newer = quiet.commit(set_write(scope, "k", "v2"))
        monkeypatch.setattr(
            quiet.redis, "get_encoded", lambda scopes: dict.fromkeys(scopes, late.encoded())
        )

        assert quiet.apply_message(ReloadMessage.change(newer)) == "absent"
        state = quiet.state(scope.name)
        assert (state.revision, state.values) == (newer.revision, {"k": "v2"})
        assert quiet.local.scopes[scope.name] is state
    finally:
        assert quiet.postgres is not None
        quiet.postgres.close()


# -- size ------------------------------------------------------------------------------------


def test_one_key_change_makes_the_same_small_message_whatever_the_scope_size(backend: Any) -> None:
    """The broadcast of a one-key change carries that key alone, in a 10,000-key scope or a
    one-key scope alike."""
    big_id = fresh_id()
    big, small = project_scope(big_id), project_scope(big_id + 1)  # names of equal length
    backend.commit(many_write(big, {f"key{i:05d}": i for i in range(10_000)}, []))
    backend.commit(set_write(small, "other", 0))
    # A key the big scope holds: a new one would take it past OPTIONS_MAX_SCOPE_KEYS (10,000).
    key, value = "key00000", "x" * 100
    sizes = {}
    for scope in (big, small):
        result: WriteResult = backend.commit(set_write(scope, key, value))
        body = ReloadMessage.change(result).to_body()
        assert (body["set"], body["unset"]) == ({key: value}, [])
        sizes[scope.name] = len(json.dumps(body))
    payload = len(json.dumps({key: value}))
    print(f"\none-key change: {sizes} bytes, of which {payload} key and value")
    assert sizes[big.name] < payload + 300
    # Only the float reprs of the two timestamps may differ in length.
    assert abs(sizes[big.name] - sizes[small.name]) <= 16


# -- published onto a running worker ---------------------------------------------------------


@dataclass
class Target:
    """A process-mode prefork worker, a quiet store on its services, and two ways to publish."""

    services: Services
    worker: Worker
    quiet: OptionsStore
    publisher: Publisher
    raw: kombu.Producer

    def commit(self, project: int, key: str, value: Any) -> WriteResult:
        return self.quiet.commit(set_write(project_scope(project), key, value))

    def publish_raw(self, body: Any, **options: Any) -> None:
        """Publish ``body`` as is (JSON-encoded unless ``serializer=None``), signed with the
        run's key over the exact bytes sent, as any sender holding the key could."""
        exchange = reload_exchange(self.services.namespace)
        if options.pop("serializer", "json") == "json":
            body = json.dumps(body).encode()
            options.update(content_type="application/json", content_encoding="utf-8")
        data = body if isinstance(body, bytes) else str(body).encode()
        headers = {SIGNATURE_HEADER: run_keyring().sign(data)}
        self.raw.publish(
            data, exchange=exchange, routing_key="", declare=[exchange], headers=headers, **options
        )

    def outcomes(self, scope: str, revision: int, since: int = 0) -> list[str]:
        return [
            e["outcome"]
            for e in self.worker.events("broadcast.applied", since=since)
            if e.get("scope") == scope and e.get("revision") == revision
        ]


@pytest.fixture(scope="module", params=["redis", "amqp"])
def target(request: pytest.FixtureRequest, services: Services) -> Iterator[Target]:
    """A process-mode worker with its own database and namespace, on a Redis or RabbitMQ broker."""
    if request.param == "amqp" and services.name != "machine":
        pytest.skip("the RabbitMQ variant runs on the machine target")
    broker = services.broker_url if request.param == "redis" else amqp_url()
    with isolated(services, broker) as own, contextlib.ExitStack() as stack:
        worker = start(
            own,
            pool="prefork",
            concurrency=3,
            broker_url=broker,
            extra_env={
                "OPTIONS_LOCAL_CACHE": "process",
                # Each child decodes every message itself (tests/test_host_relay.py: the relay).
                "OPTIONS_HOST_RELAY": "0",
            },
        )
        stack.callback(worker.stop)
        quiet = quiet_store(own)
        stack.callback(lambda: quiet.postgres.close() if quiet.postgres else None)
        publisher = Publisher(
            connect=functools.partial(kombu.Connection, broker, connect_timeout=2),
            namespace=own.namespace,
            origin="test",
            keyring=run_keyring(),
        )
        stack.callback(publisher.close)
        connection = stack.enter_context(kombu.Connection(broker))
        yield Target(own, worker, quiet, publisher, kombu.Producer(connection.default_channel))


def wait_outcomes(target: Target, scope: str, revision: int, expected: str) -> None:
    """Wait until each of the three children has logged ``expected`` for ``scope@revision``."""
    wait_for(
        lambda: len(target.outcomes(scope, revision)) >= 3,
        timeout=15,
        message=f"every child to handle {scope}@{revision}",
    )
    assert target.outcomes(scope, revision) == [expected] * 3


def warm(target: Target, project: int, key: str, expected: Any) -> None:
    """Make every child read (and so cache) the scope, and check what it read."""
    answers = first_answers(target.worker, "project_options", "get_value", project, key)
    assert {json.dumps(a["result"]) for a in answers.values()} == {json.dumps(expected)}


def test_out_of_order_revision_drops_the_scope_and_the_next_read_reloads(target: Target) -> None:
    """Revision N+2 arriving before N+1 drops the cached scope; the next read loads N+2."""
    project, key = fresh_id(), "order"
    first = target.commit(project, key, "v1")
    warm(target, project, key, "v1")
    second = target.commit(project, key, "v2")
    third = target.commit(project, key, "v3")

    target.publisher.publish(ReloadMessage.change(third))
    wait_outcomes(target, first.scope, third.revision, "gap")
    target.publisher.publish(ReloadMessage.change(second))
    wait_outcomes(target, first.scope, second.revision, "absent")

    answers = first_answers(target.worker, "project_options", "get_value", project, key)
    for pid, answer in answers.items():
        assert answer["result"] == "v3", (pid, answer)
        reads = answer["after"]["redis_reads"] + answer["after"]["postgres_reads"]
        assert reads > answer["before"]["redis_reads"] + answer["before"]["postgres_reads"]


def test_duplicate_and_old_messages_change_nothing(target: Target) -> None:
    """A repeated or older revision carrying a fake value leaves every child's value alone."""
    project, key = fresh_id(), "dup"
    older = target.commit(project, key, "v1")
    current = target.commit(project, key, "v2")
    warm(target, project, key, "v2")

    for result, fake in ((current, "fake-duplicate"), (older, "fake-old")):
        target.publisher.publish(
            ReloadMessage(CHANGE, result.scope, result.revision, {key: fake}, (), time.time())
        )
        wait_outcomes(target, result.scope, result.revision, "old")

    answers = first_answers(target.worker, "project_options", "get_value", project, key)
    for pid, answer in answers.items():
        assert answer["result"] == "v2", (pid, answer)
        assert answer["after"] == answer["before"], (pid, answer)


def test_malformed_messages_are_logged_ignored_and_survived(target: Target) -> None:
    """Malformed bodies are logged as broadcast.malformed, change nothing, and a later real
    write still reaches every child."""
    project, key = fresh_id(), "malformed"
    committed = target.commit(project, key, "committed")
    warm(target, project, key, "committed")
    since = len(target.worker.log())
    tag = uuid.uuid4().hex
    scope = f"project:{project}"
    bodies: list[object] = [[tag], tag]
    for _, body, _ in MALFORMED:
        if isinstance(body, dict):
            # The tag leads the body so it shows in the logged (truncated) repr.
            fields = {"tag": tag, **body}
            if fields.get("scope") == SCOPE:
                fields["scope"] = scope
            if type(fields.get("revision")) is int and fields["revision"] == 3:
                fields["revision"] = committed.revision + 1  # would be applied, were it valid
            bodies.append(fields)
    for body in bodies:
        target.publish_raw(body)

    def logged() -> list[dict[str, Any]]:
        found = target.worker.events("broadcast.malformed", since=since)
        return [e for e in found if tag in e.get("body", "")]

    wait_for(
        lambda: len(logged()) >= 3 * len(bodies),
        timeout=15,
        message=f"{3 * len(bodies)} broadcast.malformed events",
    )
    assert target.worker.events("broadcast.lost", since=since) == []

    answers = first_answers(target.worker, "project_options", "get_value", project, key)
    for pid, answer in answers.items():
        assert answer["result"] == "committed", (pid, answer)
        assert answer["after"] == answer["before"], (pid, answer)

    result = target.worker.call("options.set_project_option", project, key, "real")
    wait_applied(target.services, target.worker.child_pids(), scope, result["revision"])
    warm(target, project, key, "real")


@pytest.mark.parametrize(
    "kind",
    [
        "pickle-content-type",
        "invalid-json",
        "number-too-large-for-a-float",
    ],
)
def test_undecodable_message_is_logged_without_dropping_the_subscription(
    target: Target, kind: str
) -> None:
    """A body that cannot be decoded is logged and ignored; the subscription stays up."""
    pids = target.worker.child_pids()
    since = len(target.worker.log())
    sent_at = time.time()
    tag = uuid.uuid4().hex
    try:
        if kind == "pickle-content-type":
            target.publish_raw(
                tag.encode(),
                serializer=None,
                content_type="application/x-python-serialize",
                content_encoding="binary",
            )
        elif kind == "invalid-json":
            target.publish_raw(
                f'{{"{tag}": oops'.encode(),
                serializer=None,
                content_type="application/json",
                content_encoding="utf-8",
            )
        else:
            target.publish_raw(change_body(tag=tag, sent_at=10**400))
        # A valid change right behind it: applied by every child unless the bad one broke them.
        marker = fresh_id()
        target.publisher.publish(
            ReloadMessage(CHANGE, f"project:{marker}", 1, {"k": 1}, (), time.time())
        )

        def settled() -> bool:
            lost = target.worker.events("broadcast.lost", since=since)
            applied = [
                e
                for e in target.worker.events("broadcast.applied", since=since)
                if e.get("scope") == f"project:{marker}"
            ]
            return bool(lost) or len(applied) >= 3

        wait_for(settled, timeout=15, message="the children to handle both messages")
        assert target.worker.events("broadcast.lost", since=since) == []
        assert len(target.worker.events("broadcast.malformed", since=since)) >= 3
    finally:
        # Leave the children subscribed again for the tests that follow.
        if target.worker.events("broadcast.lost", since=since):
            wait_for(
                lambda: all(
                    report.synced and report.synced_at > sent_at
                    for report in wait_synced(target.services, pids).values()
                ),
                timeout=30,
                message="every child to subscribe again",
            )


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_the_consumers_decoding_agrees_with_kombus(services: Services, compression: Any) -> None:
    """What a consumer on Redis reads off the exchange's topic decodes (plain JSON, as every
    publisher of reload messages sends, or anything else kombu sends, here a compressed body)
    to the body kombu would have handed a kombu consumer."""
    import redis

    from store.transport.redis import publish_topics

    exchange = reload_exchange(f"t{uuid.uuid4().hex[:8]}")
    with kombu.Connection(services.broker_url) as conn:
        channel = conn.default_channel
        subscriber = redis.Redis.from_url(services.broker_url).pubsub()
        subscriber.psubscribe(*publish_topics(channel, exchange.name))
        wait_for(
            lambda: subscriber.get_message(timeout=0.1) is not None, message="the subscription"
        )
        body = change_body(scope="project:7", revision=3, set={"k": "é", "n": [1, 2]})
        kombu.Producer(channel).publish(
            body,
            exchange=exchange,
            routing_key="",
            serializer="json",
            compression=compression,
            declare=[exchange],
        )
        got = wait_for(lambda: subscriber.get_message(timeout=0.1), message="the message")
        message = channel.Message(json.loads(got["data"]), channel=channel)
        message.accept = {"application/json"}
        assert message.decode() == body
        assert decode_redis_envelope(got["data"]) == ReloadMessage.from_body(body)
        subscriber.close()


def test_the_publishers_message_on_redis_is_kombus_own(services: Services) -> None:
    """On Redis the publisher sends the reload message with the channel's client, not through
    kombu's producer: what arrives on the exchange's topic is field for field what kombu's
    producer sends for the same body (but the delivery tag, a fresh UUID each time)."""
    import redis

    from store.transport.redis import publish_topics

    namespace = f"t{uuid.uuid4().hex[:8]}"
    exchange = reload_exchange(namespace)
    message = ReloadMessage.from_body(change_body(scope="project:7", set={"k": "é"}))
    text = encode(message)
    publisher = Publisher(
        connect=lambda: kombu.Connection(services.broker_url), namespace=namespace
    )
    with kombu.Connection(services.broker_url) as conn:
        channel = conn.default_channel
        subscriber = redis.Redis.from_url(services.broker_url).pubsub()
        subscriber.psubscribe(*publish_topics(channel, exchange.name))
        wait_for(
            lambda: subscriber.get_message(timeout=0.1) is not None, message="the subscription"
        )
        kombu.Producer(channel).publish(
            text,
            exchange=exchange,
            routing_key="",
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=1,
            declare=[exchange],
        )
        publisher.publish(message)
        received = [
            json.loads(
                wait_for(lambda: subscriber.get_message(timeout=0.1), message="a message")["data"]
            )
            for _ in range(2)
        ]
        subscriber.close()
    publisher.close()
    tags = [m["properties"].pop("delivery_tag") for m in received]
    assert all(uuid.UUID(tag) for tag in tags) and tags[0] != tags[1]
    assert received[0] == received[1]
    assert json.loads(base64.b64decode(received[1]["body"])) == json.loads(text)
