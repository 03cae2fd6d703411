"""Who asks for a change, and why: the ``--actor`` and ``--reason`` arguments of every command
that writes, and the actor they default to."""

from __future__ import annotations

import argparse
import getpass
import os


def add_audit_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--reason", help="why: stored with the change, shown by history and explain")
    cmd.add_argument("--actor", help="who asks for the change (default: the OS user)")


def actor_of(args: argparse.Namespace) -> str:
    if args.actor:
        return str(args.actor)
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (a bare container)
        return f"uid:{os.getuid()}"
