"""Generated payloads, valid and invalid, sent by name to every write task of a real worker:
no crash, no partial write, each invalid one refused naming its field; and raw broker messages
the worker must refuse (pickle) or fail clearly (unknown keyword arguments)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from store.embedded import ensure_embedded
from store.postgres.schema import migrate
from tests.conftest import STATE_DIR, Services, Worker, wait_for
from tests.faults.checks import results

pytestmark = pytest.mark.faults

LIMIT = 512  # OPTIONS_MAX_VALUE_BYTES for this worker: "huge" is just over it
BATCH = 40  # payloads per generated example: larger lists overrun hypothesis's buffer
BATCHES = 250  # 10,000 payloads
VERIFY_EVERY = 1000  # sent payloads checked in bulk, not one round trip per example
MAX_ID = 2**63 - 1

# The contract: each write task's positional parameters and what each one takes.
CONTRACT: dict[str, list[tuple[str, str]]] = {
    "options.set_option": [("key", "key"), ("value", "value")],
    "options.unset_option": [("key", "key")],
    "options.set_project_option": [("project_id", "id"), ("key", "key"), ("value", "value")],
    "options.unset_project_option": [("project_id", "id"), ("key", "key")],
    "options.set_user_option": [
        ("user_id", "id"),
        ("project_id", "id or null"),
        ("key", "key"),
        ("value", "value"),
    ],
    "options.unset_user_option": [("user_id", "id"), ("project_id", "id or null"), ("key", "key")],
    "options.set_group_meta": [("group_id", "id"), ("key", "key"), ("value", "value")],
    "options.unset_group_meta": [("group_id", "id"), ("key", "key")],
    "options.add_tag_key": [("project_id", "id"), ("key", "tag key")],
    "options.remove_tag_key": [("project_id", "id"), ("key", "tag key")],
    "options.set_many": [("scope", "scope"), ("values", "values"), ("unset", "unset")],
}

# Expected outcomes: ("ok",), ("invalid", field) or ("type",) for a call Python itself refuses.
OK = ("ok",)
TYPE = ("type",)


def canonical_size(value: Any) -> int:
    """The encoded size the input rules measure: compact, sorted-key JSON in UTF-8."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return len(text.encode("utf-8"))


# -- valid values -------------------------------------------------------------------------------

# No control characters (Unicode Cc) and no lone surrogates (Cs): what a key may hold.
key_chars = st.characters(exclude_categories=("Cc", "Cs"))
# Values may hold control characters (JSON escapes them); lone surrogates are not Unicode.
text_chars = st.characters(exclude_categories=("Cs",))
ids = st.integers(1, MAX_ID)
keys = st.text(key_chars, min_size=1, max_size=64)
tag_keys = st.text(key_chars, min_size=1, max_size=32)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(text_chars, max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(text_chars, max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


values = st.one_of(
    json_values.filter(lambda v: canonical_size(v) <= LIMIT),
    st.just("x" * (LIMIT - 2)),  # exactly the limit, quotes included
    st.just(nested(32)),  # exactly the deepest nesting allowed
)
option_scopes = st.one_of(
    st.just("global"),
    ids.map(lambda i: f"project:{i}"),
    ids.map(lambda i: f"user:{i}"),
    st.tuples(ids, ids).map(lambda p: f"user:{p[0]}/project:{p[1]}"),
    ids.map(lambda i: f"group:{i}"),
)
VALID = {"key": keys, "tag key": tag_keys, "id": ids, "id or null": st.none() | ids}

# -- invalid values -----------------------------------------------------------------------------

not_an_int = st.sampled_from([True, False, 1.0, 2.5, "42", [1], {"id": 1}])
bad_ids = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=MAX_ID + 1, max_value=2**70),
    not_an_int,
    st.just(None),
)
not_a_str = st.sampled_from([0, 7, 1.5, True, None, ["k"], {"k": 1}])


