"""Redis Cluster as the cache, checked without any server (nothing here connects): the URL form,
the hash tags that keep each script's keys in one slot, the refusal of a broker on the cluster,
and which cluster errors are transient."""

from __future__ import annotations

import os

import pytest
import redis
from redis.cluster import key_slot
from redis.exceptions import RedisClusterException, SlotNotCoveredError

from store.errors import InvalidOption
from store.redis.cache import RedisCache, redis_client, server_identity
from store.redis.cluster import ClusterClient, cluster_client, cluster_nodes
from store.settings import Settings
from store.transient import redis_unavailable

# Nothing listens on port 1: a client that connected would fail loudly.
CLUSTER = "redis+cluster://127.0.0.1:1,127.0.0.1:2"


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_cluster_url_names_its_nodes_and_options() -> None:
    """redis+cluster://user:password@host:port,host... gives a cluster client of those nodes,
    with the query's options typed as redis-py types them, and connects to none yet."""
    client = redis_client(
        "rediss+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2/0?ssl_ca_certs=/ca.pem&socket_timeout=3",
        health_check_interval=30,
    )
    assert isinstance(client, ClusterClient)
    nodes = [(n.host, n.port) for n in client._startup_nodes]
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 6379)]
    options = client._options
    assert options["username"] == "u"
    assert options["password"] == "p@ss"
    assert options["ssl"] is True
    assert options["ssl_ca_certs"] == "/ca.pem"
    assert options["socket_timeout"] == 3.0
    assert options["health_check_interval"] == 30
    assert client._client is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://h:7000/1", "only database 0"),
        ("redis+cluster://h:7000?db=2", "only database 0"),
        ("redis+cluster://h:port", "port is a number"),
        ("redis+cluster://h:70000", "port is a number from 1 to 65535"),
        ("redis+cluster://h:0", "port is a number from 1 to 65535"),
        ("redis+cluster://a:7000,:7001", "names a host"),
        ("redis+cluster://a:7000,,b:7001", "names a host"),
        ("redis+cluster://[::1:7000", "names a host"),
        ("redis+cluster://h:7000:7001", "names a host"),
        ("redis+cluster://", "at least one node"),
        ("redis+cluster://h:7000?socket_timeout=soon", "socket_timeout"),
        ("redis+cluster://h:7000?require_full_coverage=false", "not an option of a cluster URL"),
        ("redis+cluster://h:7000?sockettimeout=3", "not an option of a cluster URL"),
        ("rediss+cluster://h:7000?ssl_cert_reqs=nope", "ssl_cert_reqs: one of"),
    ],
)
def test_bad_cluster_url_is_refused_naming_the_setting(url: str, says: str) -> None:
    """A cluster URL with a database other than 0, a bad port, no node or a bad option is
    refused with an error naming OPTIONS_REDIS_URL, by the settings and by the client."""
    with pytest.raises(InvalidOption, match=says) as raised:
        cluster_client(url)
    assert raised.value.field == "OPTIONS_REDIS_URL"
    environ = {"OPTIONS_REDIS_URL": url, "CELERY_BROKER_URL": "amqp://guest@rabbit//"}
    with pytest.raises(InvalidOption, match=says) as raised:
        Settings.from_environ(environ)
    assert raised.value.field == "OPTIONS_REDIS_URL"


def test_cluster_nodes_default_port() -> None:
    """A node given without a port is on Redis's port; an IPv6 address is given in brackets."""
    assert cluster_nodes("redis+cluster://a,b:7001") == [("a", 6379), ("b", 7001)]
    assert cluster_nodes("redis+cluster://[::1]:7000,[fe80::1]") == [
        ("::1", 7000),
        ("fe80::1", 6379),
    ]


def test_scope_keys_are_tagged_on_a_cluster_only() -> None:
    """On a cluster a scope's hash is tagged by its scope (its scripts run on one shard, and
    scopes spread over the slots); one database's record keys share one slot (recent.lua reads
    two of them); on a single Redis the names stay as they were."""
    cache = RedisCache(url=CLUSTER, prefix="ns")
    assert cache.key("user:7/project:42") == "ns:scope:{user:7/project:42}"
    assert slot(cache.key("project:1")) == slot("project:1")
    assert slot(cache.key("project:1")) != slot(cache.key("project:2"))
    record = cache.record("db-1")
    keys = [record.announced_key, record.announced_at_key, record.clock_key]
    assert keys == ["ns:db:{db-1}:announced", "ns:db:{db-1}:announced-at", "ns:db:{db-1}:clock"]
    assert len({slot(key) for key in keys}) == 1
    single = RedisCache(url="redis://127.0.0.1:1/0", prefix="ns")
    assert single.key("project:1") == "ns:scope:project:1"
    assert single.record("db-1").announced_key == "ns:db:db-1:announced"


def test_cluster_scripts_register_without_a_server() -> None:
    """The cache's scripts register on a cluster client with the digests redis-py computes,
    without asking a server (a store configures while the cluster is down)."""
    cache = RedisCache(url=CLUSTER, prefix="ns")
    plain = redis.Redis()
    assert cache._delta.sha == plain.register_script(cache._delta.script).sha
    assert cache.client._client is None


def test_no_publishing_through_a_cluster_client() -> None:
    """A cluster client is never taken for the broker's server (no script publishes through
    it), and telling so asks no server."""
    client = redis_client(CLUSTER)
    assert server_identity(client.connection_pool) is None
    assert client._client is None


