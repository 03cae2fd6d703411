"""Settings from the environment and explicit overrides, resolved on first use, never at import."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from store.broadcast import DEFAULT_MAX_MESSAGE_BYTES
from store.errors import InvalidOption
from store.local import MODES, TASK
from store.validation import DEFAULT_MAX_VALUE_BYTES

# The names an override may take, each the keyword form of one environment variable.
OVERRIDES = {
    "database_url": "OPTIONS_DATABASE_URL",
    "redis_url": "OPTIONS_REDIS_URL",
    "broker_url": "CELERY_BROKER_URL",
    "result_backend": "CELERY_RESULT_BACKEND",
    "local_cache": "OPTIONS_LOCAL_CACHE",
    "max_value_bytes": "OPTIONS_MAX_VALUE_BYTES",
    "max_message_bytes": "OPTIONS_MAX_MESSAGE_BYTES",
    "state_dir": "OPTIONS_STATE_DIR",
    "namespace": "OPTIONS_NAMESPACE",
    "task_queue": "OPTIONS_TASK_QUEUE",
    "log_format": "OPTIONS_LOG_FORMAT",
    "visibility_timeout": "OPTIONS_VISIBILITY_TIMEOUT",
    "registry": "OPTIONS_REGISTRY",
    "registry_strict": "OPTIONS_REGISTRY_STRICT",
}


def broker_transport_for(broker_url: str) -> str | None:
    """The kombu transport for a broker URL: on Redis, the one of worker/broker.py (a task
    taken off the queue is never lost); otherwise None, the URL's own."""
    if broker_url.split("://", 1)[0] in ("redis", "rediss"):
        return "worker.broker:Transport"
    return None


@dataclass(frozen=True)
class Settings:
    """What a process needs to know about its services.

    Everything but the service URLs is read and checked when the object is made. A URL left
    unset means the embedded default, whose servers start when that URL is first asked for.
    """

    configured_database_url: str = ""
    configured_redis_url: str = ""
    configured_broker_url: str = ""
    result_backend: str | None = None
    local_cache: str = TASK
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    # A change encoding larger than this is broadcast as "reload this scope" instead.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    state_dir: Path = field(default_factory=lambda: Path(".optionstore").absolute())
    namespace: str = "optionstore"
    task_queue: str = "celery"
    log_format: str = "auto"
    visibility_timeout: int = 300
    # Declared options (store/registry.py): a TOML or JSON file, and strict mode (None: the
    # file's own setting).
    registry_path: str = ""
    registry_strict: bool | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the contract's variables; keyword ``overrides`` (e.g. ``database_url=``) win."""
        unknown = set(overrides) - set(OVERRIDES)
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        env = dict(os.environ if environ is None else environ)
        env.update({OVERRIDES[k]: str(v) for k, v in overrides.items() if v is not None})
        local_cache = env.get("OPTIONS_LOCAL_CACHE") or TASK
        if local_cache not in MODES:
            raise InvalidOption(
                "OPTIONS_LOCAL_CACHE", f"must be one of {MODES}, got {local_cache!r}"
            )
        return cls(
            configured_database_url=env.get("OPTIONS_DATABASE_URL") or "",
            configured_redis_url=env.get("OPTIONS_REDIS_URL") or "",
            configured_broker_url=env.get("CELERY_BROKER_URL") or "",
            result_backend=env.get("CELERY_RESULT_BACKEND") or None,
            local_cache=local_cache,
            max_value_bytes=_positive_int(env, "OPTIONS_MAX_VALUE_BYTES", DEFAULT_MAX_VALUE_BYTES),
            max_message_bytes=_positive_int(
                env, "OPTIONS_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES
            ),
            state_dir=Path(env.get("OPTIONS_STATE_DIR") or ".optionstore").absolute(),
            namespace=env.get("OPTIONS_NAMESPACE") or "optionstore",
            task_queue=env.get("OPTIONS_TASK_QUEUE") or "celery",
            log_format=env.get("OPTIONS_LOG_FORMAT") or "auto",
            visibility_timeout=_positive_int(env, "OPTIONS_VISIBILITY_TIMEOUT", 300),
            registry_path=env.get("OPTIONS_REGISTRY") or "",
            registry_strict=_flag(env, "OPTIONS_REGISTRY_STRICT"),
        )

    @property
    def embedded(self) -> bool:
        """Whether a service URL is left to the embedded default."""
        return not (self.configured_database_url and self.configured_redis_url)

    @functools.cached_property
    def database_url(self) -> str:
        return self.configured_database_url or self._embedded_urls()[0]

    @functools.cached_property
    def redis_url(self) -> str:
        return self.configured_redis_url or self._embedded_urls()[1]

    @functools.cached_property
    def broker_url(self) -> str:
        return self.configured_broker_url or self.redis_url

    @property
    def broker_transport(self) -> str | None:
        return broker_transport_for(self.broker_url)

    def _embedded_urls(self) -> tuple[str, str]:
        # Imported here: processes pointed at real services never load the embedded servers.
        from store.embedded import ensure_embedded

        services = ensure_embedded(self.state_dir)
        return services.database_url, services.redis_url


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    text = (env.get(name) or "").strip().lower()
    if not text:
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidOption(name, f"must be 1 or 0 (true/false), got {text!r}")


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
