"""The console's users file, sessions, CSRF check and sign-in rate limit, without services."""

from __future__ import annotations

import asyncio
import stat
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from store.errors import InvalidOption
from store.model.writes import WriteResult
from store.redis.presence import ProcessReport
from store.settings import Settings
from tests.conftest import SIGNING_KEY
from worker.web import create_app
from worker.web.console import CONTENT_SECURITY_POLICY, Console
from worker.web.security import SESSION_COOKIE, RateLimit, SessionSigner, csrf_matches
from worker.web.users import UsersFile

# Starlette's TestClient suggests another HTTP client; this one is what the lock holds.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:starlette.testclient")


def test_users_file_holds_argon2_hashes_readable_by_its_owner_only(tmp_path: Path) -> None:
    """A user added is stored with an argon2 hash (never the password), in a 0600 file."""
    users = UsersFile(tmp_path / "users.json")
    users.add("ana", "editor", "correct horse")
    text = users.path.read_text()
    assert "correct horse" not in text and "$argon2id$" in text
    assert stat.S_IMODE(users.path.stat().st_mode) == 0o600
    assert users.verify("ana", "correct horse") == users.get("ana")
    assert users.verify("ana", "wrong password") is None
    assert users.verify("nobody", "correct horse") is None


def test_users_file_passwd_remove_and_bad_input(tmp_path: Path) -> None:
    """passwd replaces the hash, remove forgets the user; bad names, roles and short passwords
    are refused naming their field, and nothing is written."""
    users = UsersFile(tmp_path / "users.json")
    users.add("bo", "viewer", "first password")
    users.passwd("bo", "second password")
    assert users.verify("bo", "first password") is None
    assert users.verify("bo", "second password") is not None
    for call, field in (
        (lambda: users.add("bad name", "viewer", "long enough"), "name"),
        (lambda: users.add("cy", "admin", "long enough"), "role"),
        (lambda: users.add("cy", "viewer", "short"), "password"),
        (lambda: users.add("bo", "viewer", "long enough"), "name"),
        (lambda: users.passwd("nobody", "long enough"), "name"),
    ):
        with pytest.raises(InvalidOption) as caught:
            call()
        assert caught.value.field == field
    assert [u.name for u in users.users()] == ["bo"]
    users.remove("bo")
    assert users.users() == []


def test_session_cookie_is_signed_and_expires() -> None:
    """A session cookie read back gives its user; one altered, signed with another secret or
    expired reads as no session."""
    signer = SessionSigner("s" * 64)
    session, cookie = signer.new("ana")
    assert signer.read(cookie) == session
    payload, _, signature = cookie.rpartition(".")
    assert signer.read(payload + "x." + signature) is None
    assert SessionSigner("t" * 64).read(cookie) is None
    expired = SessionSigner("s" * 64, max_age=-1)
    assert expired.read(expired.new("ana")[1]) is None
    assert signer.read("garbage") is None and signer.read(None) is None
    assert signer.read("a.\u00e9") is None and signer.read("\u00e9." + cookie) is None


def test_a_cookie_not_ascii_reads_as_no_session(client: TestClient) -> None:
    """A session cookie with a signature that is not ASCII is no session: the sign-in page,
    not a server error."""
    cookie = {"cookie": f"{SESSION_COOKIE}=a.\u00e9".encode()}  # sent as raw bytes
    response = client.get("/login", headers=cookie)
    assert response.status_code == 200 and 'name="password"' in response.text
    status = client.get("/status", headers=cookie, follow_redirects=False)
    assert status.headers["location"] == "/login"


def test_csrf_token_must_match_the_session() -> None:
    """Only the session's own token passes; none, another's or a non-string does not."""
    signer = SessionSigner("s" * 64)
    session, _ = signer.new("ana")
    other, _ = signer.new("ana")
    assert csrf_matches(session, session.csrf)
    assert not csrf_matches(session, other.csrf)
    assert not csrf_matches(session, None)
    assert not csrf_matches(None, session.csrf)


