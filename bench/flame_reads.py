"""``python -m bench.flame_reads LABEL``: py-spy flame graphs of a local hit and of a first read.

Runs, under ``py-spy record``, a Python process that reads one 10-key project scope through the
public read API only (``store.configure``, ``store.project_options.get_value``,
``store.clear_local_cache``): first ``--hits`` local hits, then ``--misses`` first reads (the
local cache cleared before each, Redis holding the scope). The same loop runs against any
checkout (``--code DIR`` puts that checkout first on the path), so one command draws the
"before" and the "after". Writes ``bench/flames/read-hit-LABEL.svg`` and
``bench/flames/read-first-LABEL.svg``.

Uses the machine's services as ``python -m bench`` does (OPTIONS_BENCH_DATABASE_URL,
OPTIONS_BENCH_REDIS_URL); py-spy needs ptrace (root, or ``kernel.yama.ptrace_scope`` = 0).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.flame import FLAMES, _py_spy

# The sampled process: seeds the scope, then loops. Public API only, so that it runs on any
# version of the code.
_LOOP = """
import json, sys
import store
from store.model.scopes import project_scope
from store.model.writes import Write
which, count, database_url, redis_url, namespace = sys.argv[1:6]
from store.postgres.schema import migrate
migrate(database_url)
backend = store.configure(database_url=database_url, redis_url=redis_url, namespace=namespace)
values = {f"option.key.{i}": json.dumps({"enabled": True, "rate": 0.5, "owner": f"team-{i}"})
          for i in range(10)}
backend.commit(Write(project_scope(4242), values, ()))
store.clear_local_cache()
read = store.project_options.get_value
read(4242, "option.key.1")
if which == "hit":
    for _ in range(int(count)):
        read(4242, "option.key.1")
else:
    clear = store.clear_local_cache
    for _ in range(int(count)):
        clear()
        read(4242, "option.key.1")
"""


def record(label: str, *, code: Path, hits: int, misses: int) -> list[Path]:
    from bench.env import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL

    admin_url = os.environ.get("OPTIONS_BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("OPTIONS_BENCH_REDIS_URL") or DEFAULT_REDIS_URL
    FLAMES.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    written = []
    for which, count in (("hit", hits), ("first", misses)):
        out = FLAMES / f"read-{which}-{label}.svg"
        namespace = f"flame-{uuid.uuid4().hex[:8]}"
        # A database of its own, migrated by the code under test (an older checkout refuses
        # a schema newer than its own).
        with _database(admin_url, namespace) as database_url:
            _sample(out, code, env, which, count, database_url, redis_url, namespace)
        written.append(out)
    return written


@contextlib.contextmanager
def _database(admin_url: str, name: str) -> Iterator[str]:
    name = name.replace("-", "_")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _sample(  # noqa: PLR0917 (one call site, each argument named there)
    out: Path,
    code: Path,
    env: dict[str, str],
    which: str,
    count: int,
    database_url: str,
    redis_url: str,
    namespace: str,
) -> None:
    subprocess.run(
        [
            _py_spy(),
            "record",
            "--rate",
            "250",
            "--nonblocking",
            # A first read waits on Redis: the wait is part of it.
            *(["--idle"] if which == "first" else []),
            "--output",
            str(out),
            "--",
            sys.executable,
            "-c",
            _LOOP,
            which,
            str(count),
            database_url,
            redis_url,
            namespace,
        ],
        check=True,
        cwd=code,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("label", help="names the files: read-hit-LABEL.svg, read-first-LABEL.svg")
    parser.add_argument("--code", type=Path, default=Path.cwd(), help="the checkout to run")
    parser.add_argument("--hits", type=int, default=50_000_000)
    parser.add_argument("--misses", type=int, default=40_000)
    args = parser.parse_args()
    for path in record(args.label, code=args.code, hits=args.hits, misses=args.misses):
        print(path)


if __name__ == "__main__":
    main()
