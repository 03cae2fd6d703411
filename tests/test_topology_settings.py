"""How broker and cache URLs become connections: TLS, Sentinel, quorum queues and the kombu pin,
checked without any server (nothing here connects)."""

from __future__ import annotations

import importlib
import ssl
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis
from kombu.utils.url import parse_url
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection
from structlog.testing import capture_logs

from store.errors import InvalidOption
from store.redis.cache import redis_client
from store.settings import (
    TESTED_KOMBU,
    Settings,
    broker_connection_options,
    broker_ssl_options,
    broker_transport_for,
)
from store.transport.amqps import amqp_ssl_options

SENTINELS = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26380"


@pytest.fixture
def celeryconfig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """celeryconfig with its settings read afresh from the environment this test sets."""
    module = importlib.import_module("celeryconfig")
    module.settings.cache_clear()
    yield module
    module.settings.cache_clear()


def test_pin_matches_installed_kombu() -> None:
    """The kombu the project is installed with is one the transport was tested with."""
    assert kombu.__version__ in TESTED_KOMBU


def test_redis_urls_get_the_projects_transport() -> None:
    """redis://, rediss:// and sentinel:// use store/transport/redis.py; others their own."""
    assert broker_transport_for("redis://h/0") == "store.transport.redis:Transport"
    assert broker_transport_for("rediss://h/0") == "store.transport.redis:Transport"
    assert broker_transport_for(SENTINELS) == "store.transport.redis:SentinelTransport"
    assert broker_transport_for("amqp://guest@h//") is None


def test_untested_kombu_falls_back_with_a_warning() -> None:
    """Under a kombu version the transport was not tested with, kombu's own transport is used
    and the fall-back is logged, never silent."""
    with capture_logs() as events:
        assert broker_transport_for("redis://h/0", kombu_version="5.7.1") is None
        assert broker_transport_for(SENTINELS, kombu_version="5.8.0") is None
    warnings = [e for e in events if e["event"] == "broker.transport_untested"]
    assert [e["kombu"] for e in warnings] == ["5.7.1", "5.8.0"]
    assert all(e["log_level"] == "warning" for e in warnings)