@pytest.mark.parametrize(
    "broker",
    [
        "",
        "redis+cluster://127.0.0.1:1",
        "redis://127.0.0.1:2/0",
        "amqp://guest@rabbit//;redis://127.0.0.1:1",
    ],
)
def test_broker_on_the_cluster_is_refused(broker: str) -> None:
    """With the cache on a cluster, a broker left to default to it, on a cluster URL or on one
    of its nodes is refused, naming CELERY_BROKER_URL: the reload exchange cannot run there."""
    environ = {"OPTIONS_REDIS_URL": CLUSTER, "CELERY_BROKER_URL": broker}
    with pytest.raises(InvalidOption, match="Redis Cluster") as raised:
        Settings.from_environ(environ)
    assert raised.value.field == "CELERY_BROKER_URL"


@pytest.mark.parametrize("broker", ["amqp://guest@rabbit//", "redis://127.0.0.1:6380/0"])
def test_broker_outside_the_cluster_is_taken(broker: str) -> None:
    """RabbitMQ, or a Redis that is not a node of the cache's cluster, is a broker."""
    environ = {"OPTIONS_REDIS_URL": CLUSTER, "CELERY_BROKER_URL": broker}
    assert Settings.from_environ(environ).broker_url == broker


def test_cluster_errors_in_a_failover_are_transient() -> None:
    """A slot no primary serves, redirections that did not settle (redis-py's cluster client
    follows MOVED and ASK itself, and gives up on a slot map in flux with "TTL exhausted"),
    CLUSTERDOWN, TRYAGAIN and a cluster that no node answers for are transient; a cluster error
    that is a mistake (no key) is not."""
    assert redis_unavailable(SlotNotCoveredError('Slot "12" is not covered by the cluster.'))
    assert redis_unavailable(redis.exceptions.ClusterError("TTL exhausted."))
    assert redis_unavailable(redis.exceptions.ClusterDownError("The cluster is down"))
    assert redis_unavailable(redis.exceptions.TryAgainError("Multiple keys request"))
    try:
        raise RedisClusterException("Redis Cluster cannot be connected") from (
            redis.exceptions.ConnectionError("Connection refused")
        )
    except RedisClusterException as exc:
        assert redis_unavailable(exc)
    assert not redis_unavailable(RedisClusterException("No way to dispatch this command"))
    assert not redis_unavailable(redis.exceptions.ResponseError("CROSSSLOT Keys don't hash"))


def test_a_forked_child_makes_its_own_cluster_client() -> None:
    """A child forked from a process that holds a cluster client starts without it (the
    parent's locks and sockets stay with the parent) and makes its own on first use."""
    client = redis_client(CLUSTER)
    made = object()
    client._client = made  # as if the parent had used it
    pid = os.fork()
    if pid == 0:  # the child: report by exit code only
        os._exit(0 if client._client is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client._client is made


def test_a_redirection_reaching_us_is_permanent() -> None:
    """MOVED or ASK reaches the caller only from a client that does not follow redirections: a
    ``redis://`` URL naming one node of a cluster (redis-py's cluster client follows them). That
    is a wrong URL, not a cluster in transition: not taken for Redis down, which would hide it
    behind PostgreSQL reads and a relay that never finishes."""
    assert not redis_unavailable(redis.exceptions.MovedError("3999 127.0.0.1:6381"))
    assert not redis_unavailable(redis.exceptions.AskError("3999 127.0.0.1:6381"))
    assert not redis_unavailable(redis.exceptions.ResponseError("MOVED 3999 127.0.0.1:6381"))
    assert not redis_unavailable(redis.exceptions.ResponseError("ASK 3999 127.0.0.1:6381"))


def test_a_bad_cluster_url_quotes_no_password() -> None:
    """A refused cluster URL's error names the node at fault, never the credentials before it
    (a raw "/" or ":" in a password included)."""
    for url in ("redis+cluster://u:se/cr:et@h:port", "redis+cluster://u:secret@h:7000,:1"):
        with pytest.raises(InvalidOption) as raised:
            Settings.from_environ({"OPTIONS_REDIS_URL": url, "CELERY_BROKER_URL": "amqp://r//"})
        said = str(raised.value)
        assert not any(part in said for part in ("u:se", "cr:et", "secret")), said


def test_an_installed_app_is_judged_by_its_own_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """worker.install(app) puts the reload exchange on the app's own broker: with the cache on
    a cluster, an app whose broker is RabbitMQ (set in code, CELERY_BROKER_URL unset) is taken,
    and one whose broker (set in code, or given to install) is a node of the cluster is
    refused naming CELERY_BROKER_URL."""
    from celery import Celery

    from worker.install import Installation

    monkeypatch.setenv("OPTIONS_REDIS_URL", CLUSTER)
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    rabbit = Celery("mine", broker="amqp://guest@rabbit//", set_as_current=False)
    assert Installation(rabbit).settings.redis_url == CLUSTER
    on_a_node = Celery("mine", broker="redis://127.0.0.1:2/0", set_as_current=False)
    with pytest.raises(InvalidOption) as raised:
        _ = Installation(on_a_node).settings
    assert raised.value.field == "CELERY_BROKER_URL"
    told = Installation(rabbit, overrides={"broker_url": "redis://127.0.0.1:1/0"})
    with pytest.raises(InvalidOption):
        _ = told.settings
