"""The read-your-writes token (store/tokens.py) as untrusted input, and what a write task
publishes with it; no services."""

from __future__ import annotations

import threading

import pytest

import store
from store.broadcast.codec import CHANGE, ReloadMessage
from store.errors import InvalidOption, InvalidToken
from store.local import PROCESS, ScopeState
from store.options_store import OptionsStore
from store.settings import Settings
from store.snapshot import Snapshot, Snapshots
from store.tokens import MAX_SCOPES, MAX_TOKEN_BYTES, parse_token, token_of, written
from tests.conftest import wait_for


def test_token_of_merges_results_and_tokens_to_the_newest_revision() -> None:
    merged = token_of(
        {"scope": "project:1", "revision": 3, "changed": True},
        {"project:1": 5, "global": 2},
        {"scope": "global", "revision": 1, "changed": False},
        {"scope": "user:4", "revision": 0, "changed": False},  # nothing to wait for
    )
    assert merged == {"project:1": 5, "global": 2}
    assert store.options_after({"global": 2}) == {"options_after": {"global": 2}}
    assert parse_token(None) == {}


def test_token_of_refuses_what_is_not_a_write() -> None:
    with pytest.raises(InvalidToken) as refused:
        token_of(["project:1", 3])  # type: ignore[arg-type]
    assert refused.value.field == "writes[0]"
    with pytest.raises(InvalidToken) as refused:
        token_of({"scope": "project:x", "revision": 3})
    assert refused.value.field == "writes[0]['project:x']"


def test_a_token_is_bounded_in_scopes_and_checked_per_entry() -> None:
    assert len(parse_token({f"project:{n}": 2**63 - 1 for n in range(1, MAX_SCOPES + 1)})) == 64
    assert MAX_TOKEN_BYTES >= MAX_SCOPES * (64 + 22)  # the largest valid token fits
    with pytest.raises(InvalidToken, match="at most 64"):
        parse_token({f"project:{n}": 1 for n in range(1, MAX_SCOPES + 2)})
    with pytest.raises(InvalidToken) as refused:
        parse_token({"x" * 1000: 1})
    assert refused.value.field == "options_after"
    with pytest.raises(InvalidToken) as refused:
        parse_token({"global": "3"})
    assert refused.value.field == "options_after['global']"


def test_the_tasks_a_write_publishes_carry_its_token() -> None:
    from celery.signals import before_task_publish

    written.add("project:1", 9)  # outside a task: not recorded
    written.begin_task()
    written.add("project:1", 4)
    written.add("project:1", 3)  # never backwards
    written.add("global", 0)  # a scope never written: nothing to wait for
    written.begin_task()  # a task run eagerly inside this one
    written.end_task()
    try:
        headers: dict[str, object] = {}
        before_task_publish.send(sender="probe.read", body=[[], {}, {}], headers=headers)
        assert headers == {"options_after": {"project:1": 4}}
        own = {"options_after": {"global": 1}}
        before_task_publish.send(sender="probe.read", body=[[], {}, {}], headers=own)
        assert own == {"options_after": {"global": 1}}  # a token of its own wins
    finally:
        written.end_task()
    headers = {}
    before_task_publish.send(sender="probe.read", body=[[], {}, {}], headers=headers)
    assert headers == {}
    assert store.OPTIONS_AFTER == "options_after"


def _process_store_holding(scope: str, revision: int, values: dict[str, object]) -> OptionsStore:
    backend = OptionsStore()
    backend.local.set_mode(PROCESS)
    backend.local.scopes[scope] = ScopeState(revision, values)
    return backend


def test_catch_up_waits_for_the_broadcast_then_keeps_the_state_it_brought() -> None:
    backend = _process_store_holding("project:1", 3, {"k": "old"})
    change = ReloadMessage(CHANGE, "project:1", 4, {"k": "new"})
    outcomes: list[dict[str, str]] = []
    waits = threading.Thread(
        target=lambda: outcomes.append(backend.catch_up({"project:1": 4}, wait=30.0))
    )
    waits.start()
    try:
        # The broadcast arrives once catch_up is waiting for it, however slow the machine.
        wait_for(lambda: backend._waiting == 1, interval=0.001, message="catch_up waiting")
        backend.apply_message(change)
    finally:
        waits.join(timeout=30.0)
    assert outcomes == [{"project:1": "heard"}]
    assert backend.local.scopes["project:1"].values == {"k": "new"}
    assert backend.local.floors == {"project:1": 4}


