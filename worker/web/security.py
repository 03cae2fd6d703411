"""The console's sessions (signed cookies carrying the user and a CSRF token), the CSRF check,
the sign-in rate limit, and the secret the cookies are signed with."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from store.embedded import secret_file

SECRET_FILE = "web-secret"  # noqa: S105 (the file's name, not its content)
SESSION_COOKIE = "optionstore_session"
# A session lasts this long after sign-in, then the user signs in again.
SESSION_SECONDS = 12 * 3600
MAX_COOKIE_CHARS = 4096


def ensure_secret(state_dir: Path) -> str:
    """The state folder's cookie secret, made on first use (``store.embedded.secret_file``)."""
    path = state_dir / SECRET_FILE
    secret = secret_file(path)
    if len(secret) < 32:
        raise ValueError(f"{path} holds no usable secret: remove it, and the next start makes one")
    return secret


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    csrf: str
    expires: float
    stamp: str = ""  # the user's password stamp when they signed in (users.User.stamp)


class SessionSigner:
    """Session cookies: ``<base64 JSON>.<hex HMAC-SHA256>``; a cookie whose signature, shape or
    expiry is wrong reads as no session."""

    def __init__(self, secret: str, *, max_age: float = SESSION_SECONDS) -> None:
        self._key = hashlib.sha256(b"optionstore-web-session:" + secret.encode()).digest()
        self.max_age = max_age

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def new(self, user: str, stamp: str = "") -> tuple[Session, str]:
        session = Session(user, secrets.token_urlsafe(32), time.time() + self.max_age, stamp)
        body = json.dumps(
            {"u": session.user, "c": session.csrf, "e": session.expires, "s": session.stamp}
        )
        # Without padding: a cookie value with "=" in it would be sent quoted.
        payload = base64.urlsafe_b64encode(body.encode()).rstrip(b"=")
        return session, f"{payload.decode()}.{self._sign(payload)}"

    def read(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > MAX_COOKIE_CHARS or "." not in cookie:
            return None
        payload, _, signature = cookie.rpartition(".")
        # compare_digest refuses a str that is not ASCII: bytes compare any cookie's.
        if not hmac.compare_digest(
            self._sign(payload.encode()).encode(), signature.encode(errors="replace")
        ):
            return None
        try:
            data = json.loads(
                base64.urlsafe_b64decode(payload.encode() + b"=" * (-len(payload) % 4))
            )
            session = Session(
                str(data["u"]), str(data["c"]), float(data["e"]), str(data.get("s", ""))
            )
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None


def csrf_matches(session: Session | None, token: object) -> bool:
    """Whether a form's token is its session's: every state-changing request must carry it."""
    return (
        session is not None
        and isinstance(token, str)
        and hmac.compare_digest(session.csrf.encode(), token.encode())
    )


class RateLimit:
    """At most ``limit`` attempts per ``window`` seconds for each key (a user name, an address);
    memory bounded by ``max_keys``. A key is forgotten only once its attempts left the window:
    when ``max_keys`` keys all have recent attempts, a new key is refused (counted as limited),
    so that spraying names cannot reset another name's count."""

    def __init__(self, *, limit: int, window: float, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._attempts: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, *, now: float | None = None) -> bool:
        """Count one attempt for ``key``; False (and not counted) when it is over the limit."""
        now = time.monotonic() if now is None else now
        with self._lock:
            attempts = self._attempts.get(key)
            if attempts is None:
                if len(self._attempts) >= self.max_keys:
                    self._forget_expired(now)
                if len(self._attempts) >= self.max_keys:
                    return False
                attempts = self._attempts[key] = deque()
            while attempts and attempts[0] <= now - self.window:
                attempts.popleft()
            allowed = len(attempts) < self.limit
            if allowed:
                attempts.append(now)
            return allowed

    def _forget_expired(self, now: float) -> None:
        """Drops every key whose attempts all left the window (one pass: O(max_keys), run only
        when full)."""
        expired = [k for k, a in self._attempts.items() if not a or a[-1] <= now - self.window]
        for k in expired:
            del self._attempts[k]

    def reset(self, key: str) -> None:
        with self._lock:
            self._attempts.pop(key, None)


class StreamSlots:
    """At most ``limit`` open event streams per key (a session): ``take`` one before a stream
    starts (False when all are in use), ``give_back`` it when the stream ends."""

    def __init__(self, *, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        with self._lock:
            count = self._open.get(key, 0)
            if count >= self.limit:
                return False
            self._open[key] = count + 1
            return True

    def give_back(self, key: str) -> None:
        with self._lock:
            count = self._open.get(key, 0) - 1
            if count > 0:
                self._open[key] = count
            else:
                self._open.pop(key, None)

    def open(self, key: str) -> int:
        with self._lock:
            return self._open.get(key, 0)
