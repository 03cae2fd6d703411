"""What every page of the console stands on: the ``Console`` (settings, users, the cookie
signer, templates), its security headers, sessions and CSRF check, and the ``page`` and
``action`` wrappers; ``app.py`` assembles it with the pages of ``pages.py`` and ``live.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store.settings import Settings
from worker.web.security import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    RateLimit,
    Session,
    SessionSigner,
    StreamSlots,
    csrf_matches,
)
from worker.web.users import User, UsersFile

# A form larger than this is refused before it is parsed (a value may be up to 1 MiB of JSON,
# which URL-encoding can triple).
MAX_FORM_BYTES = 4 * 1024 * 1024
MAX_FORM_FIELDS = 20
# Sign-in attempts: per user name, and per client address.
ATTEMPTS_PER_USER = 10
ATTEMPTS_PER_ADDRESS = 30
ATTEMPT_WINDOW = 300.0
# Event streams (live panels) one session may hold open at once; more are refused (429).
STREAMS_PER_SESSION = 4
# A write's panel follows it this long (seconds), then names the processes still behind.
CONVERGENCE_DEADLINE = 60.0
MAX_CONVERGENCE_DEADLINE = 3600.0

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds the security headers to every response (pages, static files, event streams)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


class Console:
    """What every page of one console shares: settings, users, the cookie signer, the store
    (configured on first use) and the templates."""

    def __init__(
        self,
        *,
        settings: Settings,
        users: UsersFile,
        signer: SessionSigner,
        secure: bool,
        convergence_deadline: float = CONVERGENCE_DEADLINE,
    ) -> None:
        self.settings = settings
        self.convergence_deadline = convergence_deadline
        self.users = users
        self.signer = signer
        self.secure_cookies = secure
        self.per_user = RateLimit(limit=ATTEMPTS_PER_USER, window=ATTEMPT_WINDOW)
        self.per_address = RateLimit(limit=ATTEMPTS_PER_ADDRESS, window=ATTEMPT_WINDOW)
        self.streams = StreamSlots(limit=STREAMS_PER_SESSION)
        self._lock = threading.Lock()
        self._backend: Any = None
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("worker.web", "templates"),
            autoescape=True,  # every key and value is user data
            undefined=jinja2.StrictUndefined,
        )

    @property
    def backend(self) -> Any:
        """This process's store (``store.backend``). In a host that configured it already (an
        ASGI application the console is mounted into), that one, untouched; otherwise configured
        here from the console's settings, as any process outside a worker is (it follows
        broadcasts once it reads)."""
        with self._lock:
            if self._backend is None:
                import store
                from store.process import WEB, broker_connections

                if store.backend.postgres is None:
                    publish, follow = broker_connections(
                        self.settings.broker_url, master_name=self.settings.broker_master_name
                    )
                    store.runtime.configure_from(
                        self.settings, publish=publish, follow=follow, kind=WEB
                    )
                self._backend = store.backend
            return self._backend

    @property
    def registry(self) -> Any:
        import store

        self.backend  # noqa: B018 (the registry resolves from the same settings as the store)
        return store.registry

    def render(
        self, request: Request, template: str, status_code: int = 200, **context: Any
    ) -> Response:
        user: User | None = request.state.user
        session: Session | None = request.state.session
        html = self.templates.get_template(template).render(
            user=user,
            csrf=session.csrf if session else "",
            root=str(request.scope.get("root_path", "")),
            **context,
        )
        response = Response(html, status_code=status_code, media_type="text/html")
        response.headers["cache-control"] = "no-store"
        return response

    def user_of(self, session: Session) -> User | None:
        """The session's user as the users file says now: None if the session is anonymous or
        expired, the user removed, or their password changed since the session signed in."""
        if not session.user or session.expires <= time.time():
            return None
        user = self.users.get(session.user)
        return user if user is not None and user.stamp == session.stamp else None

    def fragment(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(**context)

    def set_session(self, response: Response, user: User | None) -> Session:
        session, cookie = self.signer.new(*((user.name, user.stamp) if user else ("", "")))
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            max_age=int(SESSION_SECONDS),
            httponly=True,
            samesite="strict",
            secure=self.secure_cookies,
            path="/",
        )
        return session


def to(request: Request, path: str) -> str:
    """``path`` of this console, under the prefix it is mounted at (if any)."""
    return str(request.scope.get("root_path", "")) + path


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


@dataclass(frozen=True, slots=True)
class Upload:
    """A file sent in a multipart form: the name the browser gave it, and its bytes."""

    filename: str
    data: bytes


async def read_form(request: Request) -> tuple[dict[str, str], dict[str, Upload]]:
    """The form of a POST (urlencoded, or multipart with at most one file), bounded in bytes
    and fields, and its uploaded files; a field given twice keeps its first value."""
    declared = request.headers.get("content-length", "0")
    if not (declared.isascii() and declared.isdecimal()) or int(declared) > MAX_FORM_BYTES:
        raise FormTooLarge(_TOO_LARGE)  # refused before a byte of it is read
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormTooLarge(_TOO_LARGE)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _multipart(request, bytes(body))
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise FormTooLarge(f"not UTF-8, or more than {MAX_FORM_FIELDS} fields") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form, {}


async def _multipart(request: Request, body: bytes) -> tuple[dict[str, str], dict[str, Upload]]:
    """A multipart body already read (and bounded) whole, parsed by Starlette's parser."""

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        parsed = await Request(request.scope, replay).form(
            max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_BYTES
        )
    except (MultiPartException, UnicodeDecodeError) as exc:
        raise FormTooLarge(f"not a form this console reads: {exc}") from None
    form: dict[str, str] = {}
    uploads: dict[str, Upload] = {}
    try:
        for name, value in parsed.multi_items():
            if isinstance(value, str):
                form.setdefault(name, value)
            elif name not in uploads:
                uploads[name] = Upload(value.filename or "", await value.read())
    finally:
        await parsed.close()
    return form, uploads


