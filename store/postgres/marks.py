"""``AnnouncedMarks``: the outbox marks of this process's announced commits, made in bulk."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from store.errors import describe
from store.events import log
from store.fork import after_fork_in_child
from store.transient import postgres_unavailable

# Task ids one write carries into options_apply, at most.
TAKE_LIMIT = 1000


class AnnouncedMarks:
    """Task ids of commits this process announced, whose outbox rows are not marked yet.

    A mark of its own would cost every write a second round trip and a second commit. Instead
    the process's next write marks them inside its own transaction (``take`` and, if that
    write fails, ``put_back``), and when no write follows within ``linger`` seconds a thread of
    this object marks them in one transaction that does not wait for the WAL flush (``flush``).
    A mark is only ever late, never wrong: one lost with the process (a crash, a prefork child
    that exits) makes the relay announce the commit once more after its grace period, which
    changes nothing anywhere. ``linger`` is well under that grace (2 s, worker/duties/relay.py).
    """

    def __init__(self, flush: Callable[[list[str]], None], *, linger: float = 0.2) -> None:
        self._flush = flush
        self.linger = linger
        self._pending: list[str] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Whether the thread waits for a first id (only then does ``add`` wake it: a wake-up
        # per write would cost more than the mark it saves).
        self._idle = False
        after_fork_in_child(self._forget_after_fork)

    def add(self, task_id: str) -> None:
        with self._wake:
            self._pending.append(task_id)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="optionstore-marks", daemon=True
                )
                self._thread.start()
            elif self._idle:
                self._wake.notify()

    def take(self) -> list[str]:
        """Up to TAKE_LIMIT pending ids, for a write to mark; ``put_back`` if it fails."""
        with self._wake:
            taken, self._pending = self._pending[:TAKE_LIMIT], self._pending[TAKE_LIMIT:]
        return taken

    def put_back(self, task_ids: list[str]) -> None:
        if task_ids:
            with self._wake:
                self._pending[:0] = task_ids
                if self._idle:
                    self._wake.notify()

    def pending(self) -> int:
        with self._wake:
            return len(self._pending)

    def flush(self) -> None:
        """Mark everything pending now (the thread does this ``linger`` seconds after a write
        that no other write followed)."""
        while taken := self.take():
            try:
                self._flush(taken)
            except Exception:
                self.put_back(taken)
                raise

    def close(self) -> None:
        """Stop the thread and flush what is pending (best effort). A later ``add`` starts
        a new thread."""
        with self._wake:
            thread, self._thread = self._thread, None
            self._closed = True
            self._wake.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._wake:
            self._closed = False
        try:
            self.flush()
        except Exception as exc:
            log.warning("outbox.mark_failed", pending=self.pending(), error=describe(exc))

    def _run(self) -> None:
        backoff = self.linger
        while True:
            with self._wake:
                self._idle = True
                while not self._pending and not self._closed:
                    self._wake.wait()
                self._idle = False
                # Give the next writes the chance to carry these: wait out the linger.
                deadline = time.monotonic() + backoff
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._wake.wait(left)
                if self._closed:
                    return
            try:
                self.flush()
                backoff = self.linger
            except Exception as exc:
                if not postgres_unavailable(exc):
                    # Not a passing condition: leave these to the relay rather than spin.
                    self.take()
                    log.warning("outbox.mark_failed", error=describe(exc))
                    continue
                backoff = min(backoff * 2, 5.0)
                log.warning("outbox.mark_deferred", retry_in_s=backoff, error=describe(exc))

    def _forget_after_fork(self) -> None:
        # The parent marks its own; the thread did not survive the fork, nor may its lock.
        self._wake = threading.Condition()
        self._pending = []
        self._thread = None
        self._idle = False
