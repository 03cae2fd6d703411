"""Reload messages on a kombu fanout exchange: their shape, their checks, and the publisher."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kombu
from kombu.common import maybe_declare

from store.fork import after_fork_in_child
from store.model.scopes import Scope
from store.model.validation import decode_value
from store.model.writes import WriteResult
from store.redis.cache import server_identity

_quote = json.encoder.encode_basestring_ascii  # a str as a JSON string (C, ASCII escapes)

VERSION = 1
CHANGE = "change"
HEARTBEAT = "heartbeat"
# "Reload this scope": a change too large to carry (see Publisher.max_message_bytes).
RELOAD = "reload"

# A change whose message would encode larger than this is announced as a RELOAD instead:
# well under every broker's limit (RabbitMQ's max_message_size, Redis's pub/sub buffers).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
# Seconds a publish on AMQP waits for the broker's confirm before it counts as failed.
CONFIRM_TIMEOUT = 5.0


class MalformedMessage(ValueError):
    """A reload message that does not follow the schema; logged and ignored, never applied."""


@dataclass(frozen=True, slots=True)
class ReloadMessage:
    """What changed in one scope at one revision, or a heartbeat. Never the whole scope.

    A heartbeat may carry ``marks``: the newest committed revision of every scope changed in
    the last few seconds (worker/duties/reconcile.py), so a process that missed a change notices it;
    ``marks_complete`` is False when the list was cut short. A RELOAD names a scope and a
    revision without the values.
    """

    kind: str
    scope: str = ""
    revision: int = 0
    sets: dict[str, Any] = field(default_factory=dict)
    unsets: tuple[str, ...] = ()
    committed_at: float = 0.0
    sent_at: float = 0.0
    origin: str = ""
    marks: dict[str, int] | None = None
    marks_complete: bool = True

    @classmethod
    def change(cls, result: WriteResult, *, origin: str = "") -> ReloadMessage:
        sets = {k: decode_value(v) for k, v in result.changes.items() if v is not None}
        unsets = tuple(k for k, v in result.changes.items() if v is None)
        return cls(
            CHANGE,
            result.scope,
            result.revision,
            sets,
            unsets,
            result.committed_at,
            time.time(),
            origin,
        )

    @classmethod
    def for_result(
        cls, result: WriteResult, *, origin: str = "", max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> ReloadMessage:
        """The change message for ``result``, or a RELOAD if it would encode over ``max_bytes``."""
        # The texts are canonical JSON; re-encoded with ASCII escapes a character takes at most
        # 12 bytes, so only a change near the limit pays for an exact measure.
        rough = sum(len(k) + len(v or "") for k, v in result.changes.items())
        message = cls.change(result, origin=origin)
        if rough * 12 + 4096 <= max_bytes or len(json.dumps(message.to_body())) <= max_bytes:
            return message
        return cls.reload(result, origin=origin)

    @classmethod
    def reload(cls, result: WriteResult, *, origin: str = "") -> ReloadMessage:
        """ "Reload ``result.scope``": names the revision, carries no values."""
        return cls(
            RELOAD,
            result.scope,
            result.revision,
            committed_at=result.committed_at,
            sent_at=time.time(),
            origin=origin,
        )

    @classmethod
    def heartbeat(
        cls, *, origin: str, marks: dict[str, int] | None = None, marks_complete: bool = True
    ) -> ReloadMessage:
        return cls(
            HEARTBEAT,
            sent_at=time.time(),
            origin=origin,
            marks=marks,
            marks_complete=marks_complete,
        )

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": VERSION,
            "kind": self.kind,
            "sent_at": self.sent_at,
            "origin": self.origin,
        }
        if self.kind == CHANGE:
            body.update(
                scope=self.scope,
                revision=self.revision,
                set=self.sets,
                unset=list(self.unsets),
                committed_at=self.committed_at,
            )
        elif self.kind == RELOAD:
            body.update(scope=self.scope, revision=self.revision, committed_at=self.committed_at)
        elif self.marks is not None:
            body.update(marks=self.marks, marks_complete=self.marks_complete)
        return body

    @classmethod
    def from_body(cls, body: object) -> ReloadMessage:
        """Check a received body field by field; raise MalformedMessage naming the first fault."""
        if not isinstance(body, dict):
            raise MalformedMessage(f"body must be an object, got {type(body).__name__}")
        if body.get("v") != VERSION:
            raise MalformedMessage(f"v: unsupported version {body.get('v')!r}")
        kind = body.get("kind")
        sent_at = _number(body, "sent_at")
        origin = body.get("origin", "")
        if not isinstance(origin, str):
            raise MalformedMessage("origin: must be a string")
        if kind == HEARTBEAT:
            # Heartbeats from before marks existed have neither field: still valid.
            complete = body.get("marks_complete", True)
            if not isinstance(complete, bool):
                raise MalformedMessage("marks_complete: must be a boolean")
            marks = _marks(body.get("marks"))
            return cls(
                HEARTBEAT, sent_at=sent_at, origin=origin, marks=marks, marks_complete=complete
            )
        if kind not in (CHANGE, RELOAD):
            raise MalformedMessage(f"kind: unknown {kind!r}")
        scope = _scope(body.get("scope"))
        revision = _revision(body.get("revision"), "revision")
        if kind == RELOAD:
            return cls(
                RELOAD,
                scope,
                revision,
                committed_at=_number(body, "committed_at"),
                sent_at=sent_at,
                origin=origin,
            )
        sets = body.get("set")
        unsets = body.get("unset")
        if not isinstance(sets, dict) or not all(isinstance(k, str) for k in sets):
            raise MalformedMessage("set: must be an object with string keys")
        if not isinstance(unsets, list) or not all(isinstance(k, str) for k in unsets):
            raise MalformedMessage("unset: must be a list of strings")
        return cls(
            CHANGE,
            scope,
            revision,
            sets,
            tuple(unsets),
            _number(body, "committed_at"),
            sent_at,
            origin,
        )


def redis_topics(channel: Any, exchange: str) -> list[str]:
    """The pub/sub topics a fanout to ``exchange`` is published to, if ``channel`` is a Redis
    channel (kombu's, the project's or Sentinel's: global key prefix and fanout options
    applied); an empty list for any other broker's channel."""
    # On the class: reading ``subclient`` off the channel would make its pub/sub client.
    names = ("_get_publish_topics", "subclient", "conn_or_acquire")
    if not all(hasattr(type(channel), name) for name in names):
        return []
    return list(channel._get_publish_topics(exchange, ""))


