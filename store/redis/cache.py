"""The shared Redis cache: a hash per scope with its values and revision, moved forward only."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from store.postgres.store import EncodedScope, Snapshot
from store.redis import cluster, direct
from store.transient import redis_unavailable

# Option keys cannot contain control characters, so these field names never collide with one.
REVISION_FIELD = b"\x00rev"
STALE_FIELD = b"\x00stale"


@functools.cache
def _script(name: str) -> str:
    """A Lua script beside this module (fill.lua, delta.lua, ...), read once."""
    return resources.files("store.redis").joinpath(name).read_text(encoding="utf-8")


class Applied(NamedTuple):
    """What ``RedisCache.apply`` did, and the highest revision of the scope announced before,
    with the task that committed it."""

    outcome: str
    announced: int
    by: str


class RedisCache:
    """Scope snapshots in Redis hashes, written with revision checks done inside Redis: on one
    server (or the master behind Sentinel), or spread over a Redis Cluster by scope."""

    def __init__(
        self,
        *,
        url: str,
        prefix: str = "optionstore",
        ttl: int = 24 * 3600,
        socket_timeout: float = 2.0,
    ) -> None:
        self.prefix = prefix
        self.ttl = ttl
        self.socket_timeout = socket_timeout
        self.cluster = cluster.is_cluster_url(url)
        # The client's own pool while its commands take turns on one connection (take_turns).
        self._shared_pool: Any = None
        # A cluster's client is made on first use, in each process (store/redis/cluster.py).
        self.client: cluster.RedisClient = redis_client(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
        )
        self._fill = self.client.register_script(_script("fill.lua"))
        self._delta = self.client.register_script(_script("delta.lua"))
        self._raise = self.client.register_script(_script("raise.lua"))
        self._recent = self.client.register_script(_script("recent.lua"))
        self._announced = self.client.register_script(_script("announced.lua"))

    def take_turns(self) -> None:
        """From now on, this process's threads take turns on one Redis connection: for a
        process that runs no task (a prefork worker's main process), whose lease, duties and
        host report need no more than one, however their seconds line up. A thread waits for
        it as long as one command may hold it (a connect and a reply, each within the socket
        timeout), so only a Redis that fails the holder fails the waiters. A client whose pool
        finds its server itself (Sentinel, a cluster) keeps its pool. Called before the
        process's threads start: a connection in use now would stay open."""
        pool: Any = self.client.connection_pool
        if self._shared_pool is not None or server_identity(pool) is None:
            return
        self._shared_pool = pool
        self.client.connection_pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
            connection_class=pool.connection_class,
            max_connections=1,
            timeout=2 * self.socket_timeout,
            **pool.connection_kwargs,
        )
        pool.disconnect(inuse_connections=False)

    def share_connections(self) -> None:
        """Undo ``take_turns`` (in a child forked from such a process, which runs tasks)."""
        if self._shared_pool is not None:
            self.client.connection_pool, self._shared_pool = self._shared_pool, None

    def key(self, scope: str) -> str:
        if self.cluster:
            return cluster.scope_key(self.prefix, scope)
        return f"{self.prefix}:scope:{scope}"

    def get(self, scope: str) -> Snapshot | None:
        return _snapshot(self.client.hgetall(self.key(scope)))

    def get_encoded(self, scopes: list[str]) -> dict[str, EncodedScope | None]:
        """The scopes a reader loads, as stored (no value decoded here); None where a scope is
        not cached or marked stale."""
        if len(scopes) == 1:  # the common miss: a pipeline only adds overhead to one command
            return {scopes[0]: _encoded(direct.hgetall(self.client, self.key(scopes[0])))}
        pipe = self.client.pipeline(transaction=False)
        for scope in scopes:
            pipe.hgetall(self.key(scope))
        return {scope: _encoded(raw) for scope, raw in zip(scopes, pipe.execute(), strict=True)}

    def fill(self, scope: str, snapshot: Snapshot) -> bool:
        args: list[str | bytes | int] = [REVISION_FIELD, STALE_FIELD, snapshot.revision, self.ttl]
        for key, value in snapshot.values.items():
            args += (key, value)
        return bool(self._fill(keys=[self.key(scope)], args=args))

    def apply(
        self,
        scope: str,
        revision: int,
        changes: Mapping[str, str | None],
        *,
        task_id: str = "",
        database: str | None = None,
        announce: tuple[Sequence[str], str] | None = None,
    ) -> Applied:
        """Move the cached scope to ``revision``, committed by ``task_id`` in ``database``:
        'applied', 'old' or 'floor', and the highest revision of the scope announced before in
        that database, with the task that committed it (``Applied.announced``, ``Applied.by``;
        nothing is recorded without a ``database``).

        ``announce`` is (topics, message): published by the same script, once the cache is
        moved, when the broker's pub/sub is on this server (``Publisher.topics_on``).
        """
        topics, message = announce or ((), "")
        sets = [(k, v) for k, v in changes.items() if v is not None]
        record = self.record(database or "-")
        recorded: Applied | None = None
        unrecorded: Exception | None = None
        if self.cluster:
            # The record lives on another shard than the scope: its own script, first, as
            # delta.lua does it on one server; then delta.lua records nothing. A record's shard
            # that cannot take it now (down, full, failing over) does not hold the scope back:
            # the scope is moved all the same, and the error raised after (the relay records
            # the announcement later, as for any cache step that failed).
            recorded = Applied("", 0, "")
            if database:
                on = [record.announced_key, record.announced_at_key]
                try:
                    announced, by = self._announced(keys=on, args=[scope, revision, task_id])
                except Exception as exc:
                    if not redis_unavailable(exc):
                        raise
                    unrecorded = exc
                else:
                    recorded = Applied("", int(announced), _text(by))
            database = None
        args: list[str | bytes | int] = [
            REVISION_FIELD,
            STALE_FIELD,
            revision,
            self.ttl,
            scope if database else "",
            task_id,
            message,
            len(topics),
            *topics,
            len(sets),
        ]
        for key, value in sets:
            args += (key, value)
        args += [k for k, v in changes.items() if v is None]
        keys: tuple[str, ...] = (self.key(scope), record.announced_key, record.announced_at_key)
        if recorded is not None:
            keys = keys[:1]
        # By its digest, directly: redis-py's Script wrapper costs more Python per call than
        # the rest of the call. NOSCRIPT (a new or restarted server): loaded, then run.
        try:
            outcome, announced, by = self.client.evalsha(self._delta.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.client.script_load(self._delta.script)
            outcome, announced, by = self.client.evalsha(self._delta.sha, len(keys), *keys, *args)
        if unrecorded is not None:
            raise unrecorded
        if recorded is not None:
            return recorded._replace(outcome=_text(outcome))
        return Applied(_text(outcome), int(announced), _text(by))

    def record(self, database: str) -> AnnouncedRecord:
        """What was announced of ``database``'s commits (PostgresStore.database_id)."""
        prefix = (
            cluster.record_prefix(self.prefix, database)
            if self.cluster
            else f"{self.prefix}:db:{database}"
        )
        return AnnouncedRecord(self.client, prefix, self._recent)

    def revisions(self, scopes: list[str]) -> dict[str, int | None]:
        """The revision each scope's hash holds (a floor's too), or None where there is none."""
        pipe = self.client.pipeline(transaction=False)
        for scope in scopes:
            pipe.hget(self.key(scope), REVISION_FIELD)
        return {
            scope: None if raw is None else int(raw)
            for scope, raw in zip(scopes, pipe.execute(), strict=True)
        }

    def raise_floor(self, scope: str, revision: int) -> bool:
        """Make a hash older than ``revision`` a floor at ``revision``; True if it was older."""
        args: list[str | bytes | int] = [REVISION_FIELD, STALE_FIELD, revision, self.ttl]
        return bool(self._raise(keys=[self.key(scope)], args=args))

    def run_id(self) -> str:
        """The server's run id: a new one means Redis restarted (or another server answers);
        on a cluster, its primaries' (a failover changes one)."""
        if isinstance(self.client, cluster.ClusterClient):
            return cluster.run_ids(self.client)
        info = self.client.info("server")
        return str(info.get("run_id", ""))

    def ping(self) -> bool:
        return bool(self.client.ping())


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


def redis_client(url: str, **options: Any) -> cluster.RedisClient:
    """A client for a ``redis://``/``rediss://`` URL (redis-py's forms, TLS options in the
    query: ``ssl_ca_certs``, ``ssl_cert_reqs``, ``ssl_certfile``, ``ssl_keyfile``), for the
    master behind Redis Sentinel:
    ``redis+sentinel://[user:password@]host:26379[,host2:26379...]/<master>[/<db>]``
    (``rediss+sentinel://`` for TLS to the master; ``sentinel_password`` in the query for
    Sentinels that require one), or for a Redis Cluster (``redis+cluster://``, a
    ``redis.cluster.RedisCluster``: store/redis/cluster.py).

    A Sentinel client asks the Sentinels for the master on every new connection, and drops a
    connection whose server turned replica (redis-py's ``SentinelManagedConnection``): after a
    failover it talks to the new master.
    """
    parts = urlsplit(url)
    if parts.scheme in cluster.CLUSTER_SCHEMES:
        return cluster.cluster_client(url, **options)
    if parts.scheme not in SENTINEL_SCHEMES:
        return redis.Redis.from_url(url, **options)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        sentinels.append((name or host, int(port) if name and port else 26379))
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    if not path:
        raise ValueError(f"a Sentinel URL names its master: {parts.scheme}://host:26379/mymaster")
    query = dict(parse_qsl(parts.query))
    sentinel_password = query.pop("sentinel_password", None)
    master_options: dict[str, Any] = dict(options)
    for name, value in query.items():  # typed as redis-py types a redis:// URL's query
        parser: Any = URL_QUERY_ARGUMENT_PARSERS.get(name)
        master_options[name] = value if parser is None else parser(value)
    if parts.username:
        master_options["username"] = unquote(parts.username)
    if parts.password:
        master_options["password"] = unquote(parts.password)
    master_options["db"] = int(path[1]) if len(path) > 1 else 0
    tls = parts.scheme.startswith("rediss")
    sentinel_options = {
        k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")
    }
    if sentinel_password:
        sentinel_options["password"] = sentinel_password
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_options)
    client: redis.Redis = sentinel.master_for(
        path[0],
        redis_class=redis.Redis,
        connection_class=SentinelManagedSSLConnection if tls else SentinelManagedConnection,
        **master_options,
    )
    return client


