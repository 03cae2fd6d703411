"""``python -m bench``: run the figures, print the table, write the JSON (and a Markdown table)."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.env import Services, machine, prepare_process, services
from bench.figures import Figure, fmt

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
COMMITTED = HERE / "RESULTS.json"


# name -> (module, function); a function returns one Figure or a list of them.
_FIGURES: dict[str, tuple[str, str]] = {
    "read_hit": ("reads", "read_hit"),
    "read_hit_declared": ("reads", "read_hit_declared"),
    "read_miss": ("reads", "read_miss"),
    "propagation": ("fleet", "propagation"),
    "installed": ("hosts", "installed"),
    "gunicorn": ("hosts", "gunicorn"),
    "scale": ("scale", "scale"),
    "scale_cluster": ("cluster", "scale_cluster"),
    "visibility": ("fleet", "visibility"),
    "token_round_trip": ("tokens", "token_round_trip"),
    "rollout_promotion": ("rollouts", "promotion"),
    "writes": ("writes", "throughput"),
    "broadcast_size": ("footprint", "broadcast_size"),
    "memory": ("footprint", "memory"),
    "console": ("console", "console"),
}
_NAMES = tuple(_FIGURES)
# Run only when named (`--only scale`): it starts 128 worker processes and takes minutes
# (`scale_cluster`: 64, and a Redis Cluster).
_ON_REQUEST = ("scale", "scale_cluster")


def _run(name: str, run: Services, quick: bool) -> list[Figure]:
    module, function = _FIGURES[name]
    produced = getattr(importlib.import_module(f"bench.{module}"), function)(run, quick=quick)
    return produced if isinstance(produced, list) else [produced]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (development)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only these (repeatable or comma-separated): " + ", ".join(_NAMES),
    )
    parser.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="use the embedded PostgreSQL and Redis (a temporary state folder) instead of the "
        "machine's services",
    )
    return parser


def _rows(figures: list[Figure]) -> list[list[str]]:
    rows = []
    for f in figures:
        median, tail = f.ratio
        label = "p1" if f.value.higher_is_better else "p99"
        rows.append(
            [
                f.title,
                f.baseline_title,
                f"{fmt(f.value.median)} ({fmt(f.value.tail)}) {f.value.unit}",
                f"{fmt(f.baseline.median)} ({fmt(f.baseline.tail)}) {f.baseline.unit}",
                f"{fmt(median)}x ({label} {fmt(tail)}x)",
                f.goal,
                "yes" if f.met else "**no**",
                f"{len(f.value.samples)}/{len(f.baseline.samples)}",
            ]
        )
    return rows


HEADER = ["figure", "baseline", "value median (tail)", "baseline median (tail)", "ratio", "goal"]
HEADER += ["met?", "n"]


def markdown(figures: list[Figure], report: dict[str, Any]) -> str:
    """The table of bench/results/latest.md: the ratio first, the measured values beside it."""
    header = ["figure", "baseline", "ratio median (p99)", "goal", "met?", "measured: median"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for f in figures:
        median, tail = f.ratio
        label = "" if not f.value.higher_is_better else "p1 "
        n = len(f.value.samples)
        lines.append(
            "| "
            + " | ".join(
                [
                    f.title,
                    f.baseline_title,
                    f"{fmt(median)}x ({label}{fmt(tail)}x)" if n > 1 else f"{fmt(median)}x",
                    f.goal,
                    "yes" if f.met else "**no**",
                    f"{fmt(f.value.median)} vs {fmt(f.baseline.median)} {f.value.unit}"
                    + (f", n={n}" if n > 1 else ""),
                ]
            )
            + " |"
        )
    m = report["machine"]
    lines += [
        "",
        f"Measured on {m['nproc']} cores ({m['cpu']}), Python {m['python']}, {m['date']}, "
        f"broker: {report['broker']}, services: {report['services']}, code: {m['code']}. "
        f"Command: `{report['command']}` ({report['duration_s']:.0f} s).",
    ]
    return "\n".join(lines) + "\n"


def _print_table(figures: list[Figure]) -> None:
    rows = [HEADER, *_rows(figures)]
    widths = [min(48, max(len(row[i]) for row in rows)) for i in range(len(HEADER))]
    for row in rows:
        print("  ".join(cell[:48].ljust(width) for cell, width in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A plain kill unwinds like Ctrl-C does: every worker and consumer started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    default = [name for name in _NAMES if name not in _ON_REQUEST]
    selected = [n for item in (args.only or [",".join(default)]) for n in item.split(",") if n]
    unknown = sorted(set(selected) - set(_NAMES))
    if unknown:
        _parser().error(f"unknown figure(s): {', '.join(unknown)}; choose from {', '.join(_NAMES)}")
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    started = time.monotonic()
    info = machine()
    with services(embedded=args.embedded, broker=args.broker) as run:
        prepare_process(run)
        for name in _NAMES:
            if name not in selected:
                continue
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                produced = _run(name, run, args.quick)
            except Exception:
                failures[name] = traceback.format_exc()
                print(failures[name], file=sys.stderr)
                continue
            figures += produced
            for figure in produced:
                print(
                    f"bench:   {figure.name}: {figure.ratio[0]:.2f}x "
                    f"(tail {figure.ratio[1]:.2f}x), goal {figure.goal}, "
                    f"{'met' if figure.met else 'MISSED'} [{time.monotonic() - t0:.0f}s]",
                    file=sys.stderr,
                    flush=True,
                )
        description = run.description
    command = "python -m bench" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    report = {
        "machine": info,
        "broker": args.broker,
        "services": description,
        "command": command,
        "quick": args.quick,
        "duration_s": round(time.monotonic() - started, 1),
        "figures": [f.as_json() for f in figures],
        "failures": failures,
    }
    _print_table(figures)
    RESULTS_DIR.mkdir(exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    (RESULTS_DIR / "latest.json").write_text(text)
    (RESULTS_DIR / "latest.md").write_text(markdown(figures, report))
    written = [RESULTS_DIR / "latest.json", RESULTS_DIR / "latest.md"]
    # The committed copy only ever holds a complete, full-length run.
    if not args.quick and set(selected) == set(default) and not failures:
        COMMITTED.write_text(text)
        written.append(COMMITTED)
    print("wrote " + ", ".join(str(p.relative_to(HERE.parent)) for p in written))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
