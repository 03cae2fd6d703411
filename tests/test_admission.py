"""Write-task messages too large or too deeply nested are refused before a worker's main
process decodes them: failed for their producer, kept in the dead letters, never requeued."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
import redis

from store.errors import InvalidOption
from tasks.admission import MAX_DEPTH, _why_refused, refusal
from tests.conftest import Services, Worker, fresh_id


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_is_counted_outside_strings() -> None:
    """MAX_DEPTH levels pass, one more is refused; brackets inside strings do not count."""
    assert refusal(json.dumps(_deep(MAX_DEPTH)).encode(), max_bytes=10_000) is None
    refused = refusal(json.dumps(_deep(MAX_DEPTH + 1)).encode(), max_bytes=10_000)
    assert refused is not None and f"nested {MAX_DEPTH + 1} deep" in refused
    text = json.dumps(["[[[[" * 50, {"k": '"{{{{' * 50}]).encode()
    assert refusal(text, max_bytes=10_000) is None


def test_a_body_over_the_size_bound_is_refused() -> None:
    """A body larger than the bound is refused by its size, before it is scanned."""
    assert refusal(b"[" + b"1," * 100 + b"1]", max_bytes=1_000) is None
    refused = refusal(b"[" + b"1," * 1_000 + b"1]", max_bytes=1_000)
    assert refused is not None and "bytes, more than 1000" in refused


def test_a_compressed_body_is_opened_only_within_the_bound() -> None:
    """A zlib body is checked as it would decode; a bomb opens no further than the bound; a
    compression this check cannot open is refused by name."""
    deep = zlib.compress(json.dumps(_deep(600)).encode())
    assert "nested 600 deep" in (_why_refused(deep, {"compression": "zlib"}, 10_000) or "")
    bomb = zlib.compress(b"[" + b"0," * 5_000_000 + b"0]")
    assert len(bomb) < 100_000
    assert "more than 10000" in (
        _why_refused(bomb, {"compression": "application/x-gzip"}, 10_000) or ""
    )
    assert "x-bz2" in (_why_refused(b"x", {"compression": "application/x-bz2"}, 10_000) or "")
    plain = zlib.compress(json.dumps([[1, "k", 2], {}, {}]).encode())
    assert _why_refused(plain, {"compression": "zlib"}, 10_000) is None


def test_a_message_nested_too_deep_is_refused_and_the_worker_stays_up(
    services: Services,
) -> None:
    """A write sent by name with a value nested 600 deep fails for its producer naming `args`,
    lands in the dead letters, and the same worker's main process takes the next write."""
    own = Worker(
        services, extra_env={"OPTIONS_TASK_QUEUE": f"{services.namespace}.admission"}
    ).start()
    try:
        project = fresh_id()
        poisoned = own.send("options.set_project_option", project, "k", _deep(600))
        with pytest.raises(InvalidOption) as info:
            poisoned.get(timeout=30, propagate=True)
        assert info.value.field == "args"
        assert "nested" in str(info.value)
        assert own.process is not None and own.process.poll() is None, own.log()[-3000:]
        written = own.call("options.set_project_option", project, "k", 1)
        assert written["changed"] is True
        client = redis.Redis.from_url(services.redis_url)
        dead = [
            json.loads(raw) for raw in client.lrange(f"{services.namespace}:dead-letters", 0, -1)
        ]
        assert poisoned.id in {letter["task_id"] for letter in dead}
        assert "task.refused" in own.log()
    finally:
        own.stop()
