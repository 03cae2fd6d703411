"""The host relay's frames: what a worker's main process and its children say to each other over
the relay's Unix socket (store/broadcast/relay.py, store/broadcast/relayed.py).

A frame is one kind byte, a 4-byte big-endian length and that many bytes. Main → child:
``MESSAGE`` (a reload message as the codec encodes it), ``SYNCED`` (every later message reaches
you), ``DEAF`` (the main process lost the exchange: cache nothing), ``ALIVE`` (nothing else to
say), ``CLOSING`` (the worker is stopping: cache nothing from now on, and do not fall back),
``ROLLOUTS`` (the leader's copy of the active canary rollouts as the main process read it from
Redis just now, empty when there is none; store/rollouts/overlay.py).
Child → main: ``HELLO`` (answer SYNCED or DEAF after everything queued before it) and
``REPORT`` (what the child has applied, JSON).
"""

from __future__ import annotations

import socket
import struct

MESSAGE = b"m"
SYNCED = b"s"
DEAF = b"d"
ALIVE = b"k"
CLOSING = b"c"
ROLLOUTS = b"o"
HELLO = b"h"
REPORT = b"r"
KINDS = frozenset({MESSAGE, SYNCED, DEAF, ALIVE, CLOSING, ROLLOUTS, HELLO, REPORT})

_HEADER = struct.Struct(">cI")


class BadFrame(ValueError):
    """A frame of an unknown kind, or longer than the reader accepts."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


class FrameReader:
    """Frames out of a stream, read as they come; bounded: a frame over ``max_bytes`` ends it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    def feed(self, sock: socket.socket) -> list[tuple[bytes, bytes]]:
        """Read what ``sock`` has (it is readable) and yield each whole frame; EOFError when
        the other end closed it."""
        data = sock.recv(1 << 18)
        if not data:
            raise EOFError("the other end closed the relay's socket")
        self._buffer += data
        return self._frames()

    def _frames(self) -> list[tuple[bytes, bytes]]:
        buffer = self._buffer
        offset = 0
        frames = []
        while len(buffer) - offset >= _HEADER.size:
            kind, length = _HEADER.unpack_from(buffer, offset)
            if kind not in KINDS:
                raise BadFrame(f"relay frame of unknown kind {kind!r}")
            if length > self.max_bytes:
                raise BadFrame(f"relay frame of {length} bytes, more than {self.max_bytes}")
            end = offset + _HEADER.size + length
            if len(buffer) < end:
                break
            frames.append((kind, bytes(buffer[offset + _HEADER.size : end])))
            offset = end
        del buffer[:offset]
        return frames
