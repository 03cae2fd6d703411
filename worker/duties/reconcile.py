"""The relay's checks against PostgreSQL: a Redis cache that went back in time is repaired,
and heartbeats carry the high-water marks that let every process notice a lost broadcast."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from store.broadcast.codec import ReloadMessage
from store.events import log
from store.postgres.store import PostgresStore
from store.redis.cache import RedisCache


@dataclass(kw_only=True)
class Reconciler:
    """Called about once a second by the relay; never raises for a service that is down.

    ``run_once`` compares the revision each scope has in Redis with PostgreSQL's and turns a
    hash that is behind into a floor (the next reader loads PostgreSQL and refills). Redis goes
    back in time when it restarts from an older RDB/AOF, when a lagging replica is promoted,
    or when keys are restored from an old ``DUMP``; the outbox row is already marked announced
    then, so nothing else would ever look again. Checked on every call: the scopes changed in
    the last ``window`` seconds, then one page of a rolling scan over every scope; after
    Redis's ``run_id`` changes (a restart, a failover) the scan goes through every scope in
    pages of ``urgent_page`` until it has seen them all.

    ``heartbeat`` builds the relay's heartbeat with its marks: the newest revision of every
    scope committed in the last ``mark_window`` seconds and announced at least ``mark_settle``
    seconds ago. A process holding an older state of one of them missed that change (its
    broadcast was lost) and drops it.
    """

    postgres: PostgresStore
    cache: RedisCache | None
    window: float = 600.0
    window_limit: int = 5000
    page: int = 200
    urgent_page: int = 5000
    # A change announced this recently may still be on its way: not judged yet.
    settle: float = 1.0
    mark_window: float = 8.0
    mark_settle: float = 1.0
    mark_limit: int = 1000
    _run_id: str | None = field(default=None, init=False)
    _cursor: str = field(default="", init=False)
    # Set until the scan has gone through every scope since Redis was (re)found.
    _urgent: bool = field(default=True, init=False)

    # -- Redis against PostgreSQL -----------------------------------------------

    def run_once(self) -> int:
        """One round of checks; returns how many cached scopes were behind and repaired."""
        if self.cache is None:
            return 0
        try:
            return self._run()
        except Exception as exc:  # Redis or PostgreSQL down: the next round tries again
            log.warning("reconcile.failed", error=f"{type(exc).__name__}: {exc}")
            return 0

    def _run(self) -> int:
        assert self.cache is not None
        run_id = self.cache.run_id()
        if run_id != self._run_id:
            if self._run_id is not None:
                log.warning("reconcile.redis_restarted", run_id=run_id)
            # A new Redis, or the first look at this one: any scope may be behind.
            self._run_id = run_id
            self._urgent = True
            self._cursor = ""
        recent, _ = self.postgres.recent_revisions(
            window=self.window, settle=self.settle, limit=self.window_limit
        )
        repaired = self._repair(recent)
        size = self.urgent_page if self._urgent else self.page
        page = self.postgres.scope_revisions(after=self._cursor, limit=size, settle=self.settle)
        repaired += self._repair(dict(page))
        if len(page) < size:
            if self._urgent:
                log.info("reconcile.scan_done", run_id=run_id)
            self._cursor, self._urgent = "", False
        else:
            self._cursor = page[-1][0]
        return repaired

    def _repair(self, committed: dict[str, int]) -> int:
        if not committed:
            return 0
        assert self.cache is not None
        scopes = list(committed)
        repaired = 0
        for start in range(0, len(scopes), 1000):
            chunk = scopes[start : start + 1000]
            for scope, cached in self.cache.revisions(chunk).items():
                revision = committed[scope]
                # Absent is fine (the next reader loads PostgreSQL); ahead is a commit newer
                # than our read of PostgreSQL.
                if cached is None or cached >= revision:
                    continue
                if self.cache.raise_floor(scope, revision):
                    repaired += 1
                    log.warning(
                        "reconcile.repaired", scope=scope, cached=cached, committed=revision
                    )
        return repaired

    # -- high-water marks ---------------------------------------------------------

    def heartbeat(self, *, origin: str) -> ReloadMessage:
        """A heartbeat with marks; without them (still a heartbeat) if PostgreSQL is down."""
        started = time.perf_counter()
        try:
            marks, complete = self.postgres.recent_revisions(
                window=self.mark_window, settle=self.mark_settle, limit=self.mark_limit
            )
        except Exception as exc:
            log.warning("reconcile.marks_failed", error=f"{type(exc).__name__}: {exc}")
            return ReloadMessage.heartbeat(origin=origin)
        if not complete:
            log.warning(
                "reconcile.marks_truncated",
                limit=self.mark_limit,
                ms=round((time.perf_counter() - started) * 1000, 3),
            )
        return ReloadMessage.heartbeat(origin=origin, marks=marks, marks_complete=complete)
