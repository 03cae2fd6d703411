"""What a rollout is: its selector, its thresholds, and the judgement of its health figures."""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from store.errors import InvalidOption

WATCHING = "watching"
PROMOTED = "promoted"
REVERTED = "reverted"
ABORTED = "aborted"
SUPERSEDED = "superseded"
STATES = (WATCHING, PROMOTED, REVERTED, ABORTED, SUPERSEDED)

PROMOTE = "promote"
REVERT = "revert"

QUEUE = "queue"
HOST = "host"
PERCENT = "percent"
SELECTOR_KINDS = (QUEUE, HOST, PERCENT)

MAX_SELECTOR_LENGTH = 200
MAX_WATCH_SECONDS = 7 * 24 * 3600.0
# Run-time samples a process keeps per rollout (its latest ones) for the p95.
MAX_SAMPLES = 200


@dataclass(frozen=True, slots=True)
class Selector:
    """Which processes serve the canary value: those consuming a queue, those on a host whose
    name matches a glob, or a percentage of the live processes (``members``, chosen when the
    rollout starts)."""

    kind: str
    argument: str

    @classmethod
    def parse(cls, text: object) -> Selector:
        if not isinstance(text, str) or not text or len(text) > MAX_SELECTOR_LENGTH:
            raise InvalidOption(
                "canary",
                f"must be queue:NAME, host:GLOB or percent:N (at most "
                f"{MAX_SELECTOR_LENGTH} characters), got {text!r}",
            )
        if text.endswith("%"):
            text = f"{PERCENT}:{text[:-1]}"
        kind, _, argument = text.partition(":")
        if kind not in SELECTOR_KINDS or not argument or not argument.isprintable():
            raise InvalidOption(
                "canary", f"must be queue:NAME, host:GLOB or percent:N, got {text!r}"
            )
        if kind == PERCENT:
            try:
                share = float(argument)
            except ValueError:
                share = math.nan
            if not 0 < share <= 100:  # a percentage
                raise InvalidOption("canary", f"percent must be in (0, 100], got {argument!r}")
            argument = f"{share:g}"
        return cls(kind, argument)

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.argument}"

    def matches(
        self, *, host: str, identity: str, queues: Iterable[str], members: Sequence[str]
    ) -> bool:
        """Whether the process ``identity`` (``host:pid``), consuming ``queues``, is a canary."""
        if self.kind == QUEUE:
            return self.argument in set(queues)
        if self.kind == HOST:
            return fnmatch.fnmatchcase(host, self.argument)
        return identity in members

    def choose(self, rollout_salt: str, live: Iterable[str]) -> list[str]:
        """The processes a percentage picks among ``live`` ones: ranked by a hash of their
        identity, so the same processes are picked for the same rollout, whatever order they
        are listed in; at least one when any is live."""
        if self.kind != PERCENT:
            return []
        ranked = sorted(
            set(live),
            key=lambda name: hashlib.sha256(f"{rollout_salt}:{name}".encode()).hexdigest(),
        )
        if not ranked:
            return []
        count = max(1, math.floor(len(ranked) * float(self.argument) / 100 + 1e-9))
        return ranked[:count]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a canary's health is worse than the baseline's: a ratio of the canary's figure to
    the baseline's at or above its threshold, once the canary has run ``min_tasks`` tasks
    that read the key. Rates below ``min_rate`` count as ``min_rate`` (a baseline without a
    single failure is not a zero to divide by); a p95 counts only when it is also at least
    ``p95_min_ms`` slower (noise in tasks of a few milliseconds is not a regression)."""

    failure_ratio: float = 2.0
    retry_ratio: float = 2.0
    p95_ratio: float = 1.5
    p95_min_ms: float = 50.0
    min_tasks: int = 20
    min_rate: float = 0.01

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Thresholds:
        """Defaults, overridden by the given ones (None: the default), each checked by name."""
        given = {name: value for name, value in options.items() if value is not None}
        unknown = set(given) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidOption("thresholds", f"unknown: {', '.join(sorted(unknown))}")
        checked: dict[str, Any] = {}
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidOption(name, f"must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0 or value > 1e9:
                raise InvalidOption(name, f"must be a finite number from 0 to 1e9, got {value!r}")
            if name == "min_tasks":
                if value != int(value) or value < 1:
                    raise InvalidOption(name, f"must be a whole number of at least 1, got {value}")
                checked[name] = int(value)
                continue
            if (name.endswith("_ratio") or name == "min_rate") and value <= 0:
                # min_rate is the floor a ratio divides by: zero would divide by zero.
                raise InvalidOption(name, f"must be above 0, got {value}")
            checked[name] = value
        return cls(**checked)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Health:
    """Tasks that read a key under rollout, in one process or summed over a group."""

    tasks: int = 0
    failures: int = 0
    retries: int = 0
    runtimes: list[float] = field(default_factory=list)  # seconds
    processes: int = 0

    def add(self, other: Health) -> None:
        self.tasks += other.tasks
        self.failures += other.failures
        self.retries += other.retries
        self.runtimes.extend(other.runtimes)
        self.processes += other.processes

    def p95_ms(self) -> float | None:
        if not self.runtimes:
            return None
        ordered = sorted(self.runtimes)
        return round(ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)] * 1000, 3)

    def summary(self) -> dict[str, Any]:
        return {
            "processes": self.processes,
            "tasks": self.tasks,
            "failures": self.failures,
            "retries": self.retries,
            "p95_ms": self.p95_ms(),
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the figures say now: a decision (``promote``/``revert``) or None (keep watching),
    the reason as history records it, and the figures."""

    decision: str | None
    reason: str
    figures: dict[str, Any]


