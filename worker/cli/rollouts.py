"""Canary rollouts on the command line: ``set … --canary SELECTOR --watch DURATION`` (and on
``apply``), and ``rollouts`` (list, ``promote ID``, ``abort ID``). The rules live in
``store/rollouts``; the leader finishes every rollout (worker/duties/rollouts.py)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from store.errors import InvalidOption
from store.errors import describe as describe_error
from store.model.scopes import Scope
from store.rollouts.model import WATCHING, Thresholds, judge
from store.rollouts.records import Rollout
from store.rollouts.start import records_of, start_rollout, start_rollouts
from worker.cli.actor import actor_of
from worker.cli.console import configured, print_json, settings, table

Command = Callable[..., argparse.ArgumentParser]


def add_canary_arguments(cmd: argparse.ArgumentParser) -> None:
    """The flags that turn a write into a canary rollout, with its thresholds."""
    cmd.add_argument(
        "--canary",
        metavar="SELECTOR",
        help="serve the new value first to queue:NAME, host:GLOB or percent:N of the processes",
    )
    cmd.add_argument(
        "--watch", metavar="DURATION", help="how long the leader compares health (e.g. 120s)"
    )
    defaults = Thresholds()
    for name, kind, text in (
        ("failure-ratio", float, "revert at this canary/baseline failure ratio"),
        ("retry-ratio", float, "revert at this canary/baseline retry ratio"),
        ("p95-ratio", float, "revert at this canary/baseline run-time p95 ratio"),
        ("p95-min-ms", float, "... only if the p95 is also this much slower"),
        ("min-tasks", int, "canary tasks needed to judge (fewer: reverted at the end)"),
    ):
        default = getattr(defaults, name.replace("-", "_"))
        cmd.add_argument(f"--{name}", type=kind, help=f"{text} (default {default})")


def canary_requested(args: argparse.Namespace) -> bool:
    """Whether the command asks for a rollout; --watch and the thresholds need --canary."""
    extras = [name for name in ("watch", *_THRESHOLD_FLAGS) if getattr(args, name) is not None]
    if args.canary is None:
        if extras:
            raise InvalidOption(extras[0], "only goes with --canary")
        return False
    if args.watch is None:
        raise InvalidOption("watch", "--canary needs --watch DURATION")
    return True


_THRESHOLD_FLAGS = ("failure_ratio", "retry_ratio", "p95_ratio", "p95_min_ms", "min_tasks")


def thresholds_of(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _THRESHOLD_FLAGS}


def start(args: argparse.Namespace, scope: Scope, key: str, value: Any) -> Rollout:
    """Check everything, then record the rollout (the leader takes it from there)."""
    return start_rollout(
        configured(),
        settings().namespace,
        scope,
        key,
        value,
        canary=args.canary,
        watch=args.watch,
        thresholds=thresholds_of(args),
        actor=actor_of(args),
        reason=args.reason,
    )


def apply_as_rollouts(
    args: argparse.Namespace, writes: list[tuple[str, list[Any]]], report: dict[str, Any]
) -> int:
    """``apply FILE --canary …``: each value the file changes becomes a rollout of its own, with
    the same selector, window and thresholds. Every request is checked before any is recorded;
    a removal cannot be rolled out (apply it without --canary)."""
    backend, namespace = configured(), settings().namespace
    requests = []
    for scope, changes in writes:
        for change in changes:
            if change.new == change.old:
                continue  # drift accepted: nothing to roll out
            if change.new is None:
                raise InvalidOption(
                    "canary",
                    f"cannot roll out the removal of {change.key!r} in {scope}: "
                    "apply it without --canary",
                )
            requests.append((scope, change.key, json.loads(change.new)))
    reason = f"apply {Path(args.file).name}" + (f": {args.reason}" if args.reason else "")
    # All of the file's rollouts, or (bad input, a key already under a rollout) none.
    rollouts = start_rollouts(
        backend,
        namespace,
        requests,
        canary=args.canary,
        watch=args.watch,
        thresholds=thresholds_of(args),
        actor=actor_of(args),
        reason=reason,
    )
    started = [rollout.id for rollout in rollouts]
    if not args.json:
        for rollout in rollouts:
            print(f"started {describe(rollout)}")
    report.update(applied=True, rollouts=started)
    if args.json:
        print_json(report)
    return 0


def describe(rollout: Rollout) -> str:
    percent = rollout.selector.startswith("percent")
    chosen = f" ({len(rollout.members)} processes)" if percent else ""
    return (
        f"rollout {rollout.id}: {rollout.scope} {rollout.key} = {rollout.new_value} to "
        f"{rollout.selector}{chosen}, watched for {rollout.watch_seconds:g} s"
    )


def add_commands(command: Command) -> None:
    rollouts = command(
        "rollouts",
        _rollouts,
        "show canary rollouts with their figures; promote or abort one early",
        json_flag=True,
    )
    rollouts.add_argument("action", nargs="?", choices=["list", "promote", "abort"])
    rollouts.add_argument("id", nargs="?", type=int)
    rollouts.add_argument("--limit", type=int, default=50)
    rollouts.add_argument("--actor", help="who asks (default: the OS user)")
    rollouts.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (30)")


def report(backend: Any, namespace: str, *, limit: int = 50) -> list[dict[str, Any]]:
    """Each rollout as a dict; a watching one with its figures so far (none, and
    ``figures_unavailable`` saying why, while the health reports cannot be read)."""
    found = records_of(backend, namespace)
    shown = []
    for rollout in found.recent(limit=limit):
        entry = rollout.as_dict()
        if rollout.state == WATCHING:
            try:
                thresholds = Thresholds.from_options(rollout.thresholds)
            except ValueError:
                thresholds = Thresholds()
            try:
                canary, baseline = found.health(rollout.id)
            except Exception as exc:  # Redis down: what PostgreSQL holds is still shown
                entry["figures_unavailable"] = f"health reports unreadable: {describe_error(exc)}"
                shown.append(entry)
                continue
            entry["figures"] = judge(
                thresholds, canary, baseline, elapsed=rollout.elapsed, window=float("inf")
            ).figures
        shown.append(entry)
    return shown


def _rollouts(args: argparse.Namespace, _: list[str]) -> int:
    backend, namespace = configured(), settings().namespace
    if args.action in {"promote", "abort"}:
        if args.id is None:
            raise InvalidOption("id", f"`rollouts {args.action}` needs a rollout id")
        found = records_of(backend, namespace)
        found.request(args.id, args.action, actor=actor_of(args))
        deadline = time.monotonic() + args.timeout
        rollout = found.get(args.id)
        while rollout is not None and rollout.state == WATCHING and time.monotonic() < deadline:
            time.sleep(0.2)
            rollout = found.get(args.id)
        assert rollout is not None
        if args.json:
            print_json(rollout.as_dict())
        else:
            print(f"rollout {rollout.id}: {rollout.state} ({rollout.decision or 'no leader yet'})")
        return 0 if rollout.state != WATCHING else 1
    shown = report(backend, namespace, limit=args.limit)
    if args.json:
        print_json(shown)
        return 0
    rows = []
    for r in shown:
        figures = r["figures"] or {}
        canary, baseline = figures.get("canary") or {}, figures.get("baseline") or {}
        rows.append(
            [
                str(r["id"]),
                r["state"],
                f"{r['scope']} {r['key']}",
                r["selector"],
                f"{min(r['elapsed_s'], r['watch_seconds']):.0f}/{r['watch_seconds']:g} s",
                f"{canary.get('tasks', 0)}t {canary.get('failures', 0)}f",
                f"{baseline.get('tasks', 0)}t {baseline.get('failures', 0)}f",
                r["decision"] or "-",
            ]
        )
    table(["id", "state", "key", "canary", "watched", "canary", "baseline", "decision"], rows)
    return 0