def test_catch_up_to_a_revision_already_held_does_not_wait() -> None:
    backend = _process_store_holding("project:1", 5, {"k": "v"})
    assert backend.catch_up({"project:1": 4}, wait=10.0) == {"project:1": "current"}
    assert backend.local.scopes["project:1"].revision == 5


def test_catch_up_wait_is_a_bounded_setting_in_seconds() -> None:
    assert Settings.from_environ({}).catch_up_wait == 0.1
    assert Settings.from_environ({"OPTIONS_CATCH_UP_WAIT": "0.5"}).catch_up_wait == 0.5
    for bad in ("nan", "-1", "11", "soon"):
        with pytest.raises(InvalidOption) as refused:
            Settings.from_environ({"OPTIONS_CATCH_UP_WAIT": bad})
        assert refused.value.field == "OPTIONS_CATCH_UP_WAIT"


def test_a_snapshot_keeps_the_state_it_pinned_while_the_store_moves_on() -> None:
    backend = _process_store_holding("project:1", 3, {"k": "old"})
    view = Snapshot(backend)
    assert view.project_options.get_value(1, "k") == "old"
    backend.apply_message(ReloadMessage(CHANGE, "project:1", 4, {"k": "new"}))
    assert backend.local.scopes["project:1"].values == {"k": "new"}
    assert view.project_options.get_value(1, "k") == "old"
    assert view.project_options.get_all_values(1) == {"k": "old"}
    assert view.scopes == ["project:1"]


def test_in_a_task_every_snapshot_call_returns_the_task_s_until_it_ends() -> None:
    snapshots = Snapshots()
    backend = OptionsStore()
    assert snapshots.open(backend) is not snapshots.open(backend)  # outside a task: new ones
    snapshots.begin_task()
    first = snapshots.open(backend)
    assert snapshots.open(backend) is first
    snapshots.end_task()
    assert snapshots.open(backend) is not first
    with snapshots.open(backend) as block:
        assert snapshots.open(backend) is block
    assert snapshots.current is None


def test_asyncio_tasks_interleaving_snapshot_blocks_each_get_their_own() -> None:
    import asyncio

    snapshots = Snapshots()
    backend = OptionsStore()

    async def request(entered: asyncio.Event, other: asyncio.Event) -> tuple[Snapshot, Snapshot]:
        with snapshots.open(backend) as block:
            entered.set()
            await other.wait()  # the other request enters its block meanwhile
            await asyncio.sleep(0)
            return block, snapshots.open(backend)

    async def main() -> list[tuple[Snapshot, Snapshot]]:
        first, second = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(request(first, second), request(second, first))

    (block_a, seen_a), (block_b, seen_b) = asyncio.run(main())
    assert block_a is not block_b
    assert seen_a is block_a and seen_b is block_b
    assert snapshots.current is None


def test_a_nested_snapshot_block_keeps_the_outer_block_s_snapshot() -> None:
    snapshots = Snapshots()
    backend = OptionsStore()
    with snapshots.open(backend) as outer:
        with snapshots.open(backend) as inner:
            assert inner is outer
        assert snapshots.current is outer  # the inner block's end did not end the outer's
        assert snapshots.open(backend) is outer
    assert snapshots.current is None
    other = Snapshot(backend, owner=snapshots)
    with snapshots.open(backend) as block:
        with other:  # another snapshot entered inside: the block's stays current
            assert snapshots.current is block
        assert snapshots.current is block
    assert snapshots.current is None


