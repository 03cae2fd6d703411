"""The per-process reload consumer: a thread with its own broker connection, opened after fork."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import kombu

from store.broadcast.codec import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    DEFAULT_MAX_MESSAGE_BYTES,
    HEARTBEAT,
    SIGNATURE_HEADER,
    MalformedMessage,
    ReloadMessage,
    UnverifiedMessage,
    decode,
    decode_redis_envelope,
    encode,
    max_body_bytes,
    signature_headers,
)
from store.broadcast.exchange import reload_exchange, reload_queue
from store.broadcast.relay import REPORTED_SCOPES, HostRelay
from store.events import Throttled, log
from store.options_store import OptionsStore
from store.redis.presence import Presence
from store.signing.keys import Keyring
from store.transport.redis import publish_topics, subscriber

# Seconds between two reports that carry revisions: under a stream of changes a process
# reports a few times a second, not once per change (a report is a Redis write).
REPORT_GAP = 0.25
# Every process of a fleet applies a change at the same moment, so their reports would fall
# due together too, and their Redis writes would queue for the CPU behind one another and
# behind the next change. Each process waits its own share of this much longer (drawn once),
# which spreads them out.
REPORT_SPREAD = 1.0
# Seconds a subscribed consumer with nothing to report waits for a message before it checks
# for silence (a tenth of the deadline, if that is shorter) and reports it is alive (1 s).
IDLE_WAIT = 0.5


class Silence(Exception):
    """Nothing was heard from the exchange for longer than the heartbeat deadline."""


class ReloadConsumer(threading.Thread):
    """Applies reload messages to this process's caches and reports what it has applied.

    The process counts as synced only once it has received its own hello through the exchange:
    that proves the subscription is live end to end (on Redis, kombu subscribes lazily).
    Losing the connection, or hearing nothing for ``deadline`` seconds, drops the local cache
    and stops caching until the next hello comes back.

    With a ``keyring``, a message is read only if its signature checks out: anything else is
    dropped unread, counted and logged (once per interval), and does not count as heard, so a
    forged message neither changes a cache nor keeps a deaf process looking alive.
    """

    def __init__(
        self,
        *,
        backend: OptionsStore,
        connect: Callable[[], kombu.Connection],
        namespace: str,
        presence: Presence | None,
        kind: str,
        pool: str,
        deadline: float = 5.0,
        report_interval: float = 0.02,
        keyring: Keyring | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        relay: HostRelay | None = None,
    ) -> None:
        super().__init__(name="optionstore-reload", daemon=True)
        # A prefork worker's main process hands every message it hears to its children
        # (store/broadcast/relay.py), in the order it hears them.
        self.relay = relay
        self.backend = backend
        # A new broker connection each time: the app's own (its transport options and TLS).
        self.connect = connect
        self.namespace = namespace
        self.presence = presence
        self.kind = kind
        self.pool = pool
        self.deadline = deadline
        self.report_interval = report_interval
        self.keyring = keyring
        self.max_body_bytes = max_body_bytes(max_message_bytes)
        self._throttled = Throttled()
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.stopping = threading.Event()
        self.subscribed = threading.Event()
        self._hello = ""
        self._last_heard = time.monotonic()
        self._heard_at = 0.0
        self._synced_at = 0.0
        self._messages = 0
        self._revisions: OrderedDict[str, int] = OrderedDict()
        self._unreported: dict[str, int] = {}
        self._forgotten: list[str] = []
        self._last_report = 0.0
        self._last_change_report = 0.0
        self._unreported_since = 0.0
        # A fraction of the report delays this process adds to them (REPORT_SPREAD); the
        # random module is reseeded in every forked child.
        self._spread = 1.0 + REPORT_SPREAD * random.random()  # noqa: S311  # not a secret
        # Its kind, pool and mode: sent when the report's hash may be new, not every time.
        self._introduced = False

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        self.backend.local.desync()
        backoff = 0.05
        while not self.stopping.is_set():
            try:
                self._consume()
                backoff = 0.05
            except Exception as exc:  # any failure: deafen, then reconnect with backoff
                self.backend.local.desync()
                self.subscribed.clear()
                if self.relay is not None:
                    self.relay.deaf()
                log.warning("broadcast.lost", error=f"{type(exc).__name__}: {exc}", pid=self.pid)
                self._report(force=True)
                self._follow_rollouts()
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def stop(self) -> None:
        self.stopping.set()

    def check_heard(self) -> None:
        """Called before a task runs: if this process has heard nothing for longer than the
        deadline (it was paused, and this thread may run before the consumer's), serve nothing
        cached until the consumer's hello comes back."""
        if self.subscribed.is_set() and time.monotonic() - self._last_heard > self.deadline:
            self._deafened("silent before a task")

    def _deafened(self, why: str) -> None:
        self.backend.local.desync()
        # Heard again only once a new hello comes back, after whatever is queued before it.
        self.subscribed.clear()
        if self.relay is not None:
            self.relay.deaf()
        log.warning("broadcast.deafened", why=why, pid=self.pid)

    def _consume(self) -> None:
        self._hello = uuid.uuid4().hex
        with self.connect() as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.default_channel
            topics = publish_topics(channel, reload_exchange(self.namespace).name)
            if topics:
                self._consume_pubsub(conn, channel, topics)
                return
            queue = reload_queue(self.namespace, f"{self.hostname}.{self.pid}.{self._hello[:8]}")
            with conn.Consumer(
                queue,
                on_message=self._on_kombu_message,  # decoded here, by the codec
                no_ack=True,
                on_decode_error=self._on_undecodable,
            ):
                self._loop(conn, lambda timeout: conn.drain_events(timeout=timeout))

    def _loop(self, conn: kombu.Connection, drain: Callable[[float], object]) -> None:
        """Hello until subscribed; ``drain`` (messages, else TimeoutError) until stopped."""
        hello_at = 0.0
        self._last_heard = time.monotonic()
        while not self.stopping.is_set():
            if not self.subscribed.is_set() and time.monotonic() - hello_at > 0.5:
                self._say_hello(conn)
                hello_at = time.monotonic()
            try:
                drain(self._drain_timeout())
            except TimeoutError:
                conn.heartbeat_check()
            silent = time.monotonic() - self._last_heard
            if silent > self.deadline:
                raise Silence(f"nothing heard for {silent:.1f}s")
            self._report()
            self._follow_rollouts()

    def _consume_pubsub(self, conn: kombu.Connection, channel: Any, topics: list[str]) -> None:
        """On a Redis broker: read the exchange's pub/sub topic straight from the channel's
        pub/sub client (TLS, Sentinel and key prefix as the app configured them), without
        kombu's consumer machinery, which costs more per message than all of ours. A fanout on
        Redis has no queue, so none is declared."""
        pubsub = subscriber(channel)
        pubsub.psubscribe(*topics)

        def drain(timeout: float) -> None:
            got = pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            if got is None:
                raise TimeoutError
            if got["type"] in ("pmessage", "message") and got["data"]:
                self._on_data(got["data"])

        try:
            self._loop(conn, drain)
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()

    def _say_hello(self, conn: kombu.Connection) -> None:
        hello = encode(ReloadMessage.heartbeat(origin=f"hello:{self._hello}"))
        exchange = reload_exchange(self.namespace)
        with conn.channel() as channel:
            kombu.Producer(channel).publish(
                hello,
                exchange=exchange,
                routing_key="",
                content_type=CONTENT_TYPE,
                content_encoding=CONTENT_ENCODING,
                headers=signature_headers(hello, self.keyring),
                delivery_mode=1,
                declare=[exchange],
            )

    # -- messages -------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        """A message read off the exchange's pub/sub topic on Redis."""
        try:
            reload = decode_redis_envelope(
                data, keyring=self.keyring, max_bytes=self.max_body_bytes
            )
        except MalformedMessage as exc:
            self._on_malformed(exc)
            return
        self._heard()
        self._on_reload(reload)

    def _on_kombu_message(self, message: kombu.Message) -> None:
        """A message kombu's consumer received (AMQP): its body, not yet decoded."""
        try:
            reload = decode(
                message.body,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                keyring=self.keyring,
                signature=(message.headers or {}).get(SIGNATURE_HEADER),
                max_bytes=self.max_body_bytes,
            )
        except MalformedMessage as exc:
            self._on_malformed(exc)
            return
        self._heard()
        self._on_reload(reload)

    def _heard(self) -> None:
        now = time.monotonic()
        if now - self._last_heard > self.deadline:
            # The loop raises Silence before a gap this long, so this process was paused
            # (SIGSTOP, a debugger) while changes may have gone by: what is queued behind this
            # message is not proof of having heard them all.
            self._deafened("paused")
        self._last_heard = now
        self._heard_at = time.time()

    def _on_malformed(self, exc: MalformedMessage) -> None:
        if isinstance(exc, UnverifiedMessage):
            # Not heard: a forged message must not stand in for the heartbeat.
            self.backend.metrics.broadcast("unverified")
            self._throttled.warning(
                "broadcast.unverified", key=exc.reason, reason=exc.reason, error=str(exc)
            )
            return
        if self.keyring is None:
            # Without keys, whatever arrives proves the subscription is alive (as a verified
            # message does with them).
            self._heard()
        self.backend.metrics.broadcast("malformed")
        log.warning("broadcast.malformed", error=str(exc), **exc.context)

    def _on_reload(self, reload: ReloadMessage) -> None:
        self._messages += 1
        if self.relay is not None and self.subscribed.is_set():
            self.relay.forward(reload)  # first: the children's apply is what a change waits on
        if reload.kind == HEARTBEAT:
            if reload.origin == f"hello:{self._hello}" and not self.subscribed.is_set():
                # Our own hello came back: every later change reaches us. What was read
                # while deaf may be stale, so start from nothing.
                self.backend.local.resync()
                self._synced_at = time.time()
                self.subscribed.set()
                if self.relay is not None:
                    self.relay.synced()
                log.info("broadcast.subscribed", pid=self.pid, kind=self.kind, pool=self.pool)
                self._report(force=True)
            self.backend.apply_message(reload)  # its marks, if any
            return
        outcome = self.backend.apply_message(reload)
        if self.relay is not None:
            # The host's subscription: its children count, log and report what they apply.
            return
        self._remember(reload.scope, reload.revision)
        lag = time.time() - reload.committed_at
        self.backend.metrics.broadcast(outcome, lag)
        # Debug: at info, every change would log once in every process of the fleet.
        log.debug(
            "broadcast.applied",
            scope=reload.scope,
            revision=reload.revision,
            outcome=outcome,
            lag_ms=round(lag * 1000, 3),
        )

    def _on_undecodable(self, message: kombu.Message, exc: Exception) -> None:
        # What kombu could not open (a body it failed to decompress): never applied, never
        # fatal; with keys, never verified either.
        if self.keyring is not None:
            self._on_malformed(UnverifiedMessage("unverifiable", "kombu could not open the body"))
            return
        self._heard()
        self.backend.metrics.broadcast("malformed")
        log.warning(
            "broadcast.malformed",
            error=f"undecodable body ({type(exc).__name__}: {exc})",
            content_type=getattr(message, "content_type", None),
        )

    def _remember(self, scope: str, revision: int) -> None:
        if self._revisions.get(scope, 0) >= revision:
            return
        self._revisions[scope] = revision
        self._revisions.move_to_end(scope)
        if not self._unreported:
            self._unreported_since = time.monotonic()
        self._unreported[scope] = revision
        while len(self._revisions) > REPORTED_SCOPES:
            old, _ = self._revisions.popitem(last=False)
            self._unreported.pop(old, None)
            self._forgotten.append(old)

    # -- reports --------------------------------------------------------------

    def _report_due_at(self) -> float:
        # report_interval after the first unreported change, and REPORT_GAP after the last
        # report that carried changes: one change alone is reported at once, a stream in
        # batches.
        return max(
            self._unreported_since + self.report_interval * self._spread,
            self._last_change_report + REPORT_GAP * self._spread,
        )

    def _drain_timeout(self) -> float:
        if self._unreported:
            return min(0.1, max(0.0, self._report_due_at() - time.monotonic()))
        if not self.subscribed.is_set():
            return 0.1  # the hello goes out again every 0.5 s until it comes back
        # Idle and subscribed: wake for the silence check and the liveness report only. Every
        # wake-up of every process costs CPU that a fleet's broadcasts then wait for.
        return min(IDLE_WAIT, self.deadline / 10)

    def _report(self, *, force: bool = False) -> None:
        if self.presence is None:
            return
        due = self._due_report(force=force)
        if due is None:
            return
        revisions, forgotten = due
        try:
            self._send_report(revisions, forgotten)
        except Exception as exc:  # a report is best effort; the next one carries these too
            self._unreported = {**revisions, **self._unreported}
            self._forgotten = forgotten + self._forgotten
            log.warning("presence.report_failed", error=f"{type(exc).__name__}: {exc}")

    def _due_report(self, *, force: bool) -> tuple[dict[str, int], list[str]] | None:
        """What the report due now carries (revisions, forgotten scopes), taken off the
        unreported ones and counted as sent; None if no report is due."""
        now = time.monotonic()
        # Reported a little after the first unreported change, not at once: the report is a
        # Redis write, and the processes still applying the same message share the CPU.
        due = self._unreported and now >= self._report_due_at()
        if not (force or due or now - self._last_report >= self._spread):
            return None
        revisions, self._unreported = self._unreported, {}
        if revisions:
            self._last_change_report = now
        forgotten, self._forgotten = self._forgotten, []
        self._last_report = now
        return revisions, forgotten

    def _follow_rollouts(self) -> None:
        """The active rollouts, at most once a second (store/rollouts/overlay.py). Whatever
        goes wrong there never stops this thread: it is also what keeps the process hearing
        broadcasts (a canary value is dropped once unconfirmed for 5 s anyway)."""
        cache = self.backend.redis
        if cache is None:
            return
        try:
            mirror = self.backend.overlay.refresh(cache.client, self.namespace, self.backend.local)
            if mirror is not None and self.relay is not None:
                self.relay.rollouts(mirror)  # the children follow them through the relay
        except Exception as exc:
            self._throttled.warning("rollout.follow_failed", error=f"{type(exc).__name__}: {exc}")

    def _fields(self) -> dict[str, Any]:
        return {
            "mode": self.backend.local.mode,
            "synced": self.subscribed.is_set(),
            "synced_at": self._synced_at,
            "heard_at": self._heard_at,
            "messages": self._messages,
            # Reads this process sent past its local cache: one that keeps going to
            # PostgreSQL shows here (optionstore status --json).
            **self.backend.stats,
        }

    def _send_report(self, revisions: dict[str, int], forgotten: list[str]) -> None:
        """Write this process's report to Redis (its own hash)."""
        assert self.presence is not None
        introduction = {} if self._introduced else self._introduction()
        recreated = self.presence.report(
            hostname=self.hostname,
            pid=self.pid,
            fields={**introduction, **self._fields()},
            revisions=revisions,
            forgotten=forgotten,
        )
        if recreated and (len(self._revisions) > len(revisions) or not introduction):
            # Redis lost the hash (a restart, a failover): send what it held again.
            self.presence.report(
                hostname=self.hostname,
                pid=self.pid,
                fields=self._introduction(),
                revisions=dict(self._revisions),
            )
        self._introduced = True

    def _introduction(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "pid": self.pid, "kind": self.kind, "pool": self.pool}