def test_rate_limit_counts_per_key_within_its_window() -> None:
    """At most ``limit`` attempts per key in a window; other keys are not affected; attempts
    older than the window no longer count."""
    limit = RateLimit(limit=3, window=10.0, max_keys=2)
    assert all(limit.allow("ana", now=t) for t in (0, 1, 2))
    assert not limit.allow("ana", now=3)
    assert limit.allow("bo", now=3)
    assert limit.allow("ana", now=10.5)  # the attempt at 0 left the window
    assert len(limit._attempts) == 2


def test_rate_limit_when_full_forgets_only_expired_keys() -> None:
    """Full (``max_keys``), the limit drops only keys whose attempts all left the window; if
    none did, a new key is refused: spraying names never resets another name's count."""
    limit = RateLimit(limit=2, window=10.0, max_keys=3)
    assert limit.allow("victim", now=0) and limit.allow("victim", now=1)
    assert not limit.allow("victim", now=2)
    assert limit.allow("a", now=3) and limit.allow("b", now=4)
    assert not limit.allow("c", now=5)  # full of keys inside their window: refused
    assert not limit.allow("victim", now=5)  # and the victim's count is still there
    assert limit.allow("c", now=11.5)  # the victim's attempts (0, 1) left the window
    assert "victim" not in limit._attempts and len(limit._attempts) == 3
    assert not limit.allow("d", now=12)  # a, b and c are recent again


def test_web_ignores_forwarded_headers_unless_told_which_proxies_to_trust() -> None:
    """``optionstore web`` runs uvicorn with proxy headers off (its default trusts
    X-Forwarded-For from 127.0.0.1); ``--forwarded-allow-ips`` turns them on for those
    addresses only."""
    import uvicorn

    from worker.cli.commands import _parser
    from worker.cli.web import server_options

    plain = server_options(_parser().parse_args(["web"]))
    assert plain["proxy_headers"] is False and "forwarded_allow_ips" not in plain
    proxied = server_options(_parser().parse_args(["web", "--forwarded-allow-ips", "10.0.0.5"]))
    assert proxied["proxy_headers"] is True and proxied["forwarded_allow_ips"] == "10.0.0.5"
    for options in (plain, proxied):
        uvicorn.Config("worker.web:create_app", **options)  # options uvicorn takes


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    users = UsersFile(tmp_path / "users.json")
    users.add("ana", "editor", "ana password")
    users.add("vic", "viewer", "vic password")
    # Services nobody listens on: these tests never reach the store (nor start the embedded one).
    # A live stream configures this process's store from these settings; the run's signing key
    # keeps what the process publishes afterwards (the tests that follow) signed.
    settings = Settings.from_environ(
        {
            "OPTIONS_STATE_DIR": str(tmp_path),
            "OPTIONS_DATABASE_URL": "postgresql://127.0.0.1:1/none",
            "OPTIONS_REDIS_URL": "redis://127.0.0.1:1/0",
            "OPTIONS_SIGNING_KEY": SIGNING_KEY,
        }
    )
    return TestClient(create_app(settings=settings, users_file=users.path, secret="k" * 64))


def csrf_of(client: TestClient) -> str:
    """The CSRF token of the client's session (given with its first page)."""
    if SESSION_COOKIE not in client.cookies:
        client.get("/login")
    session = SessionSigner("k" * 64).read(client.cookies[SESSION_COOKIE])
    assert session is not None
    return session.csrf


