"""A Redis broker transport that cannot lose a task between handing it over and recording it.

kombu's Redis transport takes a message with BRPOP and records it as unacknowledged in a
second round trip. Whatever ends the consumer in between (``kill -9``, the broker stopping
after it replied) loses the message: it is in no queue, not unacknowledged, never run.

Here a consumer of one queue takes a message with BLMOVE into a list of its own (its
"taken" list), and records it as unacknowledged and removes it from that list in one
MULTI/EXEC. Each consumer's connections carry its token as their client name; a sweep (on
kombu's restore timer) moves whatever a consumer whose connections are all gone had taken
back onto the queue. A message is then delivered at least once; the write tasks are
idempotent by task id, so a second delivery changes nothing.

It also keeps kombu 5.7 from building a new connection pool from a closed connection while
it restores unacknowledged messages on a broker outage (an AttributeError that made the
worker exit); it raises a connection error instead, which the worker's reconnect handles.

This is the one module that touches private names of kombu (and of redis-py). The hand-over
overrides kombu's ``_brpop_start``, ``_brpop_read``, ``_poll_error``, ``_connparams`` and
``_disconnect_pools``, sets and reads the channel's ``_in_poll`` and ``_brpop_sent_at``, calls
``_flush_brpop_reauth``, ``_create_client``, ``_q_for_pri`` and ``Connection._deliver``, and
reads ``Message._raw`` and redis-py's ``Connection._sock``. The reload exchange's fast path on
Redis (store/broadcast/) goes through ``publish_topics``, ``publishing_client`` and
``subscriber`` at the end, which read a Redis channel's ``_get_publish_topics``, and its
undocumented ``conn_or_acquire`` and ``subclient``.

Private names change in patch releases: pyproject.toml pins kombu to exactly the version the
fault suite runs against (5.7.0, ``store.settings.TESTED_KOMBU``). Under any other,
``store.settings.broker_transport_for`` picks kombu's own transport, with a warning, and
``publish_topics`` answers no topics, so reload messages go through kombu's public producer
and consumer. A worker that consumes several queues, uses a global key prefix or talks to
Redis older than 6.2 falls back to kombu's own hand-over and says so once in its log.

``SentinelTransport`` is the same hand-over behind Redis Sentinel (``sentinel://`` URLs with
the ``master_name`` transport option): each new connection asks the Sentinels for the
current master, so a consumer that lost its connection in a failover takes from the new one.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from queue import Empty
from typing import Any

import kombu
import redis
from kombu.log import get_logger
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from store.settings import TESTED_KOMBU

logger = get_logger(__name__)

CLIENT_NAME_PREFIX = "optionstore-taken-"
# How often a consumer looks for messages taken by consumers that went away (it runs on
# kombu's restore timer, so no more often than unacked_restore_interval), and how often it
# also forgets the tokens of consumers that left nothing behind.
RECLAIM_INTERVAL_S = 1.0
# How long one consumer's turn to sweep keeps the others from sweeping: a little under the
# interval, so the next round is never skipped for a late timer.
SWEEP_TURN_MS = int(RECLAIM_INTERVAL_S * 900)
CENSUS_INTERVAL_S = 60.0
MIN_REDIS_VERSION = (6, 2)

# A consumer's entry in the registry is "<nonce>:<queue>"; the nonce changes each time the
# consumer registers again, so a sweep never forgets a consumer that came back meanwhile.


@functools.cache
def _script(name: str) -> str:
    """A Lua script beside this module (give_back.lua, register.lua,
    drain_priorities.lua), read once."""
    return resources.files("store.transport").joinpath(name).read_text(encoding="utf-8")


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


class QoS(kombu_redis.QoS):  # type: ignore[misc]  # kombu is untyped
    def append(self, message: Any, delivery_tag: str) -> None:
        channel: Channel = self.channel
        item, channel.taken_item = channel.taken_item, None
        if item is None:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        # The same records kombu's QoS writes (restore_by_tag reads them back), plus the
        # release from the taken list, in one transaction: taken or unacknowledged, never
        # neither.
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, record)
            pipe.lrem(channel.taken_key, 1, item)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        channel: Channel = self.channel
        try:
            channel.reclaim_taken()
        except channel.ResponseError as exc:
            # (EVAL refused by an ACL, BUSY, OOM): the sweep waits, the visibility-timeout
            # redelivery below must not.
            logger.warning("Cannot look for tasks taken by gone consumers: %s", exc)
        super().restore_visible(start=start, num=num, interval=interval)


class Channel(kombu_redis.Channel):  # type: ignore[misc]  # kombu is untyped
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before kombu's __init__, which may already build connection parameters.
        self.taken_token = uuid.uuid4().hex
        self.taken_item: bytes | None = None
        self._taking: str | None = None
        # The connection (socket) this consumer last registered on; a new one re-registers.
        self._registered_on: Any = None
        # (queue, entry) of this consumer's registration, for leaving on a clean close.
        self._registration: tuple[str, str] | None = None
        self._no_ack_queues: set[str] = set()
        self._reliable: bool | None = None
        self._next_reclaim = 0.0
        self._next_census = 0.0
        self._shared_client: Any = None
        super().__init__(*args, **kwargs)
        # kombu's __init__ checks the server with a PING on the pool its BRPOP and pub/sub
        # draw from, and leaves that connection idle there. A channel that only publishes
        # (Celery's events, the reload publisher) goes through conn_or_acquire's client, on
        # the other pool, and would hold the idle one for its whole life: one Redis
        # connection per such channel per process. Closed now; the first BRPOP or
        # subscription connects again.
        self.async_pool.disconnect(inuse_connections=False)

    # -- names -----------------------------------------------------------------------------

    @property
    def taken_registry(self) -> str:
        """A hash of every consumer's token and its entry, ``<nonce>:<queue it takes from>``."""
        return f"{self.unacked_key}.taken"

    def taken_key_of(self, token: str) -> str:
        return f"{self.unacked_key}.taken.{token}"

    @property
    def taken_key(self) -> str:
        return self.taken_key_of(self.taken_token)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            # kombu 5.7 restores unacknowledged messages while it closes a channel whose
            # connection is already detached; a connection error is what the worker's
            # reconnect expects (the messages stay unacknowledged and come back after the
            # visibility timeout).
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        # Every connection of this channel carries its token: while one is open, the
        # consumer is alive and its taken list is its own.
        params["client_name"] = f"{CLIENT_NAME_PREFIX}{self.taken_token}"
        return params

    # -- one client per channel -----------------------------------------------------------

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu builds a new redis.Redis for every publish, acknowledgement and record
        # (~190 us of CPU each, more than the command itself); one per channel serves them all:
        # a redis.Redis takes a pooled connection per command and is safe across threads.
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None:
            shared = self._shared_client = self._create_client()
        yield shared

    def _disconnect_pools(self) -> None:
        self._shared_client = None  # it holds the pool being dropped
        super()._disconnect_pools()

    def close(self) -> None:
        if not self.closed and self._registration is not None:
            self._unregister()
        try:
            super().close()
        finally:
            # kombu's close restores unacknowledged messages after it dropped the pools, which
            # opens a new one; a connection left open under this consumer's name would make it
            # look alive to the sweeps of others until garbage collection.
            with contextlib.suppress(Exception):
                self._disconnect_pools()

    # -- the hand-over ---------------------------------------------------------------------

    def _single_queue(self) -> str | None:
        """The queue to take from with BLMOVE, or None to fall back to kombu's BRPOP."""
        queues = self.active_queues
        if self._reliable is None:
            self._reliable = self._can_take_reliably()
        if not self._reliable or len(queues) != 1 or queues[0] in self._no_ack_queues:
            # A consumer without acknowledgements (a `celery inspect` reply queue) asked for
            # at most once: kombu's BRPOP is exactly that.
            return None
        queue: str = queues[0]
        return queue

    def _can_take_reliably(self) -> bool:
        if self.global_keyprefix:
            reason = "a global key prefix is set"
        elif len(self.active_queues) > 1:
            reason = f"it consumes {len(self.active_queues)} queues"
        else:
            server = self.client.info("server")
            if parse_version(str(server.get("redis_version", "0"))) >= MIN_REDIS_VERSION:
                return True
            reason = f"Redis {server.get('redis_version')} has no BLMOVE (6.2 or later has)"
        logger.warning(
            "A task taken off the Redis queue can be lost if this worker dies before it "
            "records the task as unacknowledged: %s",
            reason,
        )
        return False

    def _brpop_start(self, timeout: float | None = None) -> None:
        self._taking = None
        queue = self._single_queue()
        if queue is None:
            super()._brpop_start(timeout)
            return
        if self._registered_on is None or self._registered_on is not self._socket():
            self._register(queue)
        wait = self.brpop_timeout if timeout is None else timeout
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self._taking = queue
        self.client.connection.send_command(
            "BLMOVE", queue, self.taken_key, "RIGHT", "LEFT", wait or 0
        )

    def _socket(self) -> Any:
        return getattr(self.client.connection, "_sock", None)

    def _register(self, queue: str) -> None:
        """On the first take, and on every new connection: put back what this consumer took on
        a connection that is gone, and be on record (again) before the next take.

        A sweep may have forgotten this consumer while it had no connection open (an idle
        timeout, a Redis restart); a taken list with no entry would never be swept.
        """
        entry = f"{uuid.uuid4().hex[:12]}:{queue}"
        moved = int(
            self.client.eval(
                _script("register.lua"),
                2,
                self.taken_key,
                self.taken_registry,
                queue,
                self.taken_token,
                entry,
            )
        )
        self._registered_on = self._socket()
        self._registration = (queue, entry)
        if moved:
            logger.warning(
                "Restored %d task(s) taken off the queue on a connection that was lost", moved
            )

    def _unregister(self) -> None:
        """On a clean close: leave the registry, so it holds only live consumers and those
        that died (the sweep's business). A take still in flight is read first (delivered, as
        kombu's own close does), so nothing lands in the taken list after it was emptied."""
        assert self._registration is not None
        queue, entry = self._registration
        self._registration = None
        try:
            if self._in_poll:
                with contextlib.suppress(Empty):
                    self._brpop_read()
            with self.conn_or_acquire() as client:
                client.eval(
                    _script("give_back.lua"),
                    2,
                    self.taken_key,
                    self.taken_registry,
                    queue,
                    self.taken_token,
                    entry,
                )
        except Exception as exc:  # the broker may be gone: the sweep forgets us later
            logger.debug("Could not leave the registry of consumers: %s", exc)

    def _brpop_read(self, **options: Any) -> bool:
        queue = self._taking
        if queue is None:
            result: bool = super()._brpop_read(**options)
            return result
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                # Reconnect on the next round, where _register puts back what BLMOVE moved.
                self._registered_on = None
                self.client.connection.disconnect()
                raise
            if item is None:
                raise Empty()
            self._hand_over(queue, item)
            return True
        finally:
            self._in_poll = None
            self._taking = None
            self._flush_brpop_reauth()

    def _poll_error(self, type: str, **options: Any) -> None:
        if type == "BRPOP" and self._taking is not None:
            # Whatever the reply holds is delivered (or stays taken and is put back on the
            # next connection), not read and dropped.
            self._registered_on = None
            with contextlib.suppress(Empty):
                self._brpop_read(**options)
            return
        super()._poll_error(type, **options)

    def _hand_over(self, queue: str, item: bytes) -> None:
        self.taken_item = item  # QoS.append records it and releases it in one transaction
        try:
            self.connection._deliver(loads(bytes_to_str(item)), queue)
        except self.connection_errors:
            # Not recorded and cannot be released: it stays taken, and is put back when this
            # consumer registers on its next connection (or by a sweep, if it is gone).
            self.taken_item = None
            self._registered_on = None
            raise
        finally:
            left, self.taken_item = self.taken_item, None
            if left is not None:
                # Delivered without a record (another channel recorded it), or refused before
                # one (undecodable): release it, as kombu's BRPOP would have consumed it.
                self.client.lrem(self.taken_key, 1, left)

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        no_ack = kwargs["no_ack"] if "no_ack" in kwargs else (args[0] if args else False)
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, *args, **kwargs)

    # -- the sweep ---------------------------------------------------------------------------

    def reclaim_taken(self) -> int:
        """Put back on their queues the messages taken by consumers that went away.

        Runs on whichever channel kombu's restore timer picks (a worker's gossip or event
        channel too), so it works from the registry, not from what this channel consumes.
        """
        now = time.monotonic()
        if not self.active_queues or now < self._next_reclaim:
            return 0
        self._next_reclaim = now + RECLAIM_INTERVAL_S
        moved = 0
        with self.conn_or_acquire() as client:
            # One sweep per interval for the whole fleet, by whichever consumer comes first:
            # a sweep reads every consumer's entry, so one per consumer would cost O(N^2).
            turn = f"{self.unacked_key}.sweep"
            if not client.set(turn, self.taken_token, nx=True, px=SWEEP_TURN_MS):
                return 0
            entries = {
                bytes_to_str(token): bytes_to_str(entry)
                for token, entry in client.hgetall(self.taken_registry).items()
            }
            queues = {token: entry.split(":", 1)[-1] for token, entry in entries.items()}
            self._drain_priorities(client, set(queues.values()))
            others = [token for token in entries if token != self.taken_token]
            if not others:
                return 0
            with client.pipeline(transaction=False) as pipe:
                for token in others:
                    pipe.exists(self.taken_key_of(token))
                held = pipe.execute()
            holding = [token for token, n in zip(others, held, strict=True) if n]
            census = now >= self._next_census
            if not holding and not census:
                return 0
            if census:
                self._next_census = now + CENSUS_INTERVAL_S
            try:
                alive = {str(entry.get("name", "")) for entry in client.client_list()}
            except self.ResponseError as exc:
                # A server that refuses CLIENT LIST cannot tell us who is gone: leave every
                # taken list where it is rather than take one from a live consumer.
                self._next_census = self._next_reclaim = now + CENSUS_INTERVAL_S
                logger.warning("Cannot look for tasks taken by gone consumers: %s", exc)
                return 0
            for token in holding if not census else others:
                if f"{CLIENT_NAME_PREFIX}{token}" in alive:
                    continue
                moved += int(
                    client.eval(
                        _script("give_back.lua"),
                        2,
                        self.taken_key_of(token),
                        self.taken_registry,
                        queues[token],
                        token,
                        entries[token],
                    )
                )
        if moved:
            logger.warning(
                "Restored %d task(s) taken off the queue by a consumer that went away", moved
            )
        return moved

    def _drain_priorities(self, client: Any, queues: set[str]) -> None:
        for queue in queues:
            subqueues = [self._q_for_pri(queue, step) for step in self.priority_steps]
            subqueues = [name for name in subqueues if name != queue]
            if queue and subqueues:
                client.eval(_script("drain_priorities.lua"), len(subqueues), *subqueues, queue)


