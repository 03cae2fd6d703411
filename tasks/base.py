"""``WriteTask``, the base of every write task: input checks, commit and retries, once."""

from __future__ import annotations

import random
from typing import Any

from celery import Task

import store
from store.errors import InvalidOption, StoreUnavailable
from store.transient import postgres_unavailable, redis_unavailable
from store.writes import Write


def worth_retrying(exc: BaseException) -> bool:
    """Whether a write that raised ``exc`` may succeed later: the database or a cache is
    briefly unavailable (a failover, a restart, a pooler's error). Bad input never is."""
    if isinstance(exc, InvalidOption):
        return False
    return isinstance(exc, StoreUnavailable) or postgres_unavailable(exc) or redis_unavailable(exc)


class WriteTask(Task):  # type: ignore[misc]
    """A task whose ``run`` only checks its arguments and returns the ``Write`` to commit."""

    abstract = True
    typing = True
    # At-least-once: acknowledged after it ran, redelivered if the child dies mid-write.
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # PostgreSQL down is waited out; nothing is dropped
    retry_backoff_base = 0.5
    retry_backoff_max = 60.0

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        write: Write = self.run(*args, **kwargs)
        try:
            result = store.backend.commit(write, task_id=self.request.id)
        except Exception as exc:
            # Acknowledged as failed only for a reason that will not pass: with acks_late, a
            # failure is final and the write is gone.
            if self.request.called_directly or not worth_retrying(exc):
                raise
            raise self.retry(exc=exc, countdown=self.backoff(self.request.retries)) from exc
        return result.as_task_result(write.keys)

    def backoff(self, retries: int) -> float:
        """Full-jitter exponential backoff: spreads a fleet's retries after an outage."""
        ceiling: float = min(self.retry_backoff_max, self.retry_backoff_base * 2**retries)
        return random.uniform(0, ceiling)  # noqa: S311 (jitter, not cryptography)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        # The helpers reject bad input before anything is enqueued; the worker checks again.
        self.run(*(args or ()), **(kwargs or {}))
        return super().apply_async(args, kwargs, **options)
