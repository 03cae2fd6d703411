"""A web process's request that makes a write and reads it back, for the tests: run as
``python -m tests.web_read_back PROJECT KEY ROUNDS``; prints one JSON line.

Configured from the environment on first use (no configure()), through the project's app, like
tests/webapp.py. Its consumer applies ``slow:`` values 10 ms late (tests/slow_apply.py), so a
read right after the write returned finds the old value unless the request catches up first.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import store
import tasks
import tests.slow_apply  # noqa: F401 (the fault: broadcasts of slow: values applied late)
from worker import app  # noqa: F401 (the app the write helpers send through)


def main(project: int, key: str, rounds: int) -> dict[str, object]:
    store.project_options.get_value(project, key)  # cached from here on (process mode)
    outcomes: Counter[str] = Counter()
    stale = {"with_catch_up": 0, "without": 0}
    for round_ in range(rounds):
        for way in ("with_catch_up", "without"):
            value = f"slow:{way}:{round_}"
            result = tasks.set_project_option.delay(project, key, value).get(timeout=30)
            if way == "with_catch_up":
                outcomes.update(store.catch_up(result).values())
            if store.project_options.get_value(project, key) != value:
                stale[way] += 1
    return {"stale": stale, "outcomes": dict(outcomes), "kind": store.runtime.kind}


if __name__ == "__main__":
    project, key, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    print(json.dumps(main(project, key, rounds)))
