"""What every ``optionstore`` command shares: its settings and store, and output for a person
(colour only on a terminal without ``NO_COLOR``, tables, diffs, a progress bar) or for a
program (``--json``)."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from store.settings import Settings

_CODES = {"red": "31", "green": "32", "yellow": "33", "cyan": "36", "dim": "2", "bold": "1"}


@functools.cache
def settings() -> Settings:
    return Settings.from_environ()


@functools.cache
def configured() -> Any:
    """The store, configured from the environment (once per command)."""
    import store

    found = settings()
    # The runtime's own configure: it takes the keys of the settings, the embedded default's
    # too, which sign the write tasks a command sends.
    return store.runtime.configure(
        database_url=found.database_url,
        redis_url=found.redis_url,
        namespace=found.namespace,
        max_value_bytes=found.max_value_bytes,
        keyring=found.keyring,
    )


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def colour_on(stream: TextIO) -> bool:
    """Colour only for a person: a terminal, and no ``NO_COLOR`` (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, colour: str, *, stream: TextIO | None = None) -> str:
    if not colour_on(stream or sys.stdout):
        return text
    return f"\033[{_CODES[colour]}m{text}\033[0m"


def show(text: str | None) -> str:
    """A stored JSON text for a person; ``(unset)`` when there is none."""
    return "(unset)" if text is None else text


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, width: int = 60) -> None:
    """Rows under a header, columns padded to their widest cell (cut at ``width``)."""
    cells = [[_cut(cell, width) for cell in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    print(paint("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), "bold"))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def diff_lines(scope: str, changes: Sequence[Any]) -> None:
    """A scope's changes as a diff: ``-`` the value now, ``+`` the value it would get."""
    print(paint(f"@@ {scope}", "cyan"))
    for change in changes:
        if change.old is not None:
            print(paint(f"- {change.key} = {change.old}", "red"))
        if change.new is not None:
            print(paint(f"+ {change.key} = {change.new}", "green"))
        else:
            print(paint(f"+ {change.key} (unset)", "green"))


class Progress:
    """A bar on stderr when it is a terminal; otherwise one plain count line when done."""

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.bar:
            filled = int(30 * self.done / max(self.total, 1))
            line = f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
            self.stream.write(line)
            self.stream.flush()

    def close(self) -> None:
        if self.bar:
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: {self.done}/{self.total}\n")
        self.stream.flush()