@st.composite
def bad_keys(draw: st.DrawFn, max_length: int) -> Any:
    kind = draw(st.sampled_from(["empty", "long", "type", "control", "surrogate"]))
    if kind == "empty":
        return ""
    if kind == "long":
        return draw(st.text(key_chars, min_size=max_length + 1, max_size=max_length + 80))
    if kind == "type":
        return draw(not_a_str)
    good = draw(st.text(key_chars, min_size=0, max_size=max_length - 1))
    bad = draw(
        st.characters(categories=("Cc",))
        if kind == "control"
        else st.characters(categories=("Cs",))
    )
    at = draw(st.integers(0, len(good)))
    return good[:at] + bad + good[at:]


@st.composite
def bad_values(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["deep", "huge", "huge-multibyte", "huge-list", "surrogate"]))
    if kind == "deep":
        return nested(draw(st.integers(33, 60)))
    if kind == "huge":
        return "y" * (LIMIT - 2 + draw(st.integers(1, 64)))
    if kind == "huge-multibyte":
        return "\u00e9" * (LIMIT // 2 + draw(st.integers(0, 30)))  # 2 bytes each
    if kind == "huge-list":
        return list(range(LIMIT // 2 + draw(st.integers(0, 50))))
    surrogate = draw(st.characters(categories=("Cs",)))
    return draw(st.sampled_from([surrogate, [1, {"a": surrogate}], {surrogate: 1}]))


BAD: dict[str, st.SearchStrategy[Any]] = {
    "key": bad_keys(64),
    "tag key": bad_keys(32),
    "id": bad_ids,
    "id or null": bad_ids.filter(lambda v: v is not None),
    "value": bad_values(),
}
SET_MANY_FAULTS = ("scope", "values type", "unset type", "empty", "values key", "values value")
SET_MANY_FAULTS += ("unset key", "unset overlap")
BAD_SCOPES = ("tagkeys:5", "project:0", "project:01", "projects:1", "", "user:1/group:2")
BAD_SCOPES += ("project:99999999999999999999", None, 5, ["global"])


@st.composite
def set_many_args(draw: st.DrawFn, *, valid: bool) -> tuple[list[Any], tuple[str, ...]]:
    """Arguments of options.set_many, valid or with exactly one fault, and the expectation."""
    scope = draw(option_scopes)
    sets = draw(st.dictionaries(keys, values, max_size=4))
    unset = draw(st.lists(keys.filter(lambda k: k not in sets), max_size=3))
    if not sets and not unset:
        sets = {draw(keys): draw(values)}
    if valid:
        return [scope, sets, unset], OK
    fault = draw(st.sampled_from(SET_MANY_FAULTS))
    at = draw(st.integers(0, len(unset)))
    if fault == "scope":
        scope, field = draw(st.sampled_from(BAD_SCOPES)), "scope"
    elif fault == "values type":
        sets, field = draw(st.sampled_from([[["a", 1]], "a", 5, None])), "values"
    elif fault == "unset type":
        unset, field = draw(st.sampled_from([{"a": 1}, "a", 5, None])), "unset"
    elif fault == "empty":
        sets, unset, field = {}, [], "values"
    elif fault == "values key":
        sets, field = {**sets, draw(bad_keys(64).filter(lambda k: isinstance(k, str))): 1}, "values"
    elif fault == "values value":
        key = draw(keys.filter(lambda k: k not in sets and k not in unset))
        sets, field = {**sets, key: draw(bad_values())}, f"values[{key!r}]"
    elif fault == "unset key":
        unset, field = [*unset[:at], draw(bad_keys(64)), *unset[at:]], f"unset[{at}]"
    else:  # the key is set and also unset: refused at its place in the unset list
        key = draw(keys.filter(lambda k: k not in unset))
        sets, unset = {**sets, key: 1}, [*unset[:at], key, *unset[at:]]
        field = f"unset[{at}]"
    return [scope, sets, unset], ("invalid", field)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[str, list[Any], dict[str, Any], tuple[str, ...]]:
    """(task name, args, kwargs, expected outcome) for one call of a write task by name."""
    name = draw(st.sampled_from(sorted(CONTRACT)))
    params = CONTRACT[name]
    mode = draw(st.sampled_from(["invalid"] * 4 + ["valid"] * 4 + ["arity", "kwargs"]))
    if name == "options.set_many":
        args, expect = draw(set_many_args(valid=mode != "invalid"))
    else:
        args = [draw(VALID.get(kind, values)) for _, kind in params]
        expect = OK
        if mode == "invalid":
            at = draw(st.integers(0, len(params) - 1))
            field, kind = params[at]
            args[at] = draw(BAD[kind])
            expect = ("invalid", field)
    kwargs: dict[str, Any] = {}
    if mode == "arity":
        args = args[:-1] if draw(st.booleans()) else [*args, draw(json_values)]
        expect = TYPE
    elif mode == "kwargs":
        names = {param for param, _ in params}
        unknown = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
        extra = draw(unknown.filter(lambda n: n not in names) | st.sampled_from(sorted(names)))
        # Unknown, or a parameter already given positionally: Python refuses both.
        kwargs = {extra: draw(json_values)}
        expect = TYPE
    return name, args, kwargs, expect


# -- the worker ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_worker() -> Iterator[Worker]:
    """A prefork worker on the embedded servers, with a small OPTIONS_MAX_VALUE_BYTES and a
    namespace (and so a task queue) of its own."""
    found = ensure_embedded(STATE_DIR)
    migrate(found.database_url)
    services = Services("embedded", found.database_url, found.redis_url)
    worker = Worker(services, extra_env={"OPTIONS_MAX_VALUE_BYTES": str(LIMIT)}).start()
    yield worker
    worker.stop()


def writes_of(worker: Worker, task_ids: list[str]) -> tuple[set[str], set[str]]:
    """The task ids with an options_write record, and those with an options_history row."""
    with psycopg.connect(worker.services.database_url) as conn:
        recorded = conn.execute(
            "SELECT task_id FROM options_write WHERE task_id = ANY(%s)", (task_ids,)
        ).fetchall()
        history = conn.execute(
            "SELECT DISTINCT task_id FROM options_history WHERE task_id = ANY(%s)", (task_ids,)
        ).fetchall()
    return {row[0] for row in recorded}, {row[0] for row in history}


def outcomes(worker: Worker, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every task's final result, read from the result backend in bulk."""
    found: dict[str, dict[str, Any]] = wait_for(
        lambda: (
            (got := results(worker.services.redis_url, task_ids))
            and len(got) == len(task_ids)
            and got
        ),
        timeout=180,
        interval=0.1,
        message=f"the results of {len(task_ids)} tasks",
    )
    return found


def check_outcome(call: tuple[Any, ...], outcome: dict[str, Any], recorded: bool) -> None:
    name, args, kwargs, expect = call
    what = f"{name} args={args!r:.300} kwargs={kwargs!r:.100} expected {expect}: {outcome!r:.400}"
    if expect == OK:
        assert outcome["status"] == "SUCCESS", what
        assert recorded, f"no options_write row: {what}"
        return
    # Refused at once: a failure, not a retry, and nothing recorded.
    assert outcome["status"] == "FAILURE", what
    assert not recorded, f"a refused write left a record: {what}"
    error = outcome["result"]
    if expect == TYPE:
        assert error["exc_type"] == "TypeError", what
        return
    assert error["exc_type"] == "InvalidOption", what
    assert error["exc_module"] == "store.errors", what
    assert error["exc_message"][0] == expect[1], what


def test_generated_payloads_are_refused_or_land_and_never_crash(strict_worker: Worker) -> None:
    """10,000 generated calls of every write task by name: each valid one lands, each invalid
    one fails at once with InvalidOption naming its field (TypeError for a bad call), nothing
    refused is written, and the worker keeps its main process and every child."""
    worker = strict_worker
    assert worker.process is not None
    children = worker.child_pids()
    tally: dict[str, int] = {}

    pending: dict[str, tuple[Any, ...]] = {}

    def verify() -> None:
        if not pending:
            return
        ids = list(pending)
        found = outcomes(worker, ids)
        recorded, in_history = writes_of(worker, ids)
        for task_id, call in pending.items():
            check_outcome(call, found[task_id], task_id in recorded)
            if call[3] != OK:
                assert task_id not in in_history, f"a refused write left history: {call!r:.300}"
            tally[call[3][0]] = tally.get(call[3][0], 0) + 1
        pending.clear()
        assert worker.process is not None
        assert worker.process.poll() is None, "the worker exited"
        assert worker.child_pids() == children, "a child died and was replaced"

    @settings(
        max_examples=BATCHES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(payloads(), min_size=BATCH, max_size=BATCH))
    def send(batch: list[tuple[str, list[Any], dict[str, Any], tuple[str, ...]]]) -> None:
        for call in batch:
            name, args, kwargs, _ = call
            task_id = f"bad-input-{uuid.uuid4().hex}"
            worker.producer.send_task(name, args=args, kwargs=kwargs, task_id=task_id)
            pending[task_id] = call
        if len(pending) >= VERIFY_EVERY:
            verify()

    send()
    verify()
    print(f"\nbad input: {sum(tally.values())} payloads sent: {tally}")
    assert sum(tally.values()) >= 10_000, tally
    assert min(tally.get(kind, 0) for kind in ("ok", "invalid", "type")) > 0, tally


class Unpicklable:
    """Unpickling this makes a directory: proof of whether a worker ever unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def dead_letter_ids(worker: Worker) -> set[str]:
    client = redis.Redis.from_url(worker.services.redis_url)
    letters = client.lrange(f"{worker.services.namespace}:dead-letters", 0, -1)
    return {json.loads(letter)["task_id"] for letter in letters}


def test_pickled_task_message_is_refused(strict_worker: Worker, tmp_path: Path) -> None:
    """A task message for options.set_option serialised with pickle is refused unread: not
    executed, nothing written, the refusal logged (unsigned, by a worker that holds a key; else
    Celery's content-disallowed error), the worker alive."""
    worker = strict_worker
    assert worker.process is not None
    children = worker.child_pids()
    since = len(worker.log())
    marker = tmp_path / "unpickled"
    task_id = f"pickled-{uuid.uuid4().hex}"
    message = worker.producer.amqp.as_task_v2(
        task_id, "options.set_option", args=[f"pickled:{task_id}", Unpicklable(marker)]
    )
    with worker.producer.connection_for_write() as conn:
        kombu.Producer(conn.default_channel).publish(
            message.body,
            serializer="pickle",
            headers=message.headers,
            exchange="",
            routing_key=worker.queue,
            declare=[kombu.Queue(worker.queue)],
            **message.properties,
        )
    wait_for(
        lambda: "ContentDisallowed" in worker.log()[since:] or task_id in dead_letter_ids(worker),
        timeout=30,
        message="the worker to refuse the content",
    )
    # A task sent after it runs: the worker is alive and past the pickled message.
    assert worker.call("probe.pid", timeout=30) in children
    assert not marker.exists(), "the worker unpickled the message"
    assert writes_of(worker, [task_id]) == (set(), set())
    assert worker.process.poll() is None
    assert worker.child_pids() == children


def test_unknown_keyword_arguments_fail_clearly(strict_worker: Worker) -> None:
    """set_option sent with an unknown keyword argument fails with a TypeError naming it, and
    writes nothing."""
    worker = strict_worker
    key = f"kwargs:{uuid.uuid4().hex[:8]}"
    result = worker.producer.send_task(
        "options.set_option", args=[key, 1], kwargs={"colour": "blue"}
    )
    with pytest.raises(TypeError, match="colour"):
        result.get(timeout=30)
    assert writes_of(worker, [result.id]) == (set(), set())
