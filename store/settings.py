"""Settings read from the environment at the edges (celeryconfig, the CLI), not in library code."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from store.broadcast import DEFAULT_MAX_MESSAGE_BYTES
from store.errors import InvalidOption
from store.local import MODES, TASK
from store.validation import DEFAULT_MAX_VALUE_BYTES


def broker_transport_for(broker_url: str) -> str | None:
    """The kombu transport for a broker URL: on Redis, the one of worker/broker.py (a task
    taken off the queue is never lost); otherwise None, the URL's own."""
    if broker_url.split("://", 1)[0] in ("redis", "rediss"):
        return "worker.broker:Transport"
    return None


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    broker_url: str
    result_backend: str | None
    local_cache: str = TASK
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    # A change encoding larger than this is broadcast as "reload this scope" instead.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    state_dir: Path = Path(".optionstore")
    embedded: bool = False
    namespace: str = "optionstore"
    task_queue: str = "celery"
    log_format: str = "auto"
    visibility_timeout: int = 300
    # Fault injection for the test suite only; see LayeredStore.skip_announce.
    fault: str = ""

    @property
    def broker_transport(self) -> str | None:
        return broker_transport_for(self.broker_url)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Resolve the contract's variables; unset service URLs mean the embedded default."""
        env = os.environ if environ is None else environ
        state_dir = Path(env.get("OPTIONS_STATE_DIR") or ".optionstore").absolute()
        database_url = env.get("OPTIONS_DATABASE_URL") or ""
        redis_url = env.get("OPTIONS_REDIS_URL") or ""
        embedded = not (database_url and redis_url)
        if embedded:
            # Imported here: processes pointed at real services never load the embedded servers.
            from store.embedded import ensure_embedded

            services = ensure_embedded(state_dir)
            database_url = database_url or services.database_url
            redis_url = redis_url or services.redis_url
        local_cache = env.get("OPTIONS_LOCAL_CACHE") or TASK
        if local_cache not in MODES:
            raise InvalidOption(
                "OPTIONS_LOCAL_CACHE", f"must be one of {MODES}, got {local_cache!r}"
            )
        max_value_bytes = _positive_int(env, "OPTIONS_MAX_VALUE_BYTES", DEFAULT_MAX_VALUE_BYTES)
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            broker_url=env.get("CELERY_BROKER_URL") or redis_url,
            result_backend=env.get("CELERY_RESULT_BACKEND") or None,
            local_cache=local_cache,
            max_value_bytes=max_value_bytes,
            max_message_bytes=_positive_int(
                env, "OPTIONS_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES
            ),
            state_dir=state_dir,
            embedded=embedded,
            namespace=env.get("OPTIONS_NAMESPACE") or "optionstore",
            task_queue=env.get("OPTIONS_TASK_QUEUE") or "celery",
            log_format=env.get("OPTIONS_LOG_FORMAT") or "auto",
            fault=env.get("OPTIONS_FAULT") or "",
            visibility_timeout=_positive_int(env, "OPTIONS_VISIBILITY_TIMEOUT", 300),
        )


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise InvalidOption(name, f"must be an integer, got {raw!r}") from None
    if value < 1:
        raise InvalidOption(name, f"must be at least 1, got {value}")
    return value


_SECRET_PARAMS = re.compile(r"(?i)\b(password|passwd|pwd)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&;]*)")


def redact_url(url: str | None) -> str | None:
    """The URL or libpq DSN with every password replaced, fit for a log line or a report."""
    if not url:
        return url
    # libpq also takes passwords as a query parameter or in a key=value DSN.
    url = _SECRET_PARAMS.sub(lambda m: f"{m.group(1)}=***", url)
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))
