"""The local-hit timing, run inside whichever process is measured (this one, a task, a web
worker), and the figure it makes."""

from __future__ import annotations

import statistics
import timeit
from typing import Any

import store
from bench.figures import Figure, Series


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
    return {
        "samples": samples,
        "round_trips": round_trips,
        "mode": store.backend.local.mode,
        "number": number,
    }


def hit_figure(name: str, title: str, answer: dict[str, Any], where: str) -> Figure:
    """The figure of a ``time_hits`` answer: the store's read against ``dict.get``, both net of
    the empty loop, so the ratio compares the calls themselves."""
    samples = answer["samples"]
    loop = samples["loop"]
    store_net = [s - e for s, e in zip(samples["store"], loop, strict=True)]
    dict_net = [d - e for d, e in zip(samples["dict"], loop, strict=True)]
    assert answer["round_trips"] == 0, "every timed read must be a local hit"
    return Figure(
        name=name,
        title=title,
        baseline_title="bare `dict.get` (same process)",
        value=Series("ns/call", store_net),
        baseline=Series("ns/call", dict_net),
        goal="<= 4x",
        tail_in_goal=True,
        method=(
            f"timeit inside {where} ({answer['mode']} mode), a 10-key project scope; "
            f"{len(loop)} repetitions of {answer['number']:,} calls each, interleaved with the "
            "baseline; per-call time net of timeit's empty loop (measured in the same "
            "repetitions), so the ratio compares the calls themselves"
        ),
        extra={"gross_ns_median": {k: statistics.median(v) for k, v in samples.items()}},
    )
