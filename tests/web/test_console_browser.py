"""The console in a real browser (Debian's headless Chromium through Playwright) against a real
``optionstore web`` server and a real prefork worker, on both targets (the embedded default's
PostgreSQL and Redis, and the machine's): sign in, change, converge, stragglers, refuse,
history, revert, roles, CSRF, escaping, live status, plan and apply."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import (
    IN_CI,
    ROOT,
    Services,
    Worker,
    free_port,
    fresh_id,
    target_services,
    wait_for,
)
from tests.processes import start_group, stop_group

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IMAGES = ROOT / "docs" / "images"
EDITOR, VIEWER = ("ana", "ana's password"), ("vic", "vic's password")
REGISTRY = """
[options.page_size]
type = "integer"
minimum = 1
maximum = 500
default = 50
scopes = ["project"]
description = "How many rows a page of this project shows"

[options.rollout]
type = "number"
scopes = ["project"]
reason_required = true
description = "Share of requests on the new path"
"""
TIMEOUT_MS = 30_000
# How long a write's panel follows it here before it names the processes behind.
CONVERGE_SECONDS = 20
# The target whose pages become the screenshots of docs/images.
SCREENSHOTS_FROM = "machine"


def optionstore(env: dict[str, str], *args: str, stdin: str = "") -> str:
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module", params=["embedded", "machine"])
def target(request: pytest.FixtureRequest) -> Iterator[Services]:
    """One target per run of the module's tests, with a namespace of its own: the worker and
    the console below are started once per target and shared by its tests."""
    if not CHROMIUM.exists():
        if IN_CI:
            pytest.fail(f"CI=true but {CHROMIUM} is missing (.ci/run installs it)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    yield from target_services(request.param)


@pytest.fixture(scope="module")
def console_env(target: Services) -> dict[str, str]:
    folder = Path(tempfile.mkdtemp(prefix="console-"))
    registry = folder / "registry.toml"
    registry.write_text(REGISTRY)
    env = target.env(
        OPTIONS_REGISTRY=str(registry),
        OPTIONS_WEB_USERS_FILE=str(folder / "users.json"),
    )
    return env


@pytest.fixture(scope="module")
def worker(target: Services, console_env: dict[str, str]) -> Iterator[Worker]:
    running = Worker(target, extra_env={"OPTIONS_REGISTRY": console_env["OPTIONS_REGISTRY"]})
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def console(console_env: dict[str, str], worker: Worker) -> Iterator[str]:
    """The URL of an ``optionstore web`` server, with an editor and a viewer made by
    ``optionstore users add`` (passwords on standard input)."""
    optionstore(console_env, "users", "add", EDITOR[0], "--role", "editor", stdin=EDITOR[1])
    optionstore(console_env, "users", "add", VIEWER[0], "--role", "viewer", stdin=VIEWER[1])
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="console-", suffix=".log")[1])
    server = start_group(
        [
            *(sys.executable, "-m", "worker.cli", "web", "--port", str(port)),
            *("--converge-seconds", str(CONVERGE_SECONDS)),
        ],
        env=console_env,
        log_path=log_path,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if server.poll() is not None:
            pytest.fail(f"optionstore web exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/login", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_for(answers, timeout=60, interval=0.1, message="the console to answer")
    yield url
    stop_group(server, timeout=10)
    print(log_path.read_text()[-5000:])  # shown when a test of the module failed


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def signed_in(browser: Any, console: str, user: tuple[str, str]) -> Any:
    """A page of a new browser context, signed in as ``user``."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{console}/login")
    page.fill("input[name=name]", user[0])
    page.fill("input[name=password]", user[1])
    page.click("button[type=submit]")
    page.wait_for_selector("#signed-in")
    return page


def history_count(target: Services, scope: str) -> int:
    with psycopg.connect(target.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM options_history WHERE scope = %s", (scope,))
        return int(row.fetchone()[0])  # type: ignore[index]


def shoot(page: Any, target: Services, name: str) -> None:
    """Write the page as docs/images/console-NAME.png (from one target only)."""
    if target.name != SCREENSHOTS_FROM:
        return
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / f"console-{name}.png"), full_page=True)


