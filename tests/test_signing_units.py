"""Signatures in units: the keyring, the settings that name the keys, the embedded default's own
key, what a write task's signature covers, and the bounds and signatures of reload messages."""

from __future__ import annotations

import datetime
import hashlib
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import kombu.utils.json
import pytest
from structlog.testing import capture_logs

from store.broadcast.codec import (
    SIGNATURE_HEADER,
    MalformedMessage,
    ReloadMessage,
    UnverifiedMessage,
    decode,
    decode_redis_envelope,
    encode,
    redis_envelope,
    signature_headers,
)
from store.broadcast.consumer import ReloadConsumer
from store.embedded import ensure_signing_key
from store.errors import InvalidOption
from store.events import Throttled
from store.options_store import OptionsStore
from store.settings import Settings
from store.signing.keys import Keyring, key_id
from store.signing.tasks import signed_part, task_refusal
from tests.conftest import ROOT

OLD, NEW = "old-key-0123456789abcdef", "new-key-0123456789abcdef"


def test_a_keyring_signs_with_its_first_key_and_verifies_with_every_one() -> None:
    """Rotation: a keyring of (new, old) signs with new and accepts what either signed; one of
    old alone refuses new's signatures by their key id."""
    rotating, retired = Keyring([NEW, OLD]), Keyring([OLD])
    assert rotating.ids == (key_id(NEW), key_id(OLD))
    assert key_id(NEW) == hashlib.sha256(NEW.encode()).hexdigest()[:8]
    signature = rotating.sign(b"body")
    assert signature.startswith(f"v1:{key_id(NEW)}:") and len(signature) == 3 + 9 + 64
    assert rotating.refusal(b"body", retired.sign(b"body")) is None
    assert retired.refusal(b"body", signature) == (
        "unknown_key",
        f"signed with key id {key_id(NEW)}, not one of {[key_id(OLD)]}",
    )


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        (None, "unsigned"),
        ("", "unsigned"),
        (42, "malformed_signature"),
        ("v2:abcdef01:" + "0" * 64, "malformed_signature"),
        ("v1:abcdef01:" + "é" * 64, "malformed_signature"),
        ("v1:abcdef01:" + "0" * 64, "unknown_key"),
        (f"v1:{key_id(OLD)}:" + "0" * 64, "bad_signature"),
    ],
)
def test_a_signature_that_does_not_check_out_is_refused_by_its_reason(
    signature: object, reason: str
) -> None:
    """Missing, malformed, by an unknown key or not matching: each refused with its reason."""
    refused = Keyring([OLD]).refusal(b"body", signature)
    assert refused is not None and refused[0] == reason


def test_a_keyring_never_shows_its_keys() -> None:
    """Its repr, and every refusal it gives, name key ids only."""
    keyring = Keyring([NEW, OLD])
    shown = [repr(keyring), *map(str, keyring.refusal(b"x", "v1:00000000:" + "0" * 64) or ())]
    assert all(NEW not in text and OLD not in text for text in shown)


