"""Canary rollouts requested through `apply --canary` and the `tasks.start_rollout` helper:
what is recorded, and what is refused (no worker: the leader's part is in test_rollouts.py)."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from store.errors import InvalidOption
from store.model.scopes import Scope
from store.model.writes import set_write
from store.rollouts.model import ABORTED
from store.rollouts.overlay import parse_mirror
from store.rollouts.records import RolloutRecords, mirror_key
from store.rollouts.start import records_of, start_rollout
from tests.conftest import Services, fresh_id
from tests.test_cli import ok, optionstore
from worker.duties.rollouts import RolloutJudge


def _rollouts_of(services: Services, scope: str) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT key, state, reason FROM options_rollout WHERE scope = %s ORDER BY key",
            (scope,),
        ).fetchall()
    return [(str(k), str(s), r) for k, s, r in rows]


def test_apply_with_a_canary_starts_a_rollout_per_value(
    services: Services, backend: Any, tmp_path: Any
) -> None:
    """`apply FILE --canary … --yes` records one rollout per value the file changes, each with
    the file named in its reason; a file that removes a key is refused naming ``canary``, and
    records nothing."""
    project = fresh_id()
    scope = f"project:{project}"
    removing = tmp_path / "removing.json"
    removing.write_text(
        json.dumps({"optionstore": 1, "scopes": {scope: {"values": {"a": 1}, "unset": ["gone"]}}})
    )
    backend.commit(set_write(Scope.parse(scope), "gone", 1), task_id=f"seed-{project}")
    refused = optionstore(
        services, "apply", str(removing), "--canary", "host:*", "--watch", "60s", "--yes"
    )
    assert refused.returncode == 2 and "invalid input: canary:" in refused.stderr, refused
    assert _rollouts_of(services, scope) == []

    desired = tmp_path / "desired.json"
    desired.write_text(
        json.dumps({"optionstore": 1, "scopes": {scope: {"values": {"a": 1, "b": "x"}}}})
    )
    out = ok(
        optionstore(
            services, "apply", str(desired), "--canary", "host:*", "--watch", "60s", "--yes"
        )
    )
    assert out.count("started rollout") == 2, out
    assert _rollouts_of(services, scope) == [
        ("a", "watching", "apply desired.json"),
        ("b", "watching", "apply desired.json"),
    ]


def test_the_helper_starts_a_rollout_and_refuses_bad_input_naming_the_field(
    services: Services, backend: Any
) -> None:
    """``tasks.start_rollout`` records a rollout with its thresholds and its canary entry in
    history; bad input raises InvalidOption naming the field and records nothing."""
    import tasks

    project = fresh_id()
    scope = f"project:{project}"
    for kwargs, field in (
        ({"canary": "nope", "watch": 5}, "canary"),
        ({"canary": "host:*", "watch": "soon"}, "watch"),
        ({"canary": "host:*", "watch": 5, "failure_ratio": -1}, "failure_ratio"),
        ({"canary": "host:*", "watch": 5, "bogus": 1}, "thresholds"),
        ({"canary": "host:*", "watch": 5, "reason": "two\nlines"}, "reason"),
    ):
        with pytest.raises(InvalidOption) as raised:
            tasks.start_rollout(scope, "k", 1, **kwargs)
        assert raised.value.field == field
    assert _rollouts_of(services, scope) == []
    started = tasks.start_rollout(
        scope, "k", {"on": True}, canary="host:*", watch="2m", min_tasks=3, reason="try it"
    )
    assert started["state"] == "watching"
    assert started["watch_seconds"] == 120
    assert started["thresholds"]["min_tasks"] == 3
    assert started["new_value"] == {"on": True} and started["old_set"] is False
    entries = backend.db.history(scope, "k")
    assert [(e.origin, e.new_value, e.reason) for e in entries] == [
        ("canary", {"on": True}, "canary to host:*: try it")
    ]


def test_a_start_never_brings_back_a_rollout_that_ended_meanwhile(
    services: Services, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the leader writes the copy of the active rollouts that processes follow: a start
    that read the active rollouts just before the leader ended one (and copied them without
    it) must not write back a copy that has it, or processes would serve its canary value
    again after history recorded its end."""
    assert backend.redis is not None
    namespace = f"ns{fresh_id()}"
    scope = f"project:{fresh_id()}"
    records = records_of(backend, namespace)
    first = start_rollout(backend, namespace, scope, "a", 1, canary="host:*", watch=60)
    records.mirror()  # the leader's round: the copy has the first rollout
    real_active = RolloutRecords.active
    ended: list[bool] = []

    def leader_round() -> None:  # the leader ends the first rollout, then copies the rest
        if not ended:
            ended.append(records.finish(first, ABORTED, decision="aborted by test", figures={}))
            records.mirror()

    def leader_ends_it_meanwhile(self: RolloutRecords) -> list[Any]:
        found = real_active(self)
        leader_round()
        return found

    monkeypatch.setattr(RolloutRecords, "active", leader_ends_it_meanwhile)
    start_rollout(backend, namespace, scope, "b", 2, canary="host:*", watch=60)
    monkeypatch.setattr(RolloutRecords, "active", real_active)
    leader_round()  # if the start did not read the active rollouts at all
    assert ended == [True]
    copied = parse_mirror(backend.redis.client.get(mirror_key(namespace)))
    assert first.id not in [r["id"] for r in copied], copied