def sign_in(client: TestClient, name: str, password: str) -> int:
    token = csrf_of(client)
    response = client.post(
        "/login", data={"csrf": token, "name": name, "password": password}, follow_redirects=False
    )
    return response.status_code


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    """Pages and static files carry the restrictive CSP (no inline scripts) and its siblings;
    the session cookie is HttpOnly and SameSite=Strict."""
    for path in ("/login", "/static/htmx.min.js"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "default-src 'self'" in CONTENT_SECURITY_POLICY
        assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
        assert response.headers["x-frame-options"] == "DENY"
    cookie = client.get("/login").headers.get("set-cookie", "") or ""
    fresh = TestClient(client.app).get("/login").headers["set-cookie"].lower()
    assert "httponly" in fresh and "samesite=strict" in fresh, (cookie, fresh)


def test_sign_in_needs_the_csrf_token_and_the_right_password(client: TestClient) -> None:
    """A sign-in without the form's token is refused (403), a wrong password is 401, the
    right one signs in and pages are then served."""
    unsigned = client.post("/login", data={"name": "ana", "password": "ana password"})
    assert unsigned.status_code == 403
    assert sign_in(client, "ana", "wrong") == 401
    assert client.get("/status", follow_redirects=False).status_code == 303
    assert sign_in(client, "ana", "ana password") == 303
    assert client.get("/login", follow_redirects=False).headers["location"] == "/"


def test_a_password_change_or_removal_signs_the_user_out(
    client: TestClient, tmp_path: Path
) -> None:
    """A session made before ``users passwd`` (or ``remove``) no longer counts as signed in."""
    users = UsersFile(tmp_path / "users.json")
    assert sign_in(client, "ana", "ana password") == 303
    assert client.get("/login", follow_redirects=False).headers["location"] == "/"
    users.passwd("ana", "a new password")
    assert client.get("/status", follow_redirects=False).headers["location"] == "/login"
    assert sign_in(client, "ana", "a new password") == 303
    users.remove("ana")
    assert client.get("/status", follow_redirects=False).headers["location"] == "/login"


def test_sign_in_attempts_are_limited_per_user(client: TestClient) -> None:
    """After ten failed attempts for one name, even the right password is refused (429)."""
    for _ in range(10):
        assert sign_in(client, "vic", "wrong") == 401
    assert sign_in(client, "vic", "vic password") == 429


def test_writes_need_an_editor_and_the_csrf_token(client: TestClient) -> None:
    """A POST that writes is refused without the session's CSRF token (even for an editor),
    and for a viewer even with it; nothing reaches the store."""
    assert sign_in(client, "ana", "ana password") == 303
    form = {"key": "k", "value": "1", "reason": ""}
    refused = client.post("/scope/global/apply", data=form)
    assert refused.status_code == 403 and "CSRF" in refused.text
    viewer = TestClient(client.app)
    assert sign_in(viewer, "vic", "vic password") == 303
    token = csrf_of(viewer)
    forged = viewer.post("/scope/global/apply", data={**form, "csrf": token})
    assert forged.status_code == 403 and "viewers cannot write" in forged.text
    anonymous = TestClient(client.app)
    token = csrf_of(anonymous)
    assert anonymous.post("/scope/global/apply", data={**form, "csrf": token}).status_code == 401


def test_a_form_too_large_is_refused_before_it_is_read(client: TestClient) -> None:
    """A POST past 4 MiB (or with more than 20 fields) is refused with 413, unparsed."""
    token = csrf_of(client)
    big = client.post("/login", data={"csrf": token, "name": "x" * (5 * 1024 * 1024)})
    assert big.status_code == 413
    many = client.post("/login", data={"csrf": token, **{f"f{i}": "1" for i in range(30)}})
    assert many.status_code == 413


def test_an_upload_too_large_or_not_utf8_is_refused_with_a_clear_error(
    client: TestClient,
) -> None:
    """A desired-state file uploaded past 1 MiB is refused (413) with an error naming the file
    and the limit, one not UTF-8 is refused naming the file, a form past 4 MiB is refused
    before it is parsed, and an upload without the CSRF token is refused: in each case before
    the store is reached (this client's services do not exist)."""
    assert sign_in(client, "ana", "ana password") == 303
    token = csrf_of(client)
    big = b'{"optionstore": 1, "scopes": {}, "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    refused = client.post(
        "/plan", data={"csrf": token}, files={"file": ("fleet.json", big, "application/json")}
    )
    assert refused.status_code == 413
    assert "file: fleet.json is" in refused.text and "at most 1048576 bytes" in refused.text
    latin = client.post(
        "/apply", data={"csrf": token}, files={"file": ("fleet.json", b"\xff\xfe{}", "text/plain")}
    )
    assert latin.status_code == 422 and "file: fleet.json is not UTF-8" in latin.text
    huge = client.post(
        "/apply",
        data={"csrf": token},
        files={"file": ("fleet.json", b"x" * (5 * 1024 * 1024), "application/json")},
    )
    assert huge.status_code == 413 and "larger than 4 MiB" in huge.text
    no_token = client.post("/apply", files={"file": ("fleet.json", b"{}", "application/json")})
    assert no_token.status_code == 403