class Transport(kombu_redis.Transport):  # type: ignore[misc]  # kombu is untyped
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):  # type: ignore[misc]  # untyped
    """The hand-over above on connections kombu's Sentinel channel makes: the Sentinels name
    the master each time a connection is opened."""


class SentinelTransport(kombu_redis.SentinelTransport):  # type: ignore[misc]  # untyped
    Channel = SentinelChannel


# -- the reload exchange on a Redis broker -------------------------------------------------------


def publish_topics(channel: Any, exchange: str) -> list[str]:
    """The pub/sub topics a fanout to ``exchange`` is published to, if ``channel`` is a Redis
    channel (kombu's, this module's or Sentinel's: global key prefix and fanout options
    applied) of the tested kombu; an empty list for any other, whose reload messages then go
    through kombu's producer and consumer."""
    if str(kombu.__version__) not in TESTED_KOMBU:
        return []
    # On the class: reading ``subclient`` off the channel would make its pub/sub client.
    names = ("_get_publish_topics", "subclient", "conn_or_acquire")
    if not all(hasattr(type(channel), name) for name in names):
        return []
    return list(channel._get_publish_topics(exchange, ""))


def publishing_client(channel: Any) -> Any:
    """The redis-py client that publishes to ``channel``'s topics (``publish_topics``): its
    connection pool, TLS and Sentinel. Keep it for the connection's life: kombu's own channel
    makes a new one (redis-py's costly constructor) each time it lends one."""
    with channel.conn_or_acquire() as client:
        return client


def subscriber(channel: Any) -> Any:
    """``channel``'s redis-py pub/sub client, to ``psubscribe`` to ``publish_topics``."""
    return channel.subclient
