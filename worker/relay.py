"""The outbox relay: announces commits whose writer died between commit and announcement."""

from __future__ import annotations

import time

import structlog

from store.layered import LayeredStore

log = structlog.get_logger("optionstore")


class OutboxRelay:
    """Each call to ``relay`` announces every commit left unannounced for ``grace`` seconds.

    A write whose process died between commit and announcement is still in the outbox
    (``options_write.announced_at IS NULL``). Re-announcing is harmless: a revision a process
    already has changes nothing.
    """

    def __init__(self, *, backend: LayeredStore, grace: float = 2.0) -> None:
        self.backend = backend
        self.grace = grace
        # Unannounced commits found at the last pass (the metrics endpoint serves it).
        self.backlog = 0

    def relay(self) -> int:
        """Announce what is overdue; returns how many commits that was."""
        try:
            pending = self.backend.db.unannounced(older_than=self.grace)
        except Exception as exc:  # PostgreSQL may be down; the outbox waits for it
            log.warning("outbox.relay_failed", error=f"{type(exc).__name__}: {exc}")
            return 0
        self.backlog = len(pending)
        for result in pending:
            self.backend.propagate(result)
            log.info(
                "outbox.relayed",
                scope=result.scope,
                revision=result.revision,
                delay_ms=round((time.time() - result.committed_at) * 1000, 3),
            )
        return len(pending)
