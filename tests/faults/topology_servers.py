"""Servers of the topology tests' own: a Redis and a RabbitMQ that speak only TLS (certificates
made here with the openssl CLI), and a Redis primary with a replica behind Redis Sentinels."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis

from tests.conftest import wait_for
from tests.faults.servers import free_port, unavailable


def system_redis() -> str:
    """A redis-server built with TLS (the embedded one is not); skips (fails in CI) without."""
    found = shutil.which("redis-server")
    if not found:
        unavailable("redis-server (with TLS) is not installed here")
    assert found is not None
    return found


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 (subjectAltName IP)."""
    if not shutil.which("openssl"):
        unavailable("the openssl CLI is not installed here")
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.pem" for name in ("ca", "ca-key", "cert", "key")}
    csr, ext = directory / "server.csr", directory / "san.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    ca, ca_key, cert, key = (str(paths[n]) for n in ("ca", "ca-key", "cert", "key"))
    steps = [
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            ca_key,
            "-out",
            ca,
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            key,
            "-out",
            str(csr),
        ],
        [
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            cert,
        ],
    ]
    for step in steps:
        subprocess.run(["openssl", *step], check=True, capture_output=True, timeout=60)
    return paths


class Server:
    """One redis-server process (a data node or a Sentinel) from a config file of its own."""

    def __init__(self, directory: Path, config: dict[str, str], *, sentinel: bool = False) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = int(config.get("port") or config["tls-port"])
        self.sentinel = sentinel
        self.config = {
            "bind": "127.0.0.1",
            "dir": str(directory),
            "logfile": str(directory / "redis.log"),
            "save": '""',
            **config,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, client: dict[str, Any] | None = None) -> Server:
        path = self.directory / "redis.conf"
        lines = [f"{k} {v}" for k, v in self.config.items() if not k.startswith("sentinel ")]
        lines += [f"{k} {v}" for k, v in self.config.items() if k.startswith("sentinel ")]
        path.write_text("\n".join(lines) + "\n")
        command = [system_redis(), str(path), *(["--sentinel"] if self.sentinel else [])]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._client_options = client or {}
        wait_for(self.answers, timeout=30, message=f"redis-server on port {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(
            "127.0.0.1",
            self.port,
            socket_timeout=2,
            socket_connect_timeout=2,
            **self._client_options,
        )

    def answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"redis-server exited with {self.process.returncode}:\n{log}")
        with contextlib.closing(self.client()) as client:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class TLSRedis(Server):
    """A Redis listening on a TLS port only (``--port 0``); clients need no certificate."""

    def __init__(self, directory: Path) -> None:
        self.certificates = make_certificates(directory / "tls")
        config = {
            "port": "0",
            "tls-port": str(free_port()),
            "tls-cert-file": str(self.certificates["cert"]),
            "tls-key-file": str(self.certificates["key"]),
            "tls-ca-cert-file": str(self.certificates["ca"]),
            "tls-auth-clients": "no",
            "appendonly": "yes",
        }
        super().__init__(directory, config)
        self.port = int(config["tls-port"])

    def start(self, client: dict[str, Any] | None = None) -> TLSRedis:
        super().start({"ssl": True, "ssl_ca_certs": str(self.certificates["ca"])})
        return self

    @property
    def url(self) -> str:
        """A rediss:// URL that verifies the server against this test's own CA."""
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.certificates['ca']}"


