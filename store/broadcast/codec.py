"""Reload messages: their shape, and the one codec between a ``ReloadMessage`` and the wire.

On AMQP a message is its body, JSON text; on Redis the body travels inside kombu's envelope,
the JSON object kombu's Redis transport publishes (``redis_envelope``). Whoever sends a reload
message encodes it here, and every consumer decodes it here, with every check. With a key, the
body's exact bytes are signed and the signature travels in the message's headers
(``SIGNATURE_HEADER``); a consumer that holds a key checks it before it decodes anything.
"""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import kombu.compression
import kombu.serialization

from store.model.scopes import Scope
from store.model.validation import decode_value
from store.model.writes import WriteResult
from store.signing.keys import Keyring

__all__ = [
    "ACCEPT",
    "CHANGE",
    "CONTENT_ENCODING",
    "CONTENT_TYPE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEARTBEAT",
    "RELOAD",
    "SIGNATURE_HEADER",
    "VERSION",
    "MalformedMessage",
    "ReloadMessage",
    "UnverifiedMessage",
    "decode",
    "decode_redis_envelope",
    "encode",
    "encode_announcement",
    "max_body_bytes",
    "redis_envelope",
    "signature_headers",
]

_quote = json.encoder.encode_basestring_ascii  # a str as a JSON string (C, ASCII escapes)

VERSION = 1
CHANGE = "change"
HEARTBEAT = "heartbeat"
# "Reload this scope": a change too large to carry (see encode_announcement).
RELOAD = "reload"

# A change whose message would encode larger than this is announced as a RELOAD instead:
# well under every broker's limit (RabbitMQ's max_message_size, Redis's pub/sub buffers).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024

# Bounds on what a received message may carry, checked field by field (``from_body``).
MAX_REVISION = 2**63 - 1  # PostgreSQL's bigint
MAX_ORIGIN_CHARS = 512
MAX_MARKS = 10_000
MAX_KEYS = 100_000  # keys set and unset in one change
# A timestamp further ahead of this host's clock is not a clock's skew but a wrong value.
MAX_FUTURE_SECONDS = 24 * 3600
# A received body may exceed the sender's OPTIONS_MAX_MESSAGE_BYTES by this much (a heartbeat's
# marks, a RELOAD's envelope) before it is refused unread.
BODY_SLACK_BYTES = 64 * 1024

# The message header that carries a body's signature (AMQP application headers; on Redis the
# "headers" of kombu's envelope).
SIGNATURE_HEADER = "optionstore_signature"

# What every reload message's body is, as its envelope declares it.
CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"
# A body of any other type is decoded by kombu's serializers, which refuse all but JSON.
ACCEPT = frozenset({CONTENT_TYPE})


class MalformedMessage(ValueError):
    """A reload message that does not follow the schema; logged and ignored, never applied."""

    def __init__(self, error: str, **context: Any) -> None:
        super().__init__(error)
        # What a log line about it shows besides the error: the body, or its content type.
        self.context = context


