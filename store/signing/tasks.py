"""A write task's signature: what it covers, the Celery receiver that adds it to every
``options.*`` task this process publishes (from any app), and the check a worker makes before
it runs one.

The signature is HMAC-SHA256, in the task's ``optionstore_signature`` header as
``v1:<key id>:<hex>``, over the canonical JSON (sorted keys, no spaces, ASCII escapes) of
``[task name, task id, args, kwargs, embed, actor, reason, origin]``: the name and id from the
message's headers, args, kwargs and embed (callbacks, errbacks, chain, chord) from its body,
the three audit headers (null when absent). docs/contract.md spells it out for producers in
other languages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from store.events import Throttled
from store.signing.keys import Keyring

SIGNATURE_HEADER = "optionstore_signature"
# Task headers a producer sets to say who asks for a write and why (`app.send_task(...,
# headers={"optionstore_actor": "ana", "optionstore_reason": "incident 42"})`); signed.
ACTOR_HEADER = "optionstore_actor"
REASON_HEADER = "optionstore_reason"
ORIGIN_HEADER = "optionstore_origin"
WRITE_TASK_PREFIX = "options."
# Celery's own canvas tasks (celery.group, celery.chain, celery.chord_unlock, ...): they publish
# whatever signatures their message carries.
_CANVAS_PREFIX = "celery."

_throttled = Throttled()


def canonical(material: object) -> bytes:
    """``material`` as the canonical JSON a signature covers. What plain JSON cannot hold (a
    datetime, a UUID) is taken as kombu's JSON encoder writes it and a plain JSON reader reads
    it back, which is what a worker reads."""
    try:
        text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError):
        from kombu.utils.json import dumps

        text = json.dumps(
            json.loads(dumps(material)), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )
    return text.encode()


def signed_part(headers: Mapping[str, Any], body: object) -> bytes:
    """What a write task's signature covers, from its message's ``headers`` and its protocol 2
    ``body`` (``[args, kwargs, embed]``). Raises ValueError for any other body."""
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise ValueError("not a task body of Celery's message protocol 2 ([args, kwargs, embed])")
    args, kwargs, embed = body
    return canonical(
        [
            headers.get("task"),
            headers.get("id"),
            args,
            kwargs,
            embed,
            headers.get(ACTOR_HEADER),
            headers.get(REASON_HEADER),
            headers.get(ORIGIN_HEADER),
        ]
    )


def task_refusal(
    body: bytes, headers: Mapping[str, Any], keyring: Keyring, *, accept_unsigned: bool
) -> tuple[str, str] | None:
    """Why a write task whose JSON body is ``body`` (bounded: read here) must not run under
    ``keyring``, as (reason, detail); None if it may. Unsigned tasks run if ``accept_unsigned``
    (a signed one is checked all the same)."""
    signature = headers.get(SIGNATURE_HEADER)
    if signature is None:
        if accept_unsigned:
            return None
        return "unsigned", "not signed, and this worker runs only signed write tasks"
    try:
        data = signed_part(headers, json.loads(body))
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON, or headers JSON lacks
        return "unverifiable", f"cannot be verified: {exc}"
    return keyring.refusal(data, signature)


# -- signing what this process publishes -----------------------------------------------------


def connect_task_signing(keyring: Callable[[], Keyring | None]) -> None:
    """Sign every ``options.*`` task this process publishes, from any Celery app, with the
    ``keyring()`` of the moment (None: unsigned), called on the first publish, not here.
    Idempotent; reads nothing, starts nothing."""
    from celery.signals import before_task_publish

    def sign(
        sender: object = None,
        body: object = None,
        headers: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        _sign(keyring, sender, body, headers)

    before_task_publish.connect(sign, weak=False, dispatch_uid="optionstore.sign_write_tasks")


def _sign(
    keyrings: Callable[[], Keyring | None],
    sender: object,
    body: object,
    headers: dict[str, Any] | None,
) -> None:
    if not (isinstance(sender, str) and sender.startswith(WRITE_TASK_PREFIX)) or headers is None:
        return
    keyring = keyrings()
    if keyring is None:
        return
    if not _may_vouch(headers):
        # Never pass on a signature copied from elsewhere either.
        headers.pop(SIGNATURE_HEADER, None)
        _throttled.warning(
            "task.not_signed",
            task_name=sender,
            why="published by a canvas (a link, a chain, a chord, celery.group) of a task "
            "this worker could not verify",
        )
        return
    try:
        headers[SIGNATURE_HEADER] = keyring.sign(signed_part(headers, body))
    except (TypeError, ValueError) as exc:
        _throttled.warning("task.not_signed", task_name=sender, why=str(exc))


def _may_vouch(headers: Mapping[str, Any]) -> bool:
    """Whether this process may sign the task it is publishing: yes from its own code; inside a
    task a worker runs, not when what is published may come from that task's message rather
    than from code (a canvas carried by a message nobody signed). Without this, any client of
    the broker could have a worker sign its write: a celery.group message, or a link on any
    task, naming options.set_option."""
    # Celery's private name, used here only: the task a worker runs, not one called directly.
    from celery._state import get_current_worker_task

    task = get_current_worker_task()
    if task is None:
        return True
    request = task.request
    name = str(task.name or "")
    if name.startswith(WRITE_TASK_PREFIX):
        # A signed write task was verified before it ran, its embed (chain, links) with it: its
        # retry and its links are signed again. An unsigned one (OPTIONS_UNSIGNED_WRITES=accept)
        # stays unsigned.
        return getattr(request, SIGNATURE_HEADER, None) is not None
    if name.startswith(_CANVAS_PREFIX):
        return False
    return not (request.callbacks or request.errbacks or request.chain or request.chord)
