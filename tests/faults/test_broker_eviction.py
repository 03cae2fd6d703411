"""A broker's Redis that evicts any key (maxmemory-policy allkeys-*) would drop queued write
tasks and kombu's bindings without an error: a worker refuses to start on one, and `status`
shows the policy of the cache's and the broker's Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.conftest import ROOT, Services
from tests.faults.servers import RedisServer
from tests.processes import start_group, stop_group, worker_command


def _status(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "--json"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_a_worker_refuses_a_broker_that_evicts_any_key(
    services: Services, own_redis: Callable[[], RedisServer], tmp_path: Path
) -> None:
    """On a broker Redis with maxmemory-policy allkeys-lru the worker exits at start with an
    error naming the policy and the fix; status shows the policy, and noeviction once set."""
    broker = own_redis()
    client = redis.Redis.from_url(broker.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    env = services.env(CELERY_BROKER_URL=broker.url, CELERY_RESULT_BACKEND=broker.url)
    name = f"evicting-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "worker.log"
    command = worker_command(
        pool="solo",
        concurrency=1,
        queue=f"{services.namespace}.tasks",
        hostname=f"{name}@%h",
        include="",
        loglevel="INFO",
    )
    worker = start_group(command, env=env, log_path=log_path)
    try:
        code = worker.wait(timeout=90)
    finally:
        stop_group(worker, timeout=10)
    log = log_path.read_text(errors="replace")
    assert code != 0, log[-2000:]
    assert "BrokerEvicts" in log and "maxmemory-policy allkeys-lru" in log, log[-2000:]
    assert "noeviction" in log  # the error says what to set

    status = _status(env)
    assert status["broker_eviction"] == "allkeys-lru"
    client.config_set("maxmemory-policy", "noeviction")
    assert _status(env)["broker_eviction"] == "noeviction"
