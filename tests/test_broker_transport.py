"""The Redis broker transport of store/transport/redis.py against a real Redis: a task taken off the
queue is always queued, taken or unacknowledged, and what a gone consumer took comes back."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any

import kombu
import pytest
import redis

from store.transport.redis import CLIENT_NAME_PREFIX, Channel
from tests.conftest import Services, wait_for

TRANSPORT = "store.transport.redis:Transport"


class Rig:
    """One queue and one set of unacknowledged-message keys of this test's own on a Redis."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url)
        tag = uuid.uuid4().hex[:12]
        self.queue = kombu.Queue(f"broker-test-{tag}", routing_key=f"broker-test-{tag}")
        self.options = {
            "unacked_key": f"unacked-{tag}",
            "unacked_index_key": f"unacked-index-{tag}",
            "unacked_mutex_key": f"unacked-mutex-{tag}",
        }

    @property
    def registry(self) -> str:
        return f"{self.options['unacked_key']}.taken"

    def taken_key(self, token: str) -> str:
        return f"{self.options['unacked_key']}.taken.{token}"

    def connect(self, transport: str = TRANSPORT) -> kombu.Connection:
        return kombu.Connection(
            self.redis_url, transport=transport, transport_options=dict(self.options)
        )

    def publish(self, body: Any, **options: Any) -> None:
        """Send as a producer that does not import this project would: kombu's own transport."""
        with self.connect(transport="redis") as conn:
            conn.Producer().publish(
                body,
                routing_key=self.queue.name,
                declare=[self.queue],
                serializer="json",
                **options,
            )

    def unacknowledged(self) -> int:
        return int(self.redis.hlen(self.options["unacked_key"]))

    def queued(self) -> int:
        return int(self.redis.llen(self.queue.name))

    def close(self) -> None:
        names = [self.queue.name, self.registry, *self.options.values()]
        names += [key.decode() for key in self.redis.scan_iter(match=f"{self.registry}.*")]
        self.redis.delete(*names)
        self.redis.close()


@pytest.fixture
def rig(services: Services) -> Iterator[Rig]:
    rig = Rig(services.redis_url)
    yield rig
    rig.close()


def consume(conn: kombu.Connection, queues: list[kombu.Queue], *, no_ack: bool = False) -> Any:
    received: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        received.append((body, message))

    consumer = conn.Consumer(queues, callbacks=[on_message], accept=["json"], no_ack=no_ack)
    return consumer, received


def drain_until(conn: kombu.Connection, received: list[Any], count: int = 1) -> None:
    def got() -> bool:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.2)
        return len(received) >= count

    wait_for(got, timeout=10, interval=0, message=f"{count} message(s) delivered")


def taken_by_dead_consumer(rig: Rig, token: str) -> None:
    """What a consumer that took the queued message and was killed before recording it leaves:
    the message in its taken list, its token in the registry, no connection by its name."""
    rig.redis.hset(rig.registry, token, f"{uuid.uuid4().hex[:12]}:{rig.queue.name}")
    rig.redis.lmove(rig.queue.name, rig.taken_key(token), "RIGHT", "LEFT")


def kill_connections(client: redis.Redis, token: str) -> int:
    """CLIENT KILL every connection named after a consumer's token, as an idle timeout or a
    proxy would close them."""
    named = [c for c in client.client_list() if c.get("name") == f"{CLIENT_NAME_PREFIX}{token}"]
    for connection in named:
        client.client_kill_filter(_id=connection["id"])
    return len(named)


def test_a_delivered_message_is_unacknowledged_and_no_longer_taken(rig: Rig) -> None:
    """A consumer takes a message into its taken list and, on delivery, records it as
    unacknowledged and releases it from the list: held in exactly one place until acked."""
    rig.publish({"n": 1})
    with rig.connect() as conn:
        consumer, received = consume(conn, [rig.queue])
        with consumer:
            drain_until(conn, received)
            channel: Channel = conn.default_channel
            entry = rig.redis.hget(rig.registry, channel.taken_token)
            assert entry is not None and entry.decode().endswith(f":{rig.queue.name}")
            assert rig.redis.llen(channel.taken_key) == 0
            assert rig.unacknowledged() == 1
            assert rig.queued() == 0
            received[0][1].ack()
            assert rig.unacknowledged() == 0
    assert received[0][0] == {"n": 1}


def test_what_a_gone_consumer_took_is_put_back_and_delivered(rig: Rig) -> None:
    """A message in the taken list of a consumer with no open connection goes back on the
    queue at the next sweep and is delivered to a live consumer."""
    rig.publish({"n": 2})
    dead = uuid.uuid4().hex
    taken_by_dead_consumer(rig, dead)
    assert rig.queued() == 0
    with rig.connect() as conn:
        consumer, received = consume(conn, [rig.queue])
        with consumer:
            drain_until(conn, received)
    assert received[0][0] == {"n": 2}
    assert rig.redis.exists(rig.taken_key(dead)) == 0
    assert rig.redis.hexists(rig.registry, dead) == 0