def test_settings_take_a_list_of_keys_or_a_file_and_never_show_them(tmp_path: Path) -> None:
    """OPTIONS_SIGNING_KEY takes a comma-separated list; OPTIONS_SIGNING_KEY_FILE a file of
    them; both at once, a short key or an unknown policy are refused naming the variable and
    never the key; the settings' repr shows no key."""
    urls = {"OPTIONS_DATABASE_URL": "postgresql://h/d", "OPTIONS_REDIS_URL": "redis://h"}
    settings = Settings.from_environ({**urls, "OPTIONS_SIGNING_KEY": f" {NEW} ,{OLD}"})
    assert settings.signing_keys == (NEW, OLD)
    assert settings.keyring is not None and settings.keyring.signing_id == key_id(NEW)
    assert NEW not in repr(settings)
    keys = tmp_path / "keys"
    keys.write_text(f"{NEW}\n{OLD}\n")
    from_file = Settings.from_environ({**urls, "OPTIONS_SIGNING_KEY_FILE": str(keys)})
    assert from_file.signing_keys == (NEW, OLD)
    assert Settings.from_environ(urls).keyring is None
    assert Settings.from_environ(urls, signing_key=[NEW, OLD]).signing_keys == (NEW, OLD)
    for env, field in (
        ({"OPTIONS_SIGNING_KEY": NEW, "OPTIONS_SIGNING_KEY_FILE": str(keys)}, "FILE"),
        ({"OPTIONS_SIGNING_KEY": f"{NEW},short-secret"}, "KEY"),
        ({"OPTIONS_SIGNING_KEY_FILE": str(tmp_path / "absent")}, "FILE"),
        ({"OPTIONS_UNSIGNED_WRITES": "sometimes"}, "WRITES"),
    ):
        with pytest.raises(InvalidOption) as info:
            Settings.from_environ({**urls, **env})
        assert info.value.field.endswith(field)
        assert "short-secret" not in str(info.value) and NEW not in str(info.value)


def _first_start(state_dir: str, barrier: Any, found: Any) -> None:
    barrier.wait()
    found.put(ensure_signing_key(Path(state_dir)))


def test_the_embedded_key_is_made_once_by_concurrent_first_starts(tmp_path: Path) -> None:
    """Eight processes making the state folder's key at the same instant all get one key, in a
    file only its owner can read; an embedded setting with no key set uses it."""
    context = multiprocessing.get_context("fork")
    barrier, found = context.Barrier(8), context.Queue()
    starts = [
        context.Process(target=_first_start, args=(str(tmp_path), barrier, found)) for _ in range(8)
    ]
    for process in starts:
        process.start()
    for process in starts:
        process.join(timeout=30)
    keys = {found.get(timeout=5) for _ in starts}
    assert len(keys) == 1 and len(keys.pop()) == 64
    key_file = tmp_path / "signing.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.key"]  # no scratch left
    embedded = Settings.from_environ({"OPTIONS_STATE_DIR": str(tmp_path)})
    assert embedded.keyring is not None
    assert embedded.keyring.ids == (key_id(key_file.read_text().strip()),)


# -- write tasks ------------------------------------------------------------------------------

HEADERS = {
    "task": "options.set_project_option",
    "id": "4f1e",
    "optionstore_actor": "ana",
    "optionstore_reason": "incident 42",
    "optionstore_origin": None,
}
BODY = ([7, "k", {"é": [1.5, None, True], "n": 10**20}], {}, {"callbacks": None, "chain": None})


def test_a_task_signature_verifies_after_a_json_round_trip() -> None:
    """What a producer signs (Python objects) verifies against what a worker reads (the JSON
    kombu sends), with non-ASCII text, floats, big integers and a datetime in the args."""
    keyring = Keyring([NEW])
    body = (
        [*BODY[0], datetime.datetime(2024, 1, 2, 3, 4, 5)],
        *BODY[1:],
    )
    headers = {**HEADERS, SIGNATURE_HEADER: keyring.sign(signed_part(HEADERS, body))}
    sent = kombu.utils.json.dumps(body).encode()
    assert task_refusal(sent, headers, keyring, accept_unsigned=False) is None


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("task", "options.unset_project_option"),
        ("id", "another"),
        ("optionstore_actor", "mallory"),
        ("optionstore_reason", None),
        ("optionstore_origin", "cli"),
    ],
)
def test_a_header_changed_after_signing_breaks_the_signature(header: str, value: Any) -> None:
    """The name, the id and the audit headers are covered: changing one is refused."""
    keyring = Keyring([NEW])
    headers = {**HEADERS, SIGNATURE_HEADER: keyring.sign(signed_part(HEADERS, BODY))}
    sent = json.dumps(BODY).encode()
    changed = {**headers, header: value}
    assert task_refusal(sent, changed, keyring, accept_unsigned=False) == (
        "bad_signature",
        f"the signature does not match (key id {key_id(NEW)})",
    )


