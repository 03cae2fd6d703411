"""Signed write tasks against a real prefork worker: forged tasks write nothing, are dead-lettered
and counted; the actor in history is the signed one; a worker without a key says so; the
embedded default signs with a key of its own."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.result import AsyncResult
from celery.signals import before_task_publish

from store.errors import SignatureRefused
from store.postgres.store import PostgresStore
from store.signing.keys import key_id
from tests.conftest import (
    ROOT,
    SIGNING_KEY,
    STATE_DIR,
    Services,
    Worker,
    fresh_id,
    wait_for,
    worker_serving_metrics,
)
from tests.processes import log_events

WRONG_KEY = f"not-the-fleets-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def guarded(services: Services) -> Iterator[tuple[Worker, int]]:
    """A prefork worker holding the run's key, on a queue of its own, serving its metrics."""
    with worker_serving_metrics(services, "signed") as serving:
        yield serving


def refused_count(port: int, reason: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(
        rf'^optionstore_tasks_refused_total\{{reason="{reason}"\}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def produce(services: Services, worker: Worker, sends: list[Any], *, key: str | None) -> list[str]:
    """Send ``sends`` ([name, args, headers], ...) from a process of their own: a plain Celery
    app that never imports this project (``key`` None), or one that imports ``store`` and holds
    ``key``. Returns the task ids."""
    code = textwrap.dedent(
        """
        import json, sys
        from celery import Celery
        if sys.argv[3] == "import":
            import store
        app = Celery("plain", broker=sys.argv[1])
        app.conf.task_default_queue = sys.argv[2]
        ids = [app.send_task(n, args=a, headers=h).id for n, a, h in json.loads(sys.argv[4])]
        print(json.dumps({"ids": ids, "imported": "store" in sys.modules}))
        """
    )
    done = subprocess.run(
        [
            *(sys.executable, "-c", code, worker.broker_url, worker.queue),
            *("import" if key else "plain", json.dumps(sends)),
        ],
        cwd=ROOT,
        env=services.env(OPTIONS_SIGNING_KEY=key or ""),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(done.stdout)
    assert answer["imported"] is (key is not None)
    ids: list[str] = answer["ids"]
    return ids


def dead_letters(services: Services) -> dict[str, dict[str, Any]]:
    client = redis.Redis.from_url(services.redis_url)
    letters = [
        json.loads(raw) for raw in client.lrange(f"{services.namespace}:dead-letters", 0, -1)
    ]
    return {letter["task_id"]: letter for letter in letters}


def refused_for(worker: Worker, task_id: str) -> SignatureRefused:
    with pytest.raises(SignatureRefused) as info:
        AsyncResult(task_id, app=worker.producer).get(timeout=30, propagate=True)
    assert info.value.field == "optionstore_signature"
    return info.value


def scope_state(services: Services, project: int) -> tuple[int, dict[str, str]]:
    postgres = PostgresStore(conninfo=services.database_url, max_size=1)
    try:
        snapshot = postgres.load_scope(f"project:{project}")
        return snapshot.revision, dict(snapshot.values)
    finally:
        postgres.close()


def test_forged_tasks_write_nothing_are_dead_lettered_and_counted(
    services: Services, guarded: tuple[Worker, int]
) -> None:
    """A write sent by a plain Celery app (no signature) and one signed with another key fail
    for their producer, write nothing, land in the dead letters with their reason and are
    counted; ten more unsigned ones log no line each; the next signed write lands."""
    worker, port = guarded
    project = fresh_id()
    since = len(worker.log())
    before = {r: refused_count(port, r) for r in ("unsigned", "unknown_key")}
    send = ["options.set_project_option", [project, "k", "forged"], {"optionstore_actor": "x"}]
    unsigned = produce(services, worker, [send] * 11, key=None)
    wrong = produce(services, worker, [send], key=WRONG_KEY)[0]

    assert "not signed" in str(refused_for(worker, unsigned[0]))
    assert f"key id {key_id(WRONG_KEY)}" in str(refused_for(worker, wrong))
    for task_id in unsigned[1:]:
        refused_for(worker, task_id)
    letters = dead_letters(services)
    assert {letters[t]["code"] for t in unsigned} == {"unsigned"}
    assert letters[wrong]["code"] == "unknown_key"
    assert scope_state(services, project) == (0, {})
    wait_for(
        lambda: (
            refused_count(port, "unsigned") >= before["unsigned"] + 11
            and refused_count(port, "unknown_key") >= before["unknown_key"] + 1
        ),
        message="the refusals to be counted",
    )
    logged = [
        e for e in log_events(worker.log()[since:], "task.refused") if e["code"] == "unsigned"
    ]
    assert 1 <= len(logged) < 11, logged

    written = worker.call("options.set_project_option", project, "k", "real")
    assert written["revision"] == 1 and written["changed"] is True
    assert scope_state(services, project) == (1, {"k": '"real"'})
    print(
        f"\nFIGURE forged tasks ({services.name}): 12 refused (11 unsigned, 1 unknown key), "
        f"0 written, {len(logged)} task.refused line(s) for the 11 unsigned; the next write landed"
    )


def test_a_signed_task_whose_actor_was_changed_on_the_way_is_refused(
    services: Services, guarded: tuple[Worker, int]
) -> None:
    """A task signed by a producer with the key, its actor header changed after signing (by a
    receiver that runs after ours), is refused and writes nothing; the history of the next
    write names the actor that was signed."""
    worker, _ = guarded
    project = fresh_id()

    def change_actor(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if headers is not None and "optionstore_signature" in headers:
            headers["optionstore_actor"] = "mallory"

    before_task_publish.connect(change_actor, weak=False)
    try:
        altered = worker.send(
            "options.set_project_option", project, "k", 1, headers={"optionstore_actor": "ana"}
        )
    finally:
        before_task_publish.disconnect(change_actor)
    assert "does not match" in str(refused_for(worker, altered.id))
    assert dead_letters(services)[altered.id]["code"] == "bad_signature"
    assert scope_state(services, project) == (0, {})

    worker.send(
        "options.set_project_option", project, "k", 2, headers={"optionstore_actor": "ana"}
    ).get(timeout=30)
    postgres = PostgresStore(conninfo=services.database_url, max_size=1)
    try:
        assert [e.actor for e in postgres.history(f"project:{project}", "k")] == ["ana"]
    finally:
        postgres.close()


def test_a_link_on_a_forged_message_is_not_signed_by_the_worker(
    services: Services, guarded: tuple[Worker, int]
) -> None:
    """A plain Celery app sends a task of another kind with a write as its link: the worker
    runs the task, publishes the link unsigned (it never vouches for what an unverified
    message carries) and so refuses it; nothing is written."""
    worker, _ = guarded
    project = fresh_id()
    code = textwrap.dedent(
        """
        import sys
        from celery import Celery
        app = Celery("plain", broker=sys.argv[1])
        app.conf.task_default_queue = sys.argv[2]
        link = app.signature(
            "options.set_project_option", args=[int(sys.argv[3]), "k", "linked"], immutable=True
        )
        app.send_task("probe.pid", link=link)
        """
    )
    subprocess.run(
        [sys.executable, "-c", code, worker.broker_url, worker.queue, str(project)],
        cwd=ROOT,
        env=services.env(OPTIONS_SIGNING_KEY=""),
        timeout=60,
        check=True,
    )

    def refused_link() -> list[dict[str, Any]]:
        return [
            letter
            for letter in dead_letters(services).values()
            if letter["task"] == "options.set_project_option" and str(project) in letter["body"]
        ]

    (letter,) = wait_for(refused_link, message="the link to be refused")
    assert letter["code"] == "unsigned"
    assert scope_state(services, project) == (0, {})


def _status(env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """`status --json`'s report, and all that `status` and `status --json` printed."""
    runs = [
        subprocess.run(
            [sys.executable, "-m", "worker.cli", "status", *flags],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        for flags in (["--json"], [])
    ]
    return json.loads(runs[0].stdout), "".join(r.stdout + r.stderr for r in runs)


def test_status_shows_signing_by_key_ids_and_never_a_key(services: Services) -> None:
    """`status` (plain and --json) says signing is on, signing with the first key and checking
    with both during a rotation, and prints neither key."""
    report, printed = _status(services.env(OPTIONS_SIGNING_KEY=f"{SIGNING_KEY},{WRONG_KEY}"))
    assert report["signing"] == {
        "enabled": True,
        "key_ids": [key_id(SIGNING_KEY), key_id(WRONG_KEY)],
        "signs_with": key_id(SIGNING_KEY),
        "unsigned_writes": "refuse",
    }
    assert f"on (signs with key {key_id(SIGNING_KEY)}" in printed
    assert SIGNING_KEY not in printed and WRONG_KEY not in printed


def test_without_a_key_a_worker_warns_at_start_and_status_says_off(services: Services) -> None:
    """On machine services with no key, signing is off: the worker's start logs a warning
    saying so, `status` says off, and a write runs unchecked, as before."""
    if services.name != "machine":
        pytest.skip("the embedded default always has a key")
    env = {"OPTIONS_SIGNING_KEY": "", "OPTIONS_TASK_QUEUE": f"{services.namespace}.nokey"}
    worker = Worker(services, extra_env=env).start()
    try:
        (warning,) = worker.events("signing.off")
        assert warning["level"] == "warning" and "OPTIONS_SIGNING_KEY" in warning["remedy"]
        project = fresh_id()
        assert produce(
            services, worker, [["options.set_project_option", [project, "k", 1], {}]], key=None
        )
        wait_for(lambda: scope_state(services, project)[0] == 1, message="the unsigned write")
    finally:
        worker.stop()
    report, printed = _status(services.env(**env))
    assert report["signing"]["enabled"] is False
    assert "signing              off" in printed


def test_accepting_unsigned_writes_still_checks_signed_ones(services: Services) -> None:
    """With OPTIONS_UNSIGNED_WRITES=accept, a by-name producer's unsigned write runs, one
    signed with an unknown key is still refused, and the start and `status` say so."""
    if services.name != "machine":
        pytest.skip("a setting for fleets on machine services; one target is enough")
    env = {"OPTIONS_UNSIGNED_WRITES": "accept", "OPTIONS_TASK_QUEUE": f"{services.namespace}.acc"}
    worker = Worker(services, extra_env=env).start()
    try:
        assert worker.events("signing.unsigned_writes_accepted")
        project = fresh_id()
        send = ["options.set_project_option", [project, "k", 1], {}]
        (unsigned,) = produce(services, worker, [send], key=None)
        AsyncResult(unsigned, app=worker.producer).get(timeout=30)
        (wrong,) = produce(services, worker, [send], key=WRONG_KEY)
        refused_for(worker, wrong)
    finally:
        worker.stop()
    report, printed = _status(services.env(**env))
    assert report["signing"]["unsigned_writes"] == "accept"
    assert "unsigned write tasks accepted" in printed


def test_the_embedded_default_signs_with_a_key_of_its_own(services: Services) -> None:
    """With no service URL and no key set, a worker and the CLI started from one state folder
    make its key once (readable by its owner only), sign and check with it: `set --wait`
    works, status shows that key's id, and a task signed with any other key is refused."""
    if services.name != "embedded":
        pytest.skip("the embedded default's own key")
    env = {
        "OPTIONS_DATABASE_URL": "",
        "OPTIONS_REDIS_URL": "",
        "OPTIONS_SIGNING_KEY": "",
        # A namespace of its own: this fleet's key is not the run's.
        "OPTIONS_NAMESPACE": f"e{uuid.uuid4().hex[:10]}",
    }
    env["OPTIONS_TASK_QUEUE"] = f"{env['OPTIONS_NAMESPACE']}.tasks"
    worker = Worker(services, extra_env=env).start()
    try:
        key_file = STATE_DIR / "signing.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        own = key_id(key_file.read_text().strip())
        assert worker.events("signing.on")[0]["key_ids"] == [own]
        project = fresh_id()
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "set", f"project:{project}", "k", "1", "--wait"],
            cwd=ROOT,
            env=services.env(**env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        refused_for(worker, worker.send("options.set_project_option", project, "k", 2).id)
        report, _ = _status(services.env(**env))
        assert report["signing"]["key_ids"] == [own]
    finally:
        worker.stop()
