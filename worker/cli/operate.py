"""The operators' commands of ``optionstore``: ``options``, ``explain``, ``revert``, ``plan``,
``apply`` and ``export``. The audit trail and desired-state files are read by ``audit.py`` and
``desired.py`` beside it, the rules by ``store``; this module reads arguments, asks and prints."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from store.errors import InvalidOption
from store.model.registry import Declaration
from store.model.scopes import TAGKEYS, Scope
from store.model.validation import validate_key
from worker.cli.actor import actor_of, add_audit_arguments
from worker.cli.audit import Change, diff, last_changes, state_at
from worker.cli.console import (
    Progress,
    configured,
    diff_lines,
    paint,
    print_json,
    settings,
    show,
    table,
)
from worker.cli.desired import ScopePlan, dump_desired, load_desired, plan_all
from worker.cli.rollouts import add_canary_arguments, apply_as_rollouts, canary_requested
from worker.cli.waits import wait_for_writes

Command = Callable[..., argparse.ArgumentParser]


def add_commands(command: Command) -> None:
    """Add the operators' subcommands through the main parser's ``command`` factory."""
    command("options", _options, "list the declared options (OPTIONS_REGISTRY)", json_flag=True)
    explain = command(
        "explain",
        _explain,
        "where a value comes from: scope, default or unset; who, when, why",
        json_flag=True,
    )
    explain.add_argument("scope")
    explain.add_argument("key")
    revert = command(
        "revert", _revert, "put a scope (or one key) back as it was at a revision", json_flag=True
    )
    revert.add_argument("scope")
    revert.add_argument("key", nargs="?")
    revert.add_argument("--to", type=int, required=True, metavar="REVISION")
    plan = command(
        "plan", _plan, "the changes a desired-state file would make, and drift", json_flag=True
    )
    plan.add_argument("file")
    apply = command(
        "apply", _apply, "write a desired-state file: one set_many per scope", json_flag=True
    )
    apply.add_argument("file")
    add_canary_arguments(apply)
    for cmd in (revert, apply):
        cmd.add_argument("--yes", action="store_true", help="write (without it: only show)")
        cmd.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
        add_audit_arguments(cmd)
    export = command(
        "export", _export, "write scopes as a desired-state file (JSON)", json_flag=True
    )
    export.add_argument("scopes", nargs="*", metavar="SCOPE")
    export.add_argument("--all", action="store_true", help="every scope that holds options")
    export.add_argument("-o", "--output", help="write to this file instead of stdout")


def _registry() -> Any:
    import store

    configured()  # the registry resolves from the same settings as the store
    return store.registry


def _options(args: argparse.Namespace, _: list[str]) -> int:
    registry = _registry()
    declared: list[Declaration] = registry.declarations()
    if args.json:
        print_json(
            {
                "source": registry.source,
                "strict": registry.strict,
                "options": [d.as_dict() for d in declared],
            }
        )
        return 0
    if registry.source is None and not declared:
        print("no registry: set OPTIONS_REGISTRY to a TOML file of declarations", file=sys.stderr)
        return 0
    strict = "strict: undeclared keys are refused" if registry.strict else "not strict"
    print(paint(f"{registry.source or 'declared in code'} ({strict})", "dim"))
    table(
        ["key", "scopes", "type", "default", "flags", "description"],
        [
            [
                d.key,
                ",".join(d.scopes),
                d.as_dict()["type"],
                json.dumps(d.default) if d.has_default else "-",
                ",".join(f for f in ("read_only", "deprecated") if getattr(d, f)) or "-",
                d.description,
            ]
            for d in declared
        ],
    )
    return 0


def explain(db: Any, registry: Any, scope: Scope, key: str) -> dict[str, Any]:
    """Where ``key``'s value in ``scope`` comes from (the scope, the registry's default, or
    unset), and its last change: who, when, why (``explain``, and the console's page)."""
    validate_key(key)
    snapshot = db.load_scope(scope.name)
    text = snapshot.values.get(key)
    declared = None if scope.kind == TAGKEYS else registry.get(key, scope.kind)
    last = last_changes(db, scope.name, [key]).get(key)
    if text is not None:
        source, value = "scope", json.loads(text)
    elif declared is not None and declared.has_default:
        source, value = "registry default", declared.default
    else:
        source, value = "unset", None
    return {
        "scope": scope.name,
        "key": key,
        "source": source,
        "value": value,
        "scope_revision": snapshot.revision,
        "revision": None if last is None else last.revision,
        "actor": None if last is None else last.actor,
        "reason": None if last is None else last.reason,
        "origin": None if last is None else last.origin,
        "changed_at": None if last is None else last.changed_at.isoformat(),
        "task_id": None if last is None else last.task_id,
        "declared": None if declared is None else declared.as_dict(),
    }


def _explain(args: argparse.Namespace, _: list[str]) -> int:
    scope = Scope.parse(args.scope)
    db = configured().db
    report = explain(db, _registry(), scope, args.key)
    source, value = report["source"], report["value"]
    declared = None if scope.kind == TAGKEYS else _registry().get(args.key, scope.kind)
    last = last_changes(db, scope.name, [args.key]).get(args.key)
    if args.json:
        print_json(report)
        return 0 if source != "unset" else 1
    shown = "(unset)" if source == "unset" else json.dumps(value)
    print(f"{paint(scope.name, 'cyan')} {args.key} = {paint(shown, 'bold')}")
    print(f"  from      {source}")
    if last is not None:
        what = "set" if last.new_set else "unset"
        print(f"  {what} at    r{last.revision}, {last.changed_at:%Y-%m-%d %H:%M:%S %Z}")
        print(
            f"  by        {last.actor or '(unknown)'}"
            + (f" ({last.origin})" if last.origin else "")
        )
        print(f"  why       {last.reason or '(no reason given)'}")
        print(f"  task      {last.task_id}")
    if declared is not None:
        print(f"  declared  {declared.as_dict()['type']}: {declared.description or '-'}")
    elif _registry().active:
        print(paint("  undeclared in the registry", "yellow"))
    return 0 if source != "unset" else 1


def _revert(args: argparse.Namespace, _: list[str]) -> int:
    scope = Scope.parse(args.scope)
    if scope.is_tag_keys:
        raise InvalidOption("scope", "revert takes an option scope, not tag keys")
    keys = None if args.key is None else [validate_key(args.key)]
    backend = configured()
    current = backend.db.load_scope(scope.name)
    target = state_at(backend.db, scope.name, args.to, args.key)
    changes = diff(current.values, target, keys)
    report: dict[str, Any] = {
        "scope": scope.name,
        "key": args.key,
        "revision": current.revision,
        "to": args.to,
        "changes": [c.as_dict() for c in changes],
        "applied": False,
    }
    what = scope.name if args.key is None else f"{args.key} in {scope.name}"
    if not args.json:
        if changes:
            diff_lines(f"{scope.name} r{current.revision} -> as at r{args.to}", changes)
        else:
            print(f"nothing to revert: {what} is as it was at r{args.to}")
    if _only_shown(args, report, bool(changes), "add --yes to write this as one set_many"):
        return 0
    reason = f"revert to r{args.to}" + (f": {args.reason}" if args.reason else "")
    task_id = _send_many(scope.name, changes, args, reason=reason, origin="revert")
    report.update(applied=True, task_id=task_id)
    status = wait_for_writes(
        backend,
        [task_id],
        timeout=args.timeout,
        on_commit=lambda r: report.update(new_revision=r.revision),
        out=sys.stderr if args.json else None,
    )
    if args.json:
        print_json(report)
    elif "new_revision" in report:
        print(f"reverted {what} to r{args.to} as revision {report['new_revision']}")
    return status


def _only_shown(args: argparse.Namespace, report: dict[str, Any], writes: bool, hint: str) -> bool:
    """True (the report printed) unless there is something to write and --yes says to."""
    if writes and args.yes:
        return False
    if writes and not args.json:
        print(paint(f"dry run: {hint}", "yellow"))
    if args.json:
        print_json(report)
    return True


def _send_many(
    scope: str, changes: list[Change], args: argparse.Namespace, *, reason: str | None, origin: str
) -> str:
    """Enqueue ``changes`` of ``scope`` as one ``options.set_many``; returns its task id."""
    from worker import app

    values = {c.key: json.loads(c.new) for c in changes if c.new is not None}
    unset = [c.key for c in changes if c.new is None]
    # Through the task object: the input rules and today's registry are checked first.
    result = app.tasks["options.set_many"].apply_async(
        [scope, values, unset],
        actor=actor_of(args),
        reason=reason,
        headers={"optionstore_origin": origin},
    )
    return str(result.id)


def _plans(args: argparse.Namespace) -> list[ScopePlan]:
    desired = load_desired(Path(args.file), max_value_bytes=settings().max_value_bytes)
    return plan_all(configured().db, desired)


def _print_plans(plans: list[ScopePlan], args: argparse.Namespace) -> None:
    if args.json:
        return
    for plan in plans:
        if plan.changes:
            diff_lines(f"{plan.scope} (r{plan.revision})", plan.changes)
        if plan.drift:
            last = plan.last_apply
            assert last is not None
            print(
                paint(
                    f"drift in {plan.scope}: changed outside {args.file} since its last apply "
                    f"(r{last.revision}, {last.committed_at:%Y-%m-%d %H:%M:%S}, "
                    f"by {last.actor or '(unknown)'})",
                    "yellow",
                )
            )
            for d in plan.drift:
                by = d.last_change
                who = "" if by is None else f"  r{by.revision} by {by.actor or '(unknown)'}"
                why = "" if by is None or not by.reason else f": {by.reason}"
                print(f"  ~ {d.key}: applied {show(d.applied)}, now {show(d.current)}{who}{why}")
    sets = sum(len(p.sets) for p in plans)
    unsets = sum(len(p.unsets) for p in plans)
    drift = sum(len(p.drift) for p in plans)
    touched = sum(1 for p in plans if p.changes)
    print(
        f"{len(plans)} scopes: {touched} to write, {sets} keys to set, {unsets} to unset; "
        f"{drift} drifted"
    )


def _plan_json(plans: list[ScopePlan]) -> list[dict[str, Any]]:
    return [
        {
            "scope": p.scope,
            "revision": p.revision,
            "changes": [c.as_dict() for c in p.changes],
            "drift": [d.as_dict() for d in p.drift],
            "last_apply_revision": None if p.last_apply is None else p.last_apply.revision,
        }
        for p in plans
    ]


def _plan(args: argparse.Namespace, _: list[str]) -> int:
    plans = _plans(args)
    if args.json:
        print_json({"file": args.file, "scopes": _plan_json(plans)})
    _print_plans(plans, args)
    return 0


def apply_writes(plans: list[ScopePlan]) -> list[tuple[str, list[Change]]]:
    """The ``set_many`` of each scope an apply writes (``apply``, and the console's).

    A scope with drift but nothing to change still gets a write (changing nothing): it records
    this apply, so the drift it accepted is not reported again."""
    return [
        (p.scope, p.changes or [Change(d.key, d.current, d.current) for d in p.drift])
        for p in plans
        if p.changes or p.drift
    ]


def _apply(args: argparse.Namespace, _: list[str]) -> int:
    plans = _plans(args)
    _print_plans(plans, args)
    writes = apply_writes(plans)
    report: dict[str, Any] = {"file": args.file, "scopes": _plan_json(plans), "applied": False}
    canary = canary_requested(args)
    hint = "a rollout per value" if canary else "one set_many per scope"
    if _only_shown(args, report, bool(writes), f"add --yes to write it ({hint})"):
        return 0
    if canary:
        return apply_as_rollouts(args, writes, report)
    reason = f"apply {Path(args.file).name}" + (f": {args.reason}" if args.reason else "")
    sending = Progress(len(writes), "enqueued")
    task_ids = []
    for scope, changes in writes:
        task_ids.append(_send_many(scope, changes, args, reason=reason, origin="apply"))
        sending.advance()
    sending.close()
    status = wait_for_writes(
        configured(),
        task_ids,
        timeout=args.timeout,
        progress=Progress(len(task_ids), "committed"),
        out=sys.stderr if args.json else None,
    )
    report.update(applied=status == 0, task_ids=task_ids)
    if args.json:
        print_json(report)
    return status


def _export(args: argparse.Namespace, _: list[str]) -> int:
    db = configured().db
    if args.all == bool(args.scopes):
        raise InvalidOption("scopes", "name scopes or pass --all (not both)")
    if args.all:
        names = [s for s, _ in db.list_scopes() if not s.startswith(f"{TAGKEYS}:")]
    else:
        names = [Scope.parse(s).name for s in args.scopes]
        for name in names:
            if name.startswith(f"{TAGKEYS}:"):
                raise InvalidOption("scopes", f"{name}: tag keys are not exported")
    snapshots = db.load_scopes(names) if names else {}
    # A scope with nothing set is left out: applying it would write nothing.
    text = dump_desired({n: s.values for n, s in sorted(snapshots.items()) if s.values})
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
