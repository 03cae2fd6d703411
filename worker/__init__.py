"""The Celery side of optionstore: the project's app (``celery -A worker worker``) and
``install(app)``, which makes any Celery app an optionstore app."""

from __future__ import annotations

from worker.celery import app
from worker.install import Installation, install

__all__ = ["Installation", "app", "install"]