def test_an_upload_refused_quotes_only_its_bounded_name(client: TestClient) -> None:
    """The browser's file name is untrusted: a refused upload's error quotes its last part,
    at most 200 characters, never the whole path it was sent with."""
    assert sign_in(client, "ana", "ana password") == 303
    token = csrf_of(client)
    sent = "C:\\Users\\ana\\private\\" + "n" * 3000 + ".json"
    big = b"[" + b" " * (2 * 1024 * 1024) + b"]"
    refused = client.post(
        "/plan", data={"csrf": token}, files={"file": (sent, big, "application/json")}
    )
    assert refused.status_code == 413
    assert "private" not in refused.text
    assert "n" * 200 in refused.text and "n" * 201 not in refused.text


def test_a_convergence_deadline_out_of_range_is_refused_naming_it(tmp_path: Path) -> None:
    """``create_app(convergence_deadline=...)`` (``web --converge-seconds``) takes more than 0
    and at most an hour; otherwise a ValueError names it."""
    settings = Settings.from_environ({"OPTIONS_STATE_DIR": str(tmp_path)})
    for bad in (0.0, -1.0, 3601.0):
        with pytest.raises(ValueError, match="convergence_deadline"):
            create_app(settings=settings, secret="k" * 64, convergence_deadline=bad)
    create_app(settings=settings, secret="k" * 64, convergence_deadline=5.0)


def test_a_number_parameter_not_ascii_is_refused_naming_it(client: TestClient) -> None:
    """``?before=`` of history and ``?to=`` of revert take ASCII digits only: "²" (a digit to
    ``str.isdigit``) is a 400 naming the parameter, not a server error; so is a form whose
    Content-Length is not ASCII digits."""
    assert sign_in(client, "ana", "ana password") == 303
    for bad in ("\u00b2", "-1", "1e3", "9" * 19):
        history = client.get("/scope/global/history", params={"before": bad})
        assert history.status_code == 400 and history.text.startswith("before:"), bad
        revert = client.get("/scope/global/revert", params={"to": bad})
        assert revert.status_code == 400 and revert.text.startswith("to:"), bad
    from starlette.requests import Request

    from worker.web.console import FormTooLarge, read_form

    odd = Request({"type": "http", "method": "POST", "headers": [(b"content-length", b"\xb2")]})
    with pytest.raises(FormTooLarge):
        asyncio.run(read_form(odd))


def test_json_nested_too_deeply_is_refused_naming_its_field() -> None:
    """A value or a desired-state document nested past what the parser recurses is an
    InvalidOption naming "value" or "file", like any other JSON that does not read."""
    from worker.cli.writes import parse_value
    from worker.web.changes import plan_document

    deep = "[" * 100_000
    with pytest.raises(InvalidOption) as caught:
        parse_value(deep)
    assert caught.value.field == "value"
    with pytest.raises(InvalidOption) as caught:
        plan_document(None, deep, max_value_bytes=1024)
    assert caught.value.field == "file"


def _report(name: str, revisions: dict[str, int]) -> ProcessReport:
    host, pid = name.split(":")
    return ProcessReport(host, int(pid), "worker", "prefork", "process", True, 1.0, 1.0, 1.0, 0,
                         revisions=revisions)  # fmt: skip


