"""``LeaderLease``: which one worker main process of a namespace does the fleet-wide duties."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import uuid
from importlib import resources
from typing import Any

from store.events import log
from store.fork import after_fork_in_child

LEADER = "leader"
FOLLOWER = "follower"
# The lease store could not be asked: every process does the duties itself, as before leases.
ALONE = "alone"


@functools.cache
def _script(name: str) -> str:
    """A Lua script beside this module (lease_claim.lua, lease_release.lua), read once."""
    return resources.files("worker.duties").joinpath(name).read_text(encoding="utf-8")


class LeaderLease:
    """A lease in Redis (``<namespace>:leader``, value: the holder's token, expiring after
    ``ttl`` seconds) that one process at a time holds.

    ``claim`` is called about once a second by every worker main process: it takes a free
    lease or extends its own, and returns ``LEADER``, ``FOLLOWER`` or, when Redis cannot be
    asked, ``ALONE`` (do the duties yourself: duplicates are harmless, silence is not).
    Redis expires the key by its own clock, so a holder that died (SIGKILL, a lost host) is
    replaced within ``ttl`` plus one claim interval. ``leading`` is true while the lease is
    surely ours (the last successful claim was *sent* less than ``ttl`` ago) or ``ALONE``.
    A forked child holds nothing: it gets a token of its own and starts as a follower.
    """

    def __init__(self, client: Any, *, namespace: str, ttl: float = 3.0) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl: must be positive, got {ttl}")
        self.client = client
        self.key = f"{namespace}:leader"
        self.ttl = ttl
        self._claim = (
            client.register_script(_script("lease_claim.lua")) if client is not None else None
        )
        self._release = (
            client.register_script(_script("lease_release.lua")) if client is not None else None
        )
        self._lock = threading.Lock()
        self._new_identity()
        after_fork_in_child(self._new_identity)

    def _new_identity(self) -> None:
        self._lock = threading.Lock()
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.state = FOLLOWER
        self._valid_until = 0.0

    def claim(self) -> str:
        """Take or extend the lease; the resulting state (logged when it changes)."""
        if self._claim is None:
            return self._become(ALONE, reason="no Redis configured")
        sent = time.monotonic()
        try:
            held = bool(self._claim(keys=[self.key], args=[self.token, int(self.ttl * 1000)]))
        except Exception as exc:  # Redis down or refusing: fall back, never go quiet
            return self._become(ALONE, reason=f"{type(exc).__name__}: {exc}")
        with self._lock:
            if held:
                self._valid_until = sent + self.ttl
        return self._become(LEADER if held else FOLLOWER)

    @property
    def leading(self) -> bool:
        with self._lock:
            if self.state == ALONE:
                return True
            return self.state == LEADER and time.monotonic() < self._valid_until

    def release(self) -> None:
        """Give the lease up (a clean stop), so a follower takes over at its next claim."""
        with self._lock:
            was = self.state
            self.state, self._valid_until = FOLLOWER, 0.0
        if was != LEADER or self._release is None:
            return
        try:
            self._release(keys=[self.key], args=[self.token])
            log.info("leader.released", lease=self.key, token=self.token)
        except Exception as exc:  # it expires on its own
            log.warning("leader.release_failed", error=f"{type(exc).__name__}: {exc}")

    def _become(self, state: str, *, reason: str = "") -> str:
        with self._lock:
            before, self.state = self.state, state
            if state != LEADER:
                self._valid_until = 0.0
        if state != before:
            if state == LEADER:
                log.info("leader.acquired", lease=self.key, token=self.token, ttl_s=self.ttl)
            elif state == ALONE:
                log.warning("leader.lease_unavailable", lease=self.key, error=reason)
            else:
                log.info("leader.follower", lease=self.key, was=before)
        return state
