"""The ``optionstore`` command: migrate, read, write through the tasks, inspect, run a worker."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from store.errors import InvalidOption, OptionsError
from store.model.scopes import Scope
from store.model.validation import validate_key
from worker.cli.actor import actor_of, add_audit_arguments
from worker.cli.console import configured as _configured
from worker.cli.console import print_json as _print_json
from worker.cli.console import settings as _settings
from worker.cli.console import show, table
from worker.cli.operate import add_commands as add_operator_commands
from worker.cli.rollouts import add_canary_arguments, canary_requested
from worker.cli.rollouts import add_commands as add_rollout_commands
from worker.cli.rollouts import describe as describe_rollout
from worker.cli.rollouts import start as start_rollout
from worker.cli.status import status_report
from worker.cli.waits import wait_for_writes
from worker.cli.web import add_commands as add_console_commands
from worker.cli.writes import parse_value, task_call

DEFAULT_WORKER_ARGS = ["--pool", "prefork", "--concurrency", "2", "--loglevel", "INFO"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result: int = args.handler(args, extra)
    except InvalidOption as exc:
        print(f"optionstore: invalid input: {exc}", file=sys.stderr)
        return 2
    except OptionsError as exc:
        print(f"optionstore: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`optionstore status | head`): not our error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optionstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Any, help_text: str, *, json_flag: bool = False
    ) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(handler=handler)
        if json_flag:
            cmd.add_argument("--json", action="store_true", help="print JSON")
        return cmd

    command("migrate", _migrate, "create or upgrade the PostgreSQL schema (idempotent)")
    get = command("get", _get, "print one option's value (exit 1 if it is not set)", json_flag=True)
    get.add_argument("scope")
    get.add_argument("key")
    listing = command("list", _list, "print every option of a scope", json_flag=True)
    listing.add_argument("scope")
    for name, handler, help_text in (
        ("set", _set, "enqueue a write of KEY = JSON in SCOPE"),
        ("unset", _unset, "enqueue the removal of KEY from SCOPE"),
    ):
        cmd = command(name, handler, help_text)
        cmd.add_argument("scope")
        cmd.add_argument("key")
        if name == "set":
            cmd.add_argument("value", metavar="JSON")
        cmd.add_argument(
            "--wait",
            action="store_true",
            help="return once the write committed and every live worker process applied it",
        )
        cmd.add_argument("--timeout", type=float, default=30.0, help="seconds --wait waits (30)")
        add_audit_arguments(cmd)
        if name == "set":
            add_canary_arguments(cmd)
    history = command(
        "history", _history, "print the change history of a scope or key", json_flag=True
    )
    history.add_argument("scope")
    history.add_argument("key", nargs="?")
    history.add_argument("--limit", type=int, default=100)
    command("status", _status, "show the services, the schema and the outbox", json_flag=True)
    command(
        "worker",
        _worker,
        "migrate, then run `celery -A worker worker` (extra arguments go to celery; "
        f"default: {' '.join(DEFAULT_WORKER_ARGS)})",
    )
    embedded = command(
        "embedded", _embedded, "manage the embedded PostgreSQL and Redis", json_flag=True
    )
    embedded.add_argument("action", choices=["start", "stop", "status", "env"])
    add_operator_commands(command)
    add_rollout_commands(command)
    add_console_commands(command)
    return parser


def _migrate(args: argparse.Namespace, _: list[str]) -> int:
    from store.postgres.schema import migrate

    before, after = migrate(_settings().database_url)
    print(
        f"schema at version {after}" + (f" (was {before})" if before != after else " (up to date)")
    )
    return 0


def _get(args: argparse.Namespace, _: list[str]) -> int:
    scope = Scope.parse(args.scope)
    snapshot = _configured().db.load_scope(scope.name)
    text = snapshot.values.get(args.key)
    if args.json:
        _print_json(
            {
                "scope": scope.name,
                "key": args.key,
                "set": text is not None,
                "value": None if text is None else json.loads(text),
                "revision": snapshot.revision,
            }
        )
    elif text is not None:
        print(text)
    else:
        print(f"{args.key!r} is not set in {scope.name}", file=sys.stderr)
    return 0 if text is not None else 1


def _list(args: argparse.Namespace, _: list[str]) -> int:
    scope = Scope.parse(args.scope)
    snapshot = _configured().db.load_scope(scope.name)
    values = {key: json.loads(text) for key, text in sorted(snapshot.values.items())}
    if args.json:
        _print_json({"scope": scope.name, "revision": snapshot.revision, "values": values})
    else:
        for key, text in sorted(snapshot.values.items()):
            print(f"{key} = {text}")
    return 0


def _enqueue(args: argparse.Namespace, value: Any, *, unset: bool) -> int:
    scope = Scope.parse(args.scope)
    validate_key(args.key)
    name, task_args = task_call(scope, args.key, value, unset=unset)
    backend = _configured()
    from worker import app

    # Through the task object: its apply_async applies the input rules (and the registry's)
    # before enqueueing.
    task_id: str = (
        app.tasks[name].apply_async(task_args, actor=actor_of(args), reason=args.reason).id
    )
    print(f"enqueued {name} {json.dumps(task_args)} as task {task_id}")
    if not args.wait:
        return 0

    def committed(result: Any) -> None:
        state = "changed" if result.changed else "unchanged"
        print(f"committed: {result.scope} at revision {result.revision} ({state})")

    return wait_for_writes(backend, [task_id], timeout=args.timeout, on_commit=committed)


def _set(args: argparse.Namespace, _: list[str]) -> int:
    value = parse_value(args.value)
    if canary_requested(args):
        if args.wait:
            raise InvalidOption("wait", "a canary rollout ends when the leader decides")
        rollout = start_rollout(args, Scope.parse(args.scope), validate_key(args.key), value)
        print(f"started {describe_rollout(rollout)}; see `optionstore rollouts`")
        return 0
    return _enqueue(args, value, unset=False)


def _unset(args: argparse.Namespace, _: list[str]) -> int:
    return _enqueue(args, None, unset=True)


def _history(args: argparse.Namespace, _: list[str]) -> int:
    scope = Scope.parse(args.scope)
    entries = _configured().db.history(scope.name, args.key, limit=args.limit)
    if args.json:
        _print_json([history_dict(e) for e in entries])
        return 0
    table(
        ["rev", "changed at (UTC)", "key", "old", "new", "actor", "reason", "task"],
        [
            [
                f"r{e.revision}",
                f"{e.changed_at:%Y-%m-%d %H:%M:%S}",
                e.key,
                show(json.dumps(e.old_value) if e.old_set else None),
                show(json.dumps(e.new_value) if e.new_set else None),
                e.actor or "-",
                (e.reason or "").replace("\n", " ") or "-",
                e.task_id or "-",
            ]
            for e in entries
        ],
        width=40,
    )
    return 0


def history_dict(e: Any) -> dict[str, Any]:
    """One history row for --json; ``*_set`` tell a JSON null from "not set"."""
    return {
        "scope": e.scope,
        "key": e.key,
        "revision": e.revision,
        "old_value": e.old_value,
        "old_set": e.old_set,
        "new_value": e.new_value,
        "new_set": e.new_set,
        "changed_at": e.changed_at.isoformat(),
        "task_id": e.task_id,
        "actor": e.actor,
        "reason": e.reason,
        "origin": e.origin,
    }


def _status(args: argparse.Namespace, _: list[str]) -> int:
    report = status_report(_settings(), _configured())
    if args.json:
        _print_json(report)
        return 0
    for key, value in report.items():
        if key == "signing":
            print(f"{key:20} {_signing_line(value)}")
        elif key == "rollouts":
            shown = [f"#{r['id']} {r['scope']} {r['key']} ({r['selector']})" for r in value]
            print(f"{key:20} {', '.join(shown) or 'none watching'}")
        elif key != "processes":
            print(f"{key:20} {value}")
    print(f"\n{'process':28} {'kind':6} {'pool':8} {'mode':8} {'synced':7} {'heard':>8}  converged")
    if not report["processes"]:
        print("(no live process reports: nothing has applied the latest writes)")
    for p in report["processes"]:
        heard = f"{p['heard_ago_s']:.1f}s" if p["heard_ago_s"] is not None else "never"
        state = "yes" if p["converged"] else f"no: behind on {', '.join(p['behind'][:5])}"
        print(
            f"{p['process']:28} {p['kind']:6} {p['pool']:8} {p['mode']:8} {p['synced']!s:7}"
            f" {heard:>8}  {state}"
        )
    return 0


def _signing_line(signing: dict[str, Any]) -> str:
    if not signing["enabled"]:
        return "off (no OPTIONS_SIGNING_KEY: write tasks and reload messages are not checked)"
    others = [kid for kid in signing["key_ids"] if kid != signing["signs_with"]]
    verifies = f", verifies with {', '.join(others)} too" if others else ""
    unsigned = "accepted" if signing["unsigned_writes"] == "accept" else "refused"
    return f"on (signs with key {signing['signs_with']}{verifies}; unsigned write tasks {unsigned})"


def _worker(args: argparse.Namespace, extra: list[str]) -> int:
    from store.postgres.schema import migrate

    settings = _settings()  # starts the embedded servers first, when they are the default
    migrate(settings.database_url)
    argv = [sys.executable, "-m", "celery", "-A", "worker", "worker"]
    os.execv(sys.executable, [*argv, *(extra or DEFAULT_WORKER_ARGS)])  # noqa: S606 (replaces this process with the worker)


def _embedded(args: argparse.Namespace, _: list[str]) -> int:
    from pathlib import Path

    from store.embedded import (
        SIGNING_KEY_FILE,
        embedded_status,
        ensure_embedded,
        ensure_signing_key,
        stop_embedded,
    )

    state_dir = Path(os.environ.get("OPTIONS_STATE_DIR") or ".optionstore").absolute()
    if args.action == "stop":
        stop_embedded(state_dir)
        print(f"stopped the embedded servers in {state_dir}")
        return 0
    if args.action == "status":
        status = embedded_status(state_dir)
        if args.json:
            _print_json(status)
        else:
            for name, info in status.items():
                print(f"{name:10} {info}")
        return 0
    services = ensure_embedded(state_dir)
    if args.action == "env":
        print(f"export OPTIONS_DATABASE_URL={services.database_url}")
        print(f"export OPTIONS_REDIS_URL={services.redis_url}")
        # The embedded default's key, by its file's name: every process given these variables
        # signs and checks with it, as one started with no URL set would.
        ensure_signing_key(state_dir)
        print(f"export OPTIONS_SIGNING_KEY_FILE={shlex.quote(str(state_dir / SIGNING_KEY_FILE))}")
    else:
        print(f"postgres  {services.database_url}\nredis     {services.redis_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