def set_in_browser(page: Any, url: str, *, key: str, value: str, reason: str) -> None:
    page.goto(f"{url}/edit?key={key}")
    page.fill("#value", value)
    page.fill("#reason", reason)
    page.click("#preview")


def converge(page: Any, worker: Worker) -> dict[str, tuple[int, int]]:
    """Wait for the convergence panel to say every live process applied the write; the
    applied/live counts of each kind it showed."""
    page.wait_for_selector("#converged", timeout=60_000)
    counts = {}
    for row in page.query_selector_all("tr.kind"):
        counts[row.get_attribute("data-kind")] = (
            int(row.query_selector(".applied").inner_text()),
            int(row.query_selector(".live").inner_text()),
        )
    return counts


def converged_to(page: Any, worker: Worker, project: int, key: str, value: Any) -> None:
    """Wait for the convergence panel to say every live process applied the write, then check
    that every worker child reads ``value`` for ``key``."""
    converge(page, worker)
    answers = worker.read_everywhere("project_options", "get_value", project, key)
    assert set(answers.values()) == {value}, answers


def test_editor_changes_an_option_and_every_process_applies_it(
    browser: Any, console: str, worker: Worker, target: Services
) -> None:
    """An editor sets a declared project option with a reason; the preview shows the diff; the
    convergence panel counts every live worker process (main and children) as applied, live
    through server-sent events; a task in each worker child then reads the new value; history
    shows the change with its actor and reason."""
    project = fresh_id()
    scope = f"project:{project}"
    worker.call("options.set_project_option", project, "page_size", 20)
    worker.call("options.set_project_option", project, "theme", "dark")
    page = signed_in(browser, console, EDITOR)
    messages: list[str] = []
    page.on("console", lambda message: messages.append(message.text))
    page.goto(f"{console}/scope/{scope}")
    assert page.inner_text("tr[data-key=page_size] .value") == "20"
    assert "integer" in page.inner_text("tr[data-key=page_size]")
    shoot(page, target, "browse")

    set_in_browser(
        page,
        f"{console}/scope/{scope}",
        key="page_size",
        value="100",
        reason="bigger pages for the audit",
    )
    diff = page.inner_text("#diff pre")
    assert "- page_size = 20" in diff and "+ page_size = 100" in diff
    page.click("#apply")
    counts = converge(page, worker)
    applied, live = counts["worker"]
    assert applied == live >= worker.concurrency, counts  # every prefork child, at least
    shoot(page, target, "convergence")
    answers = worker.read_everywhere("project_options", "get_value", project, "page_size")
    assert set(answers.values()) == {100}, answers

    page.goto(f"{console}/scope/{scope}/explain?key=page_size")
    assert page.inner_text("#explain-value") == "100"
    assert page.inner_text("#explain-source") == "scope"
    assert page.inner_text("#explain-actor") == EDITOR[0]
    page.goto(f"{console}/scope/{scope}/history?key=page_size")
    newest = page.query_selector("tr.entry")
    assert newest.query_selector(".actor").inner_text() == EDITOR[0]
    assert newest.query_selector(".reason").inner_text() == "bigger pages for the audit"
    shoot(page, target, "history")

    # Revert to the first revision: the same preview as the CLI's revert, then a set_many.
    page.click("tr.entry[data-revision='1'] a.revert")
    assert "+ page_size = 20" in page.inner_text("#diff")
    page.click("#revert")
    converged_to(page, worker, project, "page_size", 20)
    page.goto(f"{console}/scope/{scope}/history?key=page_size")
    newest = page.query_selector("tr.entry")
    assert newest.query_selector(".reason").inner_text() == "revert to r1"
    assert newest.query_selector(".actor").inner_text() == EDITOR[0]
    # Every page, htmx and its event streams ran under the strict policy without a violation.
    assert not [m for m in messages if "Content Security Policy" in m], messages
    page.context.close()