def redis_message(text: str, exchange: str) -> str:
    """The message kombu's Redis transport publishes for JSON ``text`` sent to a fanout
    ``exchange`` (transient, priority 0): every field, so that any kombu consumer reads it.
    store/broadcast/consumer.py reads it back (``_plain_json_body``); a test holds both to
    kombu's."""
    return json.dumps(
        {
            "body": base64.b64encode(text.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": {"exchange": exchange, "routing_key": ""},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def change_text(result: WriteResult, *, origin: str) -> str:
    """``ReloadMessage.change(result).to_body()`` as JSON text, made from the canonical JSON
    texts ``result`` holds without decoding them (the publish path of every write)."""
    sets = ",".join(f"{_quote(k)}:{v}" for k, v in result.changes.items() if v is not None)
    unsets = ",".join(_quote(k) for k, v in result.changes.items() if v is None)
    return (
        f'{{"v":{VERSION},"kind":"{CHANGE}","sent_at":{time.time()!r},"origin":{_quote(origin)},'
        f'"scope":{_quote(result.scope)},"revision":{int(result.revision)},"set":{{{sets}}},'
        f'"unset":[{unsets}],"committed_at":{float(result.committed_at)!r}}}'
    )


# Scope names already checked, each to its canonical form: a message names few scopes, often.
_checked_scopes: dict[str, str] = {}
_CHECKED_SCOPES_LIMIT = 10_000


def _scope(value: object) -> str:
    if type(value) is str and (known := _checked_scopes.get(value)) is not None:
        return known
    try:
        name = Scope.parse(value).name
    except ValueError as exc:
        raise MalformedMessage(str(exc)) from None
    if type(value) is str and len(_checked_scopes) < _CHECKED_SCOPES_LIMIT:
        _checked_scopes[value] = name
    return name


def _revision(value: object, name: str) -> int:
    if type(value) is not int or value < 1:
        raise MalformedMessage(f"{name}: must be a positive integer, got {value!r}")
    return value


def _marks(value: object) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedMessage("marks: must be an object of scope -> revision")
    # Canonical names only: a mark is compared with cache keys as is.
    return {_scope(scope): _revision(rev, f"marks.{scope}") for scope, rev in value.items()}


def publish_transport_options(broker_url: str) -> dict[str, Any]:
    """kombu transport options for a connection that publishes reload messages.

    On AMQP, publisher confirms: without them a publish into a dying connection, or one the
    broker refuses, returns as if delivered, and the outbox row is marked announced.
    """
    if broker_url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp"):
        return {"confirm_publish": True}
    return {}


def _number(body: dict[str, Any], name: str) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedMessage(f"{name}: must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise MalformedMessage(f"{name}: out of range") from None
    if not math.isfinite(number):
        raise MalformedMessage(f"{name}: must be finite, got {number!r}")
    return number


def reload_exchange(namespace: str) -> kombu.Exchange:
    # Transient: reload messages are worthless once every process has moved on.
    return kombu.Exchange(f"{namespace}.reload", type="fanout", durable=False, auto_delete=False)


def reload_queue(namespace: str, name: str) -> kombu.Queue:
    """This process's own queue: exclusive and auto-deleted, so it dies with the connection."""
    return kombu.Queue(
        f"{namespace}.reload.{name}",
        exchange=reload_exchange(namespace),
        routing_key="",  # on Redis a non-empty key changes the pub/sub topic: both sides use ''
        durable=False,
        exclusive=True,
        auto_delete=True,
        no_ack=True,
    )


class Publisher:
    """Publishes reload messages from this process over its own broker connection."""

    def __init__(
        self,
        *,
        connect: Callable[[], kombu.Connection],
        namespace: str,
        origin: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        # Makes a new connection to the broker: the app's own (its transport options and TLS),
        # with publisher confirms on AMQP (publish_transport_options).
        self.connect = connect
        self.max_message_bytes = max_message_bytes
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
        self._publish_text(json.dumps(message.to_body(), separators=(",", ":")))

    def _publish_text(self, text: str) -> None:
        with self._lock:
            try:
                self._send(text)
            except Exception:
                # One fresh connection and one more try (kombu's own retry wrapper costs on
                # every message); if that fails too, the outbox relay announces it later.
                self._reset()
                self._send(text)

    def _send(self, text: str) -> None:
        producer = self._get_producer()
        if self._topics:
            # A fanout on Redis is a PUBLISH of kombu's message to the exchange's topics: sent
            # here with the channel's own client, without kombu's producer layers (their
            # Python cost more than the PUBLISH).
            message = redis_message(text, self.exchange.name)
            for topic in self._topics:
                self._client.publish(topic, message)
            return
        # Already JSON: kombu sends the text as is (no serializer, no per-message declare).
        producer.publish(
            text,
            exchange=self.exchange,
            routing_key="",
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=1,  # transient
            confirm_timeout=CONFIRM_TIMEOUT,  # AMQP with confirms only; ignored elsewhere
        )

    def _reset(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.release()
        self._connection = None
        self._producer = None
        self._topics = []
        self._client = None

    def _forget_after_fork(self) -> None:
        # The parent's socket is not ours, and its lock may have been held at the fork (a
        # relay publishing): a new lock, and a new connection on first use. Never released:
        # closing it would close the parent's connection too.
        self._lock = threading.Lock()
        self._connection = None
        self._producer = None
        self._topics = []
        self._client = None

    def announce(self, result: WriteResult) -> None:
        """Publish the change ``result`` committed, or a RELOAD if it is too large to carry."""
        self._publish_text(self._text_for(result))

    def _text_for(self, result: WriteResult) -> str:
        text = change_text(result, origin=self.origin)
        if len(text.encode()) > self.max_message_bytes:
            reload = ReloadMessage.reload(result, origin=self.origin)
            return json.dumps(reload.to_body(), separators=(",", ":"))
        return text

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

    def envelope(self, result: WriteResult) -> str:
        """The message that announces ``result`` on a Redis broker, as ``announce`` sends it."""
        return redis_message(self._text_for(result), self.exchange.name)

    def _get_producer(self) -> kombu.Producer:
        if self._producer is None:
            self._connection = self.connect()
            channel = self._connection.default_channel
            maybe_declare(self.exchange, channel)  # once per connection, not per message
            self._producer = kombu.Producer(channel)
            self._topics = redis_topics(channel, self.exchange.name)
            if self._topics:
                # Kept for the connection's life: kombu makes a new client (redis-py's costly
                # constructor) each time it lends one.
                with channel.conn_or_acquire() as client:
                    self._client = client
        return self._producer

    def close(self) -> None:
        with self._lock:
            self._reset()
