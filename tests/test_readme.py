"""The README's quick start, run as written: its app file and its shell commands, against the
embedded default of this test run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.conftest import ROOT, STATE_DIR

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def quick_start() -> list[tuple[str, str]]:
    """The fenced blocks (language, text) between the README's "Quick start" heading and the
    next heading of the same level."""
    text = README.read_text()
    start = text.index("\n## Quick start\n")
    end = text.find("\n## ", start + 1)
    return FENCE.findall(text[start : end if end >= 0 else None])


def stop_session(process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """SIGTERM to the session the script ran in (the script, and the worker it left in the
    background), SIGKILL to what is left after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    sent: signal.Signals | None = None
    while True:
        process.poll()  # reap the script itself, or the group never looks empty
        wanted = signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL
        try:
            if sent is not wanted:
                os.killpg(process.pid, wanted)
                sent = wanted
            else:
                os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def test_readme_is_a_front_page() -> None:
    """README.md stays a front page: at most 10 KB."""
    assert len(README.read_bytes()) <= 10240


def test_readme_quick_start_runs_as_written() -> None:
    """The quick start's app file and shell commands, run as written on the embedded default,
    print the value the README says the task reads."""
    blocks = quick_start()
    files = [body for language, body in blocks if language == "python"]
    scripts = [body for language, body in blocks if language == "sh"]
    assert len(files) == 1 and len(scripts) == 1, blocks
    name = files[0].splitlines()[0].removeprefix("# ").strip()
    assert name.endswith(".py"), f"the app block starts with its file name, got {name!r}"
    expected = scripts[0].rstrip().splitlines()[-1].rsplit("# ", 1)[1].strip()

    with tempfile.TemporaryDirectory(prefix="readme-") as workdir:
        Path(workdir, name).write_text(files[0])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIONS_", "CELERY_"))}
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=f"{workdir}{os.pathsep}{ROOT}",
            OPTIONS_STATE_DIR=str(STATE_DIR),
            # Its own Redis keys and exchange, should another test share these servers.
            OPTIONS_NAMESPACE=f"readme{uuid.uuid4().hex[:8]}",
        )
        log_path = Path(workdir, "quick-start.log")
        # Output to a file, not a pipe: the worker the script leaves in the background keeps
        # its copy of the script's stdout open.
        with log_path.open("w") as log:
            process = subprocess.Popen(
                ["bash", "-eu", "-c", scripts[0]],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop_session(process, timeout=20)
        output = log_path.read_text(errors="replace")
    assert process.returncode == 0, output[-4000:]
    printed = [line.strip() for line in output.splitlines()]
    assert expected in printed, output[-4000:]