def test_the_token_guard_keeps_a_static_or_class_before_start_working() -> None:
    from celery import Celery, Task

    from worker.install import _guard

    calls: list[object] = []

    class StaticStart(Task):  # type: ignore[misc]
        abstract = True

        @staticmethod
        def before_start(task_id: str, args: object, kwargs: object) -> None:
            calls.append(("static", task_id))

    class ClassStart(Task):  # type: ignore[misc]
        abstract = True

        @classmethod
        def before_start(cls, task_id: str, args: object, kwargs: object) -> None:
            calls.append((cls.__name__, task_id))

    class PlainStart(Task):  # type: ignore[misc]
        abstract = True

        def before_start(self, task_id: str, args: object, kwargs: object) -> None:
            calls.append(("plain", task_id, self.name))

    app = Celery("guarded", set_as_current=False)
    for base, name in ((StaticStart, "static"), (ClassStart, "class"), (PlainStart, "plain")):
        app.task(base=base, name=f"probe.{name}", shared=False)(_nothing)
    static, classy, plain = (app.tasks[f"probe.{name}"] for name in ("static", "class", "plain"))
    for task in (static, classy, plain):
        _guard(type(task))
        _guard(type(task))  # once only
        task.before_start("t-1", (), {})  # no token in the request: the class's own runs
    assert calls == [
        ("static", "t-1"),
        (type(classy).__name__, "t-1"),
        ("plain", "t-1", "probe.plain"),
    ]


def _nothing() -> None:
    pass


def test_a_forged_token_never_lowers_the_floor_below_a_revision_heard_meanwhile() -> None:
    backend = _process_store_holding("project:1", 5, {"k": "five"})
    backend.local.floors["project:1"] = 5
    redis_holds = ScopeState(5, {"k": "five"})  # Redis (and the store) behind revision 6

    def load_many(scopes: list[str], *, use_redis: bool = True) -> dict[str, ScopeState]:
        if backend.local.floors.get("project:1", 0) > 6:
            # While the forged floor stands, the change to revision 6 is broadcast and heard:
            # it cannot raise the floor further, and nothing is held to apply it to.
            backend.apply_message(ReloadMessage(CHANGE, "project:1", 6, {"k": "six"}))
        return dict.fromkeys(scopes, redis_holds)

    backend.load_many = load_many  # type: ignore[method-assign]
    assert backend.catch_up({"project:1": 10**12}, wait=0.0) == {"project:1": "behind"}
    assert backend.local.floors["project:1"] == 6  # not 5: revision 6 was heard
    # A later read finds Redis still at 5: served, but never cached below what was heard.
    assert backend.state("project:1").revision == 5
    assert "project:1" not in backend.local.scopes


def test_a_task_writing_past_64_scopes_is_told_its_token_lost_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from structlog.testing import capture_logs

    from store import tokens
    from store.events import Throttled

    monkeypatch.setattr(tokens, "_throttled", Throttled(60.0))
    record = tokens.Written()
    with capture_logs() as events:
        record.begin_task()
        for n in range(1, MAX_SCOPES + 4):
            record.add(f"project:{n}", 2)
        record.add("project:1", 3)  # a scope it holds still moves on
        record.add(f"project:{MAX_SCOPES + 1}", 5)  # one of the dropped, again
        assert len(record.token) == MAX_SCOPES and record.token["project:1"] == 3
        record.end_task()
    dropped = [event for event in events if event["event"] == "token.scopes_dropped"]
    assert len(dropped) == 1
    assert dropped[0]["log_level"] == "warning"
    assert dropped[0]["dropped"] == 3 and dropped[0]["kept"] == MAX_SCOPES


def test_tasks_running_side_by_side_in_threads_each_hold_their_own_snapshot() -> None:
    snapshots = Snapshots()
    backend = OptionsStore()
    both_open = threading.Barrier(2, timeout=30)
    seen: dict[str, tuple[Snapshot, Snapshot]] = {}

    def task(name: str) -> None:
        snapshots.begin_task()
        try:
            first = snapshots.open(backend)
            both_open.wait()  # the other thread's task holds its own by now
            seen[name] = (first, snapshots.open(backend))
        finally:
            snapshots.end_task()

    threads = [threading.Thread(target=task, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert seen["a"][0] is seen["a"][1] and seen["b"][0] is seen["b"][1]
    assert seen["a"][0] is not seen["b"][0]
    assert snapshots.current is None and snapshots.depth == 0
