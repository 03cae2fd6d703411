"""The console's writes, checked and sent exactly as the command line's are: the same task call
(``task_call``), the same parse of a typed value (``parse_value``), the task's own ``run`` and
registry check before anything is enqueued, and the same audit headers; a revert is the
command line's ``set_many`` with origin ``revert``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from store.errors import InvalidOption
from store.model.scopes import Scope
from store.model.validation import validate_key
from store.model.writes import MAX_REASON_LENGTH
from store.signing.tasks import ACTOR_HEADER, ORIGIN_HEADER, REASON_HEADER
from worker.cli.audit import Change, diff, state_at
from worker.cli.writes import parse_value, task_call

REVERT, APPLY = "revert", "apply"
# The most scopes one apply from the console writes (one set_many and one live panel each).
MAX_APPLY_SCOPES = 100
# The largest desired-state file the console plans, uploaded or pasted (``optionstore plan
# FILE`` takes larger ones).
MAX_DOCUMENT_BYTES = 1024 * 1024


class DocumentTooLarge(InvalidOption):
    """A desired-state file past MAX_DOCUMENT_BYTES: refused before it is read."""


@dataclass(frozen=True, slots=True)
class PlannedWrite:
    """A write that passed every check: the task to send, its arguments, and what it changes."""

    task: str
    args: list[Any]
    changes: list[Change]
    reason: str | None
    origin: str | None = None


def _checked(task_name: str, args: list[Any], headers: dict[str, Any]) -> None:
    """The checks ``apply_async`` makes before enqueueing (input rules, then the registry),
    without enqueueing."""
    from worker import app

    task = app.tasks[task_name]
    task.checked(task.run(*args), headers)


def _reason(text: str, *, required: bool) -> str | None:
    reason = text.strip()
    if required and not reason:
        raise InvalidOption("reason", "is required for this option (the registry says so)")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidOption(
            "reason", f"must be at most {MAX_REASON_LENGTH} characters, got {len(reason)}"
        )
    return reason or None


def reason_required(registry: Any, scope: Scope, key: str) -> bool:
    """Whether the registry asks a reason for every change of ``key`` in ``scope``."""
    if scope.is_tag_keys:
        return False
    found = registry.get(key, scope.kind)
    return bool(found is not None and found.reason_required)


def plan_set(
    db: Any, registry: Any, *, scope: Scope, key: str, value_text: str, reason: str, actor: str
) -> PlannedWrite:
    """Check a ``set`` of ``key`` in ``scope`` to the JSON ``value_text``; InvalidOption names
    the field that failed, and nothing is sent."""
    validate_key(key)
    value = parse_value(value_text)
    checked_reason = _reason(reason, required=reason_required(registry, scope, key))
    name, args = task_call(scope, key, value, unset=False)
    headers = {ACTOR_HEADER: actor, REASON_HEADER: checked_reason}
    _checked(name, args, headers)
    new = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    old = db.value_text(scope.name, key)
    changes = [] if old == new else [Change(key, old, new)]
    return PlannedWrite(name, args, changes, checked_reason)


def plan_unset(
    db: Any, registry: Any, *, scope: Scope, key: str, reason: str, actor: str
) -> PlannedWrite:
    """Check the removal of ``key`` from ``scope`` (``optionstore unset``; a tag key's removal
    for a ``tagkeys:`` scope); InvalidOption names the field, and nothing is sent."""
    validate_key(key)
    checked_reason = _reason(reason, required=reason_required(registry, scope, key))
    name, args = task_call(scope, key, None, unset=True)
    _checked(name, args, {ACTOR_HEADER: actor, REASON_HEADER: checked_reason})
    old = db.value_text(scope.name, key)
    changes = [] if old is None else [Change(key, old, None)]
    return PlannedWrite(name, args, changes, checked_reason)


def plan_revert(
    db: Any,
    registry: Any,
    *,
    scope: Scope,
    key: str | None,
    to: int,
    reason: str,
    actor: str,
) -> PlannedWrite:
    """Check a revert of ``key`` (or the whole scope) to revision ``to``, as ``optionstore
    revert`` makes it: one ``set_many`` of the differences, re-validated by today's rules."""
    if scope.is_tag_keys:
        raise InvalidOption("scope", "revert takes an option scope, not tag keys")
    keys = None if key is None else [validate_key(key)]
    current = db.load_scope(scope.name)
    target = state_at(db, scope.name, to, key)
    changes = diff(current.values, target, keys)
    required = any(reason_required(registry, scope, c.key) for c in changes)
    given = _reason(reason, required=required)
    full_reason = f"revert to r{to}" + (f": {given}" if given else "")
    values = {c.key: json.loads(c.new) for c in changes if c.new is not None}
    unset = [c.key for c in changes if c.new is None]
    args: list[Any] = [scope.name, values, unset]
    headers = {ACTOR_HEADER: actor, REASON_HEADER: full_reason, ORIGIN_HEADER: REVERT}
    _checked("options.set_many", args, headers)
    return PlannedWrite("options.set_many", args, changes, full_reason, REVERT)


