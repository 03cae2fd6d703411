"""PostgresStore's keyset pages (what the console lists, and ``optionstore history`` reads):
every row once, in index order, each page continued after the last row of the one before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from store.model.scopes import project_scope
from store.model.writes import Write, set_write
from store.postgres.keyset import Page
from store.postgres.store import PostgresStore
from tests.conftest import fresh_id

pytestmark = pytest.mark.integration


def walk(read: Callable[[Any], Page[Any]], start: Any) -> list[Any]:
    """Every row of a keyset listing, page after page; fails if a page repeats a row."""
    rows: list[Any] = []
    after = start
    while True:
        page = read(after)
        assert page.rows, "a page before the last one is never empty"
        repeated = [row for row in page.rows if row in rows]
        assert not repeated, f"rows shown on an earlier page again: {repeated}"
        rows += page.rows
        if page.after is None:
            return rows
        after = page.after


def test_scope_and_key_pages_walk_every_row_once_in_c_order(db: PostgresStore) -> None:
    """scopes_page, values_page and keys_page return every matching row once, in "C" order,
    a page at a time; a prefix's ``_`` matches only itself; the scope's size, one value's text
    and which keys are set read the same rows."""
    for number in (11, 12, 13, 111, 2):
        db.apply(Write(project_scope(number), {"a_b": "1", "axb": "2", "c": '"x"'}))

    scopes = walk(lambda after: db.scopes_page(prefix="project:1", after=after, limit=2), "")
    assert [r.scope for r in scopes] == ["project:11", "project:111", "project:12", "project:13"]
    assert {r.revision for r in scopes} == {1}

    values = walk(lambda after: db.values_page("project:11", after=after, limit=2), "")
    assert [(r.key, r.value, r.revision) for r in values] == [
        ("a_b", "1", 1),
        ("axb", "2", 1),
        ("c", '"x"', 1),
    ]
    assert [r.key for r in db.values_page("project:11", prefix="a_").rows] == ["a_b"]

    def keys(after: Any) -> Page[Any]:
        key, _, scope = after.partition("\n")
        return db.keys_page(prefix="a_", after=(key, scope), limit=2)

    across = walk(keys, "")
    assert [(r.key, r.scope) for r in across] == [
        ("a_b", "project:11"),
        ("a_b", "project:111"),
        ("a_b", "project:12"),
        ("a_b", "project:13"),
        ("a_b", "project:2"),
    ]

    assert db.scope_size("project:11") == (1, 3)
    assert db.scope_size("project:999") == (0, 0)
    assert db.value_text("project:11", "c") == '"x"'
    assert db.value_text("project:11", "nothing") is None
    assert db.keys_set("project:11", ["a_b", "nothing"]) == {"a_b"}
    assert db.keys_set("project:11", []) == set()


def test_history_page_walks_newest_first_and_agrees_with_history(db: PostgresStore) -> None:
    """history_page lists a key's changes (or a scope's) newest first by history id, page after
    page below the last id shown, and holds the entries ``history`` returns, in reverse."""
    scope = project_scope(fresh_id())
    for n in range(5):
        db.apply(set_write(scope, "k", n))
    db.apply(set_write(scope, "other", "x"))

    walked = walk(
        lambda before: db.history_page(
            scope.name, "k", before=None if before is None else int(before), limit=2
        ),
        None,
    )
    ids = [entry_id for entry_id, _ in walked]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5
    assert [entry.new_value for _, entry in walked] == [4, 3, 2, 1, 0]
    assert [entry for _, entry in reversed(walked)] == db.history(scope.name, "k")
    whole = db.history_page(scope.name)
    assert whole.after is None and [e.key for _, e in whole.rows] == ["other", *["k"] * 5]
    assert db.history_page(scope.name, before=min(ids)).rows == []