_TOO_LARGE = f"larger than {MAX_FORM_BYTES // (1024 * 1024)} MiB"


class FormTooLarge(Exception):
    """A form past MAX_FORM_BYTES or MAX_FORM_FIELDS, not UTF-8, or not a form at all."""


Handler = Callable[[Request], Awaitable[Response]]


def page(handler: Handler) -> Handler:
    """A page for a signed-in user (any role); others are sent to sign in."""

    async def wrapped(request: Request) -> Response:
        if request.state.user is None:
            return RedirectResponse(to(request, "/login"), status_code=303)
        return await handler(request)

    wrapped.__name__ = handler.__name__
    return wrapped


def action(*, write: bool) -> Callable[[Handler], Handler]:
    """A state-changing POST: a signed-in user (an editor when it ``write``s), and the form's
    CSRF token matching the session's. The parsed form is ``request.state.form``, its files
    ``request.state.uploads``."""

    def decorate(handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                form, uploads = await read_form(request)
            except FormTooLarge as exc:
                return PlainTextResponse(f"form refused: {exc}", status_code=413)
            if not csrf_matches(request.state.session, form.get("csrf")):
                return PlainTextResponse("missing or wrong CSRF token", status_code=403)
            user: User | None = request.state.user
            if user is None:
                return PlainTextResponse("sign in first", status_code=401)
            if write and not user.can_write:
                return PlainTextResponse(f"{user.role}s cannot write", status_code=403)
            request.state.form = form
            request.state.uploads = uploads
            return await handler(request)

        wrapped.__name__ = handler.__name__
        return wrapped

    return decorate


class Sessions:
    """Reads the session cookie into ``request.state.session`` and the user (as the users file
    says now: a removed user is signed out) into ``request.state.user``; a request without a
    session is given one (anonymous, with a CSRF token for the sign-in form)."""

    def __init__(self, app: ASGIApp, console: Console) -> None:
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        session = self.console.signer.read(request.cookies.get(SESSION_COOKIE))
        fresh: str | None = None
        if session is None:
            session, fresh = self.console.signer.new("")
        user = None
        if session.user:
            user = await run_in_threadpool(self.console.user_of, session)
        scope.setdefault("state", {})
        scope["state"]["session"] = session
        scope["state"]["user"] = user

        async def with_cookie(message: Message) -> None:
            if fresh is not None and message["type"] == "http.response.start":
                probe = Response()
                probe.set_cookie(
                    SESSION_COOKIE,
                    fresh,
                    max_age=int(SESSION_SECONDS),
                    httponly=True,
                    samesite="strict",
                    secure=self.console.secure_cookies,
                    path="/",
                )
                cookie = probe.raw_headers[-1]
                headers = list(message.get("headers", []))
                # A handler that set its own session (sign-in) keeps it.
                if not any(name == b"set-cookie" for name, _ in headers):
                    headers.append(cookie)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_cookie)
