"""The console's live panels, as server-sent events: a write's convergence (which live processes
have applied it, from the same reports as ``set --wait``) until every one has or a deadline
passes, and the fleet's status (``optionstore status``) each second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from store.redis.presence import ProcessReport
from worker.cli.status import status_report
from worker.cli.waits import presence
from worker.web.console import Console, console_of
from worker.web.security import Session

CONVERGENCE_INTERVAL = 0.25
# How often a panel asks the result backend whether a write not committed yet was refused.
FAILED_CHECK_INTERVAL = 1.0
STATUS_INTERVAL = 1.0
# A status stream ends after this long; the browser's EventSource opens a new one.
STATUS_STREAM_SECONDS = 600.0
# How often a stream checks that its user still holds (not removed, same password).
USER_CHECK_INTERVAL = 2.0


@dataclass
class Convergence:
    """Where one write is: not committed yet, failed, committed without a change, or committed
    and applied by ``applied`` of each kind's live processes (``behind``: who has not)."""

    task_id: str
    # pending, failed, unchanged, applying, converged, late, or no_process: committed with a
    # change, and no live process reports (none to apply it, none that did: not converged).
    state: str = "pending"
    scope: str = ""
    revision: int = 0
    error: str = ""
    kinds: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind: (applied, live)
    behind: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state in ("failed", "unchanged", "converged", "late", "no_process")


