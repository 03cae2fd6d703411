"""The structlog events of SPEC: one per write, one per cache fallback, task context, no secrets."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from celery.signals import task_postrun, task_prerun
from structlog.testing import capture_logs

import store
import tasks
import worker  # noqa: F401 (installs the project app, whose handlers are under test)
from store.model.scopes import project_scope
from store.model.writes import many_write, set_write
from store.options_store import OptionsStore
from store.postgres.store import PostgresStore
from store.readers import ProjectOptions
from store.redis.cache import RedisCache
from store.settings import redact_url
from tests.conftest import Services, fresh_id

SECRET = "s3cr3t-Pa55"


def _task_id() -> str:
    return f"test-{uuid.uuid4()}"


@pytest.fixture
def clean_context() -> Iterator[None]:
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


def test_commit_logs_one_write_event(backend: Any) -> None:
    """A commit logs exactly one option.write with scope, keys, revision, changed and duration."""
    scope = project_scope(fresh_id())
    with capture_logs() as events:
        result = backend.commit(many_write(scope, {"a": 1, "b": 2}, ["c"]), task_id=_task_id())
    writes = [e for e in events if e["event"] == "option.write"]
    assert len(writes) == 1
    event = writes[0]
    assert event["scope"] == scope.name
    assert sorted(event["keys"]) == ["a", "b", "c"]
    assert event["revision"] == result.revision == 1
    assert event["changed"] is True
    assert isinstance(event["duration_ms"], float)
    assert event["duration_ms"] >= 0
    assert event["log_level"] == "info"


def test_unchanged_commit_logs_changed_false(backend: Any) -> None:
    """A write that changes nothing still logs its option.write, with changed false."""
    scope = project_scope(fresh_id())
    backend.commit(set_write(scope, "k", 1), task_id=_task_id())
    with capture_logs() as events:
        backend.commit(set_write(scope, "k", 1), task_id=_task_id())
    writes = [e for e in events if e["event"] == "option.write"]
    assert [(e["changed"], e["revision"], e["keys"]) for e in writes] == [(False, 1, ["k"])]


def test_redis_fallback_is_logged(backend: Any, services: Services) -> None:
    """A read that finds Redis unreachable logs cache.fallback from redis to postgres."""
    project = fresh_id()
    backend.commit(set_write(project_scope(project), "k", 1), task_id=_task_id())
    layered = OptionsStore()
    layered.configure(
        postgres=PostgresStore(conninfo=services.database_url),
        redis_cache=RedisCache(url="redis://127.0.0.1:1/0", prefix=services.namespace),
    )
    try:
        with capture_logs() as events:
            assert ProjectOptions(layered).get_value(project, "k") == 1
    finally:
        layered.db.close()
    assert [
        (e["event"], e["layer"], e["to"]) for e in events if e["event"] == "cache.fallback"
    ] == [("cache.fallback", "redis", "postgres")]


def test_fallback_events_carry_no_passwords(services: Services) -> None:
    """Fallback and failure events logged for unreachable services never contain a password."""
    layered = OptionsStore()
    layered.configure(
        postgres=PostgresStore(
            conninfo=f"postgresql://optionstore:{SECRET}@127.0.0.1:1/optionstore", timeout=1.0
        ),
        redis_cache=RedisCache(
            url=f"redis://default:{SECRET}@127.0.0.1:1/0",
            prefix=services.namespace,
            socket_timeout=1.0,
        ),
    )
    try:
        with capture_logs() as events, pytest.raises(store.StoreUnavailable) as caught:
            ProjectOptions(layered).get_value(fresh_id(), "k")
    finally:
        layered.db.close()
    assert any(e["event"] == "cache.fallback" for e in events)
    assert SECRET not in repr(events)
    assert SECRET not in str(caught.value)


def test_redact_url_hides_the_password() -> None:
    """redact_url replaces the password and keeps user, host, port and database."""
    redacted = redact_url("postgresql://u:secret@db.example:5432/options")
    assert redacted is not None
    assert "secret" not in redacted
    assert redacted.startswith("postgresql://u:")
    assert redacted.endswith("@db.example:5432/options")


@pytest.mark.parametrize(
    "url",
    [
        "redis://:secret@cache:6379/0",
        "amqp://guest:secret@rabbit:5672//",
        "postgresql://u:se%40cret@h/db",
        "postgresql://u:secret@h1:5432,h2:5433/db",
        "sentinel://:secret@s1:26379;sentinel://s2:26379?sentinel_password=secret",
        "postgresql://u@h/db?sslkey=k.pem&sslpassword=secret&sslmode=verify-full",
        "host=h user=u sslpassword='se cret' password=secret",
    ],
)
def test_redact_url_hides_passwords_of_every_service(url: str) -> None:
    """Redis, RabbitMQ, percent-encoded and multi-host URLs lose their password."""
    redacted = redact_url(url)
    assert redacted is not None
    assert "secret" not in redacted
    assert "se%40cret" not in redacted


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "redis://cache:6379/0", None, ""])
def test_redact_url_leaves_urls_without_password_alone(url: str | None) -> None:
    """A URL without a password (or no URL) is returned unchanged."""
    assert redact_url(url) == url


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://u@h/db?password=secret", "host=h dbname=db user=u password=secret"],
    ids=["query-parameter", "key-value"],
)
def test_redact_url_hides_a_password_outside_the_userinfo(dsn: str) -> None:
    """A libpq password in the query string or a key=value DSN is redacted too."""
    assert "secret" not in (redact_url(dsn) or "")


def test_task_prerun_binds_task_id_and_name_and_postrun_unbinds(clean_context: None) -> None:
    """task_prerun binds task_id and task_name into the log context; task_postrun removes them."""
    task = tasks.set_option
    task_prerun.send(sender=task, task_id="t-123", task=task, args=(), kwargs={})
    bound = structlog.contextvars.get_contextvars()
    assert (bound["task_id"], bound["task_name"]) == ("t-123", "options.set_option")
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        structlog.get_logger("optionstore").info("inside")
    assert (events[0]["task_id"], events[0]["task_name"]) == ("t-123", "options.set_option")
    task_postrun.send(sender=task, task_id="t-123", task=task, args=(), kwargs={}, retval=None)
    assert "task_id" not in structlog.contextvars.get_contextvars()
    assert "task_name" not in structlog.contextvars.get_contextvars()


def test_postrun_keeps_context_bound_outside_the_task(clean_context: None) -> None:
    """Unbinding the task context leaves other bound keys (a request id, say) in place."""
    structlog.contextvars.bind_contextvars(request_id="r-1")
    task = tasks.set_option
    task_prerun.send(sender=task, task_id="t-9", task=task, args=(), kwargs={})
    task_postrun.send(sender=task, task_id="t-9", task=task, args=(), kwargs={}, retval=None)
    bound = structlog.contextvars.get_contextvars()
    assert bound["request_id"] == "r-1"
    assert "task_id" not in bound


def test_write_event_inside_a_task_carries_its_id_and_name(
    backend: Any, clean_context: None
) -> None:
    """The option.write logged by a task run eagerly carries that task's id and name."""
    task_id = _task_id()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
        outcome = tasks.set_project_option.apply(args=[fresh_id(), "k", 1], task_id=task_id)
    assert outcome.successful(), outcome.traceback
    writes = [e for e in events if e["event"] == "option.write"]
    assert len(writes) == 1
    assert writes[0]["task_id"] == task_id
    assert writes[0]["task_name"] == "options.set_project_option"
    assert "task_id" not in structlog.contextvars.get_contextvars()
