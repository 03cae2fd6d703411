"""``optionstore web`` on the embedded default: it starts the servers, migrates, says how to
make the first editor, and serves a signed-in user the status of those servers."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from store.embedded import stop_embedded
from tests.conftest import ROOT, free_port, wait_for
from tests.processes import log_events, start_group, stop_group

pytestmark = pytest.mark.integration


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / ".optionstore"
    yield directory
    stop_embedded(directory)


def test_web_on_the_embedded_default(state_dir: Path, tmp_path: Path) -> None:
    """With no service URL set, ``optionstore web`` starts the embedded servers, logs how to
    create the first editor (to stderr, as an event), keeps its cookie secret 0600 in the state
    folder, and after ``users add`` serves the status page of the embedded servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIONS_", "CELERY_"))}
    env.update(OPTIONS_STATE_DIR=str(state_dir), OPTIONS_LOG_FORMAT="json", PYTHONPATH=str(ROOT))
    port = free_port()
    log_path = tmp_path / "web.log"
    server = start_group(
        [sys.executable, "-m", "worker.cli", "web", "--port", str(port)],
        env=env,
        log_path=log_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as client:

            def answers() -> bool:
                assert server.poll() is None, log_path.read_text()
                try:
                    return client.get("/login").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(answers, timeout=90, interval=0.1, message="the console to answer")
            [hint] = log_events(log_path.read_text(), "web.no_users")
            assert "optionstore users add NAME --role editor" in hint["hint"]
            assert stat.S_IMODE((state_dir / "web-secret").stat().st_mode) == 0o600

            added = subprocess.run(
                [sys.executable, "-m", "worker.cli", "users", "add", "ana", "--role", "editor"],
                cwd=ROOT,
                env=env,
                input="a long password\n",
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert "a long password" not in added.stdout + added.stderr
            form = client.get("/login").text
            token = re.search(r'name="csrf" value="([^"]+)"', form)
            assert token is not None
            signed_in = client.post(
                "/login",
                data={"csrf": token.group(1), "name": "ana", "password": "a long password"},
            )
            assert signed_in.status_code == 303
            status = client.get("/status")
            assert status.status_code == 200
            assert "embedded;" in status.text and "ana (editor)" in status.text
    finally:
        stop_group(server, timeout=10)
