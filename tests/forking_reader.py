"""A plain long-lived process for the fork test: it reads an option (configuring itself from the
environment), forks, and then parent and child each report when they read ``expected``.

Usage: python -m tests.forking_reader PROJECT KEY EXPECTED. Prints JSON lines on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time

import store


def say(**fields: object) -> None:
    # One write per line: parent and child share stdout, and print() writes the newline apart.
    os.write(1, (json.dumps({"pid": os.getpid(), **fields}) + "\n").encode())


def main() -> None:
    project, key, expected = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    store.project_options.get_value(project, key)
    child = os.fork()
    role = "child" if child == 0 else "parent"
    deadline = time.monotonic() + 60
    value = store.project_options.get_value(project, key)
    while not store.backend.local.synced and time.monotonic() < deadline:
        time.sleep(0.01)
    say(role=role, ready=store.backend.local.synced, value=value)
    while time.monotonic() < deadline:
        value = store.project_options.get_value(project, key)
        if value == expected:
            say(role=role, saw=value, round_trips=dict(store.backend.stats))
            break
        time.sleep(0.005)
    else:
        say(role=role, timeout=True, value=value)
    if child:
        os.waitpid(child, 0)
    else:
        os._exit(0)


if __name__ == "__main__":
    main()