def _ratio(canary: float, baseline: float, floor: float) -> float:
    # The floor is above 0 when checked (Thresholds.from_options); never divide by zero.
    return canary / max(baseline, floor, 1e-9) if canary > 0 else 0.0


def judge(
    thresholds: Thresholds,
    canary: Health,
    baseline: Health,
    *,
    elapsed: float,
    window: float,
) -> Verdict:
    """Compare the canary's health with the baseline's. A breach ends the rollout at once
    (revert) as soon as the canary has ``min_tasks`` tasks; at the end of the window the
    rollout is promoted if nothing breached, and reverted if the canary had too few tasks to
    judge (an empty or idle canary set proves nothing)."""
    t = thresholds
    c_rate = canary.failures / canary.tasks if canary.tasks else 0.0
    b_rate = baseline.failures / baseline.tasks if baseline.tasks else 0.0
    c_retry = canary.retries / canary.tasks if canary.tasks else 0.0
    b_retry = baseline.retries / baseline.tasks if baseline.tasks else 0.0
    failure_ratio = _ratio(c_rate, b_rate, t.min_rate)
    retry_ratio = _ratio(c_retry, b_retry, t.min_rate)
    c_p95, b_p95 = canary.p95_ms(), baseline.p95_ms()
    p95_ratio = None
    if c_p95 is not None and b_p95 is not None and baseline.tasks >= t.min_tasks:
        p95_ratio = c_p95 / max(b_p95, 0.001)
    over = round(min(elapsed, window))
    figures: dict[str, Any] = {
        "canary": canary.summary(),
        "baseline": baseline.summary(),
        "failure_ratio": round(failure_ratio, 3),
        "retry_ratio": round(retry_ratio, 3),
        "p95_ratio": None if p95_ratio is None else round(p95_ratio, 3),
        "elapsed_s": round(elapsed, 3),
    }
    if canary.tasks >= t.min_tasks:
        if failure_ratio >= t.failure_ratio:
            why = f"failure ratio {failure_ratio:.1f}x the baseline over {over} s"
            return Verdict(REVERT, f"auto-revert: {why}", figures)
        if retry_ratio >= t.retry_ratio:
            why = f"retry ratio {retry_ratio:.1f}x the baseline over {over} s"
            return Verdict(REVERT, f"auto-revert: {why}", figures)
        if (
            p95_ratio is not None
            and c_p95 is not None
            and b_p95 is not None
            and p95_ratio >= t.p95_ratio
            and c_p95 - b_p95 >= t.p95_min_ms
        ):
            why = f"run time p95 {p95_ratio:.1f}x the baseline over {over} s"
            return Verdict(REVERT, f"auto-revert: {why}", figures)
    if elapsed < window:
        return Verdict(None, "watching", figures)
    if canary.tasks < t.min_tasks:
        why = f"{canary.tasks} canary tasks over {over} s, {t.min_tasks} needed to judge"
        return Verdict(REVERT, f"auto-revert: {why}", figures)
    p95_text = "-" if p95_ratio is None else f"{p95_ratio:.1f}x"
    why = (
        f"failure ratio {failure_ratio:.1f}x, retry ratio {retry_ratio:.1f}x, "
        f"p95 {p95_text} the baseline over {over} s"
    )
    return Verdict(PROMOTE, f"auto-promote: {why}", figures)
