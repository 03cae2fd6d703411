"""The migrations as files: found in order from the package, never edited once released, and
applied on a fresh database up to the latest version."""

from __future__ import annotations

import hashlib
import uuid
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import psycopg

from store.postgres.schema import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version
from tests.conftest import Services

# The released migrations: a database that ran one never runs it again, so a change to its
# file would reach fresh databases only. A new migration is a new file, added here.
RELEASED = {
    "0001_initial.sql": "0f0e75184db4d81182c2290a59d615d33f8a47bca5324bb921288fd81114ad2a",
    "0002_options_apply.sql": "baff5c2de30dfe530f31fc3563d29ea339acb23addcb88168adaf2208c59afe6",
    "0003_recent_writes_index.sql": (
        "7f3875944d2f5b2cc91eb69037c327578a72e684edef901a682c5335faec77a7"
    ),
    "0004_outbox_claims.sql": "26d58940af8a915dcfa439bec48968262cc80cd32aa1952cda92fce1355a527d",
    "0005_audit.sql": "a528d4e7b325379750ce3f58229912d8d1d294f3d06ddd45a6c282581b66d84d",
    "0006_write_path.sql": "a6626861fa9e0a2d90dba4d24b563d394dd6f3ce556b0818a1ced1bcd2916052",
    "0007_mark_by_primary_key.sql": (
        "64d31ddeaf288e40ac1dbf325d555db6e0da1879e000400c883cfbb8d25386b4"
    ),
    "0008_compare_and_set.sql": "3b1c29d7600fe5abadb86b22d884ceab9d167d291a5b921e6f3555ddc8308b32",
    "0009_rollback_repair.sql": "e4fb87be9ea85ad90c00d276d8e6ee86210f054066849d9345a94969cc74e501",
    "0010_scope_limits.sql": "771443a1ffa4020ced6a6fc9ff3493b962600a653682150b012a354ac6e57b66",
}


def test_migration_files_are_numbered_in_order_without_a_gap() -> None:
    """The migrations are the package's .sql files, numbered 0001 up with no gap, in order."""
    folder = resources.files("store.postgres").joinpath("migrations")
    on_disk = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".sql"))
    assert list(MIGRATIONS) == on_disk
    assert [int(name[:4]) for name in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert len(MIGRATIONS) == SCHEMA_VERSION


def test_released_migrations_are_unchanged() -> None:
    """Every released migration file still holds the exact bytes it was released with."""
    folder = resources.files("store.postgres").joinpath("migrations")
    found = {
        name: hashlib.sha256(folder.joinpath(name).read_bytes()).hexdigest()
        for name in MIGRATIONS
        if name in RELEASED
    }
    assert found == RELEASED


def test_migrate_brings_a_fresh_database_to_the_latest_version(services: Services) -> None:
    """On an empty database, migrate runs every file and records the latest version; a second
    run finds nothing to do."""
    name = f"optionstore_m_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = urlunsplit(urlsplit(services.database_url)._replace(path=f"/{name}"))
        assert migrate(url) == (0, SCHEMA_VERSION)
        assert migrate(url) == (SCHEMA_VERSION, SCHEMA_VERSION)
        with psycopg.connect(url) as conn:
            assert schema_version(conn) == SCHEMA_VERSION
            # The last migration's function is the one in place.
            found = conn.execute("SELECT pronargs FROM pg_proc WHERE proname = 'options_apply'")
            assert found.fetchall() == [(12,)]
    finally:
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
