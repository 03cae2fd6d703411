"""Reading the audit trail: a scope as of a past revision, a key's last change, the last apply,
and the difference between two states of a scope (what a revert or an apply would write)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from store.errors import InvalidOption
from store.postgres.store import HistoryEntry, PostgresStore

# Values here are canonical JSON text (what PostgreSQL, Redis and Snapshot hold); None = unset.
State = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Change:
    """One key that differs: its current text and the text it would get (None: unset)."""

    key: str
    old: str | None
    new: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "old": None if self.old is None else json.loads(self.old),
            "old_set": self.old is not None,
            "new": None if self.new is None else json.loads(self.new),
            "new_set": self.new is not None,
        }


def diff(current: State, target: State, keys: Iterable[str] | None = None) -> list[Change]:
    """The changes that turn ``current`` into ``target`` (over ``keys``, or every key of both)."""
    names = set(current) | set(target) if keys is None else set(keys)
    return [
        Change(key, current.get(key), target.get(key))
        for key in sorted(names)
        if current.get(key) != target.get(key)
    ]


def revision_of(db: PostgresStore, scope: str) -> int:
    with db.connection() as conn:
        row = conn.execute(
            "SELECT revision FROM options_scope WHERE scope = %s", (scope,)
        ).fetchone()
    return 0 if row is None else int(row[0])


def state_at(
    db: PostgresStore, scope: str, revision: int, key: str | None = None
) -> dict[str, str]:
    """The scope's values (or one key's) as of ``revision``, rebuilt from history (a canary
    rollout's own entries, origins ``canary`` and ``canary-end``, are not revisions)."""
    current = revision_of(db, scope)
    if not 0 <= revision <= current:
        raise InvalidOption("revision", f"{scope} has revisions 0 to {current}, not {revision}")
    query = (
        "SELECT DISTINCT ON (key) key, new_value::text FROM options_history"
        " WHERE scope = %s AND revision <= %s"
        " AND coalesce(origin, '') NOT IN ('canary', 'canary-end')"
    )
    params: list[Any] = [scope, revision]
    if key is not None:
        query += " AND key = %s"
        params.append(key)
    query += " ORDER BY key, revision DESC, id DESC"
    with db.connection() as conn:
        rows = conn.execute(query, params).fetchall()
    return {name: text for name, text in rows if text is not None}


def last_changes(db: PostgresStore, scope: str, keys: list[str]) -> dict[str, HistoryEntry]:
    """The latest history row of each of ``keys`` in ``scope`` that has one (the change that
    made the stored value: a canary rollout's own entries are not)."""
    with db.connection() as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (key) scope, key, old_value, new_value, revision, changed_at,"
            " task_id, actor, reason, origin, old_value IS NOT NULL, new_value IS NOT NULL"
            " FROM options_history WHERE scope = %s AND key = ANY(%s)"
            " AND coalesce(origin, '') NOT IN ('canary', 'canary-end')"
            " ORDER BY key, revision DESC, id DESC",
            (scope, keys),
        ).fetchall()
    return {row[1]: HistoryEntry(*row) for row in rows}


@dataclass(frozen=True, slots=True)
class LastApply:
    """The latest write of a scope made by ``optionstore apply`` (it may have changed nothing)."""

    revision: int
    committed_at: datetime
    actor: str | None
    task_id: str


def last_applies(db: PostgresStore, scopes: list[str]) -> dict[str, LastApply]:
    """The last apply of each of ``scopes`` that had one."""
    with db.connection() as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (scope) scope, revision, committed_at, actor, task_id"
            " FROM options_write WHERE scope = ANY(%s) AND origin = 'apply'"
            " ORDER BY scope, revision DESC, committed_at DESC",
            (scopes,),
        ).fetchall()
    return {row[0]: LastApply(int(row[1]), row[2], row[3], row[4]) for row in rows}
