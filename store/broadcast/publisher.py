"""The publisher of reload messages: this process's own broker connection to the exchange."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import kombu
from kombu.common import maybe_declare

from store.broadcast.codec import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    DEFAULT_MAX_MESSAGE_BYTES,
    ReloadMessage,
    encode,
    encode_announcement,
    redis_envelope,
    signature_headers,
)
from store.broadcast.exchange import reload_exchange
from store.fork import after_fork_in_child
from store.model.writes import WriteResult
from store.redis.cache import server_identity
from store.signing.keys import Keyring
from store.transport.redis import publish_topics, publishing_client

# Seconds a publish on AMQP waits for the broker's confirm before it counts as failed.
CONFIRM_TIMEOUT = 5.0


def publish_transport_options(broker_url: str) -> dict[str, Any]:
    """kombu transport options for a connection that publishes reload messages.

    On AMQP, publisher confirms: without them a publish into a dying connection, or one the
    broker refuses, returns as if delivered, and the outbox row is marked announced.
    """
    if broker_url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp"):
        return {"confirm_publish": True}
    return {}


class Publisher:
    """Publishes reload messages from this process over its own broker connection, each signed
    when it has a ``keyring``."""

    def __init__(
        self,
        *,
        connect: Callable[[], kombu.Connection],
        namespace: str,
        origin: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keyring: Keyring | None = None,
    ) -> None:
        # Makes a new connection to the broker: the app's own (its transport options and TLS),
        # with publisher confirms on AMQP (publish_transport_options).
        self.connect = connect
        self.max_message_bytes = max_message_bytes
        self.keyring = keyring
        self.exchange = reload_exchange(namespace)
        self.origin = origin or f"{os.uname().nodename}:{os.getpid()}"
        self._connection: kombu.Connection | None = None
        self._producer: kombu.Producer | None = None
        # On a Redis broker, the pub/sub topics kombu publishes the exchange's messages to,
        # and the client of the channel's connection pool that publishes them.
        self._topics: list[str] = []
        self._client: Any = None
        # kombu connections are not thread-safe; a threads-pool worker shares this one.
        self._lock = threading.Lock()
        after_fork_in_child(self._forget_after_fork)

    def publish(self, message: ReloadMessage) -> None:
        self._publish_text(encode(message))

    def announce(self, result: WriteResult) -> None:
        """Publish the change ``result`` committed, or a RELOAD if it is too large to carry."""
        self._publish_text(self._announcement(result))

    def envelope(self, result: WriteResult) -> str:
        """The message that announces ``result`` on a Redis broker, as ``announce`` sends it
        (signed: a script publishes it as it is, store/redis/delta.lua)."""
        text = self._announcement(result)
        return redis_envelope(text, self.exchange.name, signature_headers(text, self.keyring))

    def topics_on(self, client: Any) -> list[str]:
        """The pub/sub topics this publisher's announcements go to, if its broker is the Redis
        server ``client`` talks to, reached the same way (address, TLS, user): then a script
        run through ``client`` can publish them (``envelope``). Else an empty list.

        Connects to the broker if not connected yet, once: an error is the broker's.
        """
        with self._lock:
            try:
                self._get_producer()
            except Exception:
                self._reset()
                raise
            if not self._topics:
                return []
            ours = server_identity(self._client.connection_pool)
            if ours is None or ours != server_identity(client.connection_pool):
                return []
            return list(self._topics)

    def close(self) -> None:
        with self._lock:
            self._reset()

    def _announcement(self, result: WriteResult) -> str:
        return encode_announcement(result, origin=self.origin, max_bytes=self.max_message_bytes)

    def _publish_text(self, text: str) -> None:
        headers = signature_headers(text, self.keyring)
        with self._lock:
            try:
                self._send(text, headers)
            except Exception:
                # One fresh connection and one more try (kombu's own retry wrapper costs on
                # every message); if that fails too, the outbox relay announces it later.
                self._reset()
                self._send(text, headers)

    def _send(self, text: str, headers: dict[str, str]) -> None:
        producer = self._get_producer()
        if self._topics:
            # A fanout on Redis is a PUBLISH of kombu's message to the exchange's topics: sent
            # here with the channel's own client, without kombu's producer layers (their
            # Python cost more than the PUBLISH).
            message = redis_envelope(text, self.exchange.name, headers)
            for topic in self._topics:
                self._client.publish(topic, message)
            return
        # Already JSON: kombu sends the text as is (no serializer, no per-message declare).
        producer.publish(
            text,
            exchange=self.exchange,
            routing_key="",
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            headers=headers,
            delivery_mode=1,  # transient
            confirm_timeout=CONFIRM_TIMEOUT,  # AMQP with confirms only; ignored elsewhere
        )

    def _get_producer(self) -> kombu.Producer:
        if self._producer is None:
            self._connection = self.connect()
            channel = self._connection.default_channel
            maybe_declare(self.exchange, channel)  # once per connection, not per message
            self._producer = kombu.Producer(channel)
            self._topics = publish_topics(channel, self.exchange.name)
            if self._topics:
                self._client = publishing_client(channel)
        return self._producer

    def _reset(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
        self._forget()

    def _forget_after_fork(self) -> None:
        # The parent's socket is not ours, and its lock may have been held at the fork (a
        # relay publishing): a new lock, and a new connection on first use. Never released:
        # closing it would close the parent's connection too.
        self._lock = threading.Lock()
        self._forget()

    def _forget(self) -> None:
        self._connection = None
        self._producer = None
        self._topics = []
        self._client = None