class _FakeDb:
    def __init__(self, records: dict[str, tuple[WriteResult, bool]]) -> None:
        self.records = records
        self.calls: list[list[str]] = []

    def write_records(self, task_ids: list[str]) -> dict[str, tuple[WriteResult, bool]]:
        self.calls.append(list(task_ids))
        return {t: self.records[t] for t in task_ids if t in self.records}


def _console(namespace: str, records: dict[str, tuple[WriteResult, bool]]) -> Console:
    """A console of ``namespace`` whose store is a fake: write records only, no Redis."""
    console = Console(
        settings=Settings(namespace=namespace),
        users=UsersFile(Path("/nonexistent/users.json")),
        signer=SessionSigner("k" * 64),
        secure=False,
    )
    console._backend = SimpleNamespace(db=_FakeDb(records), redis=None)
    return console


def test_convergence_reads_the_consoles_namespace_and_no_process_is_not_converged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A console made with ``Settings(namespace="prod")`` reads the process reports of
    "prod" (not of the environment's namespace); with no live process report, a committed
    change is "no_process", not "converged"; with reports, converged once each applied it."""
    from worker.web import live

    committed = WriteResult("global", 7, True, {"k": "1"}, "t1", 100.0)
    console = _console("prod", {"t1": (committed, True)})
    asked: list[str] = []
    fleets: dict[str, list[ProcessReport]] = {"prod": [], "options": [_report("h:1", {})]}

    def presence(backend: Any, namespace: str) -> Any:
        asked.append(namespace)
        return SimpleNamespace(processes=lambda: fleets.get(namespace, []))

    monkeypatch.setattr(live, "presence", presence)
    watch = live.WriteWatch(console, ["t1"], failures=lambda ids: {})
    found = watch.tick(late=False)[0]
    assert asked == ["prod"]
    assert found.state == "no_process" and found.done
    html = console.fragment("convergence.html", c=found, root="", many=False)
    assert 'id="no-process"' in html and 'id="converged"' not in html
    fleets["prod"] = [_report("h:2", {"global": 6})]
    found = watch.tick(late=False)[0]
    assert found.state == "applying" and found.behind == ["h:2 (worker)"]
    fleets["prod"] = [_report("h:2", {"global": 7})]
    assert watch.tick(late=False)[0].state == "converged"


def test_status_with_no_live_process_is_not_converged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The status report (page and command) says "not converged" when no process reports,
    and the status panel says there is no live process."""
    import contextlib

    import store.postgres.schema
    from worker.cli.status import status_report
    from worker.web import live

    monkeypatch.setattr(store.postgres.schema, "schema_version", lambda conn: 0)
    console = _console("prod", {})
    console.backend.db.connection = lambda: contextlib.nullcontext(None)
    report = status_report(console.settings, console.backend, broker=False)
    assert report["processes"] == [] and report["converged"] is False
    html = live.status_fragment(console, report)
    assert '<td id="fleet-converged">no live process</td>' in html


def test_a_write_panel_tick_reads_once_for_all_its_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """One tick of a panel of several writes reads their records in one query and the process
    reports once; the result backend is asked at most once a second (and at the deadline),
    only for the writes not committed yet."""
    from worker.web import live

    done = WriteResult("global", 3, True, {"k": "1"}, "t1", 100.0)
    same = WriteResult("project:1", 5, False, {}, "t2", 100.0)
    console = _console("options", {"t1": (done, True), "t2": (same, True)})
    scans: list[str] = []

    def presence(backend: Any, namespace: str) -> Any:
        return SimpleNamespace(
            processes=lambda: scans.append(namespace) or [_report("h:1", {"global": 3})]
        )

    monkeypatch.setattr(live, "presence", presence)
    asked: list[list[str]] = []
    now = [0.0]

    def failures(ids: list[str]) -> dict[str, str]:
        asked.append(ids)
        return {"t4": "scope limit"} if "t4" in ids and now[0] >= 1.0 else {}

    watch = live.WriteWatch(
        console, ["t1", "t2", "t3", "t4"], failures=failures, clock=lambda: now[0]
    )
    for tick in range(4):  # four ticks in 0.75 s: one question to the result backend
        now[0] = tick * 0.25
        states = [c.state for c in watch.tick(late=False)]
    assert states == ["converged", "unchanged", "pending", "pending"]
    assert console.backend.db.calls == [["t1", "t2", "t3", "t4"]] * 4
    assert scans == ["options"] * 4
    assert asked == [["t3", "t4"]]
    now[0] = 1.0
    assert [c.state for c in watch.tick(late=False)][2:] == ["pending", "failed"]
    now[0] = 1.25
    found = watch.tick(late=True)  # at the deadline: asked once more, for t3 only
    assert asked == [["t3", "t4"], ["t3", "t4"], ["t3"]]
    assert [c.state for c in found] == ["converged", "unchanged", "late", "failed"]


def test_a_session_holds_at_most_four_event_streams(client: TestClient) -> None:
    """A fifth live panel of one session is refused (429) while four are open; another
    session is not affected, and a slot given back can be taken again."""
    from worker.web.console import STREAMS_PER_SESSION

    assert sign_in(client, "ana", "ana password") == 303
    console: Console = client.app.state.console  # type: ignore[attr-defined]
    key = csrf_of(client)
    for _ in range(STREAMS_PER_SESSION):
        assert console.streams.take(key)
    refused = client.get("/status/events")
    assert refused.status_code == 429
    assert client.get(f"/writes/{uuid.uuid4()}/events").status_code == 429
    assert console.streams.open(key) == STREAMS_PER_SESSION
    console.streams.give_back(key)
    task_id = str(uuid.uuid4())
    same = WriteResult("global", 2, False, {}, task_id, 100.0)
    console._backend = SimpleNamespace(db=_FakeDb({task_id: (same, True)}), redis=None)
    ended = client.get(f"/writes/{task_id}/events")  # one slot free: served, to its end
    assert ended.status_code == 200 and "event: done" in ended.text
    assert console.streams.open(key) == STREAMS_PER_SESSION - 1  # its slot given back
    assert console.streams.take(key)
    assert console.streams.take("another session")


def test_a_status_stream_ends_once_its_user_is_removed_or_changes_password(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live status stream re-checks its user as a request would: it ends at the first check
    after ``users remove`` (or ``users passwd``), instead of streaming on."""
    from worker.web import live

    users = UsersFile(tmp_path / "users.json")
    reports: list[int] = []
    change = {"remove": lambda: users.remove("ana"), "passwd": lambda: users.passwd("vic", "x" * 9)}
    signed: dict[str, str] = {}

    def status_report(settings: Any, backend: Any, *, broker: bool) -> dict[str, Any]:
        reports.append(1)
        if len(reports) == 2:
            change[signed["how"]]()
        return {"tick": len(reports)}

    monkeypatch.setattr(live, "status_report", status_report)
    monkeypatch.setattr(live, "status_fragment", lambda console, report: f"<p>{report}</p>")
    monkeypatch.setattr(live, "STATUS_INTERVAL", 0.001)
    monkeypatch.setattr(live, "USER_CHECK_INTERVAL", 0.0, raising=False)  # checked at every tick
    monkeypatch.setattr(live, "STATUS_STREAM_SECONDS", 5.0)  # without the check: 5 s of ticks
    for name, password, how in (
        ("ana", "ana password", "remove"),
        ("vic", "vic password", "passwd"),
    ):
        session = TestClient(client.app)
        assert sign_in(session, name, password) == 303
        reports.clear()
        signed["how"] = how
        streamed = session.get("/status/events")
        assert streamed.status_code == 200
        assert len(reports) == 2, how  # the check after the change ended it
        assert session.get("/status/events").status_code == 401
