"""``HostRelay``: a prefork worker's main process hands the reload exchange to its children over a
Unix socket of its own, and writes one report for all of them.

The main process holds the one subscription (its ``ReloadConsumer``, which calls ``forward``,
``synced`` and ``deaf`` in the order it hears things); every child connects to the relay's
socket after its fork (store/broadcast/relayed.py). Each frame goes into every child's stream
in that one order, so a child hears what its parent heard, in order, or loses the stream.

Trust boundary: the socket lives in a directory only this user can enter, made by the main
process before it forks (``bind`` then ``chmod`` 0700 of the directory): only processes of
the same user reach it, and those could already read the worker's memory. The main process
checks every message's bounds and signature before it forwards it; a child checks the bounds
and fields again (``decode``), not the signature. A child's pid is the one the kernel names for
its connection (``SO_PEERCRED``): a hello that claims another is refused, so no child writes a
sibling's report.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from store.broadcast.codec import ReloadMessage, encode
from store.broadcast.frames import (
    ALIVE,
    CLOSING,
    DEAF,
    HELLO,
    MESSAGE,
    REPORT,
    ROLLOUTS,
    SYNCED,
    BadFrame,
    FrameReader,
    frame,
)
from store.errors import describe
from store.events import log
from store.fork import after_fork_in_child
from store.redis.presence import CHILD_PREFIX, CHILD_REVISION_PREFIX, Presence

# Revisions a process reports; older ones fall off its report (and a child reporting through
# the relay that claims more is cut off: what it sends is untrusted).
REPORTED_SCOPES = 5000
# What a child may send in one frame: a report of up to REPORTED_SCOPES revisions.
MAX_CHILD_FRAME = 1 << 20
# Bytes queued for a child that does not read (stopped, stuck): past this it is cut off, and
# falls back to a subscription of its own when it reads again.
MAX_QUEUED = 16 << 20
# A child hears something at least this often (an ALIVE frame when nothing else went to it),
# so that it can tell a silent exchange, which its parent reports as DEAF, from a dead parent.
ALIVE_EVERY = 1.0
# Seconds between two host reports that carry changes, and between two that refresh it.
REPORT_DELAY = 0.02
REPORT_GAP = 0.25
REFRESH_EVERY = 1.0


@dataclass
class _Child:
    sock: socket.socket
    # The pid the kernel names as the one that connected (0 where it names none): the only
    # pid a child's hello may claim, so that no child writes another's report.
    peer: int = 0
    reader: FrameReader = field(default_factory=lambda: FrameReader(MAX_CHILD_FRAME))
    queued: bytearray = field(default_factory=bytearray)
    sent_at: float = field(default_factory=time.monotonic)
    pid: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)
    # Whether the relay's selector waits for this socket to take more (something is queued).
    watching_writes: bool = False


class HostRelay:
    """The relay's socket, the children connected to it, and the host's report.

    Made in the main process before the pool forks; ``start`` runs its thread (accepting
    children, reading their hellos and reports, flushing what their sockets could not take at
    once, keeping them alive, writing the host report) at once, so that a child forked while
    the worker is still starting hears from its parent within the deadline. A forked child
    closes every socket of it (``_after_fork``): a sibling's stream held open in a child would
    hide its parent's death.
    """

    def __init__(self, *, presence: Presence | None, hostname: str, pool: str) -> None:
        self.presence = presence
        self.hostname = hostname
        self.pool = pool
        self.pid = os.getpid()
        self._directory = tempfile.mkdtemp(prefix="optionstore-relay-")
        os.chmod(self._directory, 0o700)
        self.path = os.path.join(self._directory, "relay.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(256)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._children: dict[socket.socket, _Child] = {}
        self._subscribed = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        # The host report, written by a thread of its own: a Redis that hangs never holds
        # back what the children hear. What changed since the last one, under _report_lock
        # (the relay's thread records, the reporter takes).
        self._reporter: threading.Thread | None = None
        self._report_lock = threading.Lock()
        self._report_wake = threading.Event()
        self._dirty: set[int] = set()
        self._unreported: dict[int, dict[str, int]] = {}
        self._deleted: list[str] = []
        # Children heard from but not in a host report yet: a change (status, --wait count them).
        self._joined: set[int] = set()
        self._changed_at = 0.0
        self._reported_at = 0.0
        self._change_reported_at = 0.0
        after_fork_in_child(self._after_fork)

    # -- the consumer's side (its thread, in the order it hears things) ---------------------

    def forward(self, message: ReloadMessage) -> None:
        """Send a verified message to every child, after everything sent to it before."""
        self._send_all(frame(MESSAGE, encode(message).encode()))

    def rollouts(self, mirror: bytes) -> None:
        """Pass the active rollouts as just read (``mirror``, empty for none) to every child: it
        serves them as it would have read them itself (store/rollouts/overlay.py)."""
        self._send_all(frame(ROLLOUTS, mirror))

    def synced(self) -> None:
        """The subscription is live end to end: children that ask are told so from now on."""
        with self._lock:
            self._subscribed = True
            self._send_locked(frame(SYNCED))

    def deaf(self) -> None:
        """The subscription was lost or fell silent: every child stops caching at once."""
        with self._lock:
            self._subscribed = False
            self._send_locked(frame(DEAF))

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="optionstore-relay", daemon=True)
            self._thread.start()
            self._reporter = threading.Thread(
                target=self._report_loop, name="optionstore-host-report", daemon=True
            )
            self._reporter.start()

    def stop(self) -> None:
        """Tell every child the relay is closing (each stops caching, and does not subscribe
        for itself: the worker is stopping), close the socket and every child's stream, and
        take the host report away."""
        with self._lock:
            self._send_locked(frame(CLOSING))
        self._stopping.set()
        self._report_wake.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        for thread in (self._thread, self._reporter):
            if thread is not None:
                thread.join(timeout=5)
        with self._lock:
            for child in list(self._children.values()):
                with contextlib.suppress(OSError):
                    child.sock.close()
            self._children.clear()
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        shutil.rmtree(self._directory, ignore_errors=True)
        if self._reporter is None:
            self._remove_report()

    def _remove_report(self) -> None:
        if self.presence is not None:
            with contextlib.suppress(Exception):
                self.presence.remove(self.hostname, self.pid)

    def _after_fork(self) -> None:
        # In a forked child: none of these is its own. Closed without a lock (the parent's
        # may have been held at the fork) and without removing the directory (the parent's).
        self._stopping.set()
        self._thread = self._reporter = None
        for sock in [self._listener, self._wake_r, self._wake_w, *self._children]:
            with contextlib.suppress(OSError):
                sock.close()
        if self._selector is not None:
            with contextlib.suppress(OSError):
                self._selector.close()
            self._selector = None
        self._children = {}
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()

    # -- sending --------------------------------------------------------------------------

    def _send_all(self, data: bytes) -> None:
        with self._lock:
            self._send_locked(data)

    def _send_locked(self, data: bytes) -> None:
        blocked = False
        for child in list(self._children.values()):
            if self._queue(child, data):
                blocked = True
        if blocked:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"w")

    def _queue(self, child: _Child, data: bytes) -> bool:
        """Send at once if nothing waits before it, else queue; True if something is queued."""
        child.sent_at = time.monotonic()
        if not child.queued:
            try:
                sent = child.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                # Gone, or a stream that lost this frame: either way, it must not hear the
                # next one as if nothing were missing.
                self._cut_off(child, exc)
                return False
            if sent == len(data):
                return False
            data = data[sent:]
        child.queued += data
        if len(child.queued) > MAX_QUEUED:
            self._cut_off(child, BufferError(f"{len(child.queued)} bytes queued"))
            return False
        return True

    def _cut_off(self, child: _Child, why: BaseException) -> None:
        """End ``child``'s stream (it stops caching, and follows the exchange itself): what
        it was sent can no longer reach it whole and in order. The relay's thread then reads
        its end closed and drops it (a child that exited is only logged there)."""
        if not isinstance(why, BrokenPipeError | ConnectionResetError):
            log.warning("broadcast.relay_child_cut_off", child=child.pid, why=describe(why))
        with contextlib.suppress(OSError):
            child.sock.shutdown(socket.SHUT_RDWR)
        child.queued.clear()

    def _flush(self, child: _Child) -> None:
        with self._lock:
            if not child.queued:
                return
            try:
                sent = child.sock.send(child.queued)
            except BlockingIOError:
                return
            except OSError as exc:
                self._cut_off(child, exc)
                return
            del child.queued[:sent]

    # -- the relay's thread ---------------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                self._watch(selector)
                for key, events in selector.select(timeout=self._timeout()):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept(selector)
                    elif sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        child = self._children.get(sock)  # type: ignore[call-overload]
                        if child is None:
                            continue
                        if events & selectors.EVENT_WRITE:
                            self._flush(child)
                        if events & selectors.EVENT_READ:
                            self._read(selector, child)
                self._keep_alive()
        except Exception as exc:  # the children notice the silence and fall back
            log.error("broadcast.relay_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            selector.close()

    def _watch(self, selector: selectors.BaseSelector) -> None:
        with self._lock:
            for sock, child in self._children.items():
                if bool(child.queued) != child.watching_writes:
                    child.watching_writes = bool(child.queued)
                    events = selectors.EVENT_WRITE if child.watching_writes else 0
                    selector.modify(sock, selectors.EVENT_READ | events)

    def _timeout(self) -> float:
        # Until the next child is due an ALIVE frame, at most.
        with self._lock:
            sent = min((c.sent_at for c in self._children.values()), default=time.monotonic())
        return min(0.25, max(0.0, sent + ALIVE_EVERY - time.monotonic()))

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        with self._lock:
            self._children[sock] = _Child(sock, peer=_peer_pid(sock))
        selector.register(sock, selectors.EVENT_READ)

    def _read(self, selector: selectors.BaseSelector, child: _Child) -> None:
        try:
            frames = child.reader.feed(child.sock)
        except (OSError, EOFError, BadFrame) as exc:
            self._drop(selector, child, exc)
            return
        for kind, payload in frames:
            if kind == HELLO:
                if not self._hello(child, payload):
                    self._drop(selector, child, BadFrame("a hello naming another process"))
                    return
            elif kind == REPORT:
                self._child_report(child, payload)

    def _hello(self, child: _Child, payload: bytes) -> bool:
        """Answer a child's hello; False if it claims a pid other than the one that connected."""
        pid = _pid(payload)
        if child.peer and pid != child.peer:
            log.warning("broadcast.relay_bad_hello", claimed=pid, peer=child.peer)
            return False
        # Answered in the stream: everything forwarded after this reaches the child.
        with self._lock:
            if pid and not child.pid:
                child.pid = pid
            self._queue(child, frame(SYNCED if self._subscribed else DEAF))
        return True

    def _child_report(self, child: _Child, payload: bytes) -> None:
        try:
            body = orjson.loads(payload)
            fields = dict(body["fields"])
            revisions = {str(s): int(r) for s, r in body["revisions"].items()}
            forgotten = [str(s) for s in body["forgotten"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("broadcast.relay_bad_report", child=child.pid, error=str(exc))
            return
        if not child.pid:
            return
        kept = (set(child.revisions) | set(revisions)) - set(forgotten)
        if len(kept) > REPORTED_SCOPES:
            # More than a process keeps: written nowhere; the child reports for itself.
            log.warning("broadcast.relay_bad_report", child=child.pid, scopes=len(kept))
            with contextlib.suppress(OSError):
                child.sock.shutdown(socket.SHUT_RDWR)
            return
        with self._report_lock:
            if not child.fields:  # its first report
                self._joined.add(child.pid)
            child.fields = fields
            child.revisions.update(revisions)
            for scope in forgotten:
                child.revisions.pop(scope, None)
                self._deleted.append(f"{CHILD_REVISION_PREFIX}{child.pid}:{scope}")
            if not self._dirty and not self._unreported:
                self._changed_at = time.monotonic()
            self._dirty.add(child.pid)
            if revisions:
                self._unreported.setdefault(child.pid, {}).update(revisions)
        self._report_wake.set()

    def _drop(self, selector: selectors.BaseSelector, child: _Child, why: BaseException) -> None:
        with contextlib.suppress(Exception):
            selector.unregister(child.sock)
        with self._lock:
            self._children.pop(child.sock, None)
        with contextlib.suppress(OSError):
            child.sock.close()
        if child.pid:
            log.info("broadcast.relay_child_left", child=child.pid, why=str(why))
            with self._report_lock:
                self._dirty.discard(child.pid)
                self._joined.discard(child.pid)
                self._unreported.pop(child.pid, None)
                self._deleted.append(f"{CHILD_PREFIX}{child.pid}")
                self._deleted += [
                    f"{CHILD_REVISION_PREFIX}{child.pid}:{scope}" for scope in child.revisions
                ]
                self._changed_at = time.monotonic()
            self._report_wake.set()

    def _keep_alive(self) -> None:
        now = time.monotonic()
        with self._lock:
            quiet = [c for c in self._children.values() if now - c.sent_at >= ALIVE_EVERY]
            for child in quiet:
                self._queue(child, frame(ALIVE))

    # -- the host report (its own thread) ---------------------------------------------------

    def _report_loop(self) -> None:
        while not self._stopping.is_set():
            self._report_wake.wait(self._report_timeout())
            self._report_wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._report()
            except Exception as exc:  # never the end of the reports: the next one is a second away
                log.warning("presence.report_failed", error=describe(exc))
        # Taken away by the thread that writes it, after its last report: a report still on
        # its way when the relay stops cannot bring the hash back after it was removed.
        self._remove_report()

    def _report_timeout(self) -> float:
        # Until the next report falls due: soon after a change, else the next refresh.
        with self._report_lock:
            if self._unreported or self._deleted or self._joined:
                due = max(self._changed_at + REPORT_DELAY, self._change_reported_at + REPORT_GAP)
            else:
                due = self._reported_at + REFRESH_EVERY
        return min(REFRESH_EVERY, max(0.0, due - time.monotonic()))

    def _report(self) -> None:
        now = time.monotonic()
        with self._report_lock:
            if self.presence is None:
                # No Redis to report to: nothing is kept for a report that never comes (it
                # would grow).
                self._dirty.clear()
                self._joined.clear()
                self._unreported.clear()
                self._deleted.clear()
                self._reported_at = now
                return
            changed = bool(self._unreported or self._deleted or self._joined)
            due = changed and now >= max(
                self._changed_at + REPORT_DELAY, self._change_reported_at + REPORT_GAP
            )
            if not (due or now - self._reported_at >= REFRESH_EVERY):
                return
            with self._lock:
                children = {c.pid: c for c in self._children.values() if c.pid and c.fields}
            if not children and not changed:
                self._reported_at = now  # nothing to say (and no connection opened before a fork)
                return
            dirty = {pid: dict(children[pid].fields) for pid in self._dirty if pid in children}
            unreported = {pid: r for pid, r in self._unreported.items() if pid in children}
            deleted, self._deleted = self._deleted, []
            joined, self._joined = self._joined, set()
            self._dirty, self._unreported = set(), {}
            self._reported_at = now
            if changed:
                self._change_reported_at = now
        # Outside the lock: the relay's thread records what children send meanwhile.
        try:
            recreated = self.presence.report_host(
                hostname=self.hostname,
                pid=self.pid,
                children=dirty,
                revisions=unreported,
                deleted=deleted,
            )
            if recreated and children:
                # Redis lost the hash (a restart, a failover), or this is the first report:
                # send every child's whole state (copied only then: it may be large).
                with self._report_lock:
                    fields = {pid: dict(c.fields) for pid, c in children.items()}
                    revisions = {pid: dict(c.revisions) for pid, c in children.items()}
                self.presence.report_host(
                    hostname=self.hostname, pid=self.pid, children=fields, revisions=revisions
                )
        except Exception as exc:  # best effort: the next one carries these too
            with self._report_lock:
                self._dirty |= set(dirty)
                self._joined |= joined & set(children)
                for pid, pending in unreported.items():
                    self._unreported.setdefault(pid, {}).update(pending)
                self._deleted = deleted + self._deleted
            log.warning("presence.report_failed", error=f"{type(exc).__name__}: {exc}")


_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _peer_pid(sock: socket.socket) -> int:
    """The pid of the process that connected ``sock`` as the kernel saw it (Linux), else 0."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return 0
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _PEER_CREDENTIALS.size)
    except OSError:
        return 0
    pid: int = _PEER_CREDENTIALS.unpack(raw)[0]
    return max(pid, 0)


def _pid(payload: bytes) -> int:
    try:
        pid = int(orjson.loads(payload)["pid"])
    except (ValueError, KeyError, TypeError):
        return 0
    return pid if 0 < pid < 2**31 else 0