def test_a_body_changed_after_signing_breaks_the_signature() -> None:
    """Args, kwargs and the embed (a link added on the way) are covered too; an unsigned task
    passes only where unsigned writes are accepted."""
    keyring = Keyring([NEW])
    headers = {**HEADERS, SIGNATURE_HEADER: keyring.sign(signed_part(HEADERS, BODY))}
    for body in (
        [[7, "k", "forged"], {}, BODY[2]],
        [BODY[0], {"expected_revision": 3}, BODY[2]],
        [BODY[0], {}, {**BODY[2], "callbacks": [{"task": "options.set_option"}]}],
    ):
        refused = task_refusal(json.dumps(body).encode(), headers, keyring, accept_unsigned=True)
        assert refused is not None and refused[0] == "bad_signature"
    unsigned = dict(HEADERS)
    assert task_refusal(b"[]", unsigned, keyring, accept_unsigned=True) is None
    assert task_refusal(b"[]", unsigned, keyring, accept_unsigned=False) == (
        "unsigned",
        "not signed, and this worker runs only signed write tasks",
    )
    protocol_1 = task_refusal(b'{"args": []}', headers, keyring, accept_unsigned=False)
    assert protocol_1 is not None and protocol_1[0] == "unverifiable"


# -- reload messages --------------------------------------------------------------------------


def test_a_reload_message_is_signed_over_its_body_and_checked_before_it_is_read() -> None:
    """The envelope carries the body's signature in its headers; a consumer with the key reads
    it, and refuses unsigned, wrongly signed or altered bodies, and any body over the bound,
    before decoding them."""
    keyring = Keyring([NEW])
    body = encode(ReloadMessage.heartbeat(origin="test", marks={"project:7": 3}))
    signed = redis_envelope(body, "x.reload", signature_headers(body, keyring))
    assert decode_redis_envelope(signed, keyring=keyring).marks == {"project:7": 3}
    forged = body.replace('"project:7":3', '"project:7":9223372036854775807')
    for envelope in (
        redis_envelope(body, "x.reload"),
        redis_envelope(body, "x.reload", signature_headers(body, Keyring([OLD]))),
        redis_envelope(forged, "x.reload", signature_headers(body, keyring)),
    ):
        with pytest.raises(UnverifiedMessage):
            decode_redis_envelope(envelope, keyring=keyring)
    # Without a key, as before: read unchecked.
    assert decode_redis_envelope(redis_envelope(body, "x.reload")).kind == "heartbeat"
    huge = "[" * 10_000 + "]" * 10_000
    with pytest.raises(MalformedMessage, match="body: 20000 bytes, more than 1000"):
        decode(huge, keyring=keyring, signature=keyring.sign(huge.encode()), max_bytes=1000)
    with pytest.raises(MalformedMessage, match="envelope:"):
        decode_redis_envelope(redis_envelope(huge, "x.reload"), max_bytes=1000)


def _heartbeat(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "heartbeat", "sent_at": time.time(), "origin": "o", **fields}


def _change(**fields: Any) -> dict[str, Any]:
    body = {
        "v": 1,
        "kind": "change",
        "sent_at": time.time(),
        "origin": "o",
        "scope": "project:7",
        "revision": 3,
        "set": {},
        "unset": [],
        "committed_at": time.time(),
    }
    return {**body, **fields}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_change(revision=2**63), "revision"),
        (_change(revision=10**5000), "revision"),
        (_heartbeat(marks={"project:7": 2**63}), "marks.project:7"),
        (_heartbeat(marks={f"project:{i}": 1 for i in range(1, 10_002)}), "marks"),
        (_change(origin="o" * 513), "origin"),
        (_change(sent_at=time.time() + 2 * 86400), "sent_at"),
        (_change(committed_at=1e300), "committed_at"),
        (_change(committed_at=-1.0), "committed_at"),
        (_change(set={f"k{i}": 1 for i in range(60_000)}, unset=["u"] * 40_001), "set"),
    ],
)
def test_every_field_a_reload_message_carries_is_bounded(body: dict[str, Any], field: str) -> None:
    """Revisions and marks within PostgreSQL's bigint, times finite and not far ahead, an
    origin, a list of marks and the keys of a change of bounded size: else an error naming
    the field."""
    with pytest.raises(MalformedMessage) as info:
        ReloadMessage.from_body(body)
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    assert ReloadMessage.from_body(_change(revision=2**63 - 1)).revision == 2**63 - 1


