"""The worker's heartbeat on the reload exchange: silence past the deadline desyncs a process,
and the revision marks it carries make a process drop what it missed."""

from __future__ import annotations

from store.broadcast.publisher import Publisher
from store.events import log
from worker.duties.reconcile import Reconciler


class Heartbeat:
    """Publishes one heartbeat each time ``beat`` is called (every second, from the worker's
    main process), so a consumer that hears nothing knows its subscription is broken. Each
    carries the latest announced revision of recently changed scopes (the reconciler's marks):
    a process holding an older state missed a broadcast and drops it."""

    def __init__(self, *, publisher: Publisher, reconciler: Reconciler, origin: str) -> None:
        self.publisher = publisher
        self.reconciler = reconciler
        self.origin = origin

    def beat(self) -> None:
        try:
            self.publisher.publish(self.reconciler.heartbeat(origin=self.origin))
        except Exception as exc:  # the broker may be down; consumers notice the silence
            log.warning("heartbeat.failed", error=f"{type(exc).__name__}: {exc}")
