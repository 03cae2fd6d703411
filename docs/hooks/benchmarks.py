"""MkDocs hook: the benchmark page's table, generated from bench/RESULTS.json at every build."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# MkDocs loads this file by path: the repository root goes on the path for bench's formatting.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.figures import fmt

MARKER = "<!-- benchmarks -->"
RESULTS = Path("bench/RESULTS.json")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    # The file is named relative to mkdocs.yml, so the build works from any directory.
    results = Path(config["config_file_path"]).parent / RESULTS
    report = json.loads(results.read_text())
    return markdown.replace(MARKER, render(report))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(report: dict[str, Any]) -> str:
    """The run's provenance, its table (the ratio first, the measured values beside it), and
    how each figure was measured."""
    machine = report["machine"]
    run = (
        f"From `{report['command']}` ({report['duration_s']:.0f} s"
        + (", quick" if report.get("quick") else "")
        + f"), run {machine['date']} on {machine['nproc']} cores ({machine['cpu']}), "
        f"Python {machine['python']}, code revision `{machine['code']}`; broker: "
        f"{report['broker']}, services: {report['services']}."
    )
    header = ["figure", "baseline", "ratio median (tail)", "goal", "met?", "measured: median"]
    lines = [run, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for figure in report["figures"]:
        value, baseline = figure["value"], figure.get("baseline_value") or {}
        n = value.get("n", 1)
        ratio = f"{fmt(figure['ratio_median'])}x"
        if n > 1:
            ratio += f" ({figure['tail']} {fmt(figure['ratio_tail'])}x)"
        measured = f"{fmt(value['median'])}"
        if "median" in baseline:
            measured += f" vs {fmt(baseline['median'])}"
        measured += f" {value['unit']}" + (f", n={n}" if n > 1 else "")
        row = [
            figure["figure"],
            figure["baseline"],
            ratio,
            figure["goal"],
            "yes" if figure["met"] else "**no**",
            measured,
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    failures = report.get("failures") or {}
    if failures:
        lines += ["", "Figures that failed to run:", ""]
        lines += [f"- `{name}`: {_cell(str(error))}" for name, error in sorted(failures.items())]
    lines += _cpu_per_task(report["figures"])
    lines += ["", "### How each figure is measured", ""]
    seen: set[str] = set()
    for figure in report["figures"]:
        method = figure.get("method")
        if method and method not in seen:
            seen.add(method)
            lines.append(f"- **{_cell(figure['figure'])}**: {_cell(method)}")
    return "\n".join(lines) + "\n"


def _cpu_per_task(figures: list[dict[str, Any]]) -> list[str]:
    """The write throughput's CPU per task by process group, when the run recorded it."""
    per_task: dict[str, dict[str, float]] = {}
    for figure in figures:
        per_task = (figure.get("extra") or {}).get("cpu_us_per_task") or per_task
    if not per_task:
        return []
    groups = list(next(iter(per_task.values())))
    lines = [
        "",
        "### CPU per task in the write throughput batches",
        "",
        "Microseconds of CPU per task, by process group, over the timed batches:",
        "",
        "| task | " + " | ".join(groups) + " | all |",
        "|" + "---|" * (len(groups) + 2),
    ]
    for task, cpu in per_task.items():
        cells = [f"{cpu.get(group, 0.0):,.0f}" for group in groups]
        lines.append(f"| `{task}` | " + " | ".join(cells) + f" | {sum(cpu.values()):,.0f} |")
    return lines
