"""The console's pages: browse and search, a scope, edit (check, preview, apply), history and
revert. Every read is a keyset page of an index (``PostgresStore``'s ``*_page`` methods);
every write goes through ``changes.py``."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from store.errors import InvalidOption
from store.model.registry import OPTION_KINDS
from store.model.scopes import Scope
from worker.cli.status import status_report
from worker.web import changes
from worker.web.console import action, console_of, page, to

MAX_PARAM_CHARS = 200
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Where an error of each field is shown on the edit form; others go above it.
_FORM_FIELDS = {"key": "key", "scope": "key", "reason": "reason"}


def param(request: Request, name: str) -> str:
    return request.query_params.get(name, "")[:MAX_PARAM_CHARS]


def is_number(text: str) -> bool:
    """Whether ``text`` is a revision number ``int`` reads (ASCII digits only: ``"²"`` is a
    digit to ``str.isdigit`` that ``int`` refuses), below 10**18."""
    return text.isascii() and text.isdecimal() and len(text) <= 18


def scope_of(request: Request) -> Scope | Response:
    try:
        return Scope.parse(request.path_params["scope"])
    except InvalidOption as exc:
        return PlainTextResponse(str(exc), status_code=404)


def scope_url(request: Request, scope: str, tail: str = "", **query: Any) -> str:
    path = to(request, f"/scope/{quote(scope, safe=':/')}{tail}")
    found = {k: v for k, v in query.items() if v not in (None, "")}
    return path + (f"?{urlencode(found)}" if found else "")


def form_field(exc: InvalidOption) -> str:
    if exc.field == "value" or exc.field.startswith(("values", "unset")):
        return "value"
    return _FORM_FIELDS.get(exc.field, "form")


@page
async def index(request: Request) -> Response:
    console = console_of(request)
    db = console.backend.db
    prefix, key, after = param(request, "q"), param(request, "key"), param(request, "after")
    found: Any
    if key:
        after_key, newline, after_scope = after.partition("\n")
        start = (after_key, after_scope) if newline else ("", "")
        found = await run_in_threadpool(db.keys_page, prefix=key, after=start)
        kind = "keys"
    else:
        found = await run_in_threadpool(db.scopes_page, prefix=prefix, after=after)
        kind = "scopes"
    next_url = None
    if found.after is not None:
        next_url = to(request, "/?" + urlencode({"q": prefix, "key": key, "after": found.after}))
    return console.render(
        request,
        "index.html",
        kind=kind,
        rows=found.rows,
        q=prefix,
        key=key,
        next_url=next_url,
        kinds=["global", "project:", "user:", "group:", "tagkeys:"],
        scope_url=lambda s, **q: scope_url(request, s, **q),
    )


@page
async def scope_page(request: Request) -> Response:
    console = console_of(request)
    scope = scope_of(request)
    if isinstance(scope, Response):
        return scope
    db, registry = console.backend.db, console.registry
    prefix, after = param(request, "q"), param(request, "after")

    def read() -> tuple[Any, tuple[int, int], list[Any]]:
        found = db.values_page(scope.name, prefix=prefix, after=after)
        declared = [] if scope.is_tag_keys else registry.declarations()
        declared = [d for d in declared if scope.kind in d.scopes]
        return found, db.scope_size(scope.name), declared

    found, (revision, key_count), declared = await run_in_threadpool(read)
    declarations = {d.key: d for d in declared}
    shown = {row.key for row in found.rows}
    unset_declared = []
    if not after:
        set_keys = await run_in_threadpool(db.keys_set, scope.name, list(declarations))
        unset_declared = [d for d in declared if d.key not in set_keys and d.key.startswith(prefix)]
    next_url = None
    if found.after is not None:
        next_url = scope_url(request, scope.name, q=prefix, after=found.after)
    return console.render(
        request,
        "scope.html",
        scope=scope,
        revision=revision,
        key_count=key_count,
        rows=found.rows,
        shown=shown,
        declarations=declarations,
        unset_declared=unset_declared,
        q=prefix,
        next_url=next_url,
        option_scope=scope.kind in OPTION_KINDS,
        url=lambda tail="", **q: scope_url(request, scope.name, tail, **q),
    )


def _edit_context(request: Request, scope: Scope, key: str) -> dict[str, Any]:
    registry = console_of(request).registry
    declared = None if scope.is_tag_keys else registry.get(key, scope.kind) if key else None
    return {
        "scope": scope,
        "declared": declared,
        "reason_required": bool(key) and changes.reason_required(registry, scope, key),
        "url": lambda tail="", **q: scope_url(request, scope.name, tail, **q),
    }


@page
async def edit_page(request: Request) -> Response:
    console = console_of(request)
    scope = scope_of(request)
    if isinstance(scope, Response):
        return scope
    key = param(request, "key")
    current = await run_in_threadpool(console.backend.db.value_text, scope.name, key)
    context = await run_in_threadpool(_edit_context, request, scope, key)
    return console.render(
        request,
        "edit.html",
        key=key,
        value=current if current is not None else ("true" if scope.is_tag_keys else ""),
        current=current,
        reason="",
        errors={},
        planned=None,
        unset=False,
        **context,
    )


Render = Callable[[changes.PlannedWrite | None, InvalidOption | None], Awaitable[Response]]


async def preview_or_send(
    request: Request, plan: Callable[[], changes.PlannedWrite], render: Render, *, apply: bool
) -> Response:
    """The one shape of an edit, an unset and a revert: ``plan`` (in a thread) checks the write
    and says what it changes. Its InvalidOption is rendered, nothing sent; a preview, or an
    apply that changes nothing, renders the plan; an apply that changes something sends it and
    goes to its write's panel."""
    try:
        planned = await run_in_threadpool(plan)
    except InvalidOption as exc:
        return await render(None, exc)
    if not apply or not planned.changes:
        return await render(planned, None)
    task_id = await run_in_threadpool(changes.send, planned, actor=request.state.user.name)
    return RedirectResponse(to(request, f"/writes/{task_id}"), status_code=303)


