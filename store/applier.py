"""Applying what the reload exchange brings to this process's caches."""

from __future__ import annotations

from store.broadcast.codec import HEARTBEAT, RELOAD, ReloadMessage
from store.events import log
from store.fallback import LastKnown
from store.local import LocalCache


def apply_message(local: LocalCache, last_known: LastKnown, message: ReloadMessage) -> str:
    """Apply a received message: a change in revision order; a RELOAD, or a heartbeat's marks,
    by dropping whatever they prove older. Returns what happened (for the log and the tests)."""
    if message.kind == HEARTBEAT:
        return _apply_marks(local, last_known, message)
    if message.kind == RELOAD:
        last_known.forget_older(message.scope, message.revision)
        return "dropped" if local.invalidate(message.scope, message.revision) else "absent"
    outcome = local.apply_change(message.scope, message.revision, message.sets, message.unsets)
    last_known.advance(message.scope, message.revision, message.sets, message.unsets)
    return outcome


def _apply_marks(local: LocalCache, last_known: LastKnown, message: ReloadMessage) -> str:
    if message.marks is None:
        return "none"
    missed = []
    for scope, revision in message.marks.items():
        last_known.forget_older(scope, revision)
        if local.invalidate(scope, revision):
            missed.append(scope)
    if not message.marks_complete:
        # More changed than one heartbeat names: nothing cached can be proved current.
        local.clear()
    if missed or not message.marks_complete:
        log.warning(
            "broadcast.missed",
            scopes=missed[:20],
            missed=len(missed),
            marks_complete=message.marks_complete,
        )
        return "dropped"
    return "current"
