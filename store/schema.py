"""PostgreSQL schema: numbered migrations applied once, under an advisory lock."""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

from store.errors import MigrationError

# Appended to, never edited: a deployed database records how many of these it has run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE options_scope (
        scope      text PRIMARY KEY,
        revision   bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE options_value (
        scope    text NOT NULL REFERENCES options_scope (scope),
        key      text NOT NULL,
        value    json NOT NULL,
        revision bigint NOT NULL,
        PRIMARY KEY (scope, key)
    );
    CREATE TABLE options_history (
        id         bigserial PRIMARY KEY,
        scope      text NOT NULL,
        key        text NOT NULL,
        old_value  json,
        new_value  json,
        revision   bigint NOT NULL,
        changed_at timestamptz NOT NULL DEFAULT now(),
        task_id    text
    );
    CREATE INDEX options_history_scope_key ON options_history (scope, key, revision);
    -- One row per write task: makes a re-run return the first run's result, and
    -- doubles as the outbox of announcements (announced_at NULL = not yet announced).
    CREATE TABLE options_write (
        task_id      text PRIMARY KEY,
        scope        text NOT NULL,
        revision     bigint NOT NULL,
        changed      boolean NOT NULL,
        changes      jsonb NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        announced_at timestamptz
    );
    CREATE INDEX options_write_unannounced ON options_write (committed_at)
        WHERE announced_at IS NULL;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
_LOCK_ID = 0x6F7074_7374  # "optst": one lock for every migrating process


def migrate(conninfo: str) -> tuple[int, int]:
    """Bring the schema up to date; returns (version before, version after)."""
    with psycopg.connect(conninfo) as conn, conn.transaction():
        # Concurrent migrators queue here; the second one finds the work done.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute("CREATE TABLE IF NOT EXISTS options_schema (version integer NOT NULL)")
        row = conn.execute("SELECT version FROM options_schema").fetchone()
        before = row[0] if row else 0
        if row is None:
            conn.execute("INSERT INTO options_schema (version) VALUES (0)")
        if before > SCHEMA_VERSION:
            raise MigrationError(
                f"database schema is version {before}, newer than this code's {SCHEMA_VERSION}"
            )
        for number in range(before, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[number].encode())
        conn.execute("UPDATE options_schema SET version = %s", (SCHEMA_VERSION,))
    return before, SCHEMA_VERSION


def schema_version(conn: psycopg.Connection[TupleRow]) -> int:
    try:
        with conn.transaction():
            row = conn.execute("SELECT version FROM options_schema").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0