class UnverifiedMessage(MalformedMessage):
    """A reload message whose signature does not check out (or that has none) under this
    process's keys; dropped unread."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"signature: {detail}")
        # unsigned, malformed_signature, unknown_key or bad_signature (store/signing/keys.py).
        self.reason = reason


def max_body_bytes(max_message_bytes: int) -> int:
    """The largest body a consumer reads, for senders whose messages stay within
    ``max_message_bytes`` (OPTIONS_MAX_MESSAGE_BYTES)."""
    return max_message_bytes + BODY_SLACK_BYTES


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
        sent_at = _timestamp(body, "sent_at")
        origin = body.get("origin", "")
        if not isinstance(origin, str):
            raise MalformedMessage("origin: must be a string")
        if len(origin) > MAX_ORIGIN_CHARS:
            raise MalformedMessage(
                f"origin: {len(origin)} characters, more than {MAX_ORIGIN_CHARS}"
            )
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
                committed_at=_timestamp(body, "committed_at"),
                sent_at=sent_at,
                origin=origin,
            )
        sets = body.get("set")
        unsets = body.get("unset")
        if not isinstance(sets, dict) or not all(isinstance(k, str) for k in sets):
            raise MalformedMessage("set: must be an object with string keys")
        if not isinstance(unsets, list) or not all(isinstance(k, str) for k in unsets):
            raise MalformedMessage("unset: must be a list of strings")
        if len(sets) + len(unsets) > MAX_KEYS:
            raise MalformedMessage(
                f"set: {len(sets)} keys set and {len(unsets)} unset, more than {MAX_KEYS}"
            )
        return cls(
            CHANGE,
            scope,
            revision,
            sets,
            tuple(unsets),
            _timestamp(body, "committed_at"),
            sent_at,
            origin,
        )


# -- encoding --------------------------------------------------------------------------------


def encode(message: ReloadMessage) -> str:
    """``message`` as the JSON text of its body: what an AMQP message carries, and what kombu's
    envelope on Redis wraps (``redis_envelope``)."""
    return json.dumps(message.to_body(), separators=(",", ":"))


def encode_announcement(
    result: WriteResult, *, origin: str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> str:
    """The body that announces the commit ``result``: its change, or a RELOAD if the change
    would encode larger than ``max_bytes``.

    The change is made from the canonical JSON texts ``result`` holds, without decoding them
    (the publish path of every write); it reads back as ``ReloadMessage.change(result)``.
    """
    sets = ",".join(f"{_quote(k)}:{v}" for k, v in result.changes.items() if v is not None)
    unsets = ",".join(_quote(k) for k, v in result.changes.items() if v is None)
    text = (
        f'{{"v":{VERSION},"kind":"{CHANGE}","sent_at":{time.time()!r},"origin":{_quote(origin)},'
        f'"scope":{_quote(result.scope)},"revision":{int(result.revision)},"set":{{{sets}}},'
        f'"unset":[{unsets}],"committed_at":{float(result.committed_at)!r}}}'
    )
    if len(text.encode()) > max_bytes:
        return encode(ReloadMessage.reload(result, origin=origin))
    return text


def signature_headers(body: str, keyring: Keyring | None) -> dict[str, str]:
    """The headers that carry the signature of ``body``'s exact bytes (none without a key)."""
    if keyring is None:
        return {}
    return {SIGNATURE_HEADER: keyring.sign(body.encode())}


