"""Redis Cluster: the URL form, its client, and the hash tags that keep each script on one shard.

On a cluster every Lua script's keys must hash to one slot. A scope's hash is tagged with its
scope (``<namespace>:scope:{<scope>}``) and the record of one database's announcements with
its database (``<namespace>:db:{<id>}:announced``, ``…:announced-at``, ``…:clock``), so that
``fill.lua``, ``delta.lua``, ``raise.lua`` and ``recent.lua`` each run on one shard. A single
Redis keeps its names untagged (store/redis/cache.py): a running fleet sees no change.
"""

from __future__ import annotations

import os
import threading
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis._parsers import Encoder
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.retry import Retry

from store.errors import InvalidOption
from store.fork import after_fork_in_child

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379
# How many times redis-py's cluster client tries a command again after a connection error or
# CLUSTERDOWN, asking for the slot map in between (its default, 10, can hold a read for
# seconds while a primary fails over; a read falls back to PostgreSQL instead, and a write's
# cache step is done again by the outbox relay).
RETRY_ATTEMPTS = 3
# The query options taken as text, beside those redis-py types (URL_QUERY_ARGUMENT_PARSERS).
TEXT_OPTIONS = frozenset(
    {"ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "client_name"}
)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0].strip().lower() in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The startup nodes a cluster URL names, as (host, port): each ``host[:port]``, an IPv6
    address in brackets (``[::1]:7000``)."""
    scheme, _, rest = url.partition("://")
    # The credentials off first, whatever they hold: no part of a password is ever quoted.
    hosts = rest.split("?", 1)[0].rsplit("@", 1)[-1].split("/", 1)[0]
    if not hosts:
        raise InvalidOption(
            "OPTIONS_REDIS_URL",
            f"a cluster URL names at least one node: {scheme}://host:7000,host:7001",
        )
    return [_node(host) for host in hosts.split(",")]


def _node(text: str) -> tuple[str, int]:
    host, port = text, ""
    if text.startswith("["):  # [IPv6]:port
        end = text.find("]")
        host, rest = (text[1:end], text[end + 1 :]) if end > 0 else ("", "")
        if rest and not rest.startswith(":"):
            host = ""
        port = rest[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host or (":" in host and not text.startswith("[")):
        raise InvalidOption(
            "OPTIONS_REDIS_URL", f"each cluster node names a host (host:port): {text!r}"
        )
    if not port:
        return host, DEFAULT_PORT
    if not (port.isascii() and port.isdecimal() and 1 <= int(port) <= 65535):
        raise InvalidOption(
            "OPTIONS_REDIS_URL",
            f"a cluster node's port is a number from 1 to 65535: {text!r}",
        )
    return host, int(port)


def cluster_options(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """A cluster URL's startup nodes and the connection options it gives (user, password, TLS,
    the query's), checked: the settings refuse a bad one before anything connects."""
    nodes = cluster_nodes(url)  # first: urlsplit refuses a bad IPv6 node with a bare ValueError
    parts = urlsplit(url)
    path = [segment for segment in parts.path.split("/") if segment]
    if path and path != ["0"]:
        raise InvalidOption(
            "OPTIONS_REDIS_URL", f"a Redis Cluster has only database 0, got /{'/'.join(path)}"
        )
    options: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query):  # typed as redis-py types a redis:// URL's query
        if name == "db":
            raise InvalidOption("OPTIONS_REDIS_URL", "a Redis Cluster has only database 0")
        parser: Any = URL_QUERY_ARGUMENT_PARSERS.get(name)
        if parser is None and name not in TEXT_OPTIONS:
            # redis-py's cluster client drops a keyword it does not know, and takes any text
            # for one it does ("require_full_coverage=false" would be true): refused instead.
            raise InvalidOption(
                "OPTIONS_REDIS_URL",
                f"{name!r} is not an option of a cluster URL (redis-py's connection options:"
                f" {', '.join(sorted([*URL_QUERY_ARGUMENT_PARSERS, *TEXT_OPTIONS]))})",
            )
        if name == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
            raise InvalidOption(
                "OPTIONS_REDIS_URL", "ssl_cert_reqs: one of none, optional, required"
            )
        try:
            options[name] = value if parser is None else parser(value)
        except ValueError as exc:
            raise InvalidOption("OPTIONS_REDIS_URL", f"{name}: {exc}") from None
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    return nodes, options


