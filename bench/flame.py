"""``python -m bench.flame LABEL``: a py-spy flame graph of a worker running write tasks.

Starts one ``celery -A worker worker --concurrency 2`` (prefork) on a fresh database, warms it
up, then samples the main process and both children with ``py-spy record --subprocesses`` while
batches of ``set_option`` tasks run (queued first, released at once, as the throughput figure
does). Writes ``bench/flames/write-task-LABEL.svg`` and prints the rate measured while sampled
(py-spy's sampling slows the worker a little: the rate here is not the benchmark's figure).

py-spy reads the processes' memory with ptrace: run it as root or with
``kernel.yama.ptrace_scope`` = 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.env import Worker, prepare_process, services
from bench.writes import Batches

HERE = Path(__file__).resolve().parent
FLAMES = HERE / "flames"


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def record(
    label: str, *, tasks: int, rate: int, raw: bool = False, gil: bool = False, idle: bool = False
) -> Path:
    mode = "-gil" if gil else "-idle" if idle else ""
    out = FLAMES / f"write-task-{label}{mode}.{'txt' if raw else 'svg'}"
    FLAMES.mkdir(exist_ok=True)
    with services(embedded=False, broker="redis") as run:
        prepare_process(run)
        namespace = run.namespace("flame")
        backend = run.configure_store(namespace)
        worker = Worker(run, namespace, concurrency=2).start()
        batches = None
        try:
            worker.wait_synced(backend)
            batches = Batches(run, worker)
            serial = iter(range(10**9))

            def calls(count: int) -> list[list[Any]]:
                return [[f"bench.throughput.{i % 100}", next(serial)] for i in range(count)]

            batches.rate("options.set_option", calls(200))  # warm-up
            assert worker.process is not None
            spy = subprocess.Popen(
                [
                    _py_spy(),
                    "record",
                    "--subprocesses",
                    "--nonblocking",
                    "--rate",
                    str(rate),
                    "--format",
                    "raw" if raw else "flamegraph",
                    "--output",
                    str(out),
                    "--pid",
                    str(worker.process.pid),
                    *(["--gil"] if gil else []),
                    *(["--idle"] if idle else []),
                ],
                stdout=subprocess.DEVNULL,
            )
            try:
                measured = [batches.rate("options.set_option", calls(tasks)) for _ in range(3)]
            finally:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            print(f"set_option while sampled: {', '.join(f'{r:.0f}' for r in measured)} tasks/s")
        finally:
            worker.stop()
            if batches is not None:
                batches.producer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flame", description=__doc__)
    parser.add_argument("label", help="names the SVG: bench/flames/write-task-LABEL.svg")
    parser.add_argument("--tasks", type=int, default=1500, help="set_option tasks per batch")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--raw", action="store_true", help="write collapsed stacks (.txt) instead of the SVG"
    )
    parser.add_argument(
        "--gil", action="store_true", help="only samples holding the GIL (Python's own CPU)"
    )
    parser.add_argument(
        "--idle", action="store_true", help="also samples waiting threads (where wall time goes)"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0 and Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip() != "0":
        print("warning: py-spy may be refused (ptrace_scope); run as root", file=sys.stderr)
    out = record(
        args.label, tasks=args.tasks, rate=args.rate, raw=args.raw, gil=args.gil, idle=args.idle
    )
    print(f"wrote {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
