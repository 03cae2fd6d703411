"""Console figures, measured in this process against the run's PostgreSQL: the web console's
pages on a large store, beside ``optionstore list`` of the same scope in the same run.

``console_scope_page``: a signed-in GET of the first page of a 10,000-key scope (its keys, values
and declarations); ``console_key_search``: a search by key prefix across 100,000 options (ten
scopes of 10,000 keys). Both are timed as the ASGI application serves them (Starlette's test
client, no network), against ``optionstore list SCOPE --json`` run in-process (``main``), which
loads and prints the whole scope.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.env import Services
from bench.figures import Figure, Series

SCOPES = 10
KEYS_PER_SCOPE = 10_000
FIRST_PROJECT = 910_000
USER = ("bench", "bench password")


def _fill(run: Services) -> None:
    """Ten project scopes of 10,000 keys each, written as set_many writes (one per scope)."""
    from store.model.scopes import project_scope
    from store.model.writes import many_write
    from store.postgres.store import PostgresStore

    db = PostgresStore(conninfo=run.database_url)
    try:
        for index in range(SCOPES):
            scope = project_scope(FIRST_PROJECT + index)
            values = {
                f"opt:{index}:{key:05d}": {"n": key, "on": key % 2 == 0}
                for key in range(KEYS_PER_SCOPE)
            }
            db.apply(many_write(scope, values, []), task_id=f"bench-console-{run.run_id}-{index}")
        with db.connection() as conn:
            conn.execute("ANALYZE options_value")
            conn.execute("ANALYZE options_scope")
    finally:
        db.close()


def _timed(call: Any, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def console(run: Services, *, quick: bool) -> list[Figure]:
    from starlette.testclient import TestClient

    from store.settings import Settings
    from worker.cli.commands import main as optionstore
    from worker.web import create_app
    from worker.web.security import SESSION_COOKIE, SessionSigner
    from worker.web.users import UsersFile

    _fill(run)
    count = 20 if quick else 200
    folder = Path(tempfile.mkdtemp(prefix="bench-console-"))
    users = UsersFile(folder / "users.json")
    users.add(USER[0], "viewer", USER[1])
    settings = Settings.from_environ(run.env(run.namespace("console")))
    secret = "b" * 64
    client = TestClient(create_app(settings=settings, users_file=users.path, secret=secret))
    client.get("/login")
    token = SessionSigner(secret).read(client.cookies[SESSION_COOKIE])
    assert token is not None
    signed_in = client.post(
        "/login",
        data={"csrf": token.csrf, "name": USER[0], "password": USER[1]},
        follow_redirects=False,
    )
    assert signed_in.status_code == 303, signed_in.text
    scope = f"project:{FIRST_PROJECT + SCOPES // 2}"

    def scope_page() -> None:
        response = client.get(f"/scope/{scope}")
        assert response.status_code == 200 and "Next page" in response.text

    def key_search() -> None:
        response = client.get("/?key=opt:7:0123")
        assert response.status_code == 200 and "opt:7:01234" in response.text

    def listing() -> None:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert optionstore(["list", scope, "--json"]) == 0
        assert len(out.getvalue()) > KEYS_PER_SCOPE * 10

    for warm in (scope_page, key_search, listing):
        warm()
    page = _timed(scope_page, count)
    search = _timed(key_search, count)
    baseline = _timed(listing, max(5, count // 4))
    listed = Series("ms", baseline)
    method = (
        f"{SCOPES} scopes x {KEYS_PER_SCOPE:,} keys in PostgreSQL; {count} signed-in GETs served "
        "by the ASGI app in this process (Starlette's test client); baseline: `optionstore list "
        "SCOPE --json` of the same 10,000-key scope, in-process, same run"
    )
    return [
        Figure(
            name="console_scope_page",
            title="console: first page of a 10,000-key scope",
            baseline_title="optionstore list of that scope",
            value=Series("ms", page),
            baseline=listed,
            goal="<= 1x",
            method=method,
        ),
        Figure(
            name="console_key_search",
            title="console: key search over 100,000 options",
            baseline_title="optionstore list of a 10,000-key scope",
            value=Series("ms", search),
            baseline=listed,
            goal="<= 1x",
            method=method,
        ),
    ]
