"""Canary rollouts' rules without services: selectors, thresholds, the judgement, what a
process serves and counts, and the bounds on what it reads from Redis (store/rollouts/)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from store.errors import InvalidOption
from store.local import LocalCache, ScopeState
from store.options_store import OptionsStore
from store.rollouts import overlay as overlay_module
from store.rollouts.model import MAX_SAMPLES, Health, Selector, Thresholds, judge
from store.rollouts.overlay import (
    FAILSAFE_AFTER,
    IDLE_REFRESH_INTERVAL,
    REFRESH_INTERVAL,
    Entry,
    Overlay,
    parse_mirror,
)
from store.rollouts.records import MAX_HEALTH_BYTES, MAX_MIRROR_BYTES, parse_health
from store.rollouts.start import parse_duration


def test_a_selector_is_parsed_and_a_bad_one_names_the_canary_field() -> None:
    """Selectors are queue:NAME, host:GLOB or percent:N (or N%); anything else is refused
    with an error naming ``canary``."""
    assert Selector.parse("queue:billing") == Selector("queue", "billing")
    assert Selector.parse("25%") == Selector("percent", "25")
    for bad in ("", "pid:3", "percent:0", "percent:101", "percent:x", "host:", 7):
        with pytest.raises(InvalidOption) as raised:
            Selector.parse(bad)
        assert raised.value.field == "canary"


def test_each_process_decides_from_its_own_identity() -> None:
    """A queue selector matches a process that consumes it, a host glob its host name, a
    percentage the processes chosen at the start: the same ones for the same live set."""
    queue, host = Selector.parse("queue:fast"), Selector.parse("host:web-*")
    assert queue.matches(host="a", identity="a:1", queues=["fast"], members=[])
    assert not queue.matches(host="a", identity="a:1", queues=["slow"], members=[])
    assert host.matches(host="web-3", identity="web-3:9", queues=[], members=[])
    assert not host.matches(host="db-1", identity="db-1:9", queues=[], members=[])
    share = Selector.parse("percent:34")
    live = [f"h:{pid}" for pid in range(100, 103)]
    chosen = share.choose("7", live)
    assert len(chosen) == 1
    assert chosen == share.choose("7", list(reversed(live)))
    assert share.matches(host="h", identity=chosen[0], queues=[], members=chosen)
    assert share.choose("7", []) == []


def test_a_bad_window_names_the_watch_field() -> None:
    """A window that is not a duration, or a number too large to be one, is refused naming
    ``watch``."""
    assert parse_duration("2m") == 120
    for bad in ("soon", "-5s", True, 10**400):
        with pytest.raises(InvalidOption) as raised:
            parse_duration(bad)
        assert raised.value.field == "watch"


def test_thresholds_have_defaults_and_bad_overrides_name_their_field() -> None:
    """Unset thresholds take the defaults; a negative, non-finite or non-number override is
    refused naming the threshold."""
    assert Thresholds.from_options({"min_tasks": None}) == Thresholds()
    assert Thresholds.from_options({"failure_ratio": 3}).failure_ratio == 3
    for name, value in (("failure_ratio", -1), ("min_tasks", 0.5), ("p95_ratio", float("nan"))):
        with pytest.raises(InvalidOption) as raised:
            Thresholds.from_options({name: value})
        assert raised.value.field == name


def test_a_zero_rate_floor_is_refused_and_never_divides_by_zero() -> None:
    """``min_rate`` is what a ratio divides by when the baseline has no failures: 0 is refused
    naming it, and a judgement over a floor of 0 (a record written before) still decides."""
    with pytest.raises(InvalidOption) as raised:
        Thresholds.from_options({"min_rate": 0})
    assert raised.value.field == "min_rate"
    canary = Health(tasks=50, failures=5, processes=1)
    baseline = Health(tasks=50, processes=1)
    verdict = judge(Thresholds(min_rate=0.0), canary, baseline, elapsed=1, window=10)
    assert verdict.decision == "revert"


def test_the_judgement_reverts_on_a_breach_and_promotes_a_healthy_canary() -> None:
    """A canary failing 4.2 times as often as the baseline is reverted with that figure in its
    reason; a healthy one is promoted at the window's end; one with too few tasks is
    reverted then, as not judged."""
    thresholds = Thresholds(min_tasks=10)
    canary = Health(tasks=100, failures=21, processes=1)
    baseline = Health(tasks=200, failures=10, processes=2)
    verdict = judge(thresholds, canary, baseline, elapsed=30, window=120)
    assert verdict.decision == "revert"
    assert verdict.reason == "auto-revert: failure ratio 4.2x the baseline over 30 s"
    healthy = Health(tasks=100, failures=5, processes=1)
    assert judge(thresholds, healthy, baseline, elapsed=30, window=120).decision is None
    ended = judge(thresholds, healthy, baseline, elapsed=121, window=120)
    assert ended.decision == "promote"
    assert ended.reason.startswith("auto-promote: failure ratio 1.0x")
    idle = judge(thresholds, Health(), baseline, elapsed=121, window=120)
    assert idle.decision == "revert"
    assert idle.reason == "auto-revert: 0 canary tasks over 120 s, 10 needed to judge"


def test_a_scope_under_rollout_leaves_the_hit_index_and_notes_its_reads() -> None:
    """A canary process serves the canary value of a watched key (by name, through the
    Python path), a baseline process the old one; both note the rollout for the running
    task; a scope without a rollout stays in the id index of the C hit."""
    overlay = Overlay()
    local = LocalCache("process", wrap=overlay.wrap)
    overlay.active = {"project:1": {"k": Entry(5, True, "new")}}
    local.scopes["project:1"] = ScopeState(3, {"k": "old", "other": 1})
    local.scopes["project:2"] = ScopeState(3, {"k": "plain"})
    assert 1 not in local.scopes.project_reads
    assert local.scopes.project_reads[2] == {"k": "plain"}
    overlay.task_started()
    assert local.scopes["project:1"].values.get("k") == "new"
    assert local.scopes["project:1"].values.get("other") == 1
    overlay.task_ended()
    assert overlay._counts[5].tasks == 1
    overlay.active = {"project:1": {"k": Entry(5, False, "new")}}
    local.drop_scopes(["project:1"])
    local.scopes["project:1"] = ScopeState(3, {"k": "old"})
    assert local.scopes["project:1"].values["k"] == "old"


def test_a_canary_value_is_never_carried_into_a_later_state() -> None:
    """A state once served with a rollout's canary value, wrapped again after that rollout
    ended (a load that raced the change) or moved on by a broadcast, serves the stored value:
    the canary value is never taken for a stored one."""
    overlay = Overlay()
    local = LocalCache("process", wrap=overlay.wrap)
    overlay.active = {"project:1": {"a": Entry(1, True, "canary")}}
    served = overlay.wrap("project:1", ScopeState(3, {"a": "stored", "b": "stored"}))
    assert served.values["a"] == "canary"
    overlay._serve({"project:1": {"b": Entry(2, False, "other")}}, local)  # 1 ended, 2 began
    assert overlay.wrap("project:1", served).values["a"] == "stored"
    overlay._serve({}, local)  # no rollout left
    assert overlay.wrap("project:1", served).values["a"] == "stored"
    overlay._serve({"project:1": {"a": Entry(1, True, "canary")}}, local)
    local.scopes["project:1"] = ScopeState(3, {"a": "stored", "b": "stored"})
    assert local.apply_change("project:1", 4, {"b": "written"}, ()) == "applied"
    assert local.scopes["project:1"].values["a"] == "canary"
    overlay._serve({}, local)
    moved = local.scopes.get("project:1")
    assert moved is None or moved.values["a"] == "stored"
    overlay.active = {"project:1": {"a": Entry(1, True, "canary")}}
    local.scopes["project:1"] = ScopeState(3, {"a": "stored"})
    local.apply_change("project:1", 4, {"b": "written"}, ())
    overlay.active = {}
    overlay.epoch += 1
    assert overlay.wrap("project:1", local.scopes["project:1"]).values == {
        "a": "stored",
        "b": "written",
    }


def test_a_stale_load_of_a_watched_scope_is_not_kept() -> None:
    """A load that a newer revision overtook between its check and its insert is dropped
    again, even when the map wraps it into another object (a rollout changed meanwhile)."""
    overlay = Overlay()
    local = LocalCache("process", wrap=overlay.wrap)
    overlay.active = {"project:1": {"k": Entry(5, True, "new")}}
    loaded = overlay.wrap("project:1", ScopeState(3, {"k": "old"}))  # the load, epoch 1
    overlay._serve({"project:1": {"k": Entry(5, False, "new")}}, local)  # epoch 2
    generation = local.generation  # as if the load began here: the insert wraps it again
    local.floors["project:1"] = 4  # revision 4 was announced before the insert
    holder: Any = type("Holder", (), {"local": local})()
    OptionsStore._keep(holder, local.scopes, "project:1", loaded, generation)
    assert "project:1" not in local.scopes


class _DownRedis:
    """A Redis client whose every command fails as a lost connection does (a unit-test fake:
    the real outage is the documented fallback, not a test of a server)."""

    def get(self, key: str) -> bytes:
        raise redis.ConnectionError("connection refused")


def test_a_process_that_cannot_confirm_its_rollouts_serves_the_stored_value() -> None:
    """Redis unreachable: a canary process keeps its canary value for up to FAILSAFE_AFTER
    seconds after its last confirmation, then drops it and serves the stored value."""
    overlay = Overlay()
    local = LocalCache("process", wrap=overlay.wrap)
    overlay.active = {"project:1": {"k": Entry(5, True, "new")}}
    local.scopes["project:1"] = ScopeState(3, {"k": "old"})
    down: Any = _DownRedis()
    overlay.refresh(down, "ns", local)
    assert local.scopes["project:1"].values["k"] == "new"  # confirmed moments ago
    overlay._confirmed_at -= FAILSAFE_AFTER + 1
    overlay._next_refresh = 0.0
    overlay.refresh(down, "ns", local)
    assert overlay.active == {}
    assert "project:1" not in local.scopes
    local.scopes["project:1"] = ScopeState(3, {"k": "old"})
    assert local.scopes["project:1"].values["k"] == "old"


class _Mirror:
    """A Redis client holding the leader's copy of the rollouts (a unit-test fake)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = json.dumps(body)

    def get(self, key: str) -> str:
        return self.body


