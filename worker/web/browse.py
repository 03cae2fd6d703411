"""What the console reads from PostgreSQL, a page at a time: scopes, a scope's keys, and keys
across scopes, each ordered on an index and continued after the last row shown (keyset), so a
page costs the same on 100,000 options as on ten."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from store.postgres.store import PostgresStore

T = TypeVar("T")

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_QUERY_CHARS = 200


def like_prefix(text: str) -> str:
    """A LIKE pattern matching what starts with ``text`` (its own ``%``, ``_``, ``\\`` literal)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


@dataclass(frozen=True, slots=True)
class ScopeRow:
    scope: str
    revision: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ValueRow:
    scope: str
    key: str
    value: str  # canonical JSON text
    revision: int  # the scope revision that last set this key


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    rows: list[T]
    after: str | None  # what the next page continues after; None: this is the last page


def scopes(
    db: PostgresStore, *, prefix: str = "", after: str = "", limit: int = PAGE_SIZE
) -> Page[ScopeRow]:
    """Scopes whose name starts with ``prefix``, in name order ("C"), after ``after``."""
    with db.connection() as conn:
        rows = conn.execute(
            'SELECT scope, revision, updated_at FROM options_scope WHERE scope COLLATE "C" LIKE %s'
            ' AND scope COLLATE "C" > %s ORDER BY scope COLLATE "C" LIMIT %s',
            (like_prefix(prefix), after, limit + 1),
        ).fetchall()
    found = [ScopeRow(r[0], int(r[1]), r[2]) for r in rows[:limit]]
    return Page(found, found[-1].scope if len(rows) > limit else None)


def scope_values(
    db: PostgresStore, scope: str, *, prefix: str = "", after: str = "", limit: int = PAGE_SIZE
) -> Page[ValueRow]:
    """One scope's keys starting with ``prefix``, in key order, after ``after`` (on the primary
    key, ``(scope, key)``)."""
    with db.connection() as conn:
        rows = conn.execute(
            "SELECT scope, key, value::text, revision FROM options_value"
            " WHERE scope = %s AND key > %s AND key LIKE %s ORDER BY key LIMIT %s",
            (scope, after, like_prefix(prefix), limit + 1),
        ).fetchall()
    found = [ValueRow(r[0], r[1], r[2], int(r[3])) for r in rows[:limit]]
    return Page(found, found[-1].key if len(rows) > limit else None)


def keys_across_scopes(
    db: PostgresStore, *, prefix: str, after: tuple[str, str] = ("", ""), limit: int = PAGE_SIZE
) -> Page[ValueRow]:
    """Every (scope, key) whose key starts with ``prefix``, in (key, scope) order ("C"), after
    ``after``; the next page's ``after`` is ``key + "\\n" + scope`` (a key has no newline)."""
    with db.connection() as conn:
        rows = conn.execute(
            'SELECT scope, key, value::text, revision FROM options_value WHERE key COLLATE "C"'
            ' LIKE %s AND (key COLLATE "C", scope COLLATE "C") > (%s, %s)'
            ' ORDER BY key COLLATE "C", scope COLLATE "C" LIMIT %s',
            (like_prefix(prefix), after[0], after[1], limit + 1),
        ).fetchall()
    found = [ValueRow(r[0], r[1], r[2], int(r[3])) for r in rows[:limit]]
    last = f"{found[-1].key}\n{found[-1].scope}" if len(rows) > limit else None
    return Page(found, last)


def scope_revision(db: PostgresStore, scope: str) -> tuple[int, int]:
    """A scope's revision and how many keys it holds (the count kept by migration 10)."""
    with db.connection() as conn:
        row = conn.execute(
            "SELECT revision, key_count FROM options_scope WHERE scope = %s", (scope,)
        ).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def value_of(db: PostgresStore, scope: str, key: str) -> str | None:
    """One key's canonical JSON text, or None when it is not set."""
    with db.connection() as conn:
        row = conn.execute(
            "SELECT value::text FROM options_value WHERE scope = %s AND key = %s", (scope, key)
        ).fetchone()
    return None if row is None else str(row[0])


def history_page(
    db: PostgresStore,
    scope: str,
    key: str | None,
    *,
    before: int | None = None,
    limit: int = PAGE_SIZE,
) -> Page[Any]:
    """History entries of a scope (or a key), newest first, with ids below ``before``."""
    from store.postgres.store import HistoryEntry

    query = (
        "SELECT id, scope, key, old_value, new_value, revision, changed_at, task_id,"
        " actor, reason, origin, old_value IS NOT NULL, new_value IS NOT NULL"
        " FROM options_history WHERE scope = %s"
    )
    params: list[Any] = [scope]
    if key is not None:
        query += " AND key = %s"
        params.append(key)
    if before is not None:
        query += " AND id < %s"
        params.append(before)
    query += " ORDER BY id DESC LIMIT %s"
    params.append(limit + 1)
    with db.connection() as conn:
        rows = conn.execute(query, params).fetchall()
    entries = [(int(r[0]), HistoryEntry(*r[1:])) for r in rows[:limit]]
    return Page(entries, str(entries[-1][0]) if len(rows) > limit else None)
