"""What a write-task message must be before a worker's main process decodes it: bounded in size
and in nesting, and, when the worker holds a signing key, signed with it. Celery decodes a
task's arguments in the main process (to build its request) and again in a child; JSON nested
deeper than the interpreter's recursion limit kills the main process there, and with late
acknowledgement the message comes back and kills the next one. A message refused here is
acknowledged, failed for its producer, counted, logged (once per interval and reason: a flood
must not flood the log) and kept in a bounded dead-letter list in Redis
(``<namespace>:dead-letters``), never put back on the queue."""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable
from typing import Any

from celery.worker.strategy import default

import store
from store.errors import InvalidOption, SignatureRefused, describe
from store.events import Throttled, log
from store.settings import ACCEPT
from store.signing.tasks import SIGNATURE_HEADER, task_refusal

# Far above what a valid write nests (a value at most 32 deep, store/model/validation.py, plus
# the body's own few levels), so a value merely too deep still gets the input rule's error
# naming its field; far below the interpreter's recursion limit (about 1,000).
MAX_DEPTH = 100
# How many refused messages the dead-letter list keeps, and how much of each body.
DEAD_LETTERS_KEPT = 1000
DEAD_LETTER_BODY_BYTES = 64 * 1024

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
# kombu's names for its zlib compression, the one opened here.
_ZLIB = ("application/x-gzip", "gzip", "zlib")

_throttled = Throttled()

# A refusal: its reason (a metric's label: too_large, too_deep, compression, unsigned,
# malformed_signature, unknown_key, bad_signature, unverifiable) and what it says.
Refusal = tuple[str, str]


def refusal(body: bytes, *, max_bytes: int) -> str | None:
    """Why ``body`` (JSON text) must not be decoded here, or None if it may."""
    refused = _refusal(body, max_bytes=max_bytes)
    return None if refused is None else refused[1]


def _refusal(body: bytes, *, max_bytes: int) -> Refusal | None:
    if len(body) > max_bytes:
        return "too_large", f"a body of {len(body)} bytes, more than {max_bytes}"
    # Brackets outside strings, in C: the regex drops the strings, translate keeps the rest.
    brackets = _STRINGS.sub(b"", body).translate(None, _BRACKETS)
    depth = deepest = 0
    for char in brackets:
        depth += 1 if char in b"[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        return "too_deep", f"JSON nested {deepest} deep, more than {MAX_DEPTH}"
    return None


def admitting(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """The write tasks' Celery strategy: Celery's own, behind ``refusal`` and, with a key, the
    signature check."""
    handle = default(task, app, consumer, **kwargs)
    settings = store.runtime.settings()
    keyring = store.runtime.keyring()
    accept_unsigned = settings.unsigned_writes == ACCEPT
    # The largest write (OPTIONS_MAX_WRITE_BYTES) and room for its keys and envelope.
    max_bytes = settings.max_write_bytes + settings.max_value_bytes

    def on_message(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any
    ) -> Any:
        raw = message.body
        raw = raw.encode() if isinstance(raw, str) else raw
        headers = message.headers or {}
        opened, refused = _admitted(raw, headers, max_bytes)
        if refused is None and keyring is not None:
            # Bounded above: reading it to check the signature is safe.
            refused = task_refusal(opened, headers, keyring, accept_unsigned=accept_unsigned)
        if refused is None:
            return handle(message, body, ack, reject, callbacks, **kw)
        _dead_letter(task, message, raw, refused)
        return None

    return on_message


def _why_refused(raw: bytes, headers: dict[str, Any], max_bytes: int) -> str | None:
    """``refusal`` of the body as it will be decoded; a compressed one is opened no further
    than one byte past ``max_bytes`` (a small compressed body may open to gigabytes)."""
    refused = _admitted(raw, headers, max_bytes)[1]
    return None if refused is None else refused[1]


def _admitted(raw: bytes, headers: dict[str, Any], max_bytes: int) -> tuple[bytes, Refusal | None]:
    """The body as it will be decoded (opened within the bound), and why it is refused."""
    compression = headers.get("compression")
    if compression and compression not in _ZLIB:
        why = f"compressed with {compression}: write tasks take plain or zlib-compressed JSON"
        return raw, ("compression", why)
    if compression:
        if len(raw) > max_bytes:
            return raw, ("too_large", f"a body of {len(raw)} bytes, more than {max_bytes}")
        try:
            raw = zlib.decompressobj().decompress(raw, max_bytes + 1)
        except zlib.error:
            # Celery's own decoding refuses it, as it would any undecodable body (and with a
            # key, the signature check does first).
            return raw, None
    return raw, _refusal(raw, max_bytes=max_bytes)


def _dead_letter(task: Any, message: Any, raw: bytes, refused: Refusal) -> None:
    headers = message.headers or {}
    reason, why = refused
    task_id, name = str(headers.get("id", "?")), str(headers.get("task", task.name))
    store.backend.metrics.refused(reason)
    _throttled.error(
        "task.refused",
        key=reason,
        task_id=task_id,
        task_name=name,
        code=reason,
        reason=why,
        bytes=len(raw),
    )
    record = {
        "task_id": task_id,
        "task": name,
        "code": reason,
        "reason": why,
        "at": time.time(),
        "body": raw[:DEAD_LETTER_BODY_BYTES].decode("utf-8", "replace"),
    }
    cache = store.backend.redis
    try:
        if cache is not None:
            key = f"{store.runtime.namespace}:dead-letters"
            with cache.client.pipeline(transaction=False) as pipe:
                pipe.lpush(key, json.dumps(record))
                pipe.ltrim(key, 0, DEAD_LETTERS_KEPT - 1)
                pipe.execute()
    except Exception as exc:  # the log line above is the record of last resort
        log.warning("task.dead_letter_failed", task_id=task_id, error=describe(exc))
    error = (
        InvalidOption("args", f"refused: {why}")
        if reason in ("too_large", "too_deep", "compression")
        else SignatureRefused(SIGNATURE_HEADER, f"refused: {why}")
    )
    try:
        # Its producer sees why, instead of waiting for a result that never comes.
        task.backend.mark_as_failure(task_id, error)
    except Exception as exc:
        log.warning("task.refusal_unreported", task_id=task_id, error=describe(exc))
    # Acknowledged, not rejected: back on the queue it would only be refused again.
    message.ack()
