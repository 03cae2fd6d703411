"""PostgreSQL schema: the numbered migrations in ``migrations/``, applied once each, in order,
under an advisory lock."""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

import psycopg
from psycopg.rows import TupleRow

from store.errors import MigrationError

# A migration is a file, NNNN_name.sql, added and never edited: a deployed database records
# only the number of the last one it ran. Each file keeps its SQL as released, indentation
# included, because PostgreSQL stores a function's body as written: a fresh database then
# holds the same text as one migrated step by step.
_FILE_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
_LOCK_ID = 0x6F7074_7374  # "optst": one lock for every migrating process


def _folder() -> Traversable:
    # Through importlib.resources, so the files are found in an installed wheel too.
    return resources.files("store.postgres").joinpath("migrations")


def _names() -> tuple[str, ...]:
    names = sorted(entry.name for entry in _folder().iterdir() if entry.name.endswith(".sql"))
    numbers = [int(m.group(1)) if (m := _FILE_NAME.fullmatch(name)) else 0 for name in names]
    if numbers != list(range(1, len(names) + 1)):
        raise MigrationError(f"migrations must be 0001_name.sql, 0002_... with no gap: {names}")
    return tuple(names)


# The file names in order (listed once, read when migrating): version N has run the first N.
MIGRATIONS: tuple[str, ...] = _names()
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conninfo: str, *, version: int = SCHEMA_VERSION) -> tuple[int, int]:
    """Bring the schema up to date (or up to ``version``: a test of a migration starts from
    the one before); returns (version before, version after)."""
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
        after = min(max(before, version), SCHEMA_VERSION)
        for name in MIGRATIONS[before:after]:
            conn.execute(_folder().joinpath(name).read_bytes())
        conn.execute("UPDATE options_schema SET version = %s", (after,))
    return before, after


def schema_version(conn: psycopg.Connection[TupleRow]) -> int:
    try:
        with conn.transaction():
            row = conn.execute("SELECT version FROM options_schema").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0
