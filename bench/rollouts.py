"""How long a canary rollout's promotion takes to reach every process, against a plain write of
the same key on the same worker in the same run."""

from __future__ import annotations

import random
import socket
import statistics
import time
import uuid
from collections import defaultdict

from bench.env import Services, iso_to_epoch, wait_for
from bench.figures import Figure, Series
from bench.fleet import REP_TIMEOUT, Fleet, fleet, settle
from bench.reads import KEY, PROJECT_ID
from store.rollouts.model import Selector, Thresholds
from store.rollouts.records import RolloutRecords
from worker.duties.rollouts import promotion_task_id

SCOPE = f"project:{PROJECT_ID}"


def _written(running: Fleet, task_id: str) -> tuple[int, float] | None:
    """The revision and commit time of ``task_id``'s write, once committed (a promotion is
    committed by the leader's main process, outside any task: its log event names no task)."""
    with running.backend.db.connection() as conn:
        row = conn.execute(
            "SELECT revision, extract(epoch FROM committed_at) FROM options_write"
            " WHERE task_id = %s",
            (task_id,),
        ).fetchone()
    return None if row is None else (int(row[0]), float(row[1]))


def _reached(running: Fleet, task_id: str) -> float:
    """Milliseconds from the commit of ``task_id`` to the last child applying it."""
    rev, committed = wait_for(
        lambda: _written(running, task_id), timeout=REP_TIMEOUT, what=task_id, interval=0.005
    )
    seen = max(iso_to_epoch(e["timestamp"]) for e in running.all_applied(SCOPE, rev))
    return (seen - committed) * 1000


class _Following:
    """Which children follow each rollout (their `rollout.serving` events). The worker's log is
    read once (events since the last read), so this reader also hands the fleet its events."""

    def __init__(self, running: Fleet) -> None:
        self.running = running
        self.pids: dict[int, set[int]] = defaultdict(set)

    def collect(self) -> None:
        running = self.running
        for event in running.worker.events():
            name = event.get("event")
            if name == "rollout.serving":
                for rollout_id in event.get("rollouts", []):
                    self.pids[rollout_id].add(event["pid"])
            elif name == "broadcast.applied":
                running.applied[(event["scope"], event["revision"])].append(event)
            elif name == "option.write" and event.get("task_id"):
                running.writes[event["task_id"]] = event["revision"]

    def everyone(self, rollout_id: int) -> bool:
        self.collect()
        return set(self.running.pids) <= self.pids[rollout_id]


def promotion(run: Services, *, quick: bool) -> Figure:
    reps = 8 if quick else 60
    samples: dict[str, list[float]] = {"promotion": [], "write": []}
    decided: list[float] = []
    with fleet(run, "rollouts", 4) as running:
        records = RolloutRecords(
            running.backend.db, running.backend.redis.client, namespace=running.worker.namespace
        )
        live = [f"{socket.gethostname()}:{pid}" for pid in running.pids]
        following = _Following(running)

        def promote() -> float:
            rollout = records.start(
                scope=SCOPE,
                key=KEY,
                value_text=f'"canary-{uuid.uuid4().hex}"',
                selector=Selector.parse("percent:25"),
                watch_seconds=3600,
                thresholds=Thresholds(),
                live=live,
                actor="bench",
            )
            records.mirror()
            wait_for(
                lambda: following.everyone(rollout.id),
                timeout=REP_TIMEOUT,
                what="every child to follow the rollout",
                interval=0.01,
            )
            running.warm(PROJECT_ID, KEY)  # every child holds the scope again, canary or not
            asked = time.time()
            records.request(rollout.id, "promote", actor="bench")
            reached = _reached(running, promotion_task_id(rollout.id))
            written = _written(running, promotion_task_id(rollout.id))
            assert written is not None
            decided.append((written[1] - asked) * 1000)
            wait_for(
                lambda: not records.active(), timeout=REP_TIMEOUT, what="the end", interval=0.01
            )
            return reached

        def write() -> float:
            sent = running.producer.send_task(
                "options.set_project_option", args=[PROJECT_ID, KEY, f"plain-{uuid.uuid4().hex}"]
            )
            running.task_ids.append(sent.id)
            sent.get(timeout=REP_TIMEOUT)
            return _reached(running, sent.id)

        for i in range(-1, reps):  # one warm-up round, not recorded
            order = [("promotion", promote), ("write", write)]
            random.shuffle(order)
            for name, step in order:
                sample = step()
                if i >= 0:
                    samples[name].append(sample)
                settle()
    method = (
        "one `celery worker --concurrency 4`, OPTIONS_LOCAL_CACHE=process, every child holding "
        "the scope (the canary child with the canary value over it, the others watching the "
        "key). Sample: from the commit of the promotion's write (`options_write.committed_at`, "
        "made by the leader after `rollouts promote`) to the latest `broadcast.applied` "
        "timestamp of the 4 children for its revision; baseline: the same for a plain "
        f"`options.set_project_option` of the key. {reps} of each, in random order. extra: "
        "from the promote request to the promotion's commit (the leader's next round, once a "
        "second)"
    )
    return Figure(
        name="rollout_promotion",
        title="canary promotion, commit to every child applied (4 children)",
        baseline_title="a plain write of the same key, commit to every child applied",
        value=Series("ms", samples["promotion"]),
        baseline=Series("ms", samples["write"]),
        goal="<= 1.3x",
        method=method,
        extra={
            "request_to_commit_ms_median": statistics.median(decided[1:] or decided),
        },
    )