async def _edit(request: Request, scope: Scope, *, apply: bool) -> Response:
    """A set (or, with ``unset=1``, an unset) of one key, as ``optionstore set``/``unset``."""
    console = console_of(request)
    form = request.state.form
    key, value, reason = form.get("key", ""), form.get("value", ""), form.get("reason", "")
    unset = form.get("unset") == "1"
    db, registry, actor = console.backend.db, console.registry, request.state.user.name
    plan: Callable[[], changes.PlannedWrite]
    if unset:
        plan = partial(
            changes.plan_unset, db, registry, scope=scope, key=key, reason=reason, actor=actor
        )
    else:
        plan = partial(
            changes.plan_set,
            db,
            registry,
            scope=scope,
            key=key,
            value_text=value,
            reason=reason,
            actor=actor,
        )

    async def render(planned: changes.PlannedWrite | None, error: InvalidOption | None) -> Response:
        context = await run_in_threadpool(_edit_context, request, scope, key)
        return console.render(
            request,
            "edit.html",
            422 if error else 200,
            key=key,
            value=value,
            current=None,
            reason=reason,
            errors={} if error is None else {form_field(error): str(error)},
            planned=planned,
            unset=unset,
            **context,
        )

    return await preview_or_send(request, plan, render, apply=apply)


@action(write=True)
async def preview(request: Request) -> Response:
    scope = scope_of(request)
    if isinstance(scope, Response):
        return scope
    return await _edit(request, scope, apply=False)


@action(write=True)
async def apply(request: Request) -> Response:
    scope = scope_of(request)
    if isinstance(scope, Response):
        return scope
    return await _edit(request, scope, apply=True)


@page
async def history_page(request: Request) -> Response:
    console = console_of(request)
    scope = scope_of(request)
    if isinstance(scope, Response):
        return scope
    key = param(request, "key") or None
    before_text = param(request, "before")
    if before_text and not is_number(before_text):
        return PlainTextResponse("before: must be a history entry's number", status_code=400)
    before = int(before_text) if before_text else None
    found = await run_in_threadpool(console.backend.db.history_page, scope.name, key, before=before)
    next_url = None
    if found.after is not None:
        next_url = scope_url(request, scope.name, "/history", key=key, before=found.after)
    return console.render(
        request,
        "history.html",
        scope=scope,
        key=key,
        entries=found.rows,
        next_url=next_url,
        url=lambda tail="", **q: scope_url(request, scope.name, tail, **q),
    )


def _revert_target(request: Request, source: dict[str, str]) -> tuple[str | None, int] | str:
    key = source.get("key", "")[:MAX_PARAM_CHARS] or None
    to_text = source.get("to", "")
    if not is_number(to_text):
        return "to: must be a revision number"
    return key, int(to_text)


async def _revert(request: Request, source: dict[str, str], *, apply: bool) -> Response:
    console = console_of(request)
    scope = scope_of(request)
    if isinstance(scope, Response):
        return scope
    target = _revert_target(request, source)
    if isinstance(target, str):
        return PlainTextResponse(target, status_code=400)
    key, revision = target
    reason = source.get("reason", "")
    plan = partial(
        changes.plan_revert,
        console.backend.db,
        console.registry,
        scope=scope,
        key=key,
        to=revision,
        reason=reason,
        actor=request.state.user.name,
    )

    async def render(planned: changes.PlannedWrite | None, error: InvalidOption | None) -> Response:
        return console.render(
            request,
            "revert.html",
            422 if error else 200,
            scope=scope,
            key=key,
            to=revision,
            reason=reason,
            error=None if error is None else str(error),
            planned=planned,
            url=lambda tail="", **q: scope_url(request, scope.name, tail, **q),
        )

    return await preview_or_send(request, plan, render, apply=apply)


