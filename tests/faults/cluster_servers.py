"""A Redis Cluster of the topology tests' own: three primaries, each with one replica, made with
``redis-cli --cluster create`` from redis-server processes in cluster mode (over TLS only, if
asked: clients, the cluster bus and replication)."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import redis

from tests.conftest import wait_for
from tests.faults.servers import unavailable
from tests.faults.topology_servers import Server, make_certificates

# How long a primary may stay silent before the others call it failed and its replica takes
# over: short, so that a failover takes a second or two, not Redis's default 15 s.
NODE_TIMEOUT_MS = 1000
BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


def cluster_port() -> int:
    """A port on 127.0.0.1 that is free, as is its cluster bus port."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + BUS_OFFSET))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


def system_redis_cli() -> str:
    found = shutil.which("redis-cli")
    if not found:
        unavailable("redis-cli is not installed here")
    assert found is not None
    return found


class RedisClusterGroup:
    """Six redis-server nodes in cluster mode: three primaries with one replica each."""

    def __init__(self, directory: Path, *, primaries: int = 3, tls: bool = False) -> None:
        self.certificates = make_certificates(directory / "tls") if tls else None
        self.nodes = []
        for n in range(primaries * 2):
            port = cluster_port()
            config = {
                "port": str(port),
                "appendonly": "yes",
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                "cluster-node-timeout": str(NODE_TIMEOUT_MS),
                # A replica takes over however long its link to the primary was down.
                "cluster-replica-validity-factor": "0",
            }
            if self.certificates is not None:
                config.update(
                    {
                        "port": "0",
                        "tls-port": str(port),
                        "tls-cert-file": str(self.certificates["cert"]),
                        "tls-key-file": str(self.certificates["key"]),
                        "tls-ca-cert-file": str(self.certificates["ca"]),
                        "tls-auth-clients": "no",
                        "tls-cluster": "yes",
                        "tls-replication": "yes",
                    }
                )
            node = Server(directory / f"node-{n}", config)
            node.port = port
            self.nodes.append(node)

    def _client_options(self) -> dict[str, Any]:
        if self.certificates is None:
            return {}
        return {"ssl": True, "ssl_ca_certs": str(self.certificates["ca"])}

    def start(self) -> RedisClusterGroup:
        for node in self.nodes:
            node.start(self._client_options())
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        tls = []
        if self.certificates is not None:
            tls = ["--tls", "--cacert", str(self.certificates["ca"])]
        done = subprocess.run(
            [
                system_redis_cli(),
                *tls,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(self.ready, timeout=60, message="every cluster node to see a full cluster")
        return self

    def ready(self) -> bool:
        """Every node knows every other, says the cluster is ok, and every primary has a
        replica."""
        return self.ok(known=len(self.nodes)) and all(
            self.replica_of(p) is not None for p in self.primaries()
        )

    def ok(self, known: int = 0) -> bool:
        """Every live node says the cluster is ok (each slot served), and knows ``known``
        nodes at least."""
        for node in self.live():
            try:
                with contextlib.closing(node.client()) as client:
                    text = client.execute_command("CLUSTER", "INFO").decode()
            except redis.RedisError:
                return False
            info = dict(line.split(":", 1) for line in text.split() if ":" in line)
            if info.get("cluster_state") != "ok":
                return False
            if int(info.get("cluster_known_nodes", 0)) < known:
                return False
        return True

    def roles(self) -> dict[int, tuple[str, str | None]]:
        """Each live node's port: its role and, for a replica, its primary's node id."""
        found: dict[int, tuple[str, str | None]] = {}
        for node in self.live():
            with contextlib.closing(node.client()) as client:
                for line in client.execute_command("CLUSTER", "NODES").decode().splitlines():
                    fields = line.split()
                    if "myself" in fields[2]:
                        role = "primary" if "master" in fields[2] else "replica"
                        found[node.port] = (role, None if fields[3] == "-" else fields[3])
        return found

    def primaries(self) -> list[Server]:
        roles = self.roles()
        return [node for node in self.live() if roles.get(node.port, ("", None))[0] == "primary"]

    def replica_of(self, primary: Server) -> Server | None:
        with contextlib.closing(primary.client()) as client:
            own_id = client.execute_command("CLUSTER", "MYID").decode()
        roles = self.roles()
        return next(
            (n for n in self.live() if roles.get(n.port) == ("replica", own_id)),
            None,
        )

    def live(self) -> list[Server]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    @property
    def url(self) -> str:
        """The cache URL: every node, any of which gives the client the slot map (over TLS,
        verified against this cluster's own CA)."""
        nodes = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        if self.certificates is None:
            return f"redis+cluster://{nodes}"
        return f"rediss+cluster://{nodes}?ssl_ca_certs={self.certificates['ca']}"

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
