"""``worker.install(app)`` on a user's own Celery app, a task module loaded with ``-I``, and
import hygiene: every process of either reads a change made after it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery

from tests.conftest import ROOT, Services, Worker, fresh_id, wait_for
from tests.processes import start_group, stop_group

USERPROJ = ROOT / "tests" / "userproj"


class UserWorker:
    """``celery -A userproj worker``: the user's app on its own queue, prefork with 2 children,
    in process mode (a child keeps what it read across tasks), applying the broadcasts of
    ``slow:`` values 10 ms late (tests/slow_apply.py)."""

    def __init__(self, services: Services) -> None:
        self.queue = f"{services.namespace}.userproj"
        self.env = services.env(
            USERPROJ_BROKER_URL=services.broker_url,
            USERPROJ_RESULT_BACKEND=services.redis_url,
            USERPROJ_QUEUE=self.queue,
            PYTHONPATH=f"{ROOT}{os.pathsep}{USERPROJ}",
            OPTIONS_LOCAL_CACHE="process",
        )
        # The user's app takes its broker from its own configuration, not ours.
        for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "OPTIONS_TASK_QUEUE"):
            self.env.pop(name)
        self.log_path = Path(tempfile.mkstemp(prefix="userproj-", suffix=".log")[1])
        command = [
            *(sys.executable, "-m", "celery", "-A", "userproj", "worker"),
            *("--pool", "prefork", "--concurrency", "2", "--queues", self.queue),
            *("--include", "tests.slow_apply"),
            *("--hostname", f"{services.namespace}-userproj@%h"),
            *("--without-mingle", "--without-gossip", "--loglevel", "INFO"),
        ]
        self.process = start_group(command, env=self.env, log_path=self.log_path)
        self.producer = Celery("producer", broker=services.broker_url, backend=services.redis_url)
        self.producer.conf.update(accept_content=["json"], task_default_queue=self.queue)

    def children(self) -> set[int]:
        return {child.pid for child in psutil.Process(self.process.pid).children(recursive=True)}

    def read(self, project: int, key: str, hold: float = 0.0) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = self.producer.send_task(
                "userproj.read", args=[project, key, hold]
            ).get(timeout=60)
        except Exception:
            if self.process.poll() is not None:
                pytest.fail(f"the user's worker exited:\n{self.log_path.read_text()[-4000:]}")
            raise
        return answer

    def stop(self) -> None:
        stop_group(self.process, timeout=20)


@pytest.fixture(scope="module")
def user_worker(services: Services) -> Iterator[UserWorker]:
    running = UserWorker(services)
    try:
        running.read(1, "warm-up")
        yield running
    finally:
        running.stop()


def cli(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=services.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def read_in_every_child(user_worker: UserWorker, project: int, key: str) -> dict[int, Any]:
    """A new task's read in each of the user's children (each task after this call began)."""
    expected = user_worker.children()
    answers: dict[int, Any] = {}

    def everyone() -> bool:
        for result in [
            user_worker.producer.send_task("userproj.read", args=[project, key, 0.2])
            for _ in range(4)
        ]:
            answer = result.get(timeout=30)
            answers[answer["pid"]] = answer["value"]
        return expected <= set(answers)

    wait_for(everyone, timeout=60, interval=0, message="both of the user's children to answer")
    return {pid: answers[pid] for pid in expected}


def test_installed_app_reads_a_change_in_every_child(
    services: Services, worker: Worker, user_worker: UserWorker
) -> None:
    """After `set --wait`, a new task in each child of an installed user app reads the new value,
    and `status --json` lists the user's processes beside the project worker's."""
    project, key = fresh_id(), "limit"
    done = cli(services, "set", f"project:{project}", key, "1", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(read_in_every_child(user_worker, project, key).values()) == {1}

    done = cli(services, "set", f"project:{project}", key, "2", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(read_in_every_child(user_worker, project, key).values()) == {2}

    report = json.loads(cli(services, "status", "--json").stdout)
    listed = {p["pid"]: p for p in report["processes"]}
    for pid in user_worker.children() | worker.child_pids():
        assert pid in listed, (pid, sorted(listed))
        assert listed[pid]["kind"] == "worker"
        assert listed[pid]["synced"] is True, listed[pid]
        # Not behind on this write (other tests' namespaces share the database, and a process
        # hears only its own: their writes may show as behind here, docs/operating.md).
        assert not [b for b in listed[pid]["behind"] if b.startswith(f"project:{project}@")]


def test_included_task_module_reads_a_change_in_every_child(
    services: Services, worker: Worker
) -> None:
    """A task module loaded with --include that decorates with `from worker import app` reads
    a change made by `set --wait` in every child."""
    project, key = fresh_id(), "included"
    for value in ("1", "2"):
        done = cli(services, "set", f"project:{project}", key, value, "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        answers = worker.read_everywhere("project_options", "get_value", project, key)
        assert set(answers.values()) == {int(value)}, answers


IMPORT_ORDERS = [
    "from worker import app",
    "import worker.celery; from worker import app",
    "import worker.install; import worker.cli.commands; from worker import app",
    "import tasks, store; from worker import app",
    "import celeryconfig; import worker; app = worker.app",
]


@pytest.mark.parametrize("statement", IMPORT_ORDERS)
def test_from_worker_import_app_is_the_celery_instance(statement: str) -> None:
    """`from worker import app` gives the Celery instance, with a task decorator, in any order."""
    code = f"{statement}\nfrom celery import Celery\nassert isinstance(app, Celery), app\n"
    code += "import worker\nassert worker.app is app\n@app.task(name='t.x')\ndef x(): pass\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_bare_environment(Path(tempfile.mkdtemp())),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _bare_environment(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIONS_", "CELERY_"))}
    env.update(PYTHONPATH=str(ROOT), OPTIONS_STATE_DIR=str(state_dir))
    return env


def test_importing_every_module_starts_no_server_and_connects_nowhere() -> None:
    """With no URL set, importing tasks, celeryconfig, store and worker (and the app's
    configuration module) starts no server, spawns nothing and opens no connection."""
    state_dir = Path(tempfile.mkdtemp()) / "state"
    code = (
        "import socket, subprocess\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('a connection or a process at import')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "subprocess.Popen.__init__ = refuse\n"
        "import tasks, celeryconfig, store, worker\n"
        "import worker.cli.commands, worker.steps, store.transport.redis, store.embedded\n"
        "import store.process\n"
        "print('imported')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_bare_environment(state_dir),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"
    assert not state_dir.exists(), "the embedded servers' state folder was created"


def test_install_rejects_an_unknown_setting() -> None:
    """install() names a keyword it does not know instead of ignoring it."""
    import worker

    with pytest.raises(TypeError, match="databse_url"):
        worker.install(Celery("typo", set_as_current=False), databse_url="postgresql://x")


def test_installed_app_tasks_catch_up_to_a_token_and_refuse_a_malformed_one(
    services: Services, worker: Worker, user_worker: UserWorker
) -> None:
    """A task of the user's app sent with a write's options_after token reads that write, though
    its child holds the scope and hears the write's broadcast late (one sent without a token
    reads it stale, at times: the guard is what makes the difference); one sent with a
    malformed token fails with InvalidToken naming the header, before its body."""
    import store
    from store.errors import InvalidToken

    project, key = fresh_id(), "ryw"
    worker.call("options.set_project_option", project, key, "slow:0")
    read_in_every_child(user_worker, project, key)  # both children hold the scope from now on
    missed = {"with": 0, "without": 0}
    for round_ in range(1, 31):
        for way in ("with", "without"):
            value = f"slow:{way}:{round_}"
            written = worker.call("options.set_project_option", project, key, value)
            headers = store.options_after(written) if way == "with" else None
            answer = user_worker.producer.send_task(
                "userproj.read", args=[project, key], headers=headers
            ).get(timeout=30)
            missed[way] += answer["value"] != value
    assert missed["with"] == 0, missed
    assert missed["without"] > 0, missed  # the stale read the guard prevents is there
    refused = user_worker.producer.send_task(
        "userproj.read", args=[project, key], headers={"options_after": {"project:0": 1}}
    )
    with pytest.raises(InvalidToken) as error:
        refused.get(timeout=30, propagate=True)
    assert error.value.field == "options_after['project:0']"
