"""The outbox relay: announces commits whose writer died between commit and announcement."""

from __future__ import annotations

import time
from dataclasses import dataclass

from store.events import log
from store.options_store import OptionsStore


@dataclass(kw_only=True)
class OutboxRelay:
    """Each call to ``relay`` announces the commits left unannounced for ``grace`` seconds.

    A write whose process died between commit and announcement is still in the outbox
    (``options_write.announced_at IS NULL``). Rows are claimed ``batch`` at a time
    (``PostgresStore.claim_unannounced``): a claimed row is not due again for ``backoff``
    seconds, doubling with each attempt up to ``max_backoff``, so two relays never announce
    the same row together, and a row whose announcement keeps failing is retried less and
    less often instead of every second. One call stops after ``budget`` seconds; the rest
    waits for the next call.
    """

    backend: OptionsStore
    grace: float = 2.0
    batch: int = 100
    backoff: float = 5.0
    max_backoff: float = 300.0
    budget: float = 5.0

    def relay(self) -> int:
        """Announce what is overdue; returns how many commits were announced."""
        announced = 0
        started = time.monotonic()
        while time.monotonic() - started < self.budget:
            try:
                claimed = self.backend.db.claim_unannounced(
                    older_than=self.grace,
                    limit=self.batch,
                    backoff=self.backoff,
                    max_backoff=self.max_backoff,
                )
            except Exception as exc:  # PostgreSQL may be down; the outbox waits for it
                log.warning("outbox.relay_failed", error=f"{type(exc).__name__}: {exc}")
                break
            for result, attempt in claimed:
                which = {
                    "scope": result.scope,
                    "revision": result.revision,
                    "task_id": result.task_id,
                    "attempt": attempt,
                }
                if self.backend.propagate(result):
                    announced += 1
                    delay_ms = round((time.time() - result.committed_at) * 1000, 3)
                    log.info("outbox.relayed", **which, delay_ms=delay_ms)
                else:
                    retry_in = min(self.max_backoff, self.backoff * 2 ** min(attempt - 1, 30))
                    log.warning("outbox.retry_later", **which, in_s=retry_in)
            if len(claimed) < self.batch:
                break
        return announced
