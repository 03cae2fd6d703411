"""The local-hit timing, run inside whichever process is measured (a task, a web worker)."""

from __future__ import annotations

import timeit
from typing import Any

import store


def time_hits(
    project_id: int, key: str, values: dict[str, Any], number: int, reps: int
) -> dict[str, Any]:
    """ns per call of a local-hit ``get_value``, a bare ``dict.get`` and timeit's empty loop,
    interleaved ``reps`` times; plus the round trips the reads made (0 for local hits)."""
    store.project_options.get_value(project_id, key)  # cached now, if the process is synced
    before = dict(store.backend.stats)
    namespace = {
        "project_options": store.project_options,
        "d": dict(values),
        "key": key,
        "pid": project_id,
    }
    timers = {
        "loop": timeit.Timer("pass", globals=namespace),
        "dict": timeit.Timer("d.get(key)", globals=namespace),
        "store": timeit.Timer("project_options.get_value(pid, key)", globals=namespace),
    }
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(reps):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(number) / number * 1e9)
    after = dict(store.backend.stats)
    round_trips = sum(after.values()) - sum(before.values())
    return {"samples": samples, "round_trips": round_trips, "mode": store.backend.local.mode}
