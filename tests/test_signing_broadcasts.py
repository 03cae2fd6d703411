"""Forged reload messages published raw onto a running worker's reload exchange, on a Redis
broker and on RabbitMQ: dropped unread and counted, they change nothing in any child, and the
real writes after them land and converge."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kombu
import pytest

from store.broadcast.codec import (
    SIGNATURE_HEADER,
    ReloadMessage,
    encode,
)
from store.broadcast.exchange import reload_exchange
from store.signing.keys import Keyring
from tests.conftest import (
    ROOT,
    Services,
    Worker,
    amqp_url,
    free_port,
    fresh_id,
    run_keyring,
    wait_for,
)
from tests.test_broadcast import first_answers, isolated, start, wait_applied

CHILDREN = 2
FORGER = Keyring([f"forger-{uuid.uuid4().hex}"])


@dataclass
class Fleet:
    services: Services
    worker: Worker
    port: int
    raw: kombu.Producer
    broker_name: str

    def publish(self, body: str, signature: str | None = None) -> None:
        """``body`` onto the reload exchange as any client of the broker can send it."""
        exchange = reload_exchange(self.services.namespace)
        self.raw.publish(
            body.encode(),
            exchange=exchange,
            routing_key="",
            content_type="application/json",
            content_encoding="utf-8",
            headers={} if signature is None else {SIGNATURE_HEADER: signature},
            declare=[exchange],
        )

    def unverified(self) -> float:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        found = re.search(
            r'^optionstore_broadcasts_total\{outcome="unverified"\} (\S+)$', text, re.M
        )
        return float(found.group(1)) if found else 0.0

    def write(self, project: int, value: Any) -> int:
        result = self.worker.call("options.set_project_option", project, "k", value)
        revision: int = result["revision"]
        return revision

    def values(self, project: int) -> set[Any]:
        return set(
            self.worker.read_everywhere("project_options", "get_value", project, "k").values()
        )


@pytest.fixture(scope="module", params=["redis", "amqp"])
def fleet(request: pytest.FixtureRequest, services: Services) -> Iterator[Fleet]:
    """Process-mode prefork children (their caches move on broadcasts alone) holding the run's
    key, with metrics, on a Redis broker or RabbitMQ; a database and a namespace of their own."""
    if request.param == "amqp" and services.name != "machine":
        pytest.skip("the RabbitMQ variant runs on the machine target")
    broker = services.broker_url if request.param == "redis" else amqp_url()
    port = free_port()
    with isolated(services, broker) as own, contextlib.ExitStack() as stack:
        worker = start(
            own,
            pool="prefork",
            concurrency=CHILDREN,
            broker_url=broker,
            extra_env={
                "OPTIONS_LOCAL_CACHE": "process",
                "OPTIONS_METRICS_PORT": str(port),
                # Each child checks every message itself (tests/test_host_relay.py: the relay).
                "OPTIONS_HOST_RELAY": "0",
            },
        )
        stack.callback(worker.stop)
        connection = stack.enter_context(kombu.Connection(broker))
        fleet = Fleet(own, worker, port, kombu.Producer(connection.default_channel), request.param)
        wait_for(lambda: _answers(fleet), interval=0.2, message="the metrics endpoint")
        yield fleet


def _answers(fleet: Fleet) -> bool:
    try:
        fleet.unverified()
    except OSError:
        return False
    return True


def wait_dropped(fleet: Fleet, before: float, messages: int) -> None:
    wait_for(
        lambda: fleet.unverified() >= before + messages * CHILDREN,
        interval=0.2,
        message=f"every child to drop {messages} unverified messages",
    )


def assert_cached(fleet: Fleet, project: int) -> None:
    """Each child reads the scope from its own cache: no round trip to Redis or PostgreSQL."""
    for pid, answer in first_answers(
        fleet.worker, "project_options", "get_value", project, "k"
    ).items():
        assert answer["after"] == answer["before"], (pid, answer)


def test_a_forged_change_reaches_no_cache_and_the_real_one_lands(fleet: Fleet) -> None:
    """Changes at the next revision carrying a value PostgreSQL never had (unsigned, signed
    with another key, or a signed body altered) are dropped unread and counted; every child
    keeps serving the committed value from its cache; the real write at that revision then
    reaches every child, and `set --wait` counts them converged."""
    project = fresh_id()
    committed = fleet.write(project, "v1")
    assert fleet.values(project) == {"v1"}
    scope = f"project:{project}"
    forged = ReloadMessage(
        "change", scope, committed + 1, {"k": "forged"}, (), time.time(), time.time()
    )
    body, honest = encode(forged), encode(forged).replace('"forged"', '"v1"')
    before = fleet.unverified()
    fleet.publish(body)
    fleet.publish(body, FORGER.sign(body.encode()))
    fleet.publish(body, run_keyring().sign(honest.encode()))
    wait_dropped(fleet, before, 3)
    assert fleet.values(project) == {"v1"}
    assert_cached(fleet, project)

    sent = time.monotonic()
    real = fleet.write(project, "v2")
    assert real == committed + 1
    wait_applied(fleet.services, fleet.worker.child_pids(), scope, real)
    applied_s = time.monotonic() - sent
    assert fleet.values(project) == {"v2"}
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "set", scope, "k", '"v3"', "--wait"],
        cwd=ROOT,
        env=fleet.worker.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"applied by {CHILDREN} live worker processes", done.stdout), done.stdout
    assert fleet.values(project) == {"v3"}
    print(
        f"\nFIGURE forged changes ({fleet.services.name}, {fleet.broker_name}): 3 x {CHILDREN} "
        f"dropped unread and counted, every child kept v1; the real write at that revision "
        f"reached every child {applied_s:.2f}s after it was sent; set --wait converged"
    )


def test_a_forged_heartbeat_with_a_huge_mark_leaves_every_scope_cacheable(fleet: Fleet) -> None:
    """Heartbeats naming the largest revision there is for a scope (unsigned, or signed with
    another key) are dropped unread and counted: every child keeps caching that scope, before
    and after its next real write."""
    project = fresh_id()
    fleet.write(project, "v1")
    assert fleet.values(project) == {"v1"}
    scope = f"project:{project}"
    beat = encode(ReloadMessage.heartbeat(origin="forger", marks={scope: 2**63 - 1}))
    before = fleet.unverified()
    fleet.publish(beat)
    fleet.publish(beat, FORGER.sign(beat.encode()))
    wait_dropped(fleet, before, 2)
    assert_cached(fleet, project)

    real = fleet.write(project, "v2")
    wait_applied(fleet.services, fleet.worker.child_pids(), scope, real)
    assert fleet.values(project) == {"v2"}
    assert_cached(fleet, project)
    print(
        f"\nFIGURE forged heartbeats ({fleet.services.name}, {fleet.broker_name}): 2 x "
        f"{CHILDREN} dropped unread and counted; the scope stayed cached, before and after "
        f"its next write"
    )
