"""The console's commands of ``optionstore``: ``web`` serves it, ``users`` manages who may sign
in (a password is read from a prompt or standard input, never from the command line)."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from typing import Any

from store.events import log
from store.settings import Settings
from worker.cli.console import settings

Command = Callable[..., argparse.ArgumentParser]
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def add_commands(command: Command) -> None:
    web = command("web", _web, "serve the operators' console (Starlette on uvicorn)")
    web.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind ({DEFAULT_HOST})")
    web.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    web.add_argument(
        "--secure-cookies",
        action="store_true",
        help="send the session cookie over HTTPS only (behind a TLS proxy)",
    )
    web.add_argument(
        "--forwarded-allow-ips",
        metavar="ADDRESSES",
        help="trust X-Forwarded-For and X-Forwarded-Proto from these proxy addresses "
        "(comma-separated, as uvicorn's option; default: trust no one)",
    )
    web.add_argument(
        "--converge-seconds",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a write's panel follows it before naming the processes that have not "
        "applied it (60)",
    )
    users = command("users", _users, "manage the console's users (OPTIONS_WEB_USERS_FILE)")
    actions = users.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a user (the password is asked for)")
    add.add_argument("name")
    add.add_argument("--role", choices=["editor", "viewer"], required=True)
    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    passwd = actions.add_parser("passwd", help="set a user's password (asked for)")
    passwd.add_argument("name")
    actions.add_parser("list", help="list the users and their roles")


def read_password(prompt: str = "password: ") -> str:
    """A password from the terminal (asked twice), or the first line of standard input."""
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("again: ") != first:
            raise SystemExit("optionstore: the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _users(args: argparse.Namespace, _: list[str]) -> int:
    from worker.web.users import UsersFile, check_name

    found: Settings = settings()
    users = UsersFile(found.web_users_path)
    if args.action == "list":
        for user in users.users():
            print(f"{user.name}\t{user.role}")
        return 0
    name = check_name(args.name)
    if args.action == "remove":
        users.remove(name)
        print(f"removed {name} from {users.path}")
    elif args.action == "add":
        users.add(name, args.role, read_password())
        print(f"added {name} ({args.role}) to {users.path}")
    else:
        users.passwd(name, read_password())
        print(f"set the password of {name} in {users.path}")
    return 0


def _web(args: argparse.Namespace, _: list[str]) -> int:
    import uvicorn

    from store.postgres.schema import migrate
    from worker.web import create_app
    from worker.web.users import UsersFile

    found: Settings = settings()
    # As `optionstore worker` does: on the embedded default, the console may be the first
    # process to start the servers.
    migrate(found.database_url)
    try:
        app: Any = create_app(
            settings=found,
            secure_cookies=args.secure_cookies,
            convergence_deadline=args.converge_seconds,
        )
    except ValueError as exc:
        raise SystemExit(f"optionstore web: --converge-seconds: {exc}") from None
    if not UsersFile(found.web_users_path).users():
        log.warning(
            "web.no_users",
            users_file=str(found.web_users_path),
            hint="create the first editor: optionstore users add NAME --role editor",
        )
    log.info("web.serving", url=f"http://{args.host}:{args.port}/")
    uvicorn.run(app, **server_options(args))
    return 0


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn's options for ``web``. Forwarded headers are ignored unless
    ``--forwarded-allow-ips`` names the proxies to trust: uvicorn's default trusts them from
    127.0.0.1, where an SSH tunnel or a local proxy would let any client pick its address (and
    so escape the per-address sign-in limit)."""
    trusted = args.forwarded_allow_ips
    return {
        "host": args.host,
        "port": args.port,
        "log_level": "warning",
        "proxy_headers": bool(trusted),
        **({"forwarded_allow_ips": trusted} if trusted else {}),
        # Event streams stay open: a stop waits this long for them, then closes them.
        "timeout_graceful_shutdown": 2,
    }