def test_an_unverified_message_does_not_count_as_heard() -> None:
    """A forged message neither reaches the caches nor keeps a silent process looking alive:
    past the deadline, the process deafens all the same; a signed message resets the clock."""
    keyring = Keyring([NEW])
    consumer = ReloadConsumer(
        backend=OptionsStore(),
        connect=lambda: None,  # never connects here
        namespace="unit",
        presence=None,
        kind="web",
        pool="-",
        deadline=5.0,
        keyring=keyring,
    )
    body = encode(ReloadMessage.heartbeat(origin="forger", marks={"project:7": 2**62}))
    consumer.subscribed.set()
    consumer._last_heard = time.monotonic() - 6.0
    consumer._on_data(redis_envelope(body, "unit.reload").encode())
    assert consumer.backend.local.floors.get("project:7") is None
    consumer.check_heard()
    assert not consumer.subscribed.is_set(), "a forged message kept the process looking alive"

    consumer.subscribed.set()
    consumer._last_heard = last = time.monotonic() - 4.0
    consumer._on_data(redis_envelope(body, "unit.reload").encode())
    assert consumer._last_heard == last
    consumer._on_data(redis_envelope(body, "unit.reload", signature_headers(body, keyring)))
    assert consumer._last_heard > last + 3.0
    consumer.check_heard()
    assert consumer.subscribed.is_set()


def test_a_throttled_event_is_logged_once_per_interval_with_what_it_left_out() -> None:
    """A flood of one event logs one line per interval, the next one counting those left out."""
    now = [100.0]
    throttled = Throttled(interval=10.0, clock=lambda: now[0])
    with capture_logs() as events:
        logged = [throttled.warning("unit.flood", n=n) for n in range(50)]
        now[0] += 10.0
        throttled.warning("unit.flood", n=50)
        throttled.warning("unit.flood", key="other", n=51)
    assert logged.count(True) == 1
    assert [(e["n"], e["suppressed"]) for e in events] == [(0, 0), (50, 49), (51, 0)]


def test_importing_reads_no_key_and_the_first_publish_resolves_it(tmp_path: Path) -> None:
    """Importing store, tasks and worker reads no setting (a bad key does not stop it) and makes
    no key; the first options.* task published, from a plain Celery app, resolves the key (on
    the embedded default: the state folder's, made then) and is signed with it."""
    code = textwrap.dedent(
        """
        import json, os, sys
        import store, tasks, worker
        from celery import Celery
        made_at_import = os.path.exists(".optionstore")
        app = Celery("plain", broker="memory://")
        app.send_task("options.set_option", args=["k", 1])
        with app.connection_for_read() as conn:
            message = conn.SimpleQueue("celery").get(timeout=5)
        print(json.dumps({"made_at_import": made_at_import,
                          "signature": message.headers.get("optionstore_signature")}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIONS_", "CELERY_"))}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(done.stdout)
    key = (tmp_path / ".optionstore" / "signing.key").read_text().strip()
    assert answer == {"made_at_import": False, "signature": answer["signature"]}
    assert answer["signature"].startswith(f"v1:{key_id(key)}:")
    bad = subprocess.run(
        [sys.executable, "-c", "import store, tasks, worker"],
        cwd=tmp_path,
        env={**env, "OPTIONS_SIGNING_KEY": "short"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 0, bad.stderr