class SentinelGroup:
    """A primary, one replica and two Sentinels watching them as ``mymaster``."""

    master = "mymaster"

    def __init__(self, directory: Path) -> None:
        primary_port, replica_port = free_port(), free_port()
        self.data = [
            Server(directory / "primary", {"port": str(primary_port), "appendonly": "yes"}),
            Server(
                directory / "replica",
                {
                    "port": str(replica_port),
                    "appendonly": "yes",
                    "replicaof": f"127.0.0.1 {primary_port}",
                },
            ),
        ]
        self.sentinels = [
            Server(
                directory / f"sentinel-{n}",
                {
                    "port": str(free_port()),
                    f"sentinel monitor {self.master}": f"127.0.0.1 {primary_port} 1",
                    f"sentinel down-after-milliseconds {self.master}": "1000",
                    f"sentinel failover-timeout {self.master}": "10000",
                    f"sentinel parallel-syncs {self.master}": "1",
                },
                sentinel=True,
            )
            for n in range(2)
        ]

    def start(self) -> SentinelGroup:
        for server in [*self.data, *self.sentinels]:
            server.start()
        wait_for(self.ready, timeout=60, message="the replica and both Sentinels to see mymaster")
        return self

    def ready(self) -> bool:
        info = self.data[0].client().info("replication")
        if info.get("connected_slaves", 0) < 1:
            return False
        for sentinel in self.sentinels:
            fields = sentinel.client().sentinel_master(self.master)
            if int(fields["num-other-sentinels"]) < 1 or int(fields["num-slaves"]) < 1:
                return False
        return True

    def primary_port(self) -> int:
        """The port the Sentinels name as the master now."""
        _, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(self.master)
        return int(port)

    def primary(self) -> Server:
        port = self.primary_port()
        return next(server for server in self.data if server.port == port)

    @property
    def broker_url(self) -> str:
        """Celery's form: every Sentinel, the master's name as a transport option."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}/0" for s in self.sentinels)

    @property
    def cache_url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master}/0"

    def close(self) -> None:
        for server in [*self.sentinels, *self.data]:
            server.kill()


def system_rabbitmq() -> str:
    """RabbitMQ's own start script (not the distribution's wrapper, which switches to the
    rabbitmq user and its environment); skips (fails in CI) without."""
    for found in ("/usr/lib/rabbitmq/bin/rabbitmq-server", shutil.which("rabbitmq-server")):
        if found and Path(found).exists():
            return found
    unavailable("rabbitmq-server is not installed here")
    raise AssertionError("unreachable")


class TLSRabbitMQ:
    """A RabbitMQ node of this test's own, listening on a TLS port only; clients need no
    certificate. Its own name, ports, Erlang cookie (in its HOME) and data directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.certificates = make_certificates(directory / "tls")
        self.port = free_port()
        self.node = f"optionstore-tls-{self.port}@localhost"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TLSRabbitMQ:
        certificates = {name: str(path) for name, path in self.certificates.items()}
        (self.directory / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"
            f"listeners.ssl.default = {self.port}\n"
            f"ssl_options.cacertfile = {certificates['ca']}\n"
            f"ssl_options.certfile = {certificates['cert']}\n"
            f"ssl_options.keyfile = {certificates['key']}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        env = {
            **os.environ,
            "HOME": str(self.directory),  # the Erlang cookie is made there
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_PID_FILE": str(self.directory / "rabbitmq.pid"),
        }
        self.process = subprocess.Popen(
            [system_rabbitmq()],
            env=env,
            stdout=(self.directory / "stdout.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self.answers, timeout=120, interval=0.5, message=f"RabbitMQ {self.node}")
        return self

    def connection(self, url: str, **options: Any) -> kombu.Connection:
        return kombu.Connection(url, connect_timeout=5, **options)

    def answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.directory / "stdout.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"rabbitmq-server exited with {self.process.returncode}:\n{log}")
        verified = {"ca_certs": str(self.certificates["ca"]), "cert_reqs": ssl.CERT_REQUIRED}
        with self.connection(f"amqps://guest:guest@localhost:{self.port}//", ssl=verified) as conn:
            try:
                conn.ensure_connection(max_retries=1)
            except Exception:  # not listening yet
                return False
            return True

    @property
    def url(self) -> str:
        """An amqps:// URL that verifies the server, by name, against this test's own CA."""
        return f"amqps://guest:guest@localhost:{self.port}//?ssl_ca_certs={self.certificates['ca']}"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
