"""The worker host's metrics endpoint: one HTTP server in a worker's main process, serving what
every process of that worker recorded (prometheus_client's multiprocess mode), plus the relay's
backlog and the write tasks the main process refused."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from store.events import log

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def prepare_directory() -> str:
    """Point prometheus_client at a directory for this worker's processes, before any of them
    imports it; children inherit the variable. A directory the operator named is emptied of a
    previous run's files, as prometheus_client requires."""
    directory = os.environ.get(MULTIPROC_DIR)
    if directory:
        for stale in Path(directory).glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        directory = tempfile.mkdtemp(prefix="optionstore-metrics-")
        os.environ[MULTIPROC_DIR] = directory
    return directory


class MetricsEndpoint:
    """``/metrics`` on ``port``: every process's counters, ``backlog()`` as a gauge and
    ``refusals()`` (write tasks refused unread, by reason) as a counter."""

    def __init__(
        self,
        *,
        port: int,
        backlog: Callable[[], int],
        refusals: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.port = port
        self.backlog = backlog
        self.refusals = refusals
        self._server: Any = None

    def start(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
        registry.register(_Backlog(self.backlog))
        registry.register(_Refusals(self.refusals))
        try:
            self._server, _ = start_http_server(self.port, addr="0.0.0.0", registry=registry)  # noqa: S104 (scraped from other hosts)
        except OSError as exc:
            # Another worker on this host serves it already: one endpoint per host is enough.
            log.warning("metrics.not_served", port=self.port, error=str(exc))
            return
        log.info("metrics.serving", port=self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class _Backlog:
    def __init__(self, backlog: Callable[[], int]) -> None:
        self.backlog = backlog

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            backlog = float(self.backlog())
        except Exception:  # PostgreSQL down: the scrape still answers
            backlog = float("nan")
        yield GaugeMetricFamily(
            "optionstore_relay_backlog",
            "Commits not yet announced (counted up to 100,000 at each scrape)",
            value=backlog,
        )


class _Refusals:
    def __init__(self, refusals: Callable[[], Mapping[str, int]]) -> None:
        self.refusals = refusals

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "optionstore_tasks_refused",
            "Write tasks refused before they ran (dead-lettered), by reason",
            labels=["reason"],
        )
        for reason, count in sorted(dict(self.refusals()).items()):
            family.add_metric([reason], count)
        yield family


def process_ended() -> None:
    """Drop this process's live gauges (a prefork child leaving)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(Exception):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