def test_rediss_broker_verifies_by_default() -> None:
    """A rediss:// broker URL turns TLS on with certificate checks, whatever the transport."""
    assert broker_ssl_options("rediss://h:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert broker_ssl_options("redis://h/0") is None


def test_rediss_broker_takes_the_urls_tls_parameters() -> None:
    """ssl_cert_reqs, ssl_ca_certs, certificate files and hostname checks come from the query."""
    url = (
        "rediss://h:6380/0?ssl_cert_reqs=CERT_OPTIONAL&ssl_ca_certs=/ca.pem"
        "&ssl_certfile=/c.pem&ssl_keyfile=/k.pem&ssl_check_hostname=false"
    )
    assert broker_ssl_options(url) == {
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_ca_certs": "/ca.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
        "ssl_check_hostname": False,
    }
    with pytest.raises(InvalidOption) as raised:
        broker_ssl_options("rediss://h/0?ssl_cert_reqs=maybe")
    assert raised.value.field == "ssl_cert_reqs"


def test_amqps_broker_gets_the_transport_that_checks_names() -> None:
    """An amqps:// URL gets store/transport/amqps.py's transport, which renames the query's TLS
    parameters for py-amqp, verifies the certificate and checks its name against the URL's host
    (None: kombu fills it in), unless the URL says otherwise."""
    url = "amqps://u:p@rabbit.internal:5671/vh?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem"
    assert broker_transport_for(url) == "store.transport.amqps:Transport"
    assert broker_connection_options(url, master_name=None) == {
        "transport": "store.transport.amqps:Transport"
    }
    assert amqp_ssl_options(parse_url(url)["ssl"]) == {
        "ca_certs": "/ca.pem",
        "certfile": "/c.pem",
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,
    }
    assert amqp_ssl_options(True) == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    unchecked = parse_url("amqps://h//?ssl_check_hostname=false")["ssl"]
    assert amqp_ssl_options(unchecked) == {"cert_reqs": ssl.CERT_REQUIRED}
    unverified = parse_url("amqps://h//?ssl_cert_reqs=none")["ssl"]
    assert amqp_ssl_options(unverified) == {"cert_reqs": ssl.CERT_NONE}
    # Options given in py-amqp's own names (a broker_use_ssl dict) are kept.
    assert amqp_ssl_options({"ca_certs": "/ca.pem", "server_hostname": "r"}) == {
        "ca_certs": "/ca.pem",
        "server_hostname": "r",
        "cert_reqs": ssl.CERT_REQUIRED,
    }


def test_amqps_broker_refuses_what_py_amqp_would_not_take() -> None:
    """A TLS parameter py-amqp has no use for, or a bad ssl_cert_reqs, is refused up front,
    naming it."""
    with pytest.raises(InvalidOption) as raised:
        broker_transport_for("amqps://h//?ssl_password=x")
    assert raised.value.field == "ssl_password"
    with pytest.raises(InvalidOption) as raised:
        broker_transport_for("amqps://h//?ssl_cert_reqs=maybe")
    assert raised.value.field == "ssl_cert_reqs"


def test_sentinel_broker_needs_its_master_name() -> None:
    """A sentinel:// broker carries the master's name as kombu's transport option; without one
    it is refused up front, naming the variable."""
    assert broker_connection_options(SENTINELS, master_name="mymaster") == {
        "transport_options": {"master_name": "mymaster"}
    }
    with pytest.raises(InvalidOption) as raised:
        broker_connection_options(SENTINELS, master_name=None)
    assert raised.value.field == "OPTIONS_BROKER_MASTER_NAME"


def test_queue_type_is_checked() -> None:
    """OPTIONS_TASK_QUEUE_TYPE takes classic or quorum, nothing else."""
    assert Settings.from_environ({}).task_queue_type == "classic"
    assert Settings.from_environ({"OPTIONS_TASK_QUEUE_TYPE": "quorum"}).task_queue_type == "quorum"
    with pytest.raises(InvalidOption):
        Settings.from_environ({"OPTIONS_TASK_QUEUE_TYPE": "stream"})


def test_log_level_is_checked() -> None:
    """OPTIONS_LOG_LEVEL defaults to info and names itself when it is not a level."""
    assert Settings.from_environ({}).log_level == "info"
    assert Settings.from_environ({"OPTIONS_LOG_LEVEL": "DEBUG"}).log_level == "debug"
    with pytest.raises(InvalidOption) as raised:
        Settings.from_environ({"OPTIONS_LOG_LEVEL": "verbose"})
    assert raised.value.field == "OPTIONS_LOG_LEVEL"


def test_celeryconfig_on_rediss(celeryconfig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a rediss:// broker Celery gets the project's transport and TLS options with it."""
    monkeypatch.setenv("CELERY_BROKER_URL", "rediss://h:6380/0?ssl_ca_certs=/ca.pem")
    assert celeryconfig.broker_transport == "store.transport.redis:Transport"
    assert celeryconfig.broker_use_ssl == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/ca.pem",
    }


def test_celeryconfig_on_amqps(celeryconfig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an amqps:// broker Celery gets the transport that checks the certificate's name."""
    monkeypatch.setenv("CELERY_BROKER_URL", "amqps://u:p@rabbit:5671//?ssl_ca_certs=/ca.pem")
    assert celeryconfig.broker_transport == "store.transport.amqps:Transport"
    assert celeryconfig.broker_use_ssl is None  # the URL's own, renamed by the transport


def test_celeryconfig_on_sentinel(celeryconfig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a sentinel:// broker Celery gets the Sentinel-aware transport and the master's name."""
    monkeypatch.setenv("CELERY_BROKER_URL", SENTINELS)
    monkeypatch.setenv("OPTIONS_BROKER_MASTER_NAME", "mymaster")
    assert celeryconfig.broker_transport == "store.transport.redis:SentinelTransport"
    assert celeryconfig.broker_transport_options["master_name"] == "mymaster"
    assert celeryconfig.broker_use_ssl is None


def test_celeryconfig_quorum(celeryconfig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """OPTIONS_TASK_QUEUE_TYPE=quorum makes Celery declare quorum queues and publish tasks with
    confirms on RabbitMQ."""
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://guest:guest@h//")
    monkeypatch.setenv("OPTIONS_TASK_QUEUE_TYPE", "quorum")
    assert celeryconfig.task_default_queue_type == "quorum"
    assert celeryconfig.worker_detect_quorum_queues is True
    assert celeryconfig.broker_transport_options["confirm_publish"] is True


def test_cache_sentinel_url() -> None:
    """redis+sentinel://hosts/master/db gives a client of that master through those Sentinels."""
    client = redis_client(
        "redis+sentinel://u:pw@10.0.0.1:26379,10.0.0.2/mymaster/3?sentinel_password=s",
        socket_timeout=1.0,
    )
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "pw"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26379]
    assert sentinels[0].connection_pool.connection_kwargs["password"] == "s"


def test_cache_sentinel_url_with_tls() -> None:
    """rediss+sentinel:// talks TLS to the master, with the query's certificate options."""
    client = redis_client("rediss+sentinel://10.0.0.1:26379/mymaster?ssl_ca_certs=/ca.pem")
    pool = client.connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    with pytest.raises(ValueError, match="names its master"):
        redis_client("redis+sentinel://10.0.0.1:26379")


def test_cache_plain_urls_are_redis_pys() -> None:
    """redis:// and rediss:// cache URLs are read by redis-py itself, TLS options included."""
    client = redis_client("rediss://h:6380/2?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required")
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
