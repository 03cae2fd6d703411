"""PostgreSQL, the source of truth: atomic versioned writes, scope snapshots and history."""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from store.errors import InvalidOption, NotMigrated, RevisionConflict
from store.fork import after_fork_in_child
from store.model.validation import DEFAULT_MAX_SCOPE_BYTES, DEFAULT_MAX_SCOPE_KEYS
from store.model.writes import Write, WriteResult
from store.postgres.keyset import PAGE_SIZE, Page, ScopeRow, ValueRow, like_prefix
from store.postgres.marks import AnnouncedMarks
from store.postgres.schema import SCHEMA_VERSION, schema_version

Connection = psycopg.Connection[TupleRow]
T = TypeVar("T")

# A pooled connection idle longer than this is checked (one empty query) before it is handed
# out: after a PostgreSQL restart every pooled connection is dead. One used more recently is
# not, and if it is, the calls that cannot wait (a write, a scope load) run again once on a
# fresh connection (``_once_more_if_broken``).
CHECK_AFTER_IDLE = 1.0

# undefined_table, undefined_function, undefined_column: what a query meets on a database that
# was never migrated, or not since this code added what it uses.
SCHEMA_MISSING = frozenset({"42P01", "42883", "42703"})

# Counts a status or a scrape makes stop here: bounded work on a database of any size.
COUNT_CAP = 100_000


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A whole scope as of one revision; values are canonical JSON text."""

    revision: int
    values: dict[str, str]

    def encoded(self) -> EncodedScope:
        return EncodedScope(
            self.revision, list(self.values), ("[" + ",".join(self.values.values()) + "]").encode()
        )


class EncodedScope(NamedTuple):
    """A whole scope as of one revision, as a reader decodes it: its keys, and its values as
    one JSON array (the canonical texts joined), so that one decoder call reads them all."""

    revision: int
    keys: list[str]
    array: bytes


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    scope: str
    key: str
    old_value: Any
    new_value: Any
    revision: int
    changed_at: datetime
    task_id: str | None
    actor: str | None = None
    reason: str | None = None
    origin: str | None = None
    # Whether each side was set: a JSON null and "not set" both decode to None.
    old_set: bool = True
    new_set: bool = True


# SQLSTATEs options_apply raises (store/postgres/migrations/0008_compare_and_set.sql, and
# 0010_scope_limits.sql).
TASK_ID_REUSED = "OS001"
REVISION_CONFLICT = "OS002"
SCOPE_LIMIT = "OS003"


class PostgresStore:
    """Reads and writes options in PostgreSQL through a per-process connection pool."""

    def __init__(
        self,
        *,
        conninfo: str,
        min_size: int = 0,
        max_idle: float = 60.0,
        max_size: int = 8,
        timeout: float = 5.0,
        max_scope_keys: int = DEFAULT_MAX_SCOPE_KEYS,
        max_scope_bytes: int = DEFAULT_MAX_SCOPE_BYTES,
    ) -> None:
        self.conninfo = conninfo
        # What one scope may hold (OPTIONS_MAX_SCOPE_KEYS, OPTIONS_MAX_SCOPE_BYTES): a write
        # that would grow a scope past either is refused by options_apply.
        self.max_scope_keys = max_scope_keys
        self.max_scope_bytes = max_scope_bytes
        self._min_size = min_size
        self._max_idle = max_idle
        self._max_size = max_size
        self._timeout = timeout
        self._pool: ConnectionPool[Connection] | None = None
        self._pool_pid = 0
        # Pools inherited through fork. Kept referenced, never closed: freeing one would make
        # libpq send Terminate over sockets the parent process is still using.
        self._inherited: list[ConnectionPool[Connection]] = []
        self._lock = threading.Lock()
        # When each pooled connection was last given back (see CHECK_AFTER_IDLE).
        self._returned_at: weakref.WeakKeyDictionary[Connection, float] = (
            weakref.WeakKeyDictionary()
        )
        # Commits this process announced, not yet marked in options_write: the next write
        # marks them in its own transaction (or AnnouncedMarks' flush, when none comes).
        self.marks = AnnouncedMarks(self.mark_announced)
        self._database_id: str | None = None
        after_fork_in_child(self._new_lock)

    def _new_lock(self) -> None:
        # The parent may have held it at the fork, opening its pool.
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        with self._get_pool().connection(timeout=self._timeout) as conn:
            try:
                yield conn
                # When it goes back (not in a pool ``reset`` callback: that would hand every
                # return to the pool's worker thread).
                self._returned_at[conn] = time.monotonic()
            except psycopg.errors.ReadOnlySqlTransaction:
                # The session is stuck read-only (opened on a demoted primary, or before a
                # failover finished): closed, the pool replaces it with one opened afresh,
                # which may reach the new primary. Kept, every retry would fail the same way.
                conn.close()
                raise
            except psycopg.Error as exc:
                # Checked only once a query failed: the working path pays nothing for it.
                if exc.sqlstate in SCHEMA_MISSING:
                    _raise_if_not_migrated(conn, exc)
                raise

    def _get_pool(self) -> ConnectionPool[Connection]:
        pool = self._pool
        # A forked child must never talk over its parent's sockets: open its own pool.
        if pool is not None and self._pool_pid == os.getpid():
            return pool
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                if self._pool is not None:
                    self._inherited.append(self._pool)
                self._pool = ConnectionPool(
                    self.conninfo,
                    min_size=self._min_size,
                    # No connection held by a process that stopped using the database: a
                    # prefork child that only reads from Redis opens none, and one that wrote
                    # gives its connections back after a minute idle.
                    max_idle=self._max_idle,
                    max_size=self._max_size,
                    timeout=self._timeout,
                    open=True,
                    name="optionstore",
                    # A pooled connection is dead after a PostgreSQL restart: check the idle
                    # ones on checkout rather than fail the first read or write that gets one.
                    check=self._check_if_idle,
                    # Autocommit: a write is one function call, its own transaction; reads
                    # that need a snapshot open one explicitly. No server-side prepared
                    # statements (psycopg prepares a query after its 5th run by default): behind
                    # PgBouncer in transaction pooling, the next transaction may run on another
                    # server connection, which lacks it or has one of the same name. Nothing
                    # else here outlives a transaction either: no SET outside one, no session
                    # advisory lock, no LISTEN, no temporary table.
                    kwargs={
                        "connect_timeout": max(1, int(self._timeout)),
                        "autocommit": True,
                        "prepare_threshold": None,
                    },
                )
                self._pool_pid = os.getpid()
            return self._pool

    def _check_if_idle(self, conn: Connection) -> None:
        if time.monotonic() - self._returned_at.get(conn, 0.0) >= CHECK_AFTER_IDLE:
            ConnectionPool.check_connection(conn)

    def _once_more_if_broken(self, work: Callable[[Connection], T]) -> T:
        """``work`` on a pooled connection; run again on another if the connection it got
        turned out dead (it was used moments before a restart, so not checked). Only for work
        that may run twice: a read, or a write under its task id."""
        for attempt in range(2):
            conn: Connection | None = None
            try:
                with self.connection() as conn:
                    return work(conn)
            except psycopg.OperationalError:
                if attempt or conn is None or not conn.broken:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.marks.close()
        with self._lock:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.close()
            self._pool = None

    # -- writes ---------------------------------------------------------------

    def apply(self, write: Write, *, task_id: str | None = None) -> tuple[WriteResult, bool]:
        """Commit ``write`` once per ``task_id``; returns (result, first_run).

        A re-run with the same task id (redelivery, retry after the commit) returns the
        recorded result and writes nothing.
        """
        task_id = task_id or f"direct-{uuid.uuid4()}"
        announced = self.marks.take()
        try:
            for _attempt in range(2):
                try:
                    return self._once_more_if_broken(
                        lambda conn: self._apply(conn, write, task_id, announced)
                    )
                except psycopg.errors.UniqueViolation:
                    # The same task committed concurrently (a redelivery racing its original):
                    # the next attempt finds its record.
                    continue
            raise AssertionError("unreachable: a unique violation twice for one task id")
        except BaseException:
            self.marks.put_back(announced)
            raise

    def _apply(
        self, conn: Connection, write: Write, task_id: str, announced: list[str]
    ) -> tuple[WriteResult, bool]:
        keys = [*write.sets, *write.unsets]
        values: list[str | None] = [*write.sets.values(), *([None] * len(write.unsets))]
        audit = write.audit
        # One round trip and one transaction: see options_apply in store/postgres/migrations/.
        try:
            row = conn.execute(
                "SELECT * FROM options_apply(%s, %s, %s::text[], %s::text[], %s, %s, %s,"
                " %s::text[], %s, %s, %s, %s)",
                (
                    write.scope.name,
                    task_id,
                    keys,
                    values,
                    audit.actor,
                    audit.reason,
                    audit.origin,
                    announced or None,
                    write.expected_revision,
                    write.fingerprint,
                    self.max_scope_keys,
                    self.max_scope_bytes,
                ),
            ).fetchone()
        except psycopg.Error as exc:
            if exc.sqlstate == TASK_ID_REUSED:
                raise InvalidOption(
                    "task_id", f"{task_id!r} was already used for another write"
                ) from None
            if exc.sqlstate == REVISION_CONFLICT:
                current = int(exc.diag.message_detail or -1)
                raise RevisionConflict(
                    write.scope.name, write.expected_revision or 0, current
                ) from None
            if exc.sqlstate == SCOPE_LIMIT:
                raise _scope_limit_error(write, exc.diag.message_detail or "") from None
            raise
        assert row is not None
        revision, changed, changes, committed_at, first_run = row
        result = WriteResult(
            write.scope.name,
            int(revision),
            bool(changed),
            dict(changes),
            task_id,
            float(committed_at),
        )
        return result, bool(first_run)

    def mark_announced(self, task_ids: Iterable[str]) -> None:
        """Mark these commits announced now, in a transaction of their own."""
        ids = list(task_ids)
        if not ids:
            return
        self._once_more_if_broken(
            lambda conn: conn.execute("SELECT options_mark_announced(%s::text[])", (ids,))
        )

    def write_records(self, task_ids: list[str]) -> dict[str, tuple[WriteResult, bool]]:
        """The committed result of each write task and whether it was announced; task ids not
        committed are left out."""
        with self.connection() as conn:
            rows = conn.execute(f"{_WRITES} WHERE task_id = ANY(%s)", (task_ids,)).fetchall()
        return {row[0]: _write_from_row(row) for row in rows}

    def recent_writes(self, *, limit: int = 200) -> list[tuple[WriteResult, bool]]:
        """The latest changing writes, newest first, with whether each was announced."""
        with self.connection() as conn:
            rows = conn.execute(
                f"{_WRITES} WHERE changed ORDER BY committed_at DESC LIMIT %s", (limit,)
            ).fetchall()
        return [_write_from_row(row) for row in rows]

    # -- reads ----------------------------------------------------------------

    def load_scope(self, scope: str) -> Snapshot:
        return self.load_scopes([scope])[scope]

    def load_scopes(self, scopes: list[str]) -> dict[str, Snapshot]:
        """Snapshots of several scopes, each consistent with its revision."""
        return self._once_more_if_broken(lambda conn: self._load_scopes(conn, scopes))

    def _load_scopes(self, conn: Connection, scopes: list[str]) -> dict[str, Snapshot]:
        with conn.transaction():
            # REPEATABLE READ: the revision and the values come from one snapshot.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            revisions: dict[str, int] = dict(
                conn.execute(
                    "SELECT scope, revision FROM options_scope WHERE scope = ANY(%s)", (scopes,)
                ).fetchall()
            )
            values: dict[str, dict[str, str]] = {scope: {} for scope in scopes}
            for scope, key, value in conn.execute(
                "SELECT scope, key, value::text FROM options_value WHERE scope = ANY(%s)",
                (scopes,),
            ):
                values[scope][key] = value
        return {scope: Snapshot(int(revisions.get(scope, 0)), values[scope]) for scope in scopes}

    def list_scopes(self) -> list[tuple[str, int]]:
        with self.connection() as conn:
            return [
                (scope, int(revision))
                for scope, revision in conn.execute(
                    "SELECT scope, revision FROM options_scope ORDER BY scope"
                )
            ]

    def history(
        self, scope: str, key: str | None = None, *, limit: int = 100
    ) -> list[HistoryEntry]:
        """The newest ``limit`` changes of ``scope`` (or of one ``key``), oldest first."""
        query, params = _history_query(scope, key, before=None)
        query += " ORDER BY revision DESC, id DESC LIMIT %s"
        with self.connection() as conn:
            rows = conn.execute(query, [*params, limit]).fetchall()
        return [HistoryEntry(*row[1:]) for row in reversed(rows)]

    def history_page(
        self,
        scope: str,
        key: str | None = None,
        *,
        before: int | None = None,
        limit: int = PAGE_SIZE,
    ) -> Page[tuple[int, HistoryEntry]]:
        """Changes of ``scope`` (or of one ``key``), newest first, as (history id, entry), with
        ids below ``before`` (on ``options_history_scope_id``); the next page's ``after`` is
        the last id shown."""
        query, params = _history_query(scope, key, before=before)
        query += " ORDER BY id DESC LIMIT %s"
        with self.connection() as conn:
            rows = conn.execute(query, [*params, limit + 1]).fetchall()
        entries = [(int(r[0]), HistoryEntry(*r[1:])) for r in rows[:limit]]
        return Page(entries, str(entries[-1][0]) if len(rows) > limit else None)

    def scopes_page(
        self, *, prefix: str = "", after: str = "", limit: int = PAGE_SIZE
    ) -> Page[ScopeRow]:
        """Scopes whose name starts with ``prefix``, in name order ("C", on
        ``options_scope_name_c``), after the scope ``after``."""
        with self.connection() as conn:
            rows = conn.execute(
                'SELECT scope, revision, updated_at FROM options_scope WHERE scope COLLATE "C"'
                ' LIKE %s AND scope COLLATE "C" > %s ORDER BY scope COLLATE "C" LIMIT %s',
                (like_prefix(prefix), after, limit + 1),
            ).fetchall()
        found = [ScopeRow(r[0], int(r[1]), r[2]) for r in rows[:limit]]
        return Page(found, found[-1].scope if len(rows) > limit else None)

    def values_page(
        self, scope: str, *, prefix: str = "", after: str = "", limit: int = PAGE_SIZE
    ) -> Page[ValueRow]:
        """One scope's keys starting with ``prefix``, in key order, after the key ``after`` (on
        the primary key, ``(scope, key)``), each with its canonical JSON text."""
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT scope, key, value::text, revision FROM options_value"
                " WHERE scope = %s AND key > %s AND key LIKE %s ORDER BY key LIMIT %s",
                (scope, after, like_prefix(prefix), limit + 1),
            ).fetchall()
        found = [ValueRow(r[0], r[1], r[2], int(r[3])) for r in rows[:limit]]
        return Page(found, found[-1].key if len(rows) > limit else None)

    def keys_page(
        self, *, prefix: str, after: tuple[str, str] = ("", ""), limit: int = PAGE_SIZE
    ) -> Page[ValueRow]:
        """Every (scope, key) whose key starts with ``prefix``, in (key, scope) order ("C", on
        ``options_value_key_c``), after the (key, scope) ``after``; the next page's ``after``
        is ``key + "\\n" + scope`` (a key holds no newline)."""
        with self.connection() as conn:
            rows = conn.execute(
                'SELECT scope, key, value::text, revision FROM options_value WHERE key COLLATE "C"'
                ' LIKE %s AND (key COLLATE "C", scope COLLATE "C") > (%s, %s)'
                ' ORDER BY key COLLATE "C", scope COLLATE "C" LIMIT %s',
                (like_prefix(prefix), after[0], after[1], limit + 1),
            ).fetchall()
        found = [ValueRow(r[0], r[1], r[2], int(r[3])) for r in rows[:limit]]
        last = f"{found[-1].key}\n{found[-1].scope}" if len(rows) > limit else None
        return Page(found, last)

    def scope_size(self, scope: str) -> tuple[int, int]:
        """A scope's revision and how many keys it holds (the count kept by migration 10);
        (0, 0) for a scope never written."""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT revision, key_count FROM options_scope WHERE scope = %s", (scope,)
            ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def value_text(self, scope: str, key: str) -> str | None:
        """One key's canonical JSON text, or None when it is not set."""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT value::text FROM options_value WHERE scope = %s AND key = %s",
                (scope, key),
            ).fetchone()
        return None if row is None else str(row[0])

    def keys_set(self, scope: str, keys: list[str]) -> set[str]:
        """Which of ``keys`` are set in ``scope`` (on the primary key)."""
        if not keys:
            return set()
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT key FROM options_value WHERE scope = %s AND key = ANY(%s)", (scope, keys)
            ).fetchall()
        return {row[0] for row in rows}

    def count_unannounced(self, *, cap: int = COUNT_CAP) -> int:
        """Commits not yet announced, counted up to ``cap`` on the outbox's partial index."""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM options_write"
                " WHERE announced_at IS NULL LIMIT %s) w",
                (cap,),
            ).fetchone()
        return int(row[0]) if row else 0

    def count_scopes(self, *, cap: int = COUNT_CAP) -> int:
        """Scopes, counted up to ``cap`` on the primary key."""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM options_scope LIMIT %s) s", (cap,)
            ).fetchone()
        return int(row[0]) if row else 0

    def claim_unannounced(
        self, *, older_than: float, limit: int, backoff: float, max_backoff: float
    ) -> list[tuple[WriteResult, int]]:
        """Claim up to ``limit`` commits left unannounced ``older_than`` seconds after their
        commit and due for an attempt; returns each with its attempt number, oldest first.

        One statement: the rows are locked (``SKIP LOCKED``: a row another relay is claiming is
        passed over) only while their next attempt is pushed ``backoff * 2**attempts`` seconds
        (at most ``max_backoff``) ahead, so no other relay takes a claimed row before then, and
        a row whose announcement keeps failing is tried less and less often. No lock outlives
        the statement: it works behind PgBouncer in transaction pooling.
        """
        with self.connection() as conn:
            rows = conn.execute(
                "WITH due AS (SELECT task_id FROM options_write"
                " WHERE announced_at IS NULL"
                " AND committed_at < clock_timestamp() - make_interval(secs => %(grace)s)"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= clock_timestamp())"
                " ORDER BY committed_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " UPDATE options_write w SET attempts = w.attempts + 1,"
                " next_attempt_at = clock_timestamp() + make_interval(secs =>"
                "   least(%(cap)s, %(base)s * power(2, least(w.attempts, 30))))"
                " FROM due WHERE w.task_id = due.task_id"
                " RETURNING w.task_id, w.scope, w.revision, w.changed, w.changes,"
                " extract(epoch FROM w.committed_at), w.attempts",
                {
                    "grace": older_than,
                    "limit": limit,
                    "base": float(backoff),
                    "cap": float(max_backoff),
                },
            ).fetchall()
        claimed = [(_result_from_row(row[0], row[1:6]), int(row[6])) for row in rows]
        return sorted(claimed, key=lambda item: item[0].committed_at)

    def prune_writes(self, *, older_than: float, limit: int) -> int:
        """Delete up to ``limit`` announced write records committed more than ``older_than``
        seconds ago, oldest first; returns how many. Unannounced ones are never deleted."""
        with self.connection() as conn:
            cursor = conn.execute(
                # = ANY(ARRAY(...)): the batch is looked up by primary key (an IN (SELECT ...)
                # may be planned as a hash join over the whole table).
                "DELETE FROM options_write WHERE task_id = ANY(ARRAY("
                "SELECT task_id FROM options_write"
                " WHERE committed_at < now() - make_interval(secs => %s)"
                " AND announced_at IS NOT NULL"
                " ORDER BY committed_at LIMIT %s FOR UPDATE SKIP LOCKED))",
                (older_than, limit),
            )
            return cursor.rowcount

    def prune_history(self, *, older_than: float, after: int, scan: int) -> tuple[int, int]:
        """Look at the ``scan`` history entries after id ``after``, and delete those older than
        ``older_than`` seconds that a newer entry of the same key supersedes (the latest
        change of every key is kept). Returns (deleted, where the next page starts: 0 once
        the pages reach entries younger than that, or the end)."""
        with self.connection() as conn:
            row = conn.execute(
                "WITH page AS (SELECT id, scope, key, revision, changed_at FROM options_history"
                "   WHERE id > %(after)s ORDER BY id LIMIT %(scan)s),"
                " cutoff AS (SELECT now() - make_interval(secs => %(age)s) AS at),"
                " gone AS (DELETE FROM options_history h USING page p, cutoff c"
                "   WHERE h.id = p.id AND p.changed_at < c.at"
                "   AND EXISTS (SELECT 1 FROM options_history n"
                "     WHERE n.scope = p.scope AND n.key = p.key AND n.revision > p.revision)"
                "   RETURNING h.id)"
                " SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM page),"
                " (SELECT id FROM page ORDER BY id DESC LIMIT 1),"
                " (SELECT p.changed_at < c.at FROM page p, cutoff c ORDER BY p.id DESC LIMIT 1)",
                {"after": after, "scan": scan, "age": older_than},
            ).fetchone()
        assert row is not None
        deleted, seen, last_id, last_is_old = row
        more = int(seen) == scan and bool(last_is_old)
        return int(deleted), int(last_id) if more else 0

    # -- a database that went back in time ---------------------------------------

    def database_id(self) -> str:
        """This database's identity (options_clock), which a restore or a failover keeps."""
        if self._database_id is None:
            row = self._once_more_if_broken(
                lambda conn: conn.execute(
                    "SELECT database_id FROM options_clock WHERE id = 1"
                ).fetchone()
            )
            assert row is not None
            self._database_id = str(row[0])
        return self._database_id

    def clock(self) -> int:
        """The clock's tick (store/postgres/migrations/0009_rollback_repair.sql)."""
        row = self._once_more_if_broken(
            lambda conn: conn.execute("SELECT tick FROM options_clock WHERE id = 1").fetchone()
        )
        return 0 if row is None else int(row[0])

    def advance_clock(self, known: int) -> int:
        """Move the clock one tick past itself and past ``known``; returns the new tick."""
        row = self._once_more_if_broken(
            lambda conn: conn.execute("SELECT options_advance_clock(%s)", (known,)).fetchone()
        )
        assert row is not None
        return int(row[0])

    def revisions(self, scopes: list[str]) -> dict[str, int]:
        """Each scope's committed revision; a scope this database does not have is left out."""
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT scope, revision FROM options_scope WHERE scope = ANY(%s)", (scopes,)
            ).fetchall()
        return {scope: int(revision) for scope, revision in rows}

    def rebase(self, scope: str, *, above: int) -> WriteResult | None:
        """Move ``scope`` past ``above``, a revision already announced, values unchanged (see
        store/postgres/migrations/0009_rollback_repair.sql); None if it already is past."""
        task_id = f"rebase-{uuid.uuid4()}"
        row = self._once_more_if_broken(
            lambda conn: conn.execute(
                "SELECT revision, committed_at FROM options_rebase(%s, %s, %s)",
                (scope, above, task_id),
            ).fetchone()
        )
        if row is None:
            return None
        return WriteResult(scope, int(row[0]), True, {}, task_id, float(row[1]))

    def recent_revisions(
        self, *, window: float, settle: float, limit: int
    ) -> tuple[dict[str, int], bool]:
        """The newest revision per scope among changes committed in the last ``window``
        seconds and announced at least ``settle`` seconds ago, newest first, at most ``limit``
        scopes; and whether that is all.

        Unannounced commits are left out: the relay announces them, and until then nobody
        can have heard of them.
        """
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT scope, max(revision) FROM options_write WHERE changed"
                " AND committed_at > clock_timestamp() - make_interval(secs => %s)"
                " AND announced_at <= clock_timestamp() - make_interval(secs => %s)"
                " GROUP BY scope ORDER BY max(committed_at) DESC LIMIT %s",
                (window, settle, limit + 1),
            ).fetchall()
        return {scope: int(rev) for scope, rev in rows[:limit]}, len(rows) <= limit

    def scope_revisions(self, *, after: str, limit: int, settle: float) -> list[tuple[str, int]]:
        """One page of every scope's revision, in scope order after ``after``; scopes changed in
        the last ``settle`` seconds, or with a change not yet announced, are left out (their
        announcement, which moves Redis forward, may still be under way)."""
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT scope, revision FROM options_scope s WHERE scope > %s AND revision > 0"
                " AND updated_at <= now() - make_interval(secs => %s)"
                " AND NOT EXISTS (SELECT 1 FROM options_write w"
                "   WHERE w.announced_at IS NULL AND w.scope = s.scope)"
                " ORDER BY scope LIMIT %s",
                (after, settle, limit),
            ).fetchall()
        return [(scope, int(revision)) for scope, revision in rows]


