"""Read-your-writes tokens: a write's revision per scope, carried in the ``options_after``
task header, checked as untrusted input, and passed on by the tasks a write publishes."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

from store.errors import InvalidOption, InvalidToken
from store.events import Throttled
from store.model.scopes import Scope
from store.model.validation import MAX_ID

# The Celery message header a task carries its token in: {scope name: revision}.
HEADER = "options_after"
# A token names at most this many scopes, and encodes to at most this many bytes: a header
# comes from outside, and each scope costs the receiving process a wait or a load.
MAX_SCOPES = 64
MAX_TOKEN_BYTES = 8192
# The longest canonical scope name is user:ID/project:ID with two 19-digit ids.
_MAX_SCOPE_CHARS = 64


def parse_token(value: object, *, field: str = HEADER) -> dict[str, int]:
    """``value`` as a token, ``{canonical scope: revision}``, or InvalidToken naming ``field``
    (and the scope at fault). None is no token: an empty dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidToken(
            field, f"must be an object of scope name -> revision, not {type(value).__name__}"
        )
    if len(value) > MAX_SCOPES:
        raise InvalidToken(field, f"names {len(value)} scopes; at most {MAX_SCOPES}")
    token: dict[str, int] = {}
    for name, revision in value.items():
        if not isinstance(name, str) or len(name) > _MAX_SCOPE_CHARS:
            shown = repr(name)[:80]
            raise InvalidToken(field, f"{shown} is not a scope name")
        try:
            Scope.parse(name, field=f"{field}[{name!r}]")
        except InvalidOption as exc:
            raise InvalidToken(exc.field, exc.reason) from None
        if isinstance(revision, bool) or not isinstance(revision, int):
            raise InvalidToken(
                f"{field}[{name!r}]", f"revision must be an integer, not {type(revision).__name__}"
            )
        if not 1 <= revision <= MAX_ID:
            raise InvalidToken(
                f"{field}[{name!r}]", f"revision must be between 1 and {MAX_ID}, got {revision}"
            )
        token[name] = revision
    # Bounded above already (64 names of 64 characters, 19-digit revisions); checked all the
    # same, so the limit a producer reads in the docs is the one enforced.
    size = len(json.dumps(token, separators=(",", ":")))
    if size > MAX_TOKEN_BYTES:
        raise InvalidToken(field, f"encodes to {size} bytes; at most {MAX_TOKEN_BYTES}")
    return token


def token_of(*writes: Mapping[str, Any]) -> dict[str, int]:
    """The token that covers ``writes``: write task results (``{"scope", "revision", ...}``) or
    tokens (``{scope: revision}``), merged to the newest revision per scope."""
    merged: dict[str, int] = {}
    for index, write in enumerate(writes):
        if not isinstance(write, Mapping):
            raise InvalidToken(
                f"writes[{index}]", f"must be a write result or a token, not {type(write).__name__}"
            )
        if "scope" in write and "revision" in write:
            if write["revision"] == 0 and not isinstance(write["revision"], bool):
                continue  # a write that found nothing to change in a scope never written
            found = parse_token({write["scope"]: write["revision"]}, field=f"writes[{index}]")
        else:
            found = parse_token(write, field=f"writes[{index}]")
        for scope, revision in found.items():
            if revision > merged.get(scope, 0):
                merged[scope] = revision
    return parse_token(merged)


def options_after(*writes: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """The headers that make a task run only once its process has applied ``writes``:
    ``task.apply_async(args, headers=store.options_after(result))``."""
    return {HEADER: token_of(*writes)}


class Written(threading.local):
    """What the task running in this thread has committed, for the tasks it then publishes (a
    chain's next step, a link): they carry it in their ``options_after`` header.

    Recorded only between ``begin_task`` and ``end_task`` (an installed app's ``task_prerun``
    and ``task_postrun``; counted, so a write run eagerly inside a task is kept for its caller):
    a write run outside a worker's task (``apply()`` in a script) leaves nothing behind.

    A token names at most ``MAX_SCOPES`` scopes: the task's writes to further scopes are not
    carried (the tasks it publishes may read them stale), and its end logs
    ``token.scopes_dropped`` with how many (throttled).
    """

    def __init__(self) -> None:
        self.token: dict[str, int] = {}
        self.dropped: set[str] = set()
        self.depth = 0

    def begin_task(self) -> None:
        if self.depth == 0:
            self.token = {}
            self.dropped = set()
        self.depth += 1

    def end_task(self) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            if self.dropped:
                _throttled.warning(
                    "token.scopes_dropped",
                    kept=len(self.token),
                    dropped=len(self.dropped),
                    why=f"a token names at most {MAX_SCOPES} scopes: the tasks this one "
                    "published do not wait for its writes to the others",
                )
            self.token = {}
            self.dropped = set()

    def add(self, scope: str, revision: int) -> None:
        if self.depth == 0 or revision < 1:
            return  # not in a task; or nothing written anywhere yet: nothing to wait for
        token = self.token
        if scope in token or len(token) < MAX_SCOPES:
            if revision > token.get(scope, 0):
                token[scope] = revision
        else:
            self.dropped.add(scope)


_throttled = Throttled(60.0)
written = Written()


def connect_token_carrying() -> None:
    """Give every task this process publishes, from any Celery app, while a task that wrote
    runs in the same thread, that write's token (unless it names one of its own). Idempotent."""
    from celery.signals import before_task_publish

    def carry(headers: dict[str, Any] | None = None, **_: Any) -> None:
        token = written.token
        if token and headers is not None and headers.get(HEADER) is None:
            headers[HEADER] = dict(token)

    before_task_publish.connect(carry, weak=False, dispatch_uid="optionstore.carry_token")
