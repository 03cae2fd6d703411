"""A Redis that speaks only TLS as broker, reload exchange and cache, and a RabbitMQ that speaks
only TLS as broker and reload exchange: a prefork worker on a rediss:// or amqps:// URL writes,
reads and hears broadcasts, and a web process configured from the environment follows them
too."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError

from store.settings import broker_transport_for
from tests.conftest import ROOT, fresh_id, wait_for
from tests.faults.checks import read_all, record
from tests.faults.fleet import FaultWorker, fleet
from tests.faults.servers import PostgresServer
from tests.faults.topology_servers import TLSRabbitMQ, TLSRedis

# A web process: configured from the environment on its first read, it follows broadcasts over
# the URL's TLS, and prints what it reads until it reads the expected value.
WEB_READER = """
import json, sys, time, store
project, key, want = int(sys.argv[1]), sys.argv[2], sys.argv[3]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    value = store.project_options.get_value(project, key)
    synced = store.backend.local.synced
    print("READ", json.dumps({"value": value, "synced": synced}), flush=True)
    if value == want and synced:
        break
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def tls_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRabbitMQ]:
    """A RabbitMQ node of this module's own on a TLS-only port (it takes seconds to boot)."""
    server = TLSRabbitMQ(tmp_path_factory.mktemp("tls-rabbitmq")).start()
    yield server
    server.kill()


@pytest.fixture
def tls_redis(scratch: Path) -> Iterator[TLSRedis]:
    """A Redis of this test's own on a TLS-only port, with certificates made for it."""
    server = TLSRedis(scratch / f"tls-{uuid.uuid4().hex[:8]}").start()
    yield server
    server.kill()


def _children_and_web_follow(worker: FaultWorker, project: int) -> tuple[int, float]:
    """Writes through ``worker``: each of its children (process mode) applies the broadcast
    of a change, and so does a web process configured from the worker's environment. Returns
    the number of children and how long the broadcast took to reach them all."""
    worker.call("options.set_project_option", project, "k", "v0")
    first = read_all(worker, project)
    assert all(values == {"k": "v0"} for values in first.values()), first
    started = time.monotonic()
    worker.call("options.set_project_option", project, "k", "v1")
    # Process mode: a child serves its cached v0 until the broadcast of v1 reaches it.
    wait_for(
        lambda: all(v == {"k": "v1"} for v in read_all(worker, project).values()),
        timeout=30,
        message="every child to apply the broadcast",
    )
    applied_s = time.monotonic() - started
    web = subprocess.Popen(
        [sys.executable, "-c", WEB_READER, str(project), "k", "v2"],
        env=worker.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert web.stdout is not None
        lines: list[dict[str, object]] = []

        def web_synced() -> bool:
            assert web.stdout is not None
            line = web.stdout.readline()
            assert line, "the web process ended before it subscribed"
            if line.startswith("READ "):  # other lines are its log
                lines.append(json.loads(line.removeprefix("READ ")))
            return bool(lines and lines[-1]["synced"])

        wait_for(web_synced, timeout=60, interval=0, message="the web process to subscribe")
        assert lines[-1]["value"] == "v1"
        worker.call("options.set_project_option", project, "k", "v2")
        _, errors = web.communicate(timeout=90)
        assert web.returncode == 0, errors[-3000:]
    finally:
        if web.poll() is None:
            web.kill()
    return len(first), applied_s


@contextlib.contextmanager
def _followed_over_tls(
    stable: PostgresServer, *, broker_url: str, cache_url: str, fault: str
) -> Iterator[FaultWorker]:
    """A prefork worker (process mode) on ``broker_url`` and ``cache_url`` whose children and a
    web process follow its writes (``_children_and_web_follow``); yields it still running, then
    records the figures as ``fault``."""
    with fleet(stable.new_database(), cache_url, stable.redis_url) as own:
        worker = own.start(
            broker_url=broker_url, concurrency=2, extra_env={"OPTIONS_LOCAL_CACHE": "process"}
        )
        children, applied_s = _children_and_web_follow(worker, fresh_id())
        yield worker
    record(fault, writes=3, lost=0, children=children, broadcast_applied_s=round(applied_s, 2))


@pytest.mark.faults
def test_worker_on_tls_redis(stable: PostgresServer, tls_redis: TLSRedis) -> None:
    """A prefork worker whose broker and cache are a rediss:// URL commits writes, its children
    and a web process apply the broadcast of each (process mode), and every connection to Redis
    is TLS."""
    plain = redis.Redis("127.0.0.1", tls_redis.port, socket_timeout=2, socket_connect_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # the server has no plaintext port: whoever talks to it talks TLS
    with _followed_over_tls(
        stable,
        broker_url=tls_redis.url,
        cache_url=tls_redis.url,
        fault="TLS Redis (rediss://) as broker, reload exchange and cache",
    ) as worker:
        # The worker's broker connections (named by store/transport/redis.py) are on this server.
        names = [str(c.get("name", "")) for c in tls_redis.client().client_list()]
        assert any(n.startswith("optionstore-taken-") for n in names), names
        assert "can be lost if this worker dies" not in worker.log()


@pytest.mark.faults
def test_worker_on_tls_rabbitmq(stable: PostgresServer, tls_rabbitmq: TLSRabbitMQ) -> None:
    """A prefork worker whose broker is an amqps:// URL (a RabbitMQ with a TLS port only, its
    certificate checked against the test's CA) takes writes, its children and a web process
    apply the broadcast of each over the reload exchange on that broker."""
    plain = tls_rabbitmq.connection(f"amqp://guest:guest@localhost:{tls_rabbitmq.port}//")
    with pytest.raises(OperationalError), plain:
        plain.ensure_connection(max_retries=1)  # no plaintext port
    with _followed_over_tls(
        stable,
        broker_url=tls_rabbitmq.url,
        cache_url=stable.redis_url,
        fault="TLS RabbitMQ (amqps://) as broker and reload exchange",
    ):
        pass  # what this test checks, _children_and_web_follow has checked by now


@pytest.mark.faults
def test_amqps_checks_the_certificate_name(tls_rabbitmq: TLSRabbitMQ) -> None:
    """The transport an amqps:// URL gets checks that the broker's certificate names the host
    the URL does (kombu's own does not): reached as 127.0.0.2, which the certificate does not
    name, the broker is refused, unless the URL says ssl_check_hostname=false."""
    ca = tls_rabbitmq.certificates["ca"]
    for host, check, refused in (
        ("localhost", "", False),
        ("127.0.0.2", "", True),
        ("127.0.0.2", "&ssl_check_hostname=false", False),
    ):
        url = f"amqps://guest:guest@{host}:{tls_rabbitmq.port}//?ssl_ca_certs={ca}{check}"
        with tls_rabbitmq.connection(url, transport=broker_transport_for(url)) as conn:
            if refused:
                with pytest.raises(OperationalError, match="certificate verify failed"):
                    conn.ensure_connection(max_retries=1)
            else:
                conn.ensure_connection(max_retries=1)
