"""structlog configuration for every optionstore process: JSON in production, readable on a tty."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(*, log_format: str = "auto", level: int = logging.INFO) -> None:
    """``log_format`` is ``json``, ``console`` or ``auto`` (console on a terminal, else JSON)."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            # Task id and name, bound in task_prerun, land on every event logged inside a task.
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write() per event: prefork children share stderr, and print() writes the event
        # and its newline separately, which interleaves lines.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