def test_rollouts_refuses_an_id_or_limit_out_of_range_naming_it(services: Services) -> None:
    """`rollouts promote|abort ID` and `rollouts --limit N` with a number PostgreSQL cannot
    take (past a bigint, or a negative limit) are refused naming the field, exit 2."""
    for args, field in (
        (("rollouts", "promote", str(2**63)), "id"),
        (("rollouts", "abort", "-1"), "id"),
        (("rollouts", "--limit", "-1"), "limit"),
        (("rollouts", "--limit", str(2**63)), "limit"),
    ):
        refused = optionstore(services, *args)
        assert refused.returncode == 2, (args, refused)
        assert f"invalid input: {field}:" in refused.stderr, (args, refused.stderr)


def test_apply_with_a_canary_starts_all_its_rollouts_or_none(
    services: Services, backend: Any, tmp_path: Any
) -> None:
    """`apply FILE --canary … --yes` whose file changes a key already under a rollout is
    refused naming ``key``, and starts no rollout for the file's other values either."""
    import tasks

    project = fresh_id()
    scope = f"project:{project}"
    tasks.start_rollout(scope, "b", 1, canary="host:*", watch="60s")
    desired = tmp_path / "desired.json"
    desired.write_text(
        json.dumps({"optionstore": 1, "scopes": {scope: {"values": {"a": 1, "b": 2}}}})
    )
    refused = optionstore(
        services, "apply", str(desired), "--canary", "host:*", "--watch", "60s", "--yes"
    )
    assert refused.returncode == 2 and "invalid input: key:" in refused.stderr, refused
    assert _rollouts_of(services, scope) == [("b", "watching", None)]
    assert [e.key for e in backend.db.history(scope, "a")] == []


def test_the_leader_ends_a_rollout_while_it_cannot_read_the_health_reports(
    services: Services, backend: Any
) -> None:
    """Redis unreachable for the leader (a client of a port nothing listens on): an operator's
    abort still ends the rollout, recorded in history, on the figures it has (none)."""
    import redis

    namespace = f"ns{fresh_id()}"
    scope = f"project:{fresh_id()}"
    started = start_rollout(backend, namespace, scope, "k", 1, canary="host:*", watch=60)
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    unreachable = redis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    records = RolloutRecords(backend.db, unreachable, namespace=namespace)
    records.request(started.id, "abort", actor="ops")
    judge = RolloutJudge(records=records, commit=backend.commit)
    assert judge.run_once() == 1
    ended = records.get(started.id)
    assert ended is not None and ended.state == ABORTED, ended
    assert ended.figures is not None and ended.figures["canary"]["tasks"] == 0
    origins = [e.origin for e in backend.db.history(scope, "k")]
    assert origins == ["canary", "canary-end"]


def test_an_operator_request_with_a_bad_actor_is_refused_naming_it(
    services: Services, backend: Any
) -> None:
    """`rollouts promote|abort --actor` goes into history with the rollout's end: an actor a
    write would refuse (several lines, too long) is refused naming ``actor``, nothing asked."""
    namespace = f"ns{fresh_id()}"
    scope = f"project:{fresh_id()}"
    started = start_rollout(backend, namespace, scope, "k", 1, canary="host:*", watch=60)
    records = records_of(backend, namespace)
    for actor in ("two\nlines", "x" * 1000):
        with pytest.raises(InvalidOption) as raised:
            records.request(started.id, "abort", actor=actor)
        assert raised.value.field == "actor"
    found = records.get(started.id)
    assert found is not None and found.requested is None


def test_rollouts_lists_a_watching_rollout_while_redis_is_down(
    services: Services, backend: Any
) -> None:
    """`rollouts` with the cache's Redis unreachable (a port nothing listens on) still lists
    what PostgreSQL holds; a watching rollout's live figures are shown as unavailable."""
    import tasks

    scope = f"project:{fresh_id()}"
    started = tasks.start_rollout(scope, "k", 1, canary="host:*", watch="60s")
    env = {**services.env(), "OPTIONS_REDIS_URL": "redis://127.0.0.1:1/0"}
    listing = json.loads(ok(optionstore(services, "rollouts", "--json", env=env)))
    shown = next(r for r in listing if r["id"] == started["id"])
    assert shown["state"] == "watching" and shown["figures"] is None
    assert "health" in shown["figures_unavailable"]