def plan_document(db: Any, text: str, *, max_value_bytes: int) -> list[Any]:
    """The plan of a desired-state document (``optionstore plan``): per scope, the changes and
    the drift since its last apply; InvalidOption names what is wrong in it (a document past
    MAX_DOCUMENT_BYTES among them)."""
    from worker.cli.desired import parse_desired, plan_all

    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        raise DocumentTooLarge(
            "file",
            f"is {size} bytes; the console plans files of at most {MAX_DOCUMENT_BYTES} bytes"
            " (optionstore plan FILE takes larger ones)",
        )
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InvalidOption("file", f"is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidOption("file", "is nested too deeply to read") from None
    desired = parse_desired(data, source="file", max_value_bytes=max_value_bytes)
    if len(desired) > MAX_APPLY_SCOPES:
        raise InvalidOption(
            "file", f"names {len(desired)} scopes; the console applies at most {MAX_APPLY_SCOPES}"
        )
    return plan_all(db, desired)


def read_upload(filename: str, data: bytes) -> tuple[str, str]:
    """The name (its last part, at most 200 characters) and the text of an uploaded
    desired-state file; InvalidOption("file") when it is too large or not UTF-8."""
    # The browser's name is untrusted: its last part, bounded, is all that is ever quoted.
    name = filename.replace("\\", "/").rsplit("/", 1)[-1][:200] or "desired-state.json"
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentTooLarge(
            "file",
            f"{name} is {len(data)} bytes; the console plans files of at most"
            f" {MAX_DOCUMENT_BYTES} bytes (optionstore plan FILE takes larger ones)",
        )
    try:
        return name, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidOption("file", f"{name} is not UTF-8 text: {exc}") from None


def plan_apply(plans: list[Any], *, name: str, reason: str, actor: str) -> list[PlannedWrite]:
    """The writes of ``optionstore apply`` for ``plans``, each checked before any is sent: one
    ``set_many`` per scope, origin ``apply``, reason ``apply NAME[: reason]``."""
    from worker.cli.operate import apply_writes

    given = _reason(reason, required=False)
    full_reason = f"apply {name}" + (f": {given}" if given else "")
    headers = {ACTOR_HEADER: actor, REASON_HEADER: full_reason, ORIGIN_HEADER: APPLY}
    planned = []
    for scope, changes in apply_writes(plans):
        values = {c.key: json.loads(c.new) for c in changes if c.new is not None}
        unset = [c.key for c in changes if c.new is None]
        args: list[Any] = [scope, values, unset]
        _checked("options.set_many", args, headers)
        planned.append(PlannedWrite("options.set_many", args, changes, full_reason, APPLY))
    return planned


def send(planned: PlannedWrite, *, actor: str) -> str:
    """Enqueue ``planned`` through the task object (its checks run once more); its task id."""
    from worker import app

    options: dict[str, Any] = {}
    if planned.origin is not None:
        options["headers"] = {ORIGIN_HEADER: planned.origin}
    result = app.tasks[planned.task].apply_async(
        planned.args, actor=actor, reason=planned.reason, **options
    )
    return str(result.id)
