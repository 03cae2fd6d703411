"""The worker host's Prometheus endpoint: what every process of a prefork worker recorded."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import pytest

from store.metrics import Metrics
from tests.conftest import Services, Worker, fresh_id, wait_for, worker_serving_metrics
from tests.test_broadcast import wait_synced


@pytest.fixture(scope="module")
def measured(services: Services) -> Iterator[tuple[Worker, int]]:
    with worker_serving_metrics(services, "metrics") as serving:
        # Every child follows the broadcasts before the test writes: one still waiting for its
        # subscription (or its relay's answer) would never count the writes' broadcasts.
        wait_synced(services, serving[0].child_pids())
        yield serving


def scrape(port: int) -> dict[str, float]:
    """Each sample of the endpoint, by its name and labels as written."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.eE+-]+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def test_endpoint_serves_every_childs_broadcasts_lag_and_misses(
    measured: tuple[Worker, int],
) -> None:
    """After writes and reads, the one endpoint shows broadcasts applied, a last-applied lag
    for each child by pid, cache misses by layer, and the relay backlog."""
    worker, port = measured
    project = fresh_id()
    for value in range(3):
        worker.call("options.set_project_option", project, "k", value)
    worker.read_everywhere("project_options", "get_value", project, "k")
    children = worker.child_pids()

    def complete() -> dict[str, float] | None:
        try:
            samples = scrape(port)
        except OSError:  # the endpoint starts with the worker's last step, maybe after a task
            return None
        lag_pids = {
            int(m.group(1))
            for name in samples
            if (m := re.match(r'optionstore_applied_lag_seconds\{pid="(\d+)"\}', name))
        }
        applied = sum(
            v for name, v in samples.items() if name.startswith("optionstore_broadcasts_total")
        )
        misses = sum(
            v for name, v in samples.items() if name.startswith("optionstore_cache_misses_total")
        )
        done = children <= lag_pids and applied >= 3 * len(children) and misses >= 1
        return samples if done else None

    samples = wait_for(complete, timeout=60, interval=0.2, message="the metrics to show the work")
    assert "optionstore_relay_backlog" in samples
    assert samples["optionstore_broadcast_lag_seconds_count"] >= 3 * len(children)


def test_metrics_do_nothing_until_enabled() -> None:
    """A process that never enabled metrics records nothing and never imports prometheus_client."""
    unused = Metrics()
    unused.broadcast("applied", 0.001)
    unused.miss("redis")
    unused.fallback("postgres")
    assert not unused.enabled