class WriteWatch:
    """Follows the writes of one panel: each ``tick`` reads their write records in one query and
    the live processes' reports once, shared by every write; the result backend (whether a
    write not committed yet was refused) is asked at most once per ``FAILED_CHECK_INTERVAL``,
    and once more at the deadline, for the writes still not committed."""

    def __init__(
        self,
        console: Console,
        task_ids: list[str],
        *,
        failures: Callable[[list[str]], dict[str, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.task_ids = task_ids
        self.failures = failures or _failures
        self.clock = clock
        self.failed: dict[str, str] = {}
        self._checked_at: float | None = None

    def tick(self, *, late: bool) -> list[Convergence]:
        backend = self.console.backend
        records = backend.db.write_records(self.task_ids)
        pending = [t for t in self.task_ids if t not in records and t not in self.failed]
        now = self.clock()
        if pending and (
            late or self._checked_at is None or now - self._checked_at >= FAILED_CHECK_INTERVAL
        ):
            self._checked_at = now
            self.failed.update(self.failures(pending))
        reports = None
        if any(result.changed for result, _ in records.values()):
            reports = presence(backend, self.console.settings.namespace).processes()
        return [self._one(t, records, reports, late=late) for t in self.task_ids]

    def _one(
        self,
        task_id: str,
        records: dict[str, tuple[Any, bool]],
        reports: list[ProcessReport] | None,
        *,
        late: bool,
    ) -> Convergence:
        found = Convergence(task_id)
        if task_id not in records:
            if task_id in self.failed:
                found.state, found.error = "failed", self.failed[task_id]
            elif late:
                found.state, found.error = "late", "not committed: is a worker running?"
            return found
        result, announced = records[task_id]
        found.scope, found.revision = result.scope, result.revision
        if not result.changed:
            found.state = "unchanged"
            return found
        if not reports:
            found.state = "no_process"
            return found
        for report in reports:
            applied, live = found.kinds.get(report.kind, (0, 0))
            ok = report.has_applied(result.scope, result.revision, result.committed_at, announced)
            found.kinds[report.kind] = (applied + ok, live + 1)
            if not ok:
                found.behind.append(f"{report.name} ({report.kind})")
        found.behind.sort()
        if not found.behind:
            found.state = "converged"
        else:
            found.state = "late" if late else "applying"
        return found


def _failures(task_ids: list[str]) -> dict[str, str]:
    """The worker's error for each of ``task_ids`` it refused, if there is a result backend to
    ask (one lookup per write)."""
    from celery.backends.base import DisabledBackend

    from worker import app

    if isinstance(app.backend, DisabledBackend):
        return {}
    found = {}
    for task_id in task_ids:
        result = app.AsyncResult(task_id)
        if result.state == "FAILURE":
            found[task_id] = str(result.result)
    return found


class SignedIn:
    """Whether a stream's session still holds, as a request's would (``Console.user_of``):
    asked each tick, it reads the users file at most once per USER_CHECK_INTERVAL."""

    def __init__(self, console: Console, session: Session) -> None:
        self.console = console
        self.session = session
        self._checked_at = time.monotonic()  # the request that opened the stream checked it

    async def holds(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at < USER_CHECK_INTERVAL:
            return True
        self._checked_at = now
        return await run_in_threadpool(self.console.user_of, self.session) is not None


def event(name: str, html: str) -> str:
    """One server-sent event whose data is ``html`` (each of its lines a ``data:`` line)."""
    lines = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
    return f"event: {name}\n{lines}\n"


class _EventStream(StreamingResponse):
    """An event stream that gives its session's slot back when it ends, however it ends."""

    def __init__(self, body: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _stream(request: Request, body: Callable[[], AsyncIterator[str]]) -> Response:
    """``body`` as an event stream, if the session has one of its STREAMS_PER_SESSION free."""
    console = console_of(request)
    key = request.state.session.csrf  # one per session, and never shared
    if not console.streams.take(key):
        return PlainTextResponse("too many live panels open: close one", status_code=429)
    return _EventStream(body(), lambda: console.streams.give_back(key))


async def write_events(request: Request) -> Response:
    from worker.web.pages import task_ids_of

    console = console_of(request)
    if request.state.user is None:
        return PlainTextResponse("sign in first", status_code=401)
    task_ids = task_ids_of(request)
    if task_ids is None:
        return PlainTextResponse("not a list of task ids", status_code=404)
    root = request.scope.get("root_path", "")

    watch = WriteWatch(console, task_ids)
    signed_in = SignedIn(console, request.state.session)

    async def body() -> AsyncIterator[str]:
        deadline = time.monotonic() + console.convergence_deadline
        shown = None
        while await signed_in.holds():
            late = time.monotonic() >= deadline
            found = await run_in_threadpool(watch.tick, late=late)
            html = "".join(
                console.fragment("convergence.html", c=c, root=root, many=len(found) > 1)
                for c in found
            )
            if html != shown:
                yield event("panel", html)
                shown = html
            if all(c.done for c in found):
                if len(found) > 1 and all(c.state in ("converged", "unchanged") for c in found):
                    yield event(
                        "panel",
                        html + '<p class="ok" id="all-converged">Every write '
                        "applied by every live process.</p>",
                    )
                yield event("done", "")
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(CONVERGENCE_INTERVAL)

    return _stream(request, body)


def status_fragment(console: Console, report: dict[str, Any]) -> str:
    return console.fragment("status_panel.html", report=report, now=time.time())


async def status_events(request: Request) -> Response:
    console = console_of(request)
    if request.state.user is None:
        return PlainTextResponse("sign in first", status_code=401)

    signed_in = SignedIn(console, request.state.session)

    async def body() -> AsyncIterator[str]:
        ends = time.monotonic() + STATUS_STREAM_SECONDS
        shown = None
        while time.monotonic() < ends and await signed_in.holds():
            report = await run_in_threadpool(
                status_report, console.settings, console.backend, broker=False
            )
            html = status_fragment(console, report)
            if html != shown:
                yield event("status", html)
                shown = html
            else:
                yield ": still here\n\n"  # a comment: tells a closed connection apart
            if await request.is_disconnected():
                return
            await asyncio.sleep(STATUS_INTERVAL)

    return _stream(request, body)


def routes() -> list[Route]:
    return [
        Route("/writes/{task_ids}/events", write_events, methods=["GET"]),
        Route("/status/events", status_events, methods=["GET"]),
    ]
