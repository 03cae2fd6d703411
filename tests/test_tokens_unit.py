"""The read-your-writes token (store/tokens.py) as untrusted input, and what a write task
publishes with it; no services."""

from __future__ import annotations

import pytest

import store
from store.errors import InvalidToken
from store.tokens import MAX_SCOPES, MAX_TOKEN_BYTES, parse_token, token_of, written


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

    written.add("project:1", 4)
    written.add("project:1", 3)  # never backwards
    written.add("global", 0)  # a scope never written: nothing to wait for
    try:
        headers: dict[str, object] = {}
        before_task_publish.send(sender="probe.read", body=[[], {}, {}], headers=headers)
        assert headers == {"options_after": {"project:1": 4}}
        own = {"options_after": {"global": 1}}
        before_task_publish.send(sender="probe.read", body=[[], {}, {}], headers=own)
        assert own == {"options_after": {"global": 1}}  # a token of its own wins
    finally:
        written.clear()
    headers = {}
    before_task_publish.send(sender="probe.read", body=[[], {}, {}], headers=headers)
    assert headers == {}
    assert store.OPTIONS_AFTER == "options_after"
