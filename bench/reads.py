"""Read figures, measured in this process against the run's PostgreSQL and Redis.

``read_hit``: ``store.project_options.get_value`` served from the local cache, against a bare
``dict.get``; ``read_hit_declared``: the same for a key the scope does not set, declared with a
default. ``read_miss``: the first read of a scope in a task (local cache empty, Redis holds
the scope), against one raw redis-py ``HGETALL`` of the same hash.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import redis

from bench.env import Services
from bench.figures import Figure, Series
from bench.hit import hit_figure, time_hits

PROJECT_ID = 4242
KEY = "mail:subject_prefix"
# Declared with a default, set in no scope (read_hit_declared).
DECLARED_KEY = "digests:max_delay"


def option_values(count: int, *, seed: int = 7) -> dict[str, Any]:
    """A realistic mix of option values: short strings, numbers, flags, small lists and objects."""
    rng = random.Random(seed)
    values: dict[str, Any] = {KEY: "[Prod] "}
    kinds = (
        lambda i: f"value-{i}-{rng.randrange(10**6)}",
        lambda i: rng.randrange(10**6),
        lambda i: rng.random() < 0.5,
        lambda i: [rng.randrange(100) for _ in range(4)],
        lambda i: {"enabled": True, "rate": round(rng.random(), 3), "owner": f"team-{i}"},
        lambda i: rng.random(),
    )
    for i in range(count - 1):
        values[f"option.key.{i:06d}"] = kinds[i % len(kinds)](i)
    return values


def seed_scope(backend: Any, project_id: int, values: dict[str, Any]) -> None:
    """Commit ``values`` to ``project:<id>`` through the store, then load it once so Redis holds
    the full scope (a first commit leaves only a revision floor there)."""
    from store.model.scopes import project_scope
    from store.model.writes import many_write

    scope = project_scope(project_id)
    items = list(values.items())
    for start in range(0, len(items), 5000):
        backend.commit(many_write(scope, dict(items[start : start + 5000]), []))
    backend.local.clear()
    backend.state(scope.name)
    backend.local.clear()


def read_hit(run: Services, *, quick: bool) -> Figure:
    backend = run.configure_store(run.namespace("reads"))
    values = option_values(10)
    seed_scope(backend, PROJECT_ID, values)
    number, reps = (20_000, 40) if quick else (20_000, 300)
    return hit_figure(
        "read_hit",
        "read, local cache hit (`store.project_options.get_value`)",
        time_hits(PROJECT_ID, KEY, values, number, reps),
        "this process",
    )


def read_hit_declared(run: Services, *, quick: bool) -> Figure:
    """A local hit on a key the scope does not set, declared with a default (registry on): the
    read returns the declared default."""
    import store

    backend = run.configure_store(run.namespace("reads-declared"))
    values = option_values(10)
    seed_scope(backend, PROJECT_ID, values)
    store.registry.declare(DECLARED_KEY, scopes=["project"], default=25)
    try:
        number, reps = (20_000, 40) if quick else (20_000, 300)
        answer = time_hits(PROJECT_ID, DECLARED_KEY, values, number, reps)
    finally:
        store.registry.reset()
    return hit_figure(
        "read_hit_declared",
        "read, local cache hit of a declared default (registry on, key not set)",
        answer,
        "this process",
    )


def _miss_samples(
    backend: Any, client: redis.Redis, project_id: int, n: int
) -> tuple[list[float], list[float]]:
    import store

    redis_key = backend.redis.key(f"project:{project_id}")
    store.clear_local_cache()
    store.project_options.get_value(project_id, KEY)  # opens the connection, fills Redis if needed
    client.hgetall(redis_key)
    postgres_before = backend.stats["postgres_reads"]
    ours: list[float] = []
    raw: list[float] = []
    perf = time.perf_counter
    for i in range(n):
        store.clear_local_cache()  # what task_postrun does; not timed
        for first in (i % 2 == 0, i % 2 == 1):
            if first:
                start = perf()
                store.project_options.get_value(project_id, KEY)
                ours.append((perf() - start) * 1e6)
            else:
                start = perf()
                client.hgetall(redis_key)
                raw.append((perf() - start) * 1e6)
    assert backend.stats["postgres_reads"] == postgres_before, "every timed miss must hit Redis"
    return ours, raw


def _miss_cpu(backend: Any, client: redis.Redis, project_id: int, n: int) -> dict[str, float]:
    """CPU time (this process, user + system) per read: unlike latency, not moved by load."""
    import store

    redis_key = backend.redis.key(f"project:{project_id}")
    clock = time.process_time
    start = clock()
    for _ in range(n):
        store.clear_local_cache()
        client.hgetall(redis_key)
    middle = clock()
    for _ in range(n):
        store.clear_local_cache()
        store.project_options.get_value(project_id, KEY)
    end = clock()
    return {"store_us": (end - middle) / n * 1e6, "hgetall_us": (middle - start) / n * 1e6}


def read_miss(run: Services, *, quick: bool) -> Figure:
    backend = run.configure_store(run.namespace("reads"))
    client = redis.Redis.from_url(run.redis_url)  # a plain client, as a caller would make
    seed_scope(backend, PROJECT_ID, option_values(10))
    seed_scope(backend, PROJECT_ID + 1, option_values(100))
    n = 300 if quick else 3000
    ours, raw = _miss_samples(backend, client, PROJECT_ID, n)
    ours100, raw100 = _miss_samples(backend, client, PROJECT_ID + 1, max(100, n // 4))
    med = statistics.median(ours100) / statistics.median(raw100)
    cpu = _miss_cpu(backend, client, PROJECT_ID, n)
    client.close()
    return Figure(
        name="read_miss",
        title="read, first in a task (local miss, Redis hit)",
        baseline_title="one raw redis-py `HGETALL` of the same hash",
        value=Series("us/read", ours),
        baseline=Series("us/read", raw),
        goal="<= 1.2x",
        method=(
            f"in this process: {n} samples of `get_value` on a 10-key project scope right after "
            "`clear_local_cache()` (what task_postrun does, not timed), each paired with a "
            "`HGETALL` of the same Redis hash on a plain `redis.Redis` client, in alternating "
            "order; every timed read verified to come from Redis, none from PostgreSQL"
        ),
        extra={
            "ratio_median_100_key_scope": med,
            "samples_100_key_scope": len(ours100),
            "cpu_per_read_10_key_scope": cpu,
        },
    )