def cluster_client(url: str, **options: Any) -> ClusterClient:
    """A client for the Redis Cluster behind
    ``redis+cluster://[user:password@]host:port[,host:port...][/0][?option=value...]``
    (``rediss+cluster://`` for TLS; the query takes redis-py's connection options, typed as for
    a ``redis://`` URL, such as ``ssl_ca_certs``). Any node will do: the client asks it for
    the slot map, and asks again after a ``MOVED`` or a node that stops answering (a failover).
    A cluster has one database, 0.
    """
    nodes, given = cluster_options(url)
    retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), RETRY_ATTEMPTS)
    startup = [ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
    return ClusterClient(startup, **{"retry": retry, **options, **given})


class ClusterClient:
    """A ``RedisCluster`` made on first use, in the process that uses it.

    redis-py's cluster client asks a node for the slot map as it is made, and holds locks of
    its own: made lazily, a store configures with the cluster down (reads fall back, writes
    stay in PostgreSQL) and a forked child makes its own instead of the parent's. Every
    command goes to that client; scripts register without a connection.
    """

    # Not a single server (store/redis/cache.py:server_identity): nothing publishes through it.
    connection_pool = None

    def __init__(self, startup_nodes: list[ClusterNode], **options: Any) -> None:
        self._startup_nodes = startup_nodes
        self._options = options
        self._renew()
        after_fork_in_child(self._renew)

    def _renew(self) -> None:
        self._lock = threading.Lock()
        self._client: RedisCluster | None = None
        self._pid = os.getpid()

    @property
    def cluster(self) -> RedisCluster:
        """The process's cluster client, made now if it has none."""
        client = self._client
        if client is not None and self._pid == os.getpid():
            return client
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = RedisCluster(
                    startup_nodes=list(self._startup_nodes), **self._options
                )
                self._pid = os.getpid()
            return self._client

    def get_encoder(self) -> Encoder:
        """How scripts are encoded to compute their digest, as redis-py's client would (its
        private module's class: the one place this touches it), with no server asked."""
        return Encoder(  # type: ignore[no-untyped-call]
            self._options.get("encoding", "utf-8"),
            self._options.get("encoding_errors", "strict"),
            bool(self._options.get("decode_responses", False)),
        )

    def register_script(self, script: str) -> Script:
        return Script(self, script)  # type: ignore[arg-type]  # redis-py names its own two

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # our own, not set yet (while being made): never the cluster's
            raise AttributeError(name)
        return getattr(self.cluster, name)


def scope_key(prefix: str, scope: str) -> str:
    """A scope's hash on a cluster: tagged by the scope, so its scripts run on one shard and
    the scopes spread over all of them. A scope name holds no brace (store/model/scopes.py)."""
    return f"{prefix}:scope:{{{scope}}}"


def record_prefix(prefix: str, database: str) -> str:
    """The prefix of one database's announcement record on a cluster: its keys share a slot
    (recent.lua reads two of them)."""
    return f"{prefix}:db:{{{database}}}"


def run_ids(client: ClusterClient) -> str:
    """The run ids of the cluster's primaries, in one string: it changes when a primary
    restarts or a replica takes over (a failover), as a single server's run id does."""
    found = client.info("server", target_nodes=RedisCluster.PRIMARIES)
    if "run_id" in found:  # one primary answered: redis-py hands its reply as it is
        return str(found["run_id"])
    return ",".join(sorted(str(info.get("run_id", "")) for info in found.values()))


# What the cache and the reports talk to: one server (or Sentinel's master), or a cluster.
RedisClient: TypeAlias = redis.Redis | ClusterClient
