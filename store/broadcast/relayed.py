"""``RelayedConsumer``: a prefork child follows the reload exchange through its parent's relay
(store/broadcast/relay.py) and reports through it; when it loses the relay it says so once and
falls back to a subscription of its own (``ReloadConsumer``)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from typing import Any

import orjson

from store.broadcast.codec import MalformedMessage, decode
from store.broadcast.consumer import ReloadConsumer
from store.broadcast.frames import (
    CLOSING,
    DEAF,
    HELLO,
    MESSAGE,
    REPORT,
    ROLLOUTS,
    SYNCED,
    FrameReader,
    frame,
)
from store.events import log
from store.rollouts.records import MAX_MIRROR_BYTES

# Seconds a child's cache reads leave a Redis connection open after their last use: a child
# that serves from its local cache holds none.
IDLE_REDIS_SECONDS = 2.0


class RelayLost(Exception):
    """The parent's relay closed, failed, or said nothing for longer than the deadline."""


class RelayClosed(Exception):
    """The parent closed its relay on purpose: its worker is stopping."""


class RelayedConsumer(ReloadConsumer):
    """The reload consumer of a prefork child whose parent relays the exchange.

    Synced once the parent answers its hello with SYNCED (after everything the parent queued
    before it); DEAF from the parent, its own pause past the deadline, or no message of the
    exchange through the relay for the deadline (the parent alive, its consumer stuck) stops
    caching until the next SYNCED. End of stream, a bad frame or silence past the deadline
    (the parent sends something every second while it lives) means the relay is lost: it logs
    ``broadcast.relay_lost``, takes itself out of the host's report and runs a subscription of
    its own, as every process without a relay does, for the rest of its life.
    """

    def __init__(
        self, *, relay_path: str, relay_pid: int, idle_pools: list[Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        # Other redis-py pools of this process to give back when idle (a result backend's).
        self.idle_pools = idle_pools if idle_pools is not None else []
        self.relay_path = relay_path
        self.relay_pid = relay_pid
        self.relayed = True
        self._sock: socket.socket | None = None
        # The parent's last frame of any kind (its relay thread speaks each second while it
        # lives); ``_last_heard`` is the exchange's last message through it.
        self._parent_heard = time.monotonic()
        self._redis_used: tuple[int, float] = (-1, 0.0)

    def run(self) -> None:
        self.backend.local.desync()
        try:
            self._follow_relay()
        except RelayClosed:
            # The worker is stopping: the tasks still running read through Redis, uncached,
            # until this child exits; no subscription of its own for so short a life.
            self.backend.local.desync()
            self.subscribed.clear()
            log.info("broadcast.relay_closed", pid=self.pid, parent=self.relay_pid)
            # Alive until stopped: a read must not start another consumer in its place.
            self.stopping.wait()
            return
        except Exception as exc:
            if self.stopping.is_set():
                return
            self.backend.local.desync()
            self.subscribed.clear()
            log.warning(
                "broadcast.relay_lost",
                error=f"{type(exc).__name__}: {exc}",
                pid=self.pid,
                parent=self.relay_pid,
                fallback="own subscription",
            )
        finally:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.close()
        self.relayed = False
        # Its own report from now on, written whole: the host's entry goes.
        self._introduced = False
        self._unreported = dict(self._revisions)
        if self.presence is not None:
            with contextlib.suppress(Exception):
                self.presence.remove_child(self.hostname, self.relay_pid, self.pid)
        super().run()

    # -- following the relay --------------------------------------------------------------

    def _follow_relay(self) -> None:
        sock = self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        sock.connect(self.relay_path)
        sock.setblocking(False)
        reader = FrameReader(max(self.max_body_bytes, MAX_MIRROR_BYTES) + 64)
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        hello_at = 0.0
        self._last_heard = self._parent_heard = time.monotonic()
        try:
            while not self.stopping.is_set():
                if not self.subscribed.is_set() and time.monotonic() - hello_at > 0.5:
                    self._send(frame(HELLO, orjson.dumps({"pid": self.pid})))
                    hello_at = time.monotonic()
                if selector.select(timeout=self._drain_timeout()):
                    for kind, payload in reader.feed(sock):
                        self._on_frame(kind, payload)
                now = time.monotonic()
                silent = now - self._parent_heard
                if silent > self.deadline:
                    raise RelayLost(f"nothing from the parent for {silent:.1f}s")
                quiet = now - self._last_heard
                if self.subscribed.is_set() and quiet > self.deadline:
                    # The parent lives, but no message of the exchange (a heartbeat comes each
                    # second) came through it: its consumer is stuck, or lost the exchange
                    # without noticing yet. Cache nothing until it answers a hello again.
                    self._deafened(f"nothing from the exchange through the relay for {quiet:.1f}s")
                    self._last_heard = now  # deafened once for this silence, not again as a pause
                self._report()
                # Rollouts come from the parent each second; none confirmed for a while: none.
                self.backend.overlay.failsafe(self.backend.local, why="no rollouts from the relay")
                self._close_idle_redis()
        finally:
            selector.close()

    def _on_frame(self, kind: bytes, payload: bytes) -> None:
        self._parent_heard = time.monotonic()
        if kind == MESSAGE:
            try:
                # The parent checked the signature; the bounds and every field again here.
                reload = decode(payload, max_bytes=self.max_body_bytes)
            except MalformedMessage as exc:
                self._on_malformed(exc)
                return
            self._heard()
            if self.subscribed.is_set():
                self._on_reload(reload)
            return
        if kind == SYNCED:
            # The exchange is live end to end as of now (a message, not the relay's own ALIVE).
            self._last_heard = time.monotonic()
            self._heard_at = time.time()
        if kind == SYNCED and not self.subscribed.is_set():
            # Everything the parent hears from now on reaches this child; what was read
            # before may be stale, so start from nothing.
            self.backend.local.resync()
            self._synced_at = time.time()
            self.subscribed.set()
            log.info("broadcast.subscribed", pid=self.pid, kind=self.kind, pool=self.pool, relay=1)
            self._report(force=True)
        elif kind == DEAF and self.subscribed.is_set():
            self._deafened("the parent lost the exchange")
        elif kind == ROLLOUTS:
            overlay = self.backend.overlay
            cache = self.backend.redis
            try:
                overlay.follow(payload, self.backend.local)
                if cache is not None:
                    overlay.report(cache.client, self.namespace)  # only while a rollout counts
            except Exception as exc:  # never the relay's loss (the failsafe covers a lapse)
                self._throttled.warning(
                    "rollout.follow_failed", error=f"{type(exc).__name__}: {exc}"
                )
        elif kind == CLOSING:
            raise RelayClosed("the worker is stopping")
        # ALIVE: the parent lives; not a message of the exchange.

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        # Small frames on a local socket: a full buffer means a parent that does not read.
        self._sock.setblocking(True)
        self._sock.settimeout(self.deadline)
        try:
            self._sock.sendall(data)
        finally:
            self._sock.setblocking(False)

    def _report(self, *, force: bool = False) -> None:
        if not self.relayed:
            super()._report(force=force)
            return
        due = self._due_report(force=force)
        if due is None:
            return
        revisions, forgotten = due
        body = {
            "fields": {"kind": self.kind, "pool": self.pool, **self._fields()},
            "revisions": revisions,
            "forgotten": forgotten,
        }
        # A failure here is the relay's loss: the loop sees it and falls back.
        self._send(frame(REPORT, orjson.dumps(body)))

    def _close_idle_redis(self) -> None:
        """Disconnect the pooled Redis connections no read has used for a while (redis-py
        connects them again on the next use; one in use is left alone): an idle child holds
        none."""
        cache = self.backend.redis
        pools = [*([] if cache is None else [cache.client.connection_pool]), *self.idle_pools]
        if not pools:
            return
        reads = self.backend.stats.get("redis_reads", 0)
        seen, since = self._redis_used
        now = time.monotonic()
        if reads != seen:
            self._redis_used = (reads, now)
        elif now - since > IDLE_REDIS_SECONDS:
            # Every IDLE_REDIS_SECONDS while no read comes: what else used a pool meanwhile (a
            # result stored, a write) is given back too.
            for pool in pools:
                with contextlib.suppress(Exception):
                    pool.disconnect(inuse_connections=False)
            self._redis_used = (reads, now)