def redis_envelope(body: str, exchange: str, headers: dict[str, str] | None = None) -> str:
    """The message kombu's Redis transport publishes for the JSON ``body`` sent to the fanout
    ``exchange`` (transient, priority 0) with ``headers`` (``signature_headers``): every field,
    so that any kombu consumer reads it. A test holds it to kombu's own."""
    return json.dumps(
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": CONTENT_ENCODING,
            "content-type": CONTENT_TYPE,
            "headers": headers or {},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": {"exchange": exchange, "routing_key": ""},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


# -- decoding --------------------------------------------------------------------------------


def decode(
    body: bytes | str | None,
    *,
    content_type: str | None = CONTENT_TYPE,
    content_encoding: str | None = CONTENT_ENCODING,
    compression: str | None = None,
    keyring: Keyring | None = None,
    signature: object = None,
    max_bytes: int | None = None,
) -> ReloadMessage:
    """A received body, as its message declares it, decoded and checked field by field.

    A body over ``max_bytes`` is refused unread; with a ``keyring``, so is one whose
    ``signature`` (its header) does not sign its bytes as received (UnverifiedMessage). Plain
    JSON (what every publisher of reload messages sends) is read here; anything else goes
    through kombu's own decompression and serializers, as a kombu consumer accepting only JSON
    would. Raises MalformedMessage.
    """
    if max_bytes is not None or keyring is not None:
        raw = body.encode() if isinstance(body, str) else body or b""
        if max_bytes is not None and len(raw) > max_bytes:
            raise MalformedMessage(f"body: {len(raw)} bytes, more than {max_bytes}")
        if keyring is not None and (refused := keyring.refusal(raw, signature)) is not None:
            raise UnverifiedMessage(*refused)
    try:
        if compression:
            body = kombu.compression.decompress(body, compression)
        if content_type == CONTENT_TYPE and content_encoding == CONTENT_ENCODING:
            data = decode_value(body)  # type: ignore[arg-type]  # None is refused: undecodable
        else:
            data = kombu.serialization.loads(body, content_type, content_encoding, accept=ACCEPT)
    except Exception as exc:  # whatever the bytes make a decoder raise (RecursionError too)
        raise MalformedMessage(
            f"undecodable body ({type(exc).__name__}: {exc})", content_type=content_type
        ) from None
    try:
        return ReloadMessage.from_body(data)
    except MalformedMessage as exc:
        raise MalformedMessage(str(exc), body=_shown(data)) from None


def decode_redis_envelope(
    data: bytes | str, *, keyring: Keyring | None = None, max_bytes: int | None = None
) -> ReloadMessage:
    """A message read off the exchange's pub/sub topic on Redis: kombu's envelope, whoever
    published it, opened as kombu's Redis transport opens it, then ``decode`` (the envelope
    itself refused unread if larger than a body of ``max_bytes`` could make it)."""
    if max_bytes is not None and len(data) > _envelope_bytes(max_bytes):
        raise MalformedMessage(
            f"envelope: {len(data)} bytes, more than {_envelope_bytes(max_bytes)}"
        )
    try:
        envelope = decode_value(data)
        properties = envelope["properties"]
        headers = envelope.get("headers") or {}
        compression = headers.get("compression")
        signature = headers.get(SIGNATURE_HEADER)
        body = envelope.get("body")
        body_encoding = properties.get("body_encoding")
        if body and body_encoding and body_encoding.lower() != "utf-8":
            if body_encoding != "base64":  # the one body encoding kombu's transport knows
                raise ValueError(f"unknown body encoding {body_encoding!r}")
            body = base64.b64decode(body)
        content_type = envelope.get("content-type")
        content_encoding = envelope.get("content-encoding")
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:
        raise MalformedMessage(f"not a kombu message ({exc})") from None
    return decode(
        body,
        content_type=content_type,
        content_encoding=content_encoding,
        compression=compression,
        keyring=keyring,
        signature=signature,
        max_bytes=max_bytes,
    )


def _envelope_bytes(max_bytes: int) -> int:
    # A body in base64 (4 bytes for 3), its headers and properties.
    return max_bytes * 4 // 3 + 4096


# -- checks ----------------------------------------------------------------------------------


def _shown(body: object) -> str:
    """The start of ``body`` for a log line, even for one nested as deep as JSON let it be."""
    try:
        return repr(body)[:200]
    except RecursionError:
        return f"<{type(body).__name__} nested too deep to show>"


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
        raise MalformedMessage(f"{name}: must be a positive integer, got {_short(value)}")
    if value > MAX_REVISION:
        raise MalformedMessage(f"{name}: at most 2**63-1, got {_short(value)}")
    return value


def _short(value: object) -> str:
    # An integer of thousands of digits is shown by its size (and its repr may refuse it).
    if type(value) is int and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)[:100]


def _marks(value: object) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedMessage("marks: must be an object of scope -> revision")
    if len(value) > MAX_MARKS:
        raise MalformedMessage(f"marks: {len(value)} scopes, more than {MAX_MARKS}")
    # Canonical names only: a mark is compared with cache keys as is.
    return {_scope(scope): _revision(rev, f"marks.{scope}") for scope, rev in value.items()}


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


def _timestamp(body: dict[str, Any], name: str) -> float:
    """Seconds since the epoch: not negative, and not far ahead of this host's clock."""
    number = _number(body, name)
    if number < 0 or number > time.time() + MAX_FUTURE_SECONDS:
        raise MalformedMessage(f"{name}: must be a time from 0 to a day from now, got {number!r}")
    return number
