"""``WriteTask``, the base of every write task: input checks, commit and retries, once."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any

from celery import Task

import store
from store.errors import InvalidOption, StoreUnavailable
from store.model.writes import Write, audit, check_expected_revision
from store.signing.tasks import ACTOR_HEADER, ORIGIN_HEADER, REASON_HEADER
from store.tokens import written
from store.transient import postgres_unavailable, redis_unavailable

# Task headers a producer sets to say who asks for a write and why (`app.send_task(...,
# headers={"optionstore_actor": "ana", "optionstore_reason": "incident 42"})`), covered by the
# task's signature (store/signing/tasks.py).
AUDIT_HEADERS = {"actor": ACTOR_HEADER, "reason": REASON_HEADER, "origin": ORIGIN_HEADER}
# The keyword argument of every write task that makes it a compare-and-set.
EXPECTED_REVISION = "expected_revision"


def worth_retrying(exc: BaseException) -> bool:
    """Whether a write that raised ``exc`` may succeed later: the database or a cache is
    briefly unavailable (a failover, a restart, a pooler's error). Bad input never is."""
    if isinstance(exc, InvalidOption):
        return False
    return isinstance(exc, StoreUnavailable) or postgres_unavailable(exc) or redis_unavailable(exc)


class WriteTask(Task):  # type: ignore[misc]
    """A task whose ``run`` only checks its arguments and returns the ``Write`` to commit."""

    abstract = True
    # Refuses a message too large or too deeply nested before the main process decodes it.
    Strategy = "tasks.admission:admitting"
    # Celery's own signature check would refuse expected_revision, which every write task takes
    # beside run()'s arguments: apply_async calls run() itself, so a wrong call still fails
    # before anything is enqueued.
    typing = False
    # At-least-once: acknowledged after it ran, redelivered if the child dies mid-write.
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # PostgreSQL down is waited out; nothing is dropped
    retry_backoff_base = 0.5
    retry_backoff_max = 60.0

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        expected = kwargs.pop(EXPECTED_REVISION, None)
        write = self.checked(self.run(*args, **kwargs), _headers(self.request), expected)
        try:
            result = store.backend.commit(write, task_id=self.request.id)
        except Exception as exc:
            # Acknowledged as failed only for a reason that will not pass: with acks_late, a
            # failure is final and the write is gone.
            if self.request.called_directly or not worth_retrying(exc):
                raise
            raise self.retry(exc=exc, countdown=self.backoff(self.request.retries)) from exc
        # The tasks this one publishes next (a chain's next step, a link) carry its token.
        written.add(result.scope, result.revision)
        return result.as_task_result(write.keys)

    def backoff(self, retries: int) -> float:
        """Full-jitter exponential backoff: spreads a fleet's retries after an outage."""
        ceiling: float = min(self.retry_backoff_max, self.retry_backoff_base * 2**retries)
        return random.uniform(0, ceiling)  # noqa: S311 (jitter, not cryptography)

    def checked(self, write: Write, headers: Mapping[str, Any], expected: object = None) -> Write:
        """``write`` with its audit headers and ``expected_revision``, once the registry allows
        it (else InvalidOption)."""
        store.registry.check_write(write, many=self.name == "options.set_many")
        found = {field: headers.get(name) for field, name in AUDIT_HEADERS.items()}
        return dataclasses.replace(
            write, audit=audit(**found), expected_revision=check_expected_revision(expected)
        )

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        actor: str | None = None,
        reason: str | None = None,
        expected_revision: int | None = None,
        **options: Any,
    ) -> Any:
        """Enqueue, with ``actor`` and ``reason`` sent as the audit headers, and
        ``expected_revision`` (commit only if the scope is at that revision) as the keyword
        argument every write task takes."""
        headers = dict(options.pop("headers", None) or {})
        if actor is not None:
            headers[ACTOR_HEADER] = actor
        if reason is not None:
            headers[REASON_HEADER] = reason
        kwargs = dict(kwargs or {})
        if expected_revision is not None:
            kwargs[EXPECTED_REVISION] = expected_revision
        # The helpers reject bad input before anything is enqueued; the worker checks again.
        run_kwargs = {k: v for k, v in kwargs.items() if k != EXPECTED_REVISION}
        self.checked(self.run(*(args or ()), **run_kwargs), headers, kwargs.get(EXPECTED_REVISION))
        return super().apply_async(args, kwargs or None, headers=headers or None, **options)


def _headers(request: Any) -> dict[str, Any]:
    # Celery hands custom headers to the task as attributes of its request (protocol 2), and
    # keeps them in request.headers for a retry.
    found = dict(getattr(request, "headers", None) or {})
    for name in AUDIT_HEADERS.values():
        value = getattr(request, name, None)
        if value is not None:
            found[name] = value
    return found
