"""The Celery side of optionstore: ``celery -A worker worker`` finds ``worker.app`` here."""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    # Lazy, so `optionstore embedded stop` and the other CLI commands that need no app do not
    # resolve settings (and start the embedded servers) just by importing this package.
    if name == "app":
        from worker.app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
