"""Retention: announced write records and superseded history entries deleted past their age."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from store.events import log
from store.postgres.store import PostgresStore


@dataclass(kw_only=True)
class Retention:
    """Each call to ``run_once`` prunes, at most every ``every`` seconds, in batches of
    ``batch`` rows (short statements, no long lock), at most ``max_batches`` of each kind:

    - ``options_write`` rows (the outbox and the task-id record) committed more than
      ``write_age`` seconds ago and announced. An unannounced row is never deleted. A
      task redelivered after its record is gone would commit again, so ``write_age`` must
      stay far longer than any redelivery window (visibility timeout, retry backoff).
    - ``options_history`` entries older than ``history_age`` seconds that a newer entry of
      the same key supersedes: the latest change of every key is kept however old.

    When a round leaves work behind (every batch was full) the next call goes on at once.
    """

    postgres: PostgresStore
    write_age: float
    history_age: float
    every: float = 60.0
    batch: int = 1000
    max_batches: int = 10
    _next: float = field(default=0.0, init=False)
    _history_after: int = field(default=0, init=False)

    def run_once(self) -> tuple[int, int]:
        """One round, if one is due; returns (write records, history entries) deleted."""
        now = time.monotonic()
        if now < self._next:
            return 0, 0
        self._next = now + self.every
        writes = history = 0
        try:
            for _ in range(self.max_batches):
                deleted = self.postgres.prune_writes(older_than=self.write_age, limit=self.batch)
                writes += deleted
                if deleted < self.batch:
                    break
            else:
                self._next = now  # more to do: go on at the next call
            for _ in range(self.max_batches):
                deleted, self._history_after = self.postgres.prune_history(
                    older_than=self.history_age, after=self._history_after, scan=self.batch
                )
                history += deleted
                if self._history_after == 0:
                    break
            else:
                self._next = now
        except Exception as exc:  # PostgreSQL may be down; the next round tries again
            log.warning("retention.failed", error=f"{type(exc).__name__}: {exc}")
        if writes or history:
            log.info("retention.pruned", writes=writes, history=history)
        return writes, history