def server_identity(pool: Any) -> tuple[Any, ...] | None:
    """What tells one Redis server, as a redis-py connection pool reaches it: the connection
    class (TCP, TLS or a Unix socket), address and user. None for a pool that finds its server
    some other way (Sentinel): its server may change under it."""
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict) or not (kwargs.get("path") or kwargs.get("host")):
        return None
    if type(pool) is not redis.ConnectionPool and type(pool) is not redis.BlockingConnectionPool:
        return None
    return (
        getattr(pool, "connection_class", None),
        kwargs.get("path"),
        kwargs.get("host"),
        kwargs.get("port"),
        kwargs.get("username"),
        kwargs.get("password"),
    )


def _encoded(raw: dict[Any, Any]) -> EncodedScope | None:
    if not raw or STALE_FIELD in raw:
        return None
    revision = int(raw.pop(REVISION_FIELD, 0))
    # The keys decoded in one call: a key holds no control character (validate_key), so NUL
    # separates them.
    keys = b"\0".join(raw).decode().split("\0") if raw else []
    return EncodedScope(revision, keys, b"[" + b",".join(raw.values()) + b"]")


def _snapshot(raw: Mapping[Any, Any]) -> Snapshot | None:
    if not raw or STALE_FIELD in raw:
        return None
    revision = 0
    values: dict[str, str] = {}
    for field, value in raw.items():
        if field == REVISION_FIELD:
            revision = int(value)
        else:
            values[field.decode()] = value.decode()
    return Snapshot(revision, values)


