"""Where the library's events go: through the host's structlog setup if it made one, else its
``logging`` setup, else to stderr. Never to stdout, and nothing global is configured here."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

NAME = "optionstore"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def stderr_processors(*, log_format: str) -> list[Processor]:
    """The processors that render an event for stderr: JSON (``log_format`` ``json``, or
    ``auto`` off a terminal) or readable lines (``console``, or ``auto`` on a terminal)."""
    as_json = log_format == "json" or (log_format == "auto" and not _stderr_is_a_terminal())
    common: list[Processor] = [
        # Task id and name, bound in task_prerun, land on every event logged inside a task.
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        return [*common, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    # The console renderer formats exceptions itself (and warns if format_exc_info did).
    return [*common, structlog.dev.ConsoleRenderer(colors=_stderr_is_a_terminal())]


def _stderr_is_a_terminal() -> bool:
    return sys.stderr is not None and sys.stderr.isatty()


class StderrLogger:
    """Writes each rendered event to the process's stderr of the moment, in one write: prefork
    children share stderr, and a separate newline would interleave their lines."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        if stream is None:  # pythonw, or a daemon that closed it: nowhere to write
            return
        stream.write(message + "\n")
        stream.flush()

    debug = info = warning = error = critical = msg


_FIELDS = structlog.processors.LogfmtRenderer(bool_as_flag=False)


def _as_log_record(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> tuple[tuple[str], dict[str, Any]]:
    """The arguments of a ``logging.Logger`` call: the event's name and then its fields as
    key=value as the message; the exception, if any, left for the host's formatter."""
    exc_info = event_dict.pop("exc_info", None)
    event = str(event_dict.pop("event", ""))
    fields = _FIELDS(logger, method_name, event_dict)
    return (f"{event} {fields}" if fields else event,), {"exc_info": exc_info}


class _Outputs:
    """The loggers our events go to when the host configured no structlog, built on first use
    and again when the level or the format changes."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.log_format = "auto"
        self._stderr: FilteringBoundLogger | None = None
        self._logging: FilteringBoundLogger | None = None
        # The stdlib logger is looked up once: logging.getLogger takes a module-wide lock.
        self.stdlib: logging.Logger | None = None

    def set(self, *, level: int, log_format: str) -> None:
        self.level, self.log_format = level, log_format
        self._stderr = self._logging = None

    def stdlib_logger(self) -> logging.Logger:
        if self.stdlib is None:
            self.stdlib = logging.getLogger(NAME)
        return self.stdlib

    def to_stderr(self) -> FilteringBoundLogger:
        if self._stderr is None:
            self._stderr = self._wrap(StderrLogger(), stderr_processors(log_format=self.log_format))
        return self._stderr

    def through_logging(self) -> FilteringBoundLogger:
        if self._logging is None:
            self._logging = self._wrap(
                self.stdlib_logger(),
                [structlog.contextvars.merge_contextvars, _as_log_record],
            )
        return self._logging

    def _wrap(self, logger: Any, processors: list[Processor]) -> FilteringBoundLogger:
        # wrap_logger with every argument given: no global configuration is read or changed.
        wrapped: FilteringBoundLogger = structlog.wrap_logger(
            logger,
            processors=processors,
            wrapper_class=structlog.make_filtering_bound_logger(self.level),
            context_class=dict,
            cache_logger_on_first_use=True,
        )
        return wrapped


_outputs = _Outputs()


def set_output(*, level: str = "info", log_format: str = "auto") -> None:
    """The least severe event logged when the host configured no structlog (OPTIONS_LOG_LEVEL),
    and the format of events written to stderr (OPTIONS_LOG_FORMAT)."""
    _outputs.set(level=LEVELS[level.lower()], log_format=log_format)


class EventLogger:
    """The library's logger. Each event goes where the host's setup at that moment says: its
    structlog configuration if it made one (level and all), else its ``logging`` setup (as
    logger ``optionstore``, filtered at our level first), else stderr. Deciding per event costs
    two attribute reads; a debug event below our level then stops at a no-op."""

    def __init__(self) -> None:
        # Lazy: reads structlog's configuration when used, not now.
        self._host: FilteringBoundLogger = structlog.get_logger(NAME)

    def _target(self) -> FilteringBoundLogger:
        if structlog.is_configured():
            return self._host
        if logging.root.handlers or _outputs.stdlib_logger().handlers:
            return _outputs.through_logging()
        return _outputs.to_stderr()

    def debug(self, event: str, **fields: Any) -> None:
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._target().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._target().error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._target().exception(event, **fields)


log = EventLogger()


class Throttled:
    """Logs a warning at most once per ``interval`` seconds for each ``key``: a flood of bad
    messages must not flood the log. Each line says how many like it were left out since the
    last one (``suppressed``)."""

    def __init__(
        self, interval: float = 10.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, *, key: str = "", **fields: Any) -> bool:
        """Log ``event`` unless one with ``key`` (default: the event) was logged within the
        interval; True if logged."""
        return self._emit(log.warning, event, key, fields)

    def error(self, event: str, *, key: str = "", **fields: Any) -> bool:
        """``warning``, at error level."""
        return self._emit(log.error, event, key, fields)

    def _emit(self, method: Any, event: str, key: str, fields: dict[str, Any]) -> bool:
        # A race between two threads logs one line too many, never one too few.
        key = key or event
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        method(event, **fields, suppressed=self._suppressed.pop(key, 0))
        return True
