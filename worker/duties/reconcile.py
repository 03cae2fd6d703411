"""The relay's checks against PostgreSQL: a Redis cache that went back in time is repaired, so
is a PostgreSQL that went back in time, and heartbeats carry the high-water marks that let
every process notice a lost broadcast."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from store.broadcast.codec import ReloadMessage
from store.events import log
from store.postgres.store import PostgresStore
from store.redis.cache import AnnouncedRecord, RedisCache


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

    PostgreSQL goes back in time too: restored from a dump, or failed over to a replica that
    lacked the last commits. Each call moves the database's clock (``options_clock``) one tick
    and keeps a copy of the tick in Redis, and holds the scopes announced in the last
    ``recent_window`` seconds against PostgreSQL's revisions. A database clock found behind
    Redis's copy (commits older than a round lost), or a recent scope behind what was
    announced of it (a replica that lagged by less), means the database went back: the whole
    record of announced revisions (``RedisCache.announced``) is then held against
    PostgreSQL's, and each scope that is behind is rebased past what was announced of it
    (``rebase``, ``OptionsStore.rebase``): every cache then reloads what PostgreSQL holds. The
    write path notices the same on the first write to such a scope.

    ``heartbeat`` builds the relay's heartbeat with its marks: the newest revision of every
    scope committed in the last ``mark_window`` seconds and announced at least ``mark_settle``
    seconds ago. A process holding an older state of one of them missed that change (its
    broadcast was lost) and drops it.
    """

    postgres: PostgresStore
    cache: RedisCache | None
    # Moves a scope past a revision already announced (OptionsStore.rebase); None: not done.
    rebase: Callable[[str, int], object] | None = None
    announced_page: int = 1000
    # Commits lost in a failover to a replica that lagged less than a round of the clock are
    # the scopes announced last: those announced within this many seconds are checked each
    # round (at most window_limit of them).
    recent_window: float = 10.0
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
        try:
            self._check_clock()
        except Exception as exc:
            # The record's keys may live on another shard of a Redis Cluster than the scopes
            # (one down, full or failing over): the scopes are checked all the same, and the
            # clock is checked again next round.
            log.warning("reconcile.clock_failed", error=f"{type(exc).__name__}: {exc}")
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

    # -- PostgreSQL against what was announced -------------------------------------

    def _check_clock(self) -> None:
        assert self.cache is not None
        record = self.cache.record(self.postgres.database_id())
        known = record.clock()
        # Read from Redis before PostgreSQL: a commit is announced after it is made, so in
        # between PostgreSQL can only have moved further ahead.
        recent = record.recent(window=self.recent_window, limit=self.window_limit)
        committed = self.postgres.revisions(list(recent)) if recent else {}
        behind = [scope for scope, rev in recent.items() if committed.get(scope, 0) < rev]
        if behind or self.postgres.clock() < known:
            # Moved on only once every scope is repaired: a round that fails here (PostgreSQL
            # or Redis down, this leader killed) leaves the clocks as they are, and the next
            # round, on whichever leader, finds the database behind again.
            log.warning(
                "reconcile.postgres_went_back", redis_clock=known, recent_behind=behind[:20]
            )
            rebased = self.rebase_behind(record)
            log.warning("reconcile.postgres_repaired", rebased=rebased)
        record.set_clock(self.postgres.advance_clock(known))

    def rebase_behind(self, record: AnnouncedRecord) -> int:
        """Rebase every scope PostgreSQL holds at a revision older than one announced of it
        (or not at all); returns how many."""
        if self.rebase is None:
            return 0
        rebased, cursor = 0, 0
        while True:
            cursor, announced = record.page(cursor=cursor, count=self.announced_page)
            committed = self.postgres.revisions(list(announced)) if announced else {}
            for scope, revision in announced.items():
                if committed.get(scope, 0) < revision:
                    self.rebase(scope, revision)
                    rebased += 1
            if cursor == 0:
                return rebased

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