def test_a_value_breaking_the_schema_is_refused_beside_its_field(
    browser: Any, console: str, worker: Worker, target: Services
) -> None:
    """A value the registry's schema refuses shows the registry's error beside the value field
    (the text the CLI prints) and nothing is written: no history row, no write task."""
    project = fresh_id()
    scope = f"project:{project}"
    worker.call("options.set_project_option", project, "page_size", 20)
    before = history_count(target, scope)
    page = signed_in(browser, console, EDITOR)
    set_in_browser(
        page, f"{console}/scope/{scope}", key="page_size", value="100000", reason="too many"
    )
    error = page.inner_text("#error-value")
    # What `optionstore set` says for the same value (through the same task checks).
    cli = subprocess.run(
        [sys.executable, "-m", "worker.cli", "set", scope, "page_size", "100000"],
        cwd=ROOT,
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 2
    assert error in cli.stderr, (error, cli.stderr)
    assert page.query_selector("#apply") is None
    shoot(page, target, "edit-error")
    set_in_browser(page, f"{console}/scope/{scope}", key="page_size", value="not json", reason="")
    assert "is not JSON" in page.inner_text("#error-value")
    page.goto(f"{console}/scope/{scope}/edit?key=rollout")
    page.fill("#value", "0.5")
    page.evaluate("document.querySelector('#reason').removeAttribute('required')")
    page.click("#preview")
    assert "reason: is required" in page.inner_text("#error-reason")
    assert history_count(target, scope) == before
    page.context.close()


def test_a_viewer_sees_everything_and_cannot_write(
    browser: Any, console: str, worker: Worker, target: Services
) -> None:
    """A viewer browses a scope and its history without any write control, and a POST forged
    with the viewer's own CSRF token is refused; so is an editor's POST without the token."""
    project = fresh_id()
    scope = f"project:{project}"
    worker.call("options.set_project_option", project, "page_size", 7)
    before = history_count(target, scope)
    page = signed_in(browser, console, VIEWER)
    page.goto(f"{console}/scope/{scope}")
    assert page.inner_text("tr[data-key=page_size] .value") == "7"
    assert page.query_selector("#add-key") is None and page.query_selector("a.edit") is None
    page.goto(f"{console}/scope/{scope}/history")
    assert page.query_selector("tr.entry") is not None
    assert page.query_selector("a.revert") is None
    token = page.get_attribute("input[name=csrf]", "value")
    forged = page.request.post(
        f"{console}/scope/{scope}/apply",
        form={"csrf": token, "key": "page_size", "value": "8", "reason": ""},
    )
    assert forged.status == 403
    page.context.close()

    editor = signed_in(browser, console, EDITOR)
    no_token = editor.request.post(
        f"{console}/scope/{scope}/apply", form={"key": "page_size", "value": "9", "reason": ""}
    )
    assert no_token.status == 403
    editor.context.close()
    assert history_count(target, scope) == before


def test_a_key_that_looks_like_html_renders_as_text(
    browser: Any, console: str, worker: Worker
) -> None:
    """A key ``<script>alert(1)</script>`` (user data) is shown as text on the scope page,
    search and history: no script runs, no dialog opens."""
    project = fresh_id()
    key = "<script>alert(1)</script>"
    worker.call("options.set_project_option", project, key, "<b>bold?</b>")
    page = signed_in(browser, console, EDITOR)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{console}/scope/project:{project}")
    assert page.inner_text("td.key") == key
    assert page.inner_text("tr.set .value") == json.dumps("<b>bold?</b>")
    page.goto(f"{console}/?key=%3Cscript")
    assert key in [cell.inner_text() for cell in page.query_selector_all("td.key")]
    page.goto(f"{console}/scope/project:{project}/history")
    assert page.inner_text("td.key") == key
    assert dialogs == []
    page.context.close()


def test_the_status_page_follows_workers_starting_and_stopping(
    browser: Any, console: str, target: Services, worker: Worker
) -> None:
    """The status page lists every live process and updates itself (server-sent events, no
    reload) when another worker starts, and again when it stops."""
    page = signed_in(browser, console, VIEWER)
    page.goto(f"{console}/status")
    shown = page.locator("#process-count")

    def count() -> int:
        return int(shown.get_attribute("data-count") or 0)

    before = count()
    assert before >= worker.concurrency
    page.evaluate("window.notReloaded = true")
    extra = Worker(
        target,
        pool="solo",
        concurrency=1,
        extra_env={"OPTIONS_TASK_QUEUE": f"{target.namespace}.status"},
    ).start()
    try:
        wait_for(lambda: count() > before, timeout=30, message="the new worker on the page")
        assert page.locator(f"tr.process[data-pid='{extra.process.pid}']").count() == 1  # type: ignore[union-attr]
        shoot(page, target, "status")
    finally:
        extra.stop()
    wait_for(lambda: count() == before, timeout=30, message="the stopped worker to leave the page")
    assert page.evaluate("window.notReloaded") is True
    page.context.close()


def test_an_editor_unsets_a_key_and_removes_a_tag_key(
    browser: Any, console: str, worker: Worker
) -> None:
    """Unset (and a tag key's removal) go through the same preview and the unset tasks; every
    worker child then reads the key as unset."""
    project = fresh_id()
    worker.call("options.set_project_option", project, "theme", "dark")
    worker.call("options.add_tag_key", project, "browser")
    page = signed_in(browser, console, EDITOR)
    page.goto(f"{console}/scope/project:{project}/edit?key=theme")
    page.click("#preview-unset")
    assert "+ theme (unset)" in page.inner_text("#diff pre")
    page.click("#apply")
    converged_to(page, worker, project, "theme", None)
    page.goto(f"{console}/scope/tagkeys:{project}")
    page.click("tr[data-key=browser] a.edit")
    page.click("#preview-unset")
    page.click("#apply")
    converge(page, worker)
    answers = worker.read_everywhere("tag_keys", "all_keys", project)
    assert set(map(tuple, answers.values())) == {()}, answers
    page.context.close()


def test_an_editor_plans_and_applies_a_desired_state_file(
    browser: Any, console: str, worker: Worker, target: Services
) -> None:
    """A desired-state file pasted in the console is planned as ``optionstore plan`` does (a
    diff per scope), then applied as ``optionstore apply`` does (one set_many per scope, origin
    apply, the user as actor); every worker child reads the new values."""
    first, second = fresh_id(), fresh_id()
    worker.call("options.set_project_option", first, "page_size", 10)
    document = json.dumps(
        {
            "optionstore": 1,
            "scopes": {
                f"project:{first}": {"values": {"page_size": 30}},
                f"project:{second}": {"values": {"page_size": 40, "theme": "light"}},
            },
        }
    )
    page = signed_in(browser, console, EDITOR)
    page.goto(f"{console}/plan")
    page.fill("#document", document)
    page.click("#plan")
    plan = page.inner_text("#plan-result")
    assert "- page_size = 10" in plan and "+ page_size = 30" in plan and "+ theme" in plan
    page.click("#apply-plan")
    page.wait_for_selector("#all-converged", timeout=60_000)
    first_values = worker.read_everywhere("project_options", "get_value", first, "page_size")
    second_values = worker.read_everywhere("project_options", "get_value", second, "theme")
    assert set(first_values.values()) == {30} and set(second_values.values()) == {"light"}
    with psycopg.connect(target.database_url) as conn:
        rows = conn.execute(
            "SELECT actor, origin, reason FROM options_history WHERE scope = %s"
            " ORDER BY id DESC LIMIT 1",
            (f"project:{first}",),
        ).fetchall()
    assert rows == [(EDITOR[0], "apply", "apply desired-state.json")]
    page.context.close()


def upload_plan(page: Any, console: str, name: str, document: dict[str, Any]) -> str:
    """Upload ``document`` as the file ``name`` on the plan page; the plan's text."""
    page.goto(f"{console}/plan")
    page.set_input_files(
        "#file",
        files=[
            {"name": name, "mimeType": "application/json", "buffer": json.dumps(document).encode()}
        ],
    )
    page.click("#plan")
    return str(page.inner_text("#plan-result"))


def test_an_editor_uploads_a_desired_state_file_sees_its_drift_and_applies_it(
    browser: Any, console: str, worker: Worker, target: Services
) -> None:
    """A desired-state file uploaded as a file (multipart) is planned as ``optionstore plan``
    plans it: a value changed outside the file since its last apply is shown as drift, and
    nothing is written until the plan is applied; the apply (origin apply, the file's name in
    the reason, the user as actor) then reaches every worker child and the scope's history."""
    project = fresh_id()
    scope = f"project:{project}"
    page = signed_in(browser, console, EDITOR)
    upload_plan(
        page,
        console,
        "fleet.json",
        {"optionstore": 1, "scopes": {scope: {"values": {"page_size": 30}}}},
    )
    page.click("#apply-plan")
    converge(page, worker)
    worker.call("options.set_project_option", project, "page_size", 35)  # outside the file
    before = history_count(target, scope)

    plan = upload_plan(
        page,
        console,
        "fleet.json",
        {"optionstore": 1, "scopes": {scope: {"values": {"page_size": 50}}}},
    )
    assert f"Drift in {scope}: changed outside fleet.json" in plan, plan
    assert "page_size: applied 30, now 35" in plan, plan
    assert "- page_size = 35" in plan and "+ page_size = 50" in plan, plan
    assert history_count(target, scope) == before  # planned, nothing written
    shoot(page, target, "plan-upload")
    page.click("#apply-plan")
    converged_to(page, worker, project, "page_size", 50)
    page.goto(f"{console}/scope/{scope}/history?key=page_size")
    newest = page.query_selector("tr.entry")
    assert newest.query_selector(".actor").inner_text() == EDITOR[0]
    assert newest.query_selector(".reason").inner_text() == "apply fleet.json"
    page.context.close()


def test_the_convergence_panel_names_a_process_that_never_applies_the_change(
    browser: Any, console: str, console_env: dict[str, str], target: Services, worker: Worker
) -> None:
    """A live worker process that never applies one change (tests/held_apply.py holds it back)
    keeps the panel waiting until the deadline passes; the panel then names that process by
    host, pid and kind, and only it, and counts every other worker process as applied."""
    project = fresh_id()
    scope = f"project:{project}"
    worker.call("options.set_project_option", project, "theme", "dark")
    held = Worker(
        target,
        pool="solo",
        concurrency=1,
        include="tests.probe_tasks,tests.held_apply",
        extra_env={
            "OPTIONS_TASK_QUEUE": f"{target.namespace}.held",
            "OPTIONS_REGISTRY": console_env["OPTIONS_REGISTRY"],
        },
    ).start()
    try:
        held_pid = held.process.pid  # type: ignore[union-attr]
        page = signed_in(browser, console, EDITOR)
        page.goto(f"{console}/status")
        page.wait_for_selector(f"tr.process[data-pid='{held_pid}']")
        page.goto(f"{console}/scope/{scope}/edit?key=theme")
        page.fill("#value", '"held:back"')
        page.click("#preview")
        assert '+ theme = "held:back"' in page.inner_text("#diff pre")
        page.click("#apply")
        page.wait_for_selector("section.convergence[data-state=applying]")
        stragglers = page.wait_for_selector("#stragglers", timeout=(CONVERGE_SECONDS + 40) * 1000)
        named = stragglers.inner_text()  # type: ignore[union-attr]
        assert f"{socket.gethostname()}:{held_pid} (worker)" in named, named
        others = {worker.process.pid, *worker.child_pids()}  # type: ignore[union-attr]
        assert not [pid for pid in others if f":{pid} " in named], (named, others)
        applied, live = (
            int(page.inner_text("tr.kind[data-kind=worker] .applied")),
            int(page.inner_text("tr.kind[data-kind=worker] .live")),
        )
        assert applied == live - 1 >= worker.concurrency, (applied, live)
        shoot(page, target, "stragglers")
        page.context.close()
    finally:
        held.stop()