def _history_query(scope: str, key: str | None, *, before: int | None) -> tuple[str, list[Any]]:
    """The history rows of ``scope`` (or one ``key``), with ids below ``before``: id first,
    then HistoryEntry's fields; the caller adds its order and limit."""
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
    return query, params


def _raise_if_not_migrated(conn: Connection, error: psycopg.Error) -> None:
    """Raise NotMigrated if the schema is older than this code (else ``error`` was a bug of
    ours, and the caller raises it)."""
    if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return
    try:
        version = schema_version(conn)
    except psycopg.Error:
        return  # the connection failed too: the first error says more than this one
    if version >= SCHEMA_VERSION:
        return
    where = f"database {conn.info.dbname!r} on {conn.info.host}"
    state = (
        "has no optionstore schema"
        if version == 0
        else f"has optionstore schema version {version}, this code needs {SCHEMA_VERSION}"
    )
    raise NotMigrated(f"{where} {state}: run `optionstore migrate`") from error


def _scope_limit_error(write: Write, detail: str) -> InvalidOption:
    """The refusal of a write that would grow its scope past a limit, from options_apply's
    DETAIL ('keys|bytes <would hold> <limit>'), naming the write's keys argument."""
    what, would, limit = detail.split()
    held = (
        f"{int(would):,} keys, more than {int(limit):,} (OPTIONS_MAX_SCOPE_KEYS)"
        if what == "keys"
        else f"{int(would):,} bytes of encoded values, more than {int(limit):,} "
        "(OPTIONS_MAX_SCOPE_BYTES)"
    )
    return InvalidOption(
        write.keys_field, f"scope {write.scope.name} would hold {held}; nothing was written"
    )


def _result_from_row(task_id: str, row: tuple[Any, ...]) -> WriteResult:
    scope, revision, changed, changes, committed_at = row
    return WriteResult(
        scope, int(revision), bool(changed), dict(changes), task_id, float(committed_at)
    )


# A write record and whether it was announced, as _write_from_row reads it.
_WRITES = (
    "SELECT task_id, scope, revision, changed, changes, extract(epoch FROM committed_at),"
    " announced_at IS NOT NULL FROM options_write"
)


def _write_from_row(row: tuple[Any, ...]) -> tuple[WriteResult, bool]:
    return _result_from_row(row[0], row[1:6]), bool(row[6])