@page
async def revert_page(request: Request) -> Response:
    return await _revert(request, dict(request.query_params), apply=False)


@action(write=True)
async def revert(request: Request) -> Response:
    return await _revert(request, request.state.form, apply=True)


@page
async def explain_page(request: Request) -> Response:
    from worker.cli.operate import explain

    console = console_of(request)
    scope = scope_of(request)
    if isinstance(scope, Response):
        return scope
    key = param(request, "key")
    try:
        report = await run_in_threadpool(explain, console.backend.db, console.registry, scope, key)
    except InvalidOption as exc:
        return PlainTextResponse(str(exc), status_code=400)
    return console.render(
        request,
        "explain.html",
        scope=scope,
        key=key,
        report=report,
        url=lambda tail="", **q: scope_url(request, scope.name, tail, **q),
    )


def task_ids_of(request: Request) -> list[str] | None:
    """The write task ids of a ``/writes/ID[,ID...]`` path, or None if it holds anything else."""
    ids = str(request.path_params["task_ids"]).split(",")
    if len(ids) > changes.MAX_APPLY_SCOPES or not all(_TASK_ID.fullmatch(i) for i in ids):
        return None
    return ids


@page
async def write_page(request: Request) -> Response:
    task_ids = task_ids_of(request)
    if task_ids is None:
        return PlainTextResponse("not a list of task ids", status_code=404)
    return console_of(request).render(
        request, "write.html", task_ids=task_ids, path=",".join(task_ids)
    )


@page
async def plan_page(request: Request) -> Response:
    return console_of(request).render(
        request,
        "plan.html",
        name="desired-state.json",
        document="",
        reason="",
        error=None,
        plans=None,
    )


async def _plan_document(request: Request, *, apply: bool) -> Response:
    """Plan (and with ``apply``, send) a desired-state file: the one uploaded as ``file``, else
    the pasted ``document``. Nothing is sent unless every scope's write passed its checks."""
    console = console_of(request)
    form = request.state.form
    name = form.get("name", "")[:MAX_PARAM_CHARS] or "desired-state.json"
    document, reason = form.get("document", ""), form.get("reason", "")
    upload = request.state.uploads.get("file")
    user = request.state.user

    def plan() -> tuple[list[Any], list[changes.PlannedWrite]]:
        plans = changes.plan_document(
            console.backend.db, document, max_value_bytes=console.settings.max_value_bytes
        )
        writes = changes.plan_apply(plans, name=name, reason=reason, actor=user.name)
        return plans, writes

    try:
        if upload is not None and (upload.filename or upload.data):
            name, document = changes.read_upload(upload.filename, upload.data)
        plans, writes = await run_in_threadpool(plan)
    except InvalidOption as exc:
        too_large = isinstance(exc, changes.DocumentTooLarge)
        return console.render(
            request,
            "plan.html",
            413 if too_large else 422,
            name=name,
            document="" if too_large else document,
            reason=reason,
            error=str(exc),
            plans=None,
        )
    if apply and writes:
        task_ids = [
            await run_in_threadpool(changes.send, planned, actor=user.name) for planned in writes
        ]
        return RedirectResponse(to(request, f"/writes/{','.join(task_ids)}"), status_code=303)
    return console.render(
        request,
        "plan.html",
        name=name,
        document=document,
        reason=reason,
        error=None,
        plans=plans,
        writes=len(writes),
    )


@action(write=False)
async def plan_document(request: Request) -> Response:
    return await _plan_document(request, apply=False)


@action(write=True)
async def apply_document(request: Request) -> Response:
    return await _plan_document(request, apply=True)


@page
async def status_page(request: Request) -> Response:
    console = console_of(request)
    report = await run_in_threadpool(status_report, console.settings, console.backend)
    return console.render(request, "status.html", report=report)


def routes() -> list[Route]:
    return [
        Route("/", index, methods=["GET"]),
        Route("/status", status_page, methods=["GET"]),
        Route("/plan", plan_page, methods=["GET"]),
        Route("/plan", plan_document, methods=["POST"]),
        Route("/apply", apply_document, methods=["POST"]),
        Route("/writes/{task_ids}", write_page, methods=["GET"]),
        Route("/scope/{scope:path}/edit", edit_page, methods=["GET"]),
        Route("/scope/{scope:path}/preview", preview, methods=["POST"]),
        Route("/scope/{scope:path}/apply", apply, methods=["POST"]),
        Route("/scope/{scope:path}/history", history_page, methods=["GET"]),
        Route("/scope/{scope:path}/explain", explain_page, methods=["GET"]),
        Route("/scope/{scope:path}/revert", revert_page, methods=["GET"]),
        Route("/scope/{scope:path}/revert", revert, methods=["POST"]),
        Route("/scope/{scope:path}", scope_page, methods=["GET"]),
    ]
