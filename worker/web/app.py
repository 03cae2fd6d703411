"""``create_app``: the console as one ASGI application (Starlette), with its sign-in; the pages
are in ``pages.py`` and ``live.py``, what they stand on in ``console.py``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from store.events import log
from store.settings import Settings
from worker.web import live, pages
from worker.web.console import (
    CONVERGENCE_DEADLINE,
    MAX_CONVERGENCE_DEADLINE,
    Console,
    FormTooLarge,
    SecurityHeaders,
    Sessions,
    action,
    console_of,
    read_form,
    to,
)
from worker.web.security import SessionSigner, csrf_matches, ensure_secret
from worker.web.users import UsersFile


async def login_page(request: Request) -> Response:
    console = console_of(request)
    if request.state.user is not None:
        return RedirectResponse(to(request, "/"), status_code=303)
    return console.render(request, "login.html", error=None, name="")


async def login(request: Request) -> Response:
    console = console_of(request)
    try:
        form, _ = await read_form(request)
    except FormTooLarge as exc:
        return PlainTextResponse(f"form refused: {exc}", status_code=413)
    if not csrf_matches(request.state.session, form.get("csrf")):
        return PlainTextResponse("missing or wrong CSRF token", status_code=403)
    name = form.get("name", "")[:64]
    address = request.client.host if request.client else "-"
    if not (console.per_address.allow(address) and console.per_user.allow(name)):
        log.warning("web.sign_in_limited", user=name, address=address)
        return console.render(
            request, "login.html", 429, error="too many attempts: wait a few minutes", name=name
        )
    user = await run_in_threadpool(console.users.verify, name, form.get("password", ""))
    if user is None:
        log.info("web.sign_in_failed", user=name, address=address)
        return console.render(request, "login.html", 401, error="wrong name or password", name=name)
    console.per_user.reset(name)
    log.info("web.signed_in", user=user.name, role=user.role, address=address)
    response = RedirectResponse(to(request, "/"), status_code=303)
    console.set_session(response, user)  # a new session, a new CSRF token
    return response


@action(write=False)
async def logout(request: Request) -> Response:
    response = RedirectResponse(to(request, "/login"), status_code=303)
    console_of(request).set_session(response, None)
    return response


def create_app(
    *,
    settings: Settings | None = None,
    users_file: str | Path | None = None,
    secret: str | None = None,
    secure_cookies: bool = False,
    convergence_deadline: float = CONVERGENCE_DEADLINE,
) -> Starlette:
    """The console as an ASGI application, to serve (``optionstore web``) or to mount into your
    own ASGI application (``Mount("/options", app=create_app())``).

    ``settings`` default to the environment's (``Settings.from_environ()``); ``users_file`` to
    ``OPTIONS_WEB_USERS_FILE`` (or ``web-users.json`` in the state folder); ``secret`` (what
    session cookies are signed with) to ``OPTIONS_WEB_SECRET``, else one kept in the state
    folder. ``secure_cookies``: send the session cookie over HTTPS only (set it behind TLS).
    ``convergence_deadline``: how many seconds a write's panel follows it before it names the
    processes that have not applied it.
    Nothing is connected until the first request.
    """
    settings = settings or Settings.from_environ()
    users = UsersFile(Path(users_file) if users_file else settings.web_users_path)
    signer = SessionSigner(secret or settings.web_secret or ensure_secret(settings.state_dir))
    if not 0 < convergence_deadline <= MAX_CONVERGENCE_DEADLINE:
        raise ValueError(
            f"convergence_deadline: must be above 0 and at most {MAX_CONVERGENCE_DEADLINE:g}"
            f" seconds, got {convergence_deadline!r}"
        )
    console = Console(
        settings=settings,
        users=users,
        signer=signer,
        secure=secure_cookies,
        convergence_deadline=convergence_deadline,
    )
    static = resources.files("worker.web").joinpath("static")
    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        *pages.routes(),
        *live.routes(),
        Mount("/static", app=StaticFiles(directory=str(static)), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.console = console
    app.add_middleware(Sessions, console=console)
    app.add_middleware(SecurityHeaders)
    return app
