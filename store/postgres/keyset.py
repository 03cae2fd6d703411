"""The rows of the store's keyset pages (scopes, a scope's keys, keys across scopes, history):
each page is ordered on an index and continued after its last row, never at an offset."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")

PAGE_SIZE = 50


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