class AnnouncedRecord:
    """For one database: the highest revision ever announced of each scope and the task that
    committed it (no expiry), when each scope was last announced a new revision (one window),
    and the last tick of the database's clock seen. A database that went back in time is
    found behind it (worker/duties/reconcile.py)."""

    def __init__(self, client: cluster.RedisClient, prefix: str, recent: Any) -> None:
        self.client = client
        self.announced_key = f"{prefix}:announced"
        self.announced_at_key = f"{prefix}:announced-at"
        self.clock_key = f"{prefix}:clock"
        self._recent = recent

    def recent(self, *, window: float, limit: int) -> dict[str, int]:
        """The scopes announced a new revision in the last ``window`` seconds (the newest
        ``limit``), each with the highest revision announced of it."""
        found = self._recent(keys=[self.announced_at_key, self.announced_key], args=[window, limit])
        return {
            _text(scope): _revision(entry)
            for scope, entry in zip(found[::2], found[1::2], strict=True)
        }

    def page(self, *, cursor: int, count: int) -> tuple[int, dict[str, int]]:
        """One page of every scope's announced revision: (next cursor, 0 when done; page)."""
        cursor, page = self.client.hscan(self.announced_key, cursor, count=count)
        assert isinstance(page, dict)  # a list only with no_values=True
        return int(cursor), {_text(scope): _revision(entry) for scope, entry in page.items()}

    def clock(self) -> int:
        raw = self.client.get(self.clock_key)
        return 0 if raw is None else int(raw)

    def set_clock(self, tick: int) -> None:
        self.client.set(self.clock_key, tick)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _revision(entry: bytes | str) -> int:
    """The revision of an announced-revisions entry ("<revision> <task id>")."""
    return int(_text(entry).split(" ", 1)[0])
