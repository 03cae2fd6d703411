"""What a read-your-writes token costs: a read task sent right after a write, with the write's
``options_after`` token and without, in the same run on the same worker."""

from __future__ import annotations

import random
import statistics
import time

import store
from bench.env import Services
from bench.figures import Figure, Series
from bench.fleet import fleet
from bench.reads import PROJECT_ID

KEY = "bench.tokens"


def token_round_trip(run: Services, *, quick: bool) -> Figure:
    reps = 60 if quick else 400
    samples: dict[str, list[float]] = {"with": [], "without": []}
    missed = {"with": 0, "without": 0}
    with fleet(run, "tokens", 2) as running:
        producer = running.producer

        def write(value: str) -> dict[str, object]:
            result = producer.send_task("options.set_project_option", args=[PROJECT_ID, KEY, value])
            running.task_ids.append(result.id)
            answer: dict[str, object] = result.get(timeout=60)
            return answer

        def read(way: str, written: dict[str, object], value: str) -> float:
            headers = store.options_after(written) if way == "with" else None
            started = time.perf_counter()
            result = producer.send_task("bench.warm", args=[PROJECT_ID, KEY, 0.0], headers=headers)
            answer = result.get(timeout=60)
            elapsed = (time.perf_counter() - started) * 1000
            running.task_ids.append(result.id)
            missed[way] += answer["value"] != value
            return elapsed

        for i in range(-5, reps):  # five warm-up rounds, not recorded
            ways = ["with", "without"]
            random.shuffle(ways)
            for way in ways:
                value = f"{way}:{i}"
                sample = read(way, write(value), value)
                if i >= 0:
                    samples[way].append(sample)
                time.sleep(0.01 + random.random() * 0.01)
    method = (
        "one `celery worker --concurrency 2`, OPTIONS_LOCAL_CACHE=process, both children holding "
        "the scope. Each sample: `options.set_project_option` sent by name and its result "
        "awaited, then at once one `bench.warm` read of that option, timed from send to result; "
        "with the write's `options_after` header (the value) and without (the baseline), in "
        f"random order, 10-20 ms apart, {reps} of each. extra: reads that did not return the "
        "value just written (without a token a read may run before its child applied the "
        "broadcast; with one it never should)"
    )
    return Figure(
        name="token_round_trip",
        title="read task with the write's options_after token, send to result",
        baseline_title="the same read task without a token",
        value=Series("ms", samples["with"]),
        baseline=Series("ms", samples["without"]),
        goal="<= 1.5x",
        method=method,
        extra={
            "missed_the_write": missed,
            "with_ms_median": statistics.median(samples["with"]),
            "without_ms_median": statistics.median(samples["without"]),
        },
    )
