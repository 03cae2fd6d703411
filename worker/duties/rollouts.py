"""``RolloutJudge``: the leader's round over the active rollouts: keep the processes' copy in
Redis current, compare each canary's health with the baseline's, promote or revert."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from store.errors import describe
from store.events import Throttled, log
from store.model.scopes import Scope
from store.model.writes import Audit, Write, WriteResult
from store.rollouts.model import (
    ABORTED,
    PROMOTE,
    PROMOTED,
    REVERTED,
    SUPERSEDED,
    Health,
    Thresholds,
    Verdict,
    judge,
)
from store.rollouts.records import Rollout, RolloutRecords

PROMOTION_ORIGIN = "rollout"


def promotion_task_id(rollout_id: int) -> str:
    """The promotion's write record: a leader that takes over re-runs it, unchanged."""
    return f"rollout:{rollout_id}:promote"


@dataclass(kw_only=True)
class RolloutJudge:
    """Each call to ``run_once`` (on the leader, each second) reads the watching rollouts from
    PostgreSQL, so a new leader carries on where the last one stopped, and for each one:

    - an operator's request (``rollouts promote|abort``) is carried out;
    - otherwise the canary's figures are judged against the baseline's (store/rollouts/model.py:
      ``judge``): revert on a clear breach, then at the window's end promote or revert;
    - a promotion is a normal write through the write path (``commit``), under a fixed task id;
      a revert or an abort is recorded in history with the rollout's end, in one transaction;
    - a key written by someone else meanwhile ends the rollout as ``superseded``: that write is
      what every process serves.

    Then the active ones are copied to Redis for the processes to follow.
    """

    records: RolloutRecords
    commit: Callable[..., WriteResult]
    # A round a second: an outage must not log a line a second.
    _throttled: Throttled = field(default_factory=Throttled, init=False)

    def run_once(self) -> int:
        """One round; returns how many rollouts ended."""
        try:
            active = self.records.active()
        except Exception as exc:  # PostgreSQL down: the copy in Redis expires if this lasts
            self._throttled.warning("rollout.judge_failed", error=describe(exc))
            return 0
        ended = 0
        for rollout in active:
            try:
                ended += self._judge(rollout)
            except Exception as exc:  # the next round tries again
                self._throttled.warning(
                    "rollout.judge_failed",
                    key=f"rollout:{rollout.id}",
                    rollout=rollout.id,
                    error=describe(exc),
                )
        try:
            self.records.mirror(self.records.active() if ended else active)
        except Exception as exc:  # Redis down: processes fall back to the base values
            self._throttled.warning("rollout.mirror_failed", error=describe(exc))
        return ended

    def _judge(self, rollout: Rollout) -> bool:
        verdict, state = self._verdict(rollout)
        task_id = promotion_task_id(rollout.id)
        if self.records.written(task_id):
            # Promoted by a leader that died before it could end the rollout.
            reason = "promoted (committed by the leader before a takeover)"
            return self._end(rollout, PROMOTED, reason, verdict.figures)
        revision, current = self.records.current(rollout.scope, rollout.key)
        if current != rollout.old_value:
            reason = f"superseded: {rollout.key} was written during the rollout"
            return self._end(rollout, SUPERSEDED, reason, verdict.figures)
        if verdict.decision is None:
            return False
        promoting = verdict.decision == PROMOTE
        if promoting:
            write = Write(
                Scope.parse(rollout.scope),
                {rollout.key: rollout.new_value},
                audit=Audit(
                    rollout.requested_by or rollout.actor, verdict.reason, PROMOTION_ORIGIN
                ),
                # Only over the state just checked: a write that lands in between makes this
                # one fail (RevisionConflict), and the next round finds the rollout superseded.
                expected_revision=revision,
            )
            self.commit(write, task_id=task_id)
        return self._end(rollout, state, verdict.reason, verdict.figures)

    def _verdict(self, rollout: Rollout) -> tuple[Verdict, str]:
        try:
            thresholds = Thresholds.from_options(rollout.thresholds)
        except ValueError:
            thresholds = Thresholds()
        try:
            canary, baseline = self.records.health(rollout.id)
        except Exception as exc:  # Redis down: judged on what there is (nothing), not stuck
            self._throttled.warning(
                "rollout.health_unread",
                key=f"health:{rollout.id}",
                rollout=rollout.id,
                error=describe(exc),
            )
            canary, baseline = Health(), Health()
        figures: dict[str, Any]
        if rollout.requested is not None:
            figures = judge(
                thresholds, canary, baseline, elapsed=rollout.elapsed, window=float("inf")
            ).figures
            by = rollout.requested_by or "an operator"
            if rollout.requested == PROMOTE:
                reason = f"promoted by {by} after {round(rollout.elapsed)} s"
                return Verdict(PROMOTE, reason, figures), PROMOTED
            reason = f"aborted by {by} after {round(rollout.elapsed)} s"
            return Verdict("revert", reason, figures), ABORTED
        verdict = judge(
            thresholds, canary, baseline, elapsed=rollout.elapsed, window=rollout.watch_seconds
        )
        return verdict, PROMOTED if verdict.decision == PROMOTE else REVERTED

    def _end(self, rollout: Rollout, state: str, reason: str, figures: dict[str, Any]) -> bool:
        if not self.records.finish(rollout, state, decision=reason, figures=figures):
            return False
        log.info(
            "rollout.ended",
            rollout=rollout.id,
            scope=rollout.scope,
            key=rollout.key,
            state=state,
            reason=reason,
            figures=figures,
        )
        return True
