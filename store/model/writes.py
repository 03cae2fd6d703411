"""What a write task asks for (``Write``) and what it did (``WriteResult``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from store.errors import InvalidOption
from store.model.scopes import Scope
from store.model.validation import (
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_MAX_WRITE_BYTES,
    DEFAULT_MAX_WRITE_KEYS,
    MAX_ID,
    encode_value,
    validate_key,
    validate_tag_key,
    validate_text,
)

# Tag keys are a set; each member is stored with this value.
TAG_KEY_PRESENT = "true"

MAX_ACTOR_LENGTH = 128
MAX_REASON_LENGTH = 1000
# Writes made by `optionstore apply` and `revert`; plan finds the last apply by this mark.
ORIGINS = ("apply", "revert", "rollout")


@dataclass(frozen=True, slots=True)
class Audit:
    """Who asked for a write, why, and whether an apply or a revert made it."""

    actor: str | None = None
    reason: str | None = None
    origin: str | None = None


def audit(actor: object = None, reason: object = None, origin: object = None) -> Audit:
    """A checked ``Audit``; each field is optional, and named in its error."""
    if origin is not None and origin not in ORIGINS:
        raise InvalidOption("origin", f"must be one of {', '.join(ORIGINS)}, got {origin!r}")
    return Audit(
        None if actor is None else validate_text(actor, "actor", max_length=MAX_ACTOR_LENGTH),
        None
        if reason is None
        # One line: history, explain and plan print it as one.
        else validate_text(reason, "reason", max_length=MAX_REASON_LENGTH),
        origin,
    )


@dataclass(frozen=True, slots=True)
class Write:
    """One atomic change of one scope: keys to set (canonical JSON text) and keys to remove."""

    scope: Scope
    sets: Mapping[str, str] = field(default_factory=dict)
    unsets: tuple[str, ...] = ()
    audit: Audit = Audit()
    # Compare-and-set: commit only if the scope is at this revision (0: never written).
    expected_revision: int | None = None
    # The argument an error about this write's keys names (a scope limit): "values" for a
    # set_many.
    keys_field: str = "key"

    @property
    def keys(self) -> list[str]:
        return [*self.sets, *self.unsets]

    @property
    def fingerprint(self) -> str:
        """What this write asks for, recorded with its task id: the same id coming back with
        another write is refused."""
        asked: list[object] = [self.scope.name, sorted(self.sets.items()), sorted(self.unsets)]
        asked.append(self.expected_revision)
        text = json.dumps(asked, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The committed outcome; ``changes`` maps each changed key to its new JSON text or None."""

    scope: str
    revision: int
    changed: bool
    changes: dict[str, str | None]
    task_id: str
    committed_at: float

    def as_task_result(self, keys: Sequence[str]) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "revision": self.revision,
            "changed": self.changed,
            "keys": list(keys),
            "changed_keys": sorted(self.changes),
        }


def check_expected_revision(value: object) -> int | None:
    """A write's ``expected_revision``: None (any), or a revision from 0 (never written)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption("expected_revision", f"must be an integer, not {type(value).__name__}")
    if not 0 <= value <= MAX_ID:
        raise InvalidOption("expected_revision", f"must be between 0 and {MAX_ID}, got {value}")
    return value


def set_write(
    scope: Scope, key: object, value: object, *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
) -> Write:
    name = validate_key(key)
    return Write(scope, {name: encode_value(value, max_bytes=max_value_bytes)})


def unset_write(scope: Scope, key: object) -> Write:
    return Write(scope, unsets=(validate_key(key),))


def add_tag_key_write(scope: Scope, key: object) -> Write:
    return Write(scope, {validate_tag_key(key): TAG_KEY_PRESENT})


def remove_tag_key_write(scope: Scope, key: object) -> Write:
    return Write(scope, unsets=(validate_tag_key(key),))


def many_write(
    scope: Scope,
    values: object,
    unset: object,
    *,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    max_write_keys: int = DEFAULT_MAX_WRITE_KEYS,
    max_write_bytes: int = DEFAULT_MAX_WRITE_BYTES,
) -> Write:
    """A set_many: ``values`` set and ``unset`` removed in one revision, at most
    ``max_write_keys`` keys and ``max_write_bytes`` of encoded values in all."""
    if scope.is_tag_keys:
        raise InvalidOption("scope", "set_many takes an option scope; use add_tag_key for tag keys")
    if not isinstance(values, dict):
        raise InvalidOption(
            "values", f"must be an object of key -> value, not {type(values).__name__}"
        )
    if not isinstance(unset, list):
        raise InvalidOption("unset", f"must be a list of keys, not {type(unset).__name__}")
    # Counted before anything is encoded: an oversized write costs no work.
    if len(values) + len(unset) > max_write_keys:
        raise InvalidOption(
            "values",
            f"one write takes at most {max_write_keys} keys (OPTIONS_MAX_WRITE_KEYS), "
            f"got {len(values)} in values and {len(unset)} in unset",
        )
    sets: dict[str, str] = {}
    size = 0
    for key, value in values.items():
        name = validate_key(key, "values")
        sets[name] = encoded = encode_value(value, f"values[{name!r}]", max_bytes=max_value_bytes)
        size += len(encoded)
        if size > max_write_bytes:
            raise InvalidOption(
                "values",
                f"one write takes at most {max_write_bytes} bytes of encoded values "
                f"(OPTIONS_MAX_WRITE_BYTES), and {name!r} takes it past that",
            )
    unsets: list[str] = []
    for position, key in enumerate(unset):
        name = validate_key(key, f"unset[{position}]")
        if name in sets:
            raise InvalidOption(f"unset[{position}]", f"{name!r} is also in values")
        if name not in unsets:
            unsets.append(name)
    if not sets and not unsets:
        raise InvalidOption("values", "set_many needs at least one key in values or unset")
    return Write(scope, sets, tuple(unsets), keys_field="values")