def test_a_live_consumers_taken_list_is_left_alone(rig: Rig) -> None:
    """While a connection named after a consumer's token is open, its taken message stays
    with it; once that connection closes, the sweep puts the message back."""
    rig.publish({"n": 3})
    alive = uuid.uuid4().hex
    taken_by_dead_consumer(rig, alive)
    holder = redis.Redis.from_url(rig.redis_url, client_name=f"{CLIENT_NAME_PREFIX}{alive}")
    holder.ping()
    with rig.connect() as conn:
        consumer, _ = consume(conn, [rig.queue])
        with consumer:
            channel: Channel = conn.default_channel
            assert channel.reclaim_taken() == 0
            assert rig.redis.llen(rig.taken_key(alive)) == 1
            holder.close()
            channel._next_reclaim = 0.0  # the sweep's own throttle, not what is under test
            wait_for(
                lambda: channel.reclaim_taken() == 1 or rig.queued() == 1,
                timeout=10,
                message="the closed connection to leave the server",
            )
    assert rig.queued() == 1
    assert rig.redis.exists(rig.taken_key(alive)) == 0


def test_a_message_sent_with_a_priority_is_delivered(rig: Rig) -> None:
    """A producer that sets a priority pushes to a per-priority list the consumer does not wait
    on; the sweep moves it to the queue and it is delivered."""
    rig.publish({"n": 4}, priority=5)
    assert rig.queued() == 0
    with rig.connect() as conn:
        consumer, received = consume(conn, [rig.queue])
        with consumer:
            drain_until(conn, received)
    assert received[0][0] == {"n": 4}


def test_an_undecodable_message_is_not_kept_taken(rig: Rig) -> None:
    """A message that is not JSON fails its delivery as with kombu's own transport, and is not
    left in the taken list to be put back and fail again forever."""
    rig.redis.lpush(rig.queue.name, b"\xff not json")
    with rig.connect() as conn:
        consumer, received = consume(conn, [rig.queue])
        with consumer, pytest.raises(ValueError):
            drain_until(conn, received)
        channel: Channel = conn.default_channel
        assert rig.redis.llen(channel.taken_key) == 0
    assert received == []
    assert rig.queued() == 0
    assert rig.unacknowledged() == 0


def test_a_no_ack_consumer_takes_without_a_taken_list(rig: Rig) -> None:
    """A consumer that asked for no acknowledgements (a `celery inspect` reply queue) gets the
    message at most once, as it asked: no taken list, no registration, no record."""
    rig.publish({"n": 5})
    with rig.connect() as conn:
        consumer, received = consume(conn, [rig.queue], no_ack=True)
        with consumer:
            drain_until(conn, received)
            channel: Channel = conn.default_channel
            assert not rig.redis.hexists(rig.registry, channel.taken_token)
    assert received[0][0] == {"n": 5}
    assert rig.unacknowledged() == 0
    assert rig.queued() == 0


def test_a_consumer_of_two_queues_falls_back_and_says_so(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer of more than one queue cannot take with BLMOVE: it uses kombu's BRPOP,
    registers no taken list, and logs that a taken task can be lost."""
    other = kombu.Queue(f"{rig.queue.name}-other", routing_key=f"{rig.queue.name}-other")
    rig.publish({"n": 6})
    try:
        with (
            caplog.at_level(logging.WARNING, logger="store.transport.redis"),
            rig.connect() as conn,
        ):
            consumer, received = consume(conn, [rig.queue, other])
            with consumer:
                drain_until(conn, received)
                channel: Channel = conn.default_channel
                assert not rig.redis.hexists(rig.registry, channel.taken_token)
        assert received[0][0] == {"n": 6}
        assert "it consumes 2 queues" in caplog.text
    finally:
        rig.redis.delete(other.name)


def test_a_consumer_forgotten_while_disconnected_registers_again_and_puts_back_its_take(
    rig: Rig,
) -> None:
    """A consumer whose connections were all closed (and whom a sweep therefore forgot) is on
    record again before its next take on a new connection, and what it had taken on the lost
    connection goes back on the queue and is delivered."""
    rig.publish({"n": 7})
    with rig.connect() as conn:
        consumer, received = consume(conn, [rig.queue])
        with consumer:
            drain_until(conn, received)
            channel: Channel = conn.default_channel
            # Taken on the connection about to be lost, never recorded; then a sweep that saw
            # no connection under its name forgets the consumer.
            rig.publish({"n": 8})
            rig.redis.lmove(rig.queue.name, channel.taken_key, "RIGHT", "LEFT")
            assert kill_connections(rig.redis, channel.taken_token) >= 1
            rig.redis.hdel(rig.registry, channel.taken_token)
            # What kombu does when the idle connection turns out closed: reconnect on the next
            # round, on the same channel.
            channel.client.connection.disconnect()
            drain_until(conn, received, count=2)
            assert rig.redis.hexists(rig.registry, channel.taken_token)
            assert rig.redis.llen(channel.taken_key) == 0
    assert [body for body, _ in received] == [{"n": 7}, {"n": 8}]


def test_a_sweep_does_not_forget_a_consumer_that_registered_again(rig: Rig) -> None:
    """The sweep forgets a gone consumer only if its registry entry is still the one the sweep
    read: a consumer that registered again in between keeps its entry."""
    reclaim = resources.files("store.transport").joinpath("give_back.lua").read_text()
    token = uuid.uuid4().hex
    rig.redis.hset(rig.registry, token, f"old:{rig.queue.name}")
    seen = rig.redis.hget(rig.registry, token)
    rig.redis.hset(rig.registry, token, f"new:{rig.queue.name}")  # back, on a new connection
    rig.redis.eval(reclaim, 2, rig.taken_key(token), rig.registry, rig.queue.name, token, seen)
    assert rig.redis.hget(rig.registry, token) == f"new:{rig.queue.name}".encode()
    now = rig.redis.hget(rig.registry, token)
    rig.redis.eval(reclaim, 2, rig.taken_key(token), rig.registry, rig.queue.name, token, now)
    assert not rig.redis.hexists(rig.registry, token)
