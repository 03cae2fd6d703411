"""The worker's main-process beacon: heartbeats on the reload exchange and the outbox relay."""

from __future__ import annotations

import threading
import time

import structlog

from store.broadcast import Publisher
from store.layered import LayeredStore
from store.reconcile import Reconciler

log = structlog.get_logger("optionstore")


class Beacon(threading.Thread):
    """Every ``interval`` seconds: a heartbeat, and a re-announcement of forgotten commits.

    A write whose process died between commit and announcement is still in the outbox
    (``options_write.announced_at IS NULL``); after ``grace`` seconds the relay announces it.
    Re-announcing is harmless: a revision a process already has changes nothing.
    """

    def __init__(
        self,
        *,
        backend: LayeredStore,
        publisher: Publisher,
        origin: str,
        interval: float = 1.0,
        grace: float = 2.0,
    ) -> None:
        super().__init__(name="optionstore-beacon", daemon=True)
        self.backend = backend
        self.publisher = publisher
        self.origin = origin
        self.interval = interval
        self.grace = grace
        self.stopping = threading.Event()
        self.reconciler = Reconciler(postgres=backend.db, cache=backend.redis)

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        try:
            self.publisher.publish(self.reconciler.heartbeat(origin=self.origin))
        except Exception as exc:  # the broker may be down; consumers notice the silence
            log.warning("beacon.heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
        try:
            self.relay()
        except Exception as exc:  # PostgreSQL may be down; the outbox waits for it
            log.warning("outbox.relay_failed", error=f"{type(exc).__name__}: {exc}")
        self.reconciler.run_once()

    def relay(self) -> int:
        """Announce every commit left unannounced for longer than the grace period."""
        pending = self.backend.db.unannounced(older_than=self.grace)
        for result in pending:
            self.backend.announce(result)
            log.info(
                "outbox.relayed",
                scope=result.scope,
                revision=result.revision,
                delay_ms=round((time.time() - result.committed_at) * 1000, 3),
            )
        return len(pending)
