"""The propagation baseline: N processes each consuming an exclusive queue on a raw kombu fanout.

Each consumer runs as ``python -m bench.rawfanout BROKER_URL EXCHANGE`` and prints one JSON line
per message received: ``{"pid", "seq", "t"}`` with ``t`` taken the moment the callback runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import kombu

from bench.env import ROOT, LogTail, Services, wait_for

REP_TIMEOUT = 20.0


def main() -> None:
    broker_url, exchange_name = sys.argv[1], sys.argv[2]
    exchange = kombu.Exchange(exchange_name, type="fanout", durable=False, auto_delete=False)
    queue = kombu.Queue(
        f"{exchange_name}.{os.getpid()}",
        exchange=exchange,
        routing_key="",
        durable=False,
        exclusive=True,
        auto_delete=True,
        no_ack=True,
    )
    pid = os.getpid()
    out = sys.stdout

    def on_message(body: Any, message: Any) -> None:
        received = time.time()
        out.write(json.dumps({"pid": pid, "seq": body.get("seq"), "t": received}) + "\n")
        out.flush()

    with (
        kombu.Connection(broker_url, connect_timeout=5) as conn,
        conn.Consumer(queue, callbacks=[on_message], accept=["json"], no_ack=True),
    ):
        while True:
            try:
                conn.drain_events(timeout=1.0)
            except TimeoutError:
                continue


class RawFanout:
    """The baseline: N processes each consuming an exclusive queue bound to a kombu fanout."""

    def __init__(self, run: Services, namespace: str, count: int) -> None:
        self.exchange = kombu.Exchange(
            f"{namespace}.rawfanout", type="fanout", durable=False, auto_delete=False
        )
        self.log_path = Path(tempfile.mkstemp(prefix=f"{namespace}-fanout-", suffix=".log")[1])
        self.log = LogTail(self.log_path)
        self.received: dict[int, list[float]] = defaultdict(list)
        self.count = count
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log_path.open("ab") as out:
            self.processes = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.rawfanout",
                        run.broker_url,
                        self.exchange.name,
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    start_new_session=True,
                )
                for _ in range(count)
            ]
        self.connection = kombu.Connection(run.broker_url)
        self.producer = kombu.Producer(self.connection.default_channel)
        self._ping = 0

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def publish(self, seq: int, body: dict[str, Any]) -> float:
        sent = time.time()
        self.producer.publish(
            {**body, "seq": seq},
            exchange=self.exchange,
            routing_key="",
            serializer="json",
            delivery_mode=1,
            declare=[self.exchange],
        )
        return sent

    def _collect(self) -> None:
        for line in self.log.read():
            self.received[line["seq"]].append(line["t"])

    def wait_subscribed(self, timeout: float | None = None) -> None:
        """Ping until every consumer has received one: only then is each one subscribed. By
        default a second per consumer, at least two minutes (their imports share two cores)."""
        timeout = max(120.0, float(self.count)) if timeout is None else timeout

        def ready() -> bool:
            self._ping -= 1
            self.publish(self._ping, {})
            time.sleep(0.2)
            self._collect()
            return any(len(times) >= self.count for seq, times in self.received.items() if seq < 0)

        wait_for(ready, timeout=timeout, what=f"{self.count} raw fanout consumers", interval=0)

    def all_received(self, seq: int) -> list[float]:
        def done() -> list[float] | None:
            self._collect()
            times = self.received.get(seq, [])
            return times if len(times) >= self.count else None

        return wait_for(done, timeout=REP_TIMEOUT, what=f"raw fanout #{seq}", interval=0.005)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.connection.release()
        self.log_path.unlink(missing_ok=True)


def body(scope: str, seq: int, key: str) -> dict[str, Any]:
    """A body shaped and sized like a one-key reload message."""
    now = time.time()
    return {
        "v": 1,
        "kind": "change",
        "sent_at": now,
        "origin": "bench:0",
        "scope": scope,
        "revision": seq,
        "set": {key: "[Prod 00000000]"},
        "unset": [],
        "committed_at": now,
    }


if __name__ == "__main__":
    main()
