"""The worker's heartbeat on the reload exchange: silence past the deadline desyncs a process."""

from __future__ import annotations

import structlog

from store.broadcast import Publisher, ReloadMessage

log = structlog.get_logger("optionstore")


class Heartbeat:
    """Publishes one heartbeat each time ``beat`` is called (every second, from the worker's
    main process), so a consumer that hears nothing knows its subscription is broken."""

    def __init__(self, *, publisher: Publisher, origin: str) -> None:
        self.publisher = publisher
        self.origin = origin

    def beat(self) -> None:
        try:
            self.publisher.publish(ReloadMessage.heartbeat(origin=self.origin))
        except Exception as exc:  # the broker may be down; consumers notice the silence
            log.warning("heartbeat.failed", error=f"{type(exc).__name__}: {exc}")
