"""Desired-state files (`optionstore plan/apply/export`): the format, and the plan of one scope
(what to set and unset, and what changed outside the file since its last apply).

The format is JSON, the one format that holds every option value (TOML has no null)::

    {
      "optionstore": 1,
      "scopes": {
        "global":     {"values": {"system.rate-limit": 100}},
        "project:42": {"values": {"mail:subject_prefix": "[Prod]"}, "unset": ["legacy"]},
        "project:43": {"values": {}, "prune": true}
      }
    }

A key left out of a scope is left alone, unless the scope says ``"prune": true`` (then every key
not in ``values`` is unset) or names it in ``"unset"``. ``export`` writes ``"prune": true``: a
file it wrote is the whole state of those scopes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.errors import InvalidOption
from store.model.scopes import Scope
from store.model.validation import DEFAULT_MAX_VALUE_BYTES, encode_value, validate_key
from store.postgres.store import HistoryEntry, PostgresStore
from worker.cli.audit import Change, LastApply, State, diff, last_applies, last_changes, state_at

FORMAT_VERSION = 1
_SCOPE_FIELDS = {"values", "unset", "prune"}


@dataclass(frozen=True, slots=True)
class DesiredScope:
    """What a file wants of one scope; ``values`` hold canonical JSON text."""

    scope: Scope
    values: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    prune: bool = False

    def target(self, current: State) -> dict[str, str]:
        """The scope's values once this is applied on top of ``current``."""
        kept = {} if self.prune else {k: v for k, v in current.items() if k not in self.unset}
        return {**kept, **self.values}

    def keys(self, current: State, applied: State) -> set[str]:
        """The keys this file governs in the scope."""
        governed = set(self.values) | set(self.unset)
        return governed | set(current) | set(applied) if self.prune else governed


def parse_desired(
    data: object, *, source: str, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
) -> list[DesiredScope]:
    """Check a decoded desired-state document; errors name the scope and key."""
    if not isinstance(data, dict):
        raise InvalidOption(source, "must hold a JSON object")
    unknown = set(data) - {"optionstore", "scopes"}
    if unknown:
        raise InvalidOption(source, f"unknown top-level field(s): {', '.join(sorted(unknown))}")
    if data.get("optionstore", FORMAT_VERSION) != FORMAT_VERSION:
        raise InvalidOption(f"{source}: optionstore", f"format {FORMAT_VERSION} only")
    scopes = data.get("scopes", {})
    if not isinstance(scopes, dict):
        raise InvalidOption(f"{source}: scopes", "must be an object of scope -> desired values")
    found = []
    for name, spec in sorted(scopes.items()):
        where = f"{source}: scopes[{name!r}]"
        scope = Scope.parse(name, field=where)
        if scope.is_tag_keys:
            raise InvalidOption(where, "tag key scopes are not managed by desired-state files")
        if not isinstance(spec, dict) or set(spec) - _SCOPE_FIELDS:
            raise InvalidOption(where, f"must be an object with only {sorted(_SCOPE_FIELDS)}")
        values, unset, prune = spec.get("values", {}), spec.get("unset", []), spec.get("prune")
        if not isinstance(values, dict):
            raise InvalidOption(f"{where}.values", "must be an object of key -> value")
        if not isinstance(unset, list):
            raise InvalidOption(f"{where}.unset", "must be a list of keys")
        if not isinstance(prune, bool | None):
            raise InvalidOption(f"{where}.prune", "must be true or false")
        texts = {
            validate_key(key, f"{where}.values"): encode_value(
                value, f"{where}.values[{key!r}]", max_bytes=max_value_bytes
            )
            for key, value in values.items()
        }
        for position, key in enumerate(unset):
            validate_key(key, f"{where}.unset[{position}]")
            if key in texts:
                raise InvalidOption(f"{where}.unset[{position}]", f"{key!r} is also in values")
        found.append(DesiredScope(scope, texts, tuple(dict.fromkeys(unset)), bool(prune)))
    return found


def load_desired(
    path: Path, *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
) -> list[DesiredScope]:
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise InvalidOption("FILE", f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidOption("FILE", f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidOption("FILE", f"{path} is nested too deeply to read") from None
    return parse_desired(data, source=str(path), max_value_bytes=max_value_bytes)


def dump_desired(states: Mapping[str, State]) -> str:
    """The file ``export`` writes: each scope's whole state, pruned, keys and scopes sorted."""
    document = {
        "optionstore": FORMAT_VERSION,
        "scopes": {
            scope: {
                "prune": True,
                "values": {key: json.loads(text) for key, text in values.items()},
            }
            for scope, values in states.items()
        },
    }
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@dataclass(frozen=True, slots=True)
class Drift:
    """A governed key whose value changed outside the file since its last apply."""

    key: str
    applied: str | None
    current: str | None
    last_change: HistoryEntry | None

    # Shaped like audit.Change.as_dict (a JSON text and whether it is set, per side); the
    # fields differ, so each record says its own.
    def as_dict(self) -> dict[str, Any]:
        change = self.last_change
        return {
            "key": self.key,
            "applied": None if self.applied is None else json.loads(self.applied),
            "applied_set": self.applied is not None,
            "current": None if self.current is None else json.loads(self.current),
            "current_set": self.current is not None,
            "revision": None if change is None else change.revision,
            "actor": None if change is None else change.actor,
            "reason": None if change is None else change.reason,
            "changed_at": None if change is None else change.changed_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class ScopePlan:
    """What applying a file does to one scope, and the drift it found there."""

    scope: str
    revision: int
    changes: list[Change]
    drift: list[Drift]
    last_apply: LastApply | None

    @property
    def sets(self) -> dict[str, Any]:
        return {c.key: json.loads(c.new) for c in self.changes if c.new is not None}

    @property
    def unsets(self) -> list[str]:
        return [c.key for c in self.changes if c.new is None]


def plan_scope(
    desired: DesiredScope,
    *,
    revision: int,
    current: State,
    last_apply: LastApply | None,
    applied: State,
    last_changes: Mapping[str, HistoryEntry],
) -> ScopePlan:
    """``applied`` is the scope as the last apply left it (ignored when there was none)."""
    drift = []
    if last_apply is not None:
        drift = [
            Drift(c.key, c.old, c.new, last_changes.get(c.key))
            for c in diff(applied, current, desired.keys(current, applied))
        ]
    return ScopePlan(
        desired.scope.name, revision, diff(current, desired.target(current)), drift, last_apply
    )


def plan_all(db: PostgresStore, desired: list[DesiredScope]) -> list[ScopePlan]:
    """The plan of every scope of a file against the store, with drift since each last apply."""
    names = [d.scope.name for d in desired]
    snapshots = db.load_scopes(names)
    applies = last_applies(db, names)
    plans = []
    for wanted in desired:
        name = wanted.scope.name
        snapshot, last = snapshots[name], applies.get(name)
        # Nothing can have drifted in a scope untouched since its last apply.
        unchanged = last is None or last.revision == snapshot.revision
        applied = snapshot.values if unchanged else state_at(db, name, last.revision)  # type: ignore[union-attr]
        drifted = (
            []
            if unchanged
            else diff(applied, snapshot.values, wanted.keys(snapshot.values, applied))
        )
        plans.append(
            plan_scope(
                wanted,
                revision=snapshot.revision,
                current=snapshot.values,
                last_apply=last,
                applied=applied,
                last_changes=last_changes(db, name, [c.key for c in drifted]) if drifted else {},
            )
        )
    return plans
