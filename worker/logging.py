"""structlog configuration for the project's own worker process: JSON in production, readable on
a tty. A user's app installed with ``worker.install`` keeps its own configuration."""

from __future__ import annotations

import logging
import sys

import structlog

from store.events import stderr_processors


def configure_logging(*, log_format: str = "auto", level: int = logging.INFO) -> None:
    """``log_format`` is ``json``, ``console`` or ``auto`` (console on a terminal, else JSON)."""
    structlog.configure(
        processors=stderr_processors(log_format=log_format),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write() per event: prefork children share stderr, and print() writes the event
        # and its newline separately, which interleaves lines.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
