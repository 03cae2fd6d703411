"""Fail if the virtualenv holds a distribution at a version the lock does not name.

``pip install --constraint`` pins what the lock lists but lets a dependency the lock has never
seen (one added to pyproject.toml since the last ``make lock``) install at whatever version is
newest today: this check turns that into an error that says which command to run.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def canonicalize_name(name: str) -> str:
    """PEP 503's normal form, so ``PyYAML`` in the lock matches ``pyyaml`` installed."""
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock_path: str) -> int:
    locked: dict[str, str] = {}
    for raw in Path(lock_path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            locked[canonicalize_name(name.split("[")[0])] = version.split(";")[0].strip()
    problems = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in {"optionstore", "pip", "setuptools", "wheel"}:
            continue
        if name not in locked:
            problems.append(f"{name} {dist.version} is installed but not in {lock_path}")
        elif locked[name] != dist.version:
            problems.append(f"{name} is {dist.version}, {lock_path} says {locked[name]}")
    for problem in sorted(problems):
        print(f"lock: {problem}", file=sys.stderr)
    if problems:
        print("lock: run `make lock`, then `make lint test`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
