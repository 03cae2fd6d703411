"""``start_rollout``: a checked request for a canary rollout, recorded (the command line's
``set --canary`` and ``apply --canary``, and the ``tasks.start_rollout`` helper)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from store.errors import InvalidOption
from store.model.scopes import TAGKEYS, Scope
from store.model.writes import audit, set_write
from store.redis.presence import Presence
from store.rollouts.model import PERCENT, Selector, Thresholds
from store.rollouts.records import Rollout, RolloutRecords

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object, field: str = "watch") -> float:
    """Seconds from ``120``, ``"120s"``, ``"2m"``, ``"1h"``, ``"500ms"``; InvalidOption naming
    ``field`` otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int past any float: far past the longest window
            raise InvalidOption(field, "must be at most 7 days, got a far larger number") from None
    found = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if found is None:
        raise InvalidOption(field, f"must be a duration such as 120s, 2m or 1h, got {value!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def records_of(backend: Any, namespace: str) -> RolloutRecords:
    """The rollouts of ``backend``'s database, followed under ``namespace`` in its Redis."""
    client = None if backend.redis is None else backend.redis.client
    return RolloutRecords(backend.db, client, namespace=namespace)


def check_request(
    backend: Any,
    scope: str | Scope,
    key: object,
    value: object,
    *,
    canary: object,
    watch: object,
    thresholds: dict[str, Any] | None = None,
) -> tuple[Scope, str, str, Selector, float, Thresholds]:
    """Every input rule of a rollout, before anything is written: the scope, key and value (and
    the registry's declaration), the selector, the window and the thresholds."""
    parsed = scope if isinstance(scope, Scope) else Scope.parse(scope)
    if parsed.kind == TAGKEYS:
        raise InvalidOption("scope", "tag keys have no values to roll out")
    selector = Selector.parse(canary)
    seconds = parse_duration(watch)
    checked = Thresholds.from_options(dict(thresholds or {}))
    write = set_write(parsed, key, value, max_value_bytes=backend.max_value_bytes)
    backend.registry.check_write(write)
    name = write.keys[0]
    return parsed, name, write.sets[name], selector, seconds, checked


def start_rollout(
    backend: Any,
    namespace: str,
    scope: str | Scope,
    key: object,
    value: object,
    *,
    canary: object,
    watch: object,
    thresholds: dict[str, Any] | None = None,
    actor: str | None = None,
    reason: str | None = None,
) -> Rollout:
    """Check a rollout of ``key`` = ``value`` in ``scope`` to the processes ``canary`` selects,
    watched for ``watch`` (seconds, or a duration such as ``"120s"``), and record it; the leader
    takes it from there. Bad input raises InvalidOption naming the field, and writes nothing."""
    return start_rollouts(
        backend,
        namespace,
        [(scope, key, value)],
        canary=canary,
        watch=watch,
        thresholds=thresholds,
        actor=actor,
        reason=reason,
    )[0]


def start_rollouts(
    backend: Any,
    namespace: str,
    requests: Sequence[tuple[str | Scope, object, object]],
    *,
    canary: object,
    watch: object,
    thresholds: dict[str, Any] | None = None,
    actor: str | None = None,
    reason: str | None = None,
) -> list[Rollout]:
    """``start_rollout`` for each (scope, key, value), with the same selector, window and
    thresholds: every request is checked, then all are recorded in one transaction, or none
    (bad input, or a key already under a rollout, raises InvalidOption naming the field)."""
    checked_requests = [
        check_request(backend, scope, key, value, canary=canary, watch=watch, thresholds=thresholds)
        for scope, key, value in requests
    ]
    if not checked_requests:
        return []
    asked = audit(actor, reason)  # the rules of a write's actor and reason
    found = records_of(backend, namespace)
    _, _, _, selector, seconds, checked = checked_requests[0]
    live: list[str] = []
    if selector.kind == PERCENT and backend.redis is not None:
        presence = Presence(backend.redis.client, namespace=namespace)
        live = [p.name for p in presence.processes() if p.kind == "worker"]
    # Processes follow them once the leader copies the active rollouts to Redis (within a
    # second): only the leader writes that copy, so that no copy read before a rollout ended
    # is written after the leader removed it.
    return found.start_many(
        [(parsed.name, name, text) for parsed, name, text, _, _, _ in checked_requests],
        selector=selector,
        watch_seconds=seconds,
        thresholds=checked,
        live=live,
        actor=asked.actor,
        reason=asked.reason,
    )