def test_a_canary_value_is_not_served_unconfirmed_even_when_no_refresh_runs() -> None:
    """The consumer that refreshes the rollouts may be stuck (reconnecting to a broker that
    does not answer): a load made FAILSAFE_AFTER seconds after the last confirmation serves
    the stored value all the same, and the canary value comes back at the next confirmation."""
    overlay = Overlay()
    local = LocalCache("process", wrap=overlay.wrap)
    overlay.active = {"project:1": {"k": Entry(5, True, "new")}}
    overlay._confirmed_at -= FAILSAFE_AFTER + 1  # no refresh since
    local.scopes["project:1"] = ScopeState(3, {"k": "old"})
    assert local.scopes["project:1"].values["k"] == "old"
    entry = {"id": 5, "scope": "project:1", "key": "k", "value": "new", "selector": "host:*"}
    client: Any = _Mirror({"rollouts": [{**entry, "members": []}]})
    overlay.refresh(client, "ns", local)
    assert "project:1" not in local.scopes
    local.scopes["project:1"] = ScopeState(3, {"k": "old"})
    assert local.scopes["project:1"].values["k"] == "new"


class _CountedMirror(_Mirror):
    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.reads = 0

    def get(self, key: str) -> str:
        self.reads += 1
        return self.body


def test_a_process_without_rollouts_reads_the_copy_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no rollout to serve, a process reads the leader's copy every
    IDLE_REFRESH_INTERVAL seconds, not every second; once it serves one, every second again
    (how soon it drops a canary value after its rollout ended). Time is a fake clock here."""
    clock = [1000.0]
    monkeypatch.setattr(overlay_module.time, "monotonic", lambda: clock[0])
    overlay = Overlay()
    local = LocalCache("process", wrap=overlay.wrap)
    idle = _CountedMirror({"rollouts": []})

    def reads_at(client: Any, *moments: float) -> int:
        for moment in moments:
            clock[0] = moment
            overlay.refresh(client, "ns", local)
        return int(client.reads)

    assert reads_at(idle, 1000.0, 1001.5, 1003.0, 1004.5) == 1
    assert reads_at(idle, 1000.0 + IDLE_REFRESH_INTERVAL) == 2
    entry = {"id": 5, "scope": "project:1", "key": "k", "value": "new", "selector": "host:*"}
    busy = _CountedMirror({"rollouts": [{**entry, "members": []}]})
    start = 1000.0 + 2 * IDLE_REFRESH_INTERVAL
    assert reads_at(busy, start, start + 0.5, start + REFRESH_INTERVAL) == 2


def test_reports_and_the_copy_of_rollouts_are_bounded_and_checked() -> None:
    """A process's health report and the leader's copy of the rollouts come from Redis, which
    any process writes: oversized or malformed ones are ignored, never trusted."""
    good = {"tasks": 3, "failures": 1, "retries": 0, "runtimes": [0.01, 0.02], "canary": True}
    parsed = parse_health(json.dumps(good))
    assert parsed is not None and parsed[0] is True and parsed[1].failures == 1
    for bad in (
        {**good, "tasks": -1},
        {**good, "failures": True},
        {**good, "runtimes": [float("nan")]},
        {**good, "runtimes": [0.1] * (MAX_SAMPLES + 1)},
        {**good, "retries": 2**60},
        {**good, "failures": 4},
        {**good, "retries": 4},
        {**good, "runtimes": [0.01] * 4},
        [1, 2],
    ):
        assert parse_health(json.dumps(bad)) is None, bad
    assert parse_health("x" * (MAX_HEALTH_BYTES + 1)) is None
    assert parse_health("{not json") is None
    # Nested too deep to decode: ignored, not an error that stops the leader's judgement of
    # the rollout (or, for the copy, the reload consumer's thread).
    assert parse_health("[" * (MAX_HEALTH_BYTES // 2)) is None
    assert parse_mirror("[" * 200_000) == []
    entry = {"id": 1, "scope": "global", "key": "k", "value": 1, "selector": "host:*"}
    assert parse_mirror(json.dumps({"rollouts": [{**entry, "members": []}]})) != []
    assert parse_mirror(json.dumps({"rollouts": [{**entry, "members": [3]}]})) == []
    assert parse_mirror(json.dumps({"rollouts": [{**entry, "id": "1", "members": []}]})) == []
    assert parse_mirror(b" " * (MAX_MIRROR_BYTES + 1)) == []
    assert parse_mirror(None) == []
