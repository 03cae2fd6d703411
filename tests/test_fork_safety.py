"""A child forked while the parent holds the store's locks (a relay publishing, a pool being
opened, a consumer starting) writes and reads without waiting on them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, Services, Worker, fresh_id

CHILD_WRITES_WHILE_PARENT_HOLDS_LOCKS = """
import os, sys, threading
import store
from store.model.scopes import project_scope
from store.model.writes import set_write

project = int(sys.argv[1])
assert store.project_options.get_value(project, "k") == "before"
backend = store.backend
locks = [backend.publisher._lock, backend.db._lock, backend._lock, store.runtime._lock]
held, release = threading.Event(), threading.Event()

def hold():
    for lock in locks:
        lock.acquire()
    held.set()
    release.wait()
    for lock in reversed(locks):
        lock.release()

threading.Thread(target=hold, daemon=True).start()
held.wait()
child = os.fork()
if child == 0:
    result = backend.commit(set_write(project_scope(project), "k", "from-child"))
    assert result.changed, result
    assert store.project_options.get_value(project, "k") == "from-child"
    os._exit(0)
_, status = os.waitpid(child, 0)
release.set()
print("child exit", os.waitstatus_to_exitcode(status))
"""


def test_child_forked_while_locks_are_held_completes_its_write(
    services: Services, worker: Worker
) -> None:
    """A process forked while another thread holds the publisher, pool and runtime locks
    commits, announces and reads in the child instead of hanging on an inherited lock."""
    project = fresh_id()
    worker.call("options.set_project_option", project, "k", "before")
    done = subprocess.run(
        [sys.executable, "-c", CHILD_WRITES_WHILE_PARENT_HOLDS_LOCKS, str(project)],
        env=services.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "child exit 0" in done.stdout, done.stdout + done.stderr
    answers = worker.read_everywhere("project_options", "get_value", project, "k")
    assert set(answers.values()) == {"from-child"}
