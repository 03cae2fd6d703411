"""How a figure is summarised: samples, median and tail, the ratio to its baseline, the goal."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


def fmt(value: float) -> str:
    """A figure as the table prints it (the benchmark output and the docs' page alike)."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile: with 100 samples, p99 is the second largest."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Series:
    """Samples of one quantity; ``higher_is_better`` flips which tail is the bad one."""

    unit: str
    samples: list[float]
    higher_is_better: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def tail(self) -> float:
        # The bad tail: p99 of a latency, the 1st percentile of a rate.
        return percentile(self.samples, 1 if self.higher_is_better else 99)

    def summary(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "n": len(self.samples),
            "median": self.median,
            "p99" if not self.higher_is_better else "p1": self.tail,
            "min": min(self.samples),
            "max": max(self.samples),
        }


@dataclass
class Figure:
    """One row of the table: a measurement, its same-run baseline and the goal for their ratio."""

    name: str
    title: str
    baseline_title: str
    value: Series
    baseline: Series
    goal: str  # e.g. "<= 10x", ">= 0.8x", "O(1)"
    method: str
    # Goals naming p50 and p99 are met only if both ratios are.
    tail_in_goal: bool = False
    ratio_override: tuple[float, float] | None = None
    met_override: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> tuple[float, float]:
        if self.ratio_override is not None:
            return self.ratio_override
        return (
            self.value.median / self.baseline.median,
            self.value.tail / self.baseline.tail,
        )

    @property
    def met(self) -> bool:
        if self.met_override is not None:
            return self.met_override
        op, limit = self.goal.split()
        bound = float(limit.rstrip("x"))
        median, tail = self.ratio
        ok = (lambda r: r <= bound) if op == "<=" else (lambda r: r >= bound)
        return ok(median) and (ok(tail) or not self.tail_in_goal)

    def as_json(self) -> dict[str, Any]:
        median, tail = self.ratio
        return {
            "name": self.name,
            "figure": self.title,
            "baseline": self.baseline_title,
            "ratio_median": median,
            "ratio_tail": tail,
            "tail": "p1" if self.value.higher_is_better else "p99",
            "goal": self.goal,
            "met": self.met,
            "value": self.value.summary(),
            "baseline_value": self.baseline.summary(),
            "method": self.method,
            "extra": self.extra,
        }
