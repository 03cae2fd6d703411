"""What each process counts for a fleet operator: broadcasts by outcome and their lag, reads
that left the local cache by the layer that answered, fallbacks. Recorded with prometheus_client
in its multiprocess mode once ``enable()`` ran in the process (a worker does it when
OPTIONS_METRICS_PORT is set); until then every call is a no-op and prometheus_client is not even
imported.

Local hits are not counted: a counter on that path would add ~15% to a ~150 ns read. Misses and
round trips are counted, and a hit is every read that is neither.

Write tasks a worker refused before running them are counted apart, in plain memory
(``refusals``): the refusal happens in a prefork worker's main process, which forks children
and so must never hold prometheus_client's lock; its metrics endpoint serves the count.
"""

from __future__ import annotations

import collections
import os
from typing import Any

# Commit to applied, in seconds: loopback propagation is ~1-10 ms; past a second is an outage.
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


class Metrics:
    """This process's counters; no-ops until ``enable``."""

    def __init__(self) -> None:
        self.enabled = False
        self._broadcasts: Any = None
        self._lag: Any = None
        self._last_lag: Any = None
        self._reads: Any = None
        self._fallbacks: Any = None
        # Write tasks refused unread, by reason (tasks/admission.py); always counted.
        self.refusals: collections.Counter[str] = collections.Counter()

    def enable(self) -> None:
        """Create the metrics in this process. ``PROMETHEUS_MULTIPROC_DIR`` must be set first:
        prometheus_client picks its storage when it is imported."""
        if self.enabled:
            return
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            raise RuntimeError("metrics need PROMETHEUS_MULTIPROC_DIR (see worker/metrics.py)")
        from prometheus_client import Counter, Gauge, Histogram

        self._broadcasts = Counter(
            "optionstore_broadcasts",
            "Reload messages received, by what applying them did (malformed and unverified: "
            "dropped unread)",
            ["outcome"],
        )
        self._lag = Histogram(
            "optionstore_broadcast_lag_seconds",
            "From a change's commit to this process applying it",
            buckets=LAG_BUCKETS,
        )
        self._last_lag = Gauge(
            "optionstore_applied_lag_seconds",
            "Lag of the last change each live process applied (one series per pid)",
            multiprocess_mode="liveall",
        )
        self._reads = Counter(
            "optionstore_cache_misses",
            "Reads that left the local cache, by the layer that answered",
            ["layer"],
        )
        self._fallbacks = Counter(
            "optionstore_fallbacks",
            "Reads that fell back because a service failed, by the service",
            ["layer"],
        )
        self.enabled = True

    def broadcast(self, outcome: str, lag_s: float | None = None) -> None:
        if not self.enabled:
            return
        self._broadcasts.labels(outcome).inc()
        if lag_s is not None:
            self._lag.observe(lag_s)
            self._last_lag.set(lag_s)

    def refused(self, reason: str) -> None:
        self.refusals[reason] += 1

    def miss(self, layer: str, count: int = 1) -> None:
        if self.enabled:
            self._reads.labels(layer).inc(count)

    def fallback(self, layer: str) -> None:
        if self.enabled:
            self._fallbacks.labels(layer).inc()
