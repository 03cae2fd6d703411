"""Figures for the processes users run besides the project's worker: a worker of their own
Celery app made an optionstore app with ``worker.install``, and gunicorn workers of a web app
that only imports ``store``. Same measurements and baselines as ``read_hit`` and
``propagation``, measured inside those processes."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.env import LogTail, Services, wait_for
from bench.figures import Figure
from bench.fleet import Fleet, _propagation_at, fleet
from bench.hit import hit_figure
from bench.reads import KEY, PROJECT_ID, option_values, seed_scope
from tests.processes import start_group, stop_group

USER_APP = "bench.userapp"


def installed(run: Services, *, quick: bool) -> list[Figure]:
    """A local hit inside a task of an installed app, and propagation to its children."""
    number, reps = (20_000, 40) if quick else (20_000, 300)
    with fleet(run, "userhit", 2, app=USER_APP, local_cache="task") as running:
        answer = running.producer.send_task(
            "bench.read_hit", args=[PROJECT_ID, KEY, option_values(10), number, reps]
        ).get(timeout=900)
    figures = [
        hit_figure(
            "read_hit_installed",
            "read, local hit, in a task of a `worker.install()`ed app",
            answer,
            "a task of `celery -A bench.userapp worker` (a user's app, installed)",
        )
    ]
    figures += _propagation_at(
        run,
        2,
        30 if quick else 200,
        host=lambda: fleet(run, "userprop", 2, app=USER_APP),
        name="propagation_installed_2",
        title="propagation: commit to every process applied, an installed app's 2 children",
        who=(
            "2 prefork children of `celery -A bench.userapp worker --concurrency 2` (a user's "
            "own app made an optionstore app with worker.install; OPTIONS_LOCAL_CACHE=process)"
        ),
    )
    return figures


class Gunicorn:
    """``gunicorn --preload`` with ``count`` sync workers serving bench/webapp.py."""

    def __init__(self, run: Services, namespace: str, count: int) -> None:
        self.namespace = namespace
        self.count = count
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log_path = Path(tempfile.mkstemp(prefix=f"{namespace}-gunicorn-", suffix=".log")[1])
        self.log = LogTail(self.log_path)
        command = [
            *(sys.executable, "-m", "gunicorn", "--preload", "--workers", str(count)),
            *("--bind", f"127.0.0.1:{self.port}", "bench.webapp:app"),
        ]
        self.process = start_group(command, env=run.env(namespace), log_path=self.log_path)

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=600) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    def warm(self) -> list[int]:
        """Ask until every worker has answered synced, holding the scope; returns their pids."""
        synced: set[int] = set()

        def ask() -> None:
            with contextlib.suppress(OSError):
                answer = self.get("/warm", project=PROJECT_ID, key=KEY, hold=0.05)
                if answer["synced"]:
                    synced.add(answer["pid"])

        def everyone() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log_path.read_text()[-3000:]}")
            threads = [threading.Thread(target=ask) for _ in range(self.count * 2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return len(synced) >= self.count

        wait_for(everyone, timeout=120, what=f"{self.count} synced gunicorn workers", interval=0.1)
        # Each worker read the scope once it was synced, so each holds it now.
        return sorted(synced)

    def events(self) -> list[dict[str, Any]]:
        return self.log.read()

    def stop(self) -> None:
        stop_group(self.process, timeout=15)
        self.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def gunicorn_fleet(run: Services, label: str, count: int) -> Iterator[Fleet]:
    namespace = run.namespace(label)
    backend = run.configure_store(namespace, broker_url=run.broker_url)
    seed_scope(backend, PROJECT_ID, option_values(10))
    host = Gunicorn(run, namespace, count)
    try:
        pids = host.warm()
        yield Fleet(host, backend, None, pids)  # type: ignore[arg-type]  # a Worker-like host
    finally:
        host.stop()


def gunicorn(run: Services, *, quick: bool) -> list[Figure]:
    """A local hit inside a gunicorn worker, and propagation to 2 of them."""
    number, reps = (20_000, 40) if quick else (20_000, 300)
    with gunicorn_fleet(run, "webhit", 2) as running:
        answer = running.worker.get(
            "/hit",
            project=PROJECT_ID,
            key=KEY,
            values=json.dumps(option_values(10)),
            number=number,
            reps=reps,
        )
    figures = [
        hit_figure(
            "read_hit_gunicorn",
            "read, local hit, in a gunicorn worker (no configure call)",
            answer,
            "a request of `gunicorn --preload --workers 2` serving a WSGI app that imports store",
        )
    ]
    figures += _propagation_at(
        run,
        2,
        30 if quick else 200,
        host=lambda: gunicorn_fleet(run, "webprop", 2),
        name="propagation_gunicorn_2",
        title="propagation: commit to every process applied, 2 gunicorn workers",
        who=(
            "2 workers of `gunicorn --preload --workers 2` (a WSGI app that only imports store: "
            "configured from the environment, process mode, each worker holding the scope)"
        ),
    )
    return figures
