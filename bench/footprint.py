"""Sizes: the broadcast of a one-key change in a big scope, and the memory of cached options.

Memory is measured in a fresh subprocess (``python -m bench.footprint CONFIG_JSON``) with
tracemalloc: the bytes still allocated after loading the scopes through the read API (which
caches them) against the bytes of plain dicts built from the same Redis hashes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import kombu

from bench.env import ROOT, Services, wait_for
from bench.figures import Figure, Series
from bench.reads import option_values

BIG_SCOPE_KEYS = 10_000
BIG_PROJECT = 7_000_001
SMALL_PROJECT = 7_000_002
MEMORY_PROJECT = 8_000_000  # one scope of 100,000 keys
SPREAD_BASE = 8_100_000  # 1,000 scopes of 100 keys


def broadcast_size(run: Services, *, quick: bool = False) -> Figure:
    from store.broadcast.codec import ReloadMessage
    from store.broadcast.exchange import reload_queue
    from store.model.scopes import project_scope
    from store.model.writes import many_write, set_write

    namespace = run.namespace("size")
    # The big scope takes one key past the default OPTIONS_MAX_SCOPE_KEYS.
    backend = run.configure_store(
        namespace, broker_url=run.broker_url, max_scope_keys=BIG_SCOPE_KEYS + 1
    )
    bodies: list[tuple[dict[str, Any], int]] = []

    def on_message(body: dict[str, Any], message: Any) -> None:
        raw = message.body
        bodies.append((body, len(raw.encode() if isinstance(raw, str) else raw)))

    queue = reload_queue(namespace, "bench-capture")
    with (
        kombu.Connection(run.broker_url) as conn,
        conn.Consumer(queue, callbacks=[on_message], accept=["json"], no_ack=True),
    ):

        def heard(predicate: Any) -> Any:
            def found() -> Any:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.05)
                return next((b for b in bodies if predicate(b[0])), None)

            return wait_for(found, timeout=30, what="a reload message", interval=0)

        # Subscribed once our own marker comes back.
        def hello_heard() -> Any:
            backend.publisher.publish(ReloadMessage.heartbeat(origin="bench-size"))
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
            return any(b.get("origin") == "bench-size" for b, _ in bodies)

        wait_for(hello_heard, timeout=30, what="the capture subscription", interval=0)
        big = option_values(BIG_SCOPE_KEYS, seed=11)
        items = list(big.items())
        for start in range(0, len(items), 2000):
            backend.commit(
                many_write(project_scope(BIG_PROJECT), dict(items[start : start + 2000]), [])
            )
        backend.commit(set_write(project_scope(SMALL_PROJECT), "mail:subject_prefix", "[A]"))
        sizes: dict[int, tuple[int, int]] = {}
        key, value = "mail:subject_prefix", "[Prod] new"
        for project in (BIG_PROJECT, SMALL_PROJECT):
            result = backend.commit(set_write(project_scope(project), key, value))
            _, size = heard(
                lambda b, r=result: b.get("scope") == r.scope and b.get("revision") == r.revision
            )
            sizes[project] = (size, result.revision)
    one = len(key.encode()) + len(json.dumps(value).encode())
    scope_bytes = sum(len(k.encode()) + len(json.dumps(v).encode()) for k, v in big.items())
    big_size, small_size = sizes[BIG_PROJECT][0], sizes[SMALL_PROJECT][0]
    # Sizes differ only in the digits of two timestamps and the revision.
    slack = 8 + abs(len(str(sizes[BIG_PROJECT][1])) - len(str(sizes[SMALL_PROJECT][1])))
    return Figure(
        name="broadcast_size",
        title=f"broadcast size, one-key change in a {BIG_SCOPE_KEYS:,}-key scope",
        baseline_title="the size of that one key and value",
        value=Series("bytes", [float(big_size)]),
        baseline=Series("bytes", [float(one)]),
        goal="O(1)",
        # O(1): the same message as for a one-key scope, and nothing like the scope's size.
        met_override=abs(big_size - small_size) <= slack and big_size < scope_bytes / 100,
        method=(
            "the JSON body of the reload message as received by a kombu consumer bound to the "
            f"reload exchange, for a one-key change in a {BIG_SCOPE_KEYS:,}-key project scope; "
            "compared with the same change in a one-key scope and with the whole scope's size"
        ),
        extra={
            "message_bytes_one_key_scope": small_size,
            "scope_bytes": scope_bytes,
            "message_over_scope": big_size / scope_bytes,
        },
    )


def memory(run: Services, *, quick: bool = False) -> list[Figure]:
    from store.model.scopes import project_scope
    from store.model.writes import many_write

    namespace = run.namespace("memory")
    # One scope of 100,000 keys: ten times the default OPTIONS_MAX_SCOPE_KEYS.
    backend = run.configure_store(namespace, max_scope_keys=100_000)
    items = list(option_values(100_000, seed=3).items())
    for start in range(0, len(items), 10_000):
        backend.commit(
            many_write(project_scope(MEMORY_PROJECT), dict(items[start : start + 10_000]), [])
        )
    for n in range(1000):
        # Keys differ per scope, so a flat dict of all 100,000 is a fair second baseline.
        values = {f"p{n:03d}.{k[-6:]}": v for k, v in option_values(100, seed=n).items()}
        backend.commit(many_write(project_scope(SPREAD_BASE + n), values, []))
    figures = []
    for layout in ("one", "spread"):
        config = {
            "database_url": run.database_url,
            "redis_url": run.redis_url,
            "namespace": namespace,
            "layout": layout,
        }
        out = subprocess.run(
            [sys.executable, "-m", "bench.footprint", json.dumps(config)],
            cwd=ROOT,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        found = json.loads(out.strip().splitlines()[-1])
        if layout == "one":
            title = "memory, 100,000 cached options in one scope (one ScopeState)"
            baseline_title = "a plain dict of the same decoded values"
            baseline = found["flat_dict"]
        else:
            title = "memory, 100,000 cached options over 1,000 project scopes x 100 keys"
            baseline_title = "plain dicts of the same values, one per scope"
            baseline = found["nested_dicts"]
        figures.append(
            Figure(
                name=f"memory_{layout}",
                title=title,
                baseline_title=baseline_title,
                value=Series("MiB", [found["store"] / 2**20]),
                baseline=Series("MiB", [baseline / 2**20]),
                goal="<= 1.5x",
                method=(
                    "a fresh subprocess; tracemalloc bytes still allocated after reading every "
                    "scope once through `store.project_options` (process-mode cache, loads from "
                    "Redis; includes the local cache and the last-known copy it keeps) against "
                    "dicts built with json.loads from the same Redis hashes"
                ),
                extra={
                    "store_mib": found["store"] / 2**20,
                    "flat_dict_mib": found["flat_dict"] / 2**20,
                    "nested_dicts_mib": found["nested_dicts"] / 2**20,
                    "ratio_to_flat_dict": found["store"] / found["flat_dict"],
                    "load_ms_under_tracemalloc": found["load_ms"],
                },
            )
        )
    return figures


def _traced(build: Any) -> tuple[int, Any]:
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    built = build()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before, built


def _child(config: dict[str, Any]) -> dict[str, int]:
    import redis

    import store
    from store.redis.cache import REVISION_FIELD

    backend = store.configure(
        database_url=config["database_url"],
        redis_url=config["redis_url"],
        namespace=config["namespace"],
        local_cache="process",
    )
    ids = [MEMORY_PROJECT] if config["layout"] == "one" else [SPREAD_BASE + n for n in range(1000)]
    # Connections open and Redis filled from PostgreSQL before anything is measured.
    for project_id in ids:
        store.project_options.get_value(project_id, "mail:subject_prefix")
    store.clear_local_cache()
    backend.last_known.clear()
    client = redis.Redis.from_url(config["redis_url"])
    raw = {pid: client.hgetall(backend.redis.key(f"project:{pid}")) for pid in ids}
    tracemalloc.start()
    flat_size, flat = _traced(
        lambda: {
            k.decode(): json.loads(v)
            for hashed in raw.values()
            for k, v in hashed.items()
            if k != REVISION_FIELD
        }
    )
    assert len(flat) == 100_000, len(flat)
    del flat
    nested_size, nested = _traced(
        lambda: {
            pid: {k.decode(): json.loads(v) for k, v in hashed.items() if k != REVISION_FIELD}
            for pid, hashed in raw.items()
        }
    )
    del nested
    reads_before = backend.stats["postgres_reads"]
    start = time.perf_counter()
    store_size, _ = _traced(
        lambda: [store.project_options.get_value(pid, "mail:subject_prefix") for pid in ids]
    )
    assert backend.stats["postgres_reads"] == reads_before
    assert sum(len(s.values) for s in backend.local.scopes.values()) == 100_000
    return {
        "store": store_size,
        "flat_dict": flat_size,
        "nested_dicts": nested_size,
        "load_ms": int((time.perf_counter() - start) * 1000),
    }


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
