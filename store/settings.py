"""Settings from the environment and explicit overrides, resolved on first use, never at import."""

from __future__ import annotations

import functools
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from store.broadcast.codec import DEFAULT_MAX_MESSAGE_BYTES
from store.errors import InvalidOption
from store.events import log
from store.local import MODES, TASK
from store.model.validation import (
    DEFAULT_MAX_SCOPE_BYTES,
    DEFAULT_MAX_SCOPE_KEYS,
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_MAX_WRITE_BYTES,
    DEFAULT_MAX_WRITE_KEYS,
    MAX_ID,
)
from store.redis.cluster import cluster_nodes, cluster_options, is_cluster_url
from store.signing.keys import MIN_KEY_CHARS, Keyring, parse_keys

# The names an override may take, each the keyword form of one environment variable.
OVERRIDES = {
    "database_url": "OPTIONS_DATABASE_URL",
    "redis_url": "OPTIONS_REDIS_URL",
    "broker_url": "CELERY_BROKER_URL",
    "result_backend": "CELERY_RESULT_BACKEND",
    "local_cache": "OPTIONS_LOCAL_CACHE",
    "max_value_bytes": "OPTIONS_MAX_VALUE_BYTES",
    "max_message_bytes": "OPTIONS_MAX_MESSAGE_BYTES",
    "max_write_keys": "OPTIONS_MAX_WRITE_KEYS",
    "max_write_bytes": "OPTIONS_MAX_WRITE_BYTES",
    "max_scope_keys": "OPTIONS_MAX_SCOPE_KEYS",
    "max_scope_bytes": "OPTIONS_MAX_SCOPE_BYTES",
    "state_dir": "OPTIONS_STATE_DIR",
    "namespace": "OPTIONS_NAMESPACE",
    "task_queue": "OPTIONS_TASK_QUEUE",
    "log_format": "OPTIONS_LOG_FORMAT",
    "log_level": "OPTIONS_LOG_LEVEL",
    "visibility_timeout": "OPTIONS_VISIBILITY_TIMEOUT",
    "metrics_port": "OPTIONS_METRICS_PORT",
    "broker_master_name": "OPTIONS_BROKER_MASTER_NAME",
    "task_queue_type": "OPTIONS_TASK_QUEUE_TYPE",
    "catch_up_wait": "OPTIONS_CATCH_UP_WAIT",
    "host_relay": "OPTIONS_HOST_RELAY",
    "write_retention": "OPTIONS_WRITE_RETENTION",
    "history_retention": "OPTIONS_HISTORY_RETENTION",
    "registry": "OPTIONS_REGISTRY",
    "registry_strict": "OPTIONS_REGISTRY_STRICT",
    "signing_key": "OPTIONS_SIGNING_KEY",
    "signing_key_file": "OPTIONS_SIGNING_KEY_FILE",
    "unsigned_writes": "OPTIONS_UNSIGNED_WRITES",
    "web_users_file": "OPTIONS_WEB_USERS_FILE",
    "web_secret": "OPTIONS_WEB_SECRET",
}

# The kombu versions store/transport/redis.py is tested with: it overrides private names of kombu's
# Redis transport, which a patch release may change. Keep in step with pyproject.toml.
TESTED_KOMBU = ("5.7.0",)
QUEUE_TYPES = ("classic", "quorum")
# What a worker that holds a signing key does with a write task that carries no signature.
REFUSE, ACCEPT = "refuse", "accept"
UNSIGNED_WRITES = (REFUSE, ACCEPT)
LOG_LEVELS = ("debug", "info", "warning", "error")
AMQPS_TRANSPORT = "store.transport.amqps:Transport"
_REDIS_TRANSPORTS = {
    "redis": "store.transport.redis:Transport",
    "rediss": "store.transport.redis:Transport",
    "sentinel": "store.transport.redis:SentinelTransport",
}
_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}

DAY = 24 * 3600


def broker_scheme(broker_url: str) -> str:
    return broker_url.split("://", 1)[0].lower()


def check_cluster_broker(redis_url: str, broker_url: str) -> None:
    """Check a cluster cache URL (``InvalidOption`` naming ``OPTIONS_REDIS_URL``), and refuse a
    broker on a Redis Cluster: kombu's Redis transport speaks to one server and uses each
    queue's keys together, which a cluster spreads over its nodes' slots. With the cache on a
    cluster, the broker is RabbitMQ or a Redis outside it. Decided from the URLs (a
    ``redis://`` broker on one of the cache URL's nodes too)."""
    brokers = [url.strip() for url in broker_url.split(";") if url.strip()]
    for url in brokers:
        if is_cluster_url(url):
            raise InvalidOption(
                "CELERY_BROKER_URL",
                "a broker cannot live on a Redis Cluster (kombu's Redis transport speaks to one "
                "server): use RabbitMQ (amqp://) or a Redis outside the cluster",
            )
    if not is_cluster_url(redis_url):
        return
    cluster_options(redis_url)  # a bad cluster URL is refused here, before anything connects
    if not brokers:
        raise InvalidOption(
            "CELERY_BROKER_URL",
            "OPTIONS_REDIS_URL names a Redis Cluster, which cannot carry the broker and its "
            "reload exchange: set CELERY_BROKER_URL to RabbitMQ (amqp://) or a Redis outside "
            "the cluster",
        )
    nodes = {(host.lower(), port) for host, port in cluster_nodes(redis_url)}
    for url in brokers:
        parts = urlsplit(url)
        redis_broker = broker_scheme(url) in ("redis", "rediss") and parts.hostname
        if redis_broker and (str(parts.hostname).lower(), parts.port or 6379) in nodes:
            raise InvalidOption(
                "CELERY_BROKER_URL",
                f"{parts.hostname}:{parts.port or 6379} is a node of the Redis Cluster in "
                "OPTIONS_REDIS_URL, which cannot carry the reload exchange: use RabbitMQ "
                "(amqp://) or a Redis outside the cluster",
            )


def broker_transport_for(broker_url: str, *, kombu_version: str | None = None) -> str | None:
    """The kombu transport for a broker URL: on Redis (and Redis Sentinel), the one of
    store/transport/redis.py (a task taken off the queue is never lost); on ``amqps://``, the one of
    store/transport/amqps.py (the certificate's name is checked); otherwise None, the URL's own.

    With a kombu other than the tested ones, None too: kombu's own Redis transport, and a
    warning that a worker killed mid hand-over can lose a task.
    """
    if broker_scheme(broker_url) == "amqps":
        _check_amqps_query(broker_url)
        return AMQPS_TRANSPORT
    transport = _REDIS_TRANSPORTS.get(broker_scheme(broker_url))
    if transport is None:
        return None
    if kombu_version is None:
        import kombu

        kombu_version = str(kombu.__version__)
    if kombu_version not in TESTED_KOMBU:
        log.warning(
            "broker.transport_untested",
            kombu=kombu_version,
            tested=list(TESTED_KOMBU),
            transport="kombu's own",
            consequence="a task taken off the Redis queue is lost if its worker dies "
            "before recording it",
        )
        return None
    return transport


def _check_amqps_query(broker_url: str) -> None:
    from store.transport.amqps import AMQP_SSL_OPTIONS

    for name, value in parse_qsl(urlsplit(broker_url).query):
        if not name.startswith("ssl_"):
            continue
        if name not in AMQP_SSL_OPTIONS:
            raise InvalidOption(
                name, f"is not a TLS parameter of an amqps:// URL ({', '.join(AMQP_SSL_OPTIONS)})"
            )
        if name == "ssl_cert_reqs":
            _cert_reqs(value)


def _cert_reqs(value: str) -> ssl.VerifyMode:
    """The ``ssl_cert_reqs`` of a URL's query (``required``, ``CERT_REQUIRED``, ...)."""
    reqs = _CERT_REQS.get(value.lower().removeprefix("cert_"))
    if reqs is None:
        raise InvalidOption("ssl_cert_reqs", f"must be required, optional or none, got {value!r}")
    return reqs


def broker_ssl_options(broker_url: str) -> dict[str, Any] | None:
    """TLS options of a ``rediss://`` broker URL for kombu (Celery's ``broker_use_ssl``).

    kombu turns TLS on by the transport's name ("rediss"), which a transport of our own does
    not have; these options turn it on by the URL. The certificate is verified unless the URL
    says ``ssl_cert_reqs=none``; ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and
    ``ssl_check_hostname`` are taken from the query as kombu and redis-py take them.
    """
    if broker_scheme(broker_url) != "rediss":
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    for name, value in parse_qsl(urlsplit(broker_url).query):
        if name == "ssl_cert_reqs":
            options[name] = _cert_reqs(value)
        elif name == "ssl_check_hostname":
            options[name] = value.lower() not in ("false", "0", "no")
        elif name.startswith("ssl_"):
            options[name] = value
    return options


def broker_connection_options(broker_url: str, *, master_name: str | None) -> dict[str, Any]:
    """kombu ``Connection`` keywords a broker URL needs beyond itself: TLS for ``rediss://``,
    the transport that checks the certificate's name for ``amqps://``, the master's name for
    ``sentinel://``."""
    options: dict[str, Any] = {}
    tls = broker_ssl_options(broker_url)
    if tls is not None:
        options["ssl"] = tls
    if broker_scheme(broker_url) == "amqps":
        options["transport"] = broker_transport_for(broker_url)
    if broker_scheme(broker_url) == "sentinel":
        if not master_name:
            raise InvalidOption(
                "OPTIONS_BROKER_MASTER_NAME", "a sentinel:// broker URL needs the master's name"
            )
        options["transport_options"] = {"master_name": master_name}
    return options


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
    # One set_many: at most this many keys, and this many bytes of encoded values.
    max_write_keys: int = DEFAULT_MAX_WRITE_KEYS
    max_write_bytes: int = DEFAULT_MAX_WRITE_BYTES
    # One scope: at most this many keys, and this many bytes of encoded values (the database
    # refuses a write that would grow a scope past either).
    max_scope_keys: int = DEFAULT_MAX_SCOPE_KEYS
    max_scope_bytes: int = DEFAULT_MAX_SCOPE_BYTES
    state_dir: Path = field(default_factory=lambda: Path(".optionstore").absolute())
    namespace: str = "optionstore"
    task_queue: str = "celery"
    log_format: str = "auto"
    # The least severe event logged; "debug" adds one event per broadcast applied, per process.
    log_level: str = "info"
    visibility_timeout: int = 300
    # The worker host's Prometheus endpoint; None: no metrics recorded at all.
    metrics_port: int | None = None
    # The Sentinel master of a sentinel:// broker (Celery's broker_transport_options form).
    broker_master_name: str | None = None
    # "quorum" declares the task queue as a RabbitMQ quorum queue (replicated, durable).
    task_queue_type: str = "classic"
    # Seconds an announced options_write row (the outbox and the task-id record) is kept.
    write_retention: int = 7 * DAY
    # Seconds a superseded history entry is kept (the latest change of each key stays).
    history_retention: int = 90 * DAY
    # Declared options (store/model/registry.py): a TOML or JSON file, and strict mode (None: the
    # file's own setting).
    registry_path: str = ""
    registry_strict: bool | None = None
    # The secrets write tasks and reload messages are signed with (the first signs, all verify);
    # never shown (repr=False): ``keyring`` names them by id only.
    signing_keys: tuple[str, ...] = field(default=(), repr=False)
    # "accept": a write task without a signature is run (one with a signature is still checked).
    unsigned_writes: str = REFUSE
    # Seconds a task with an options_after token waits for a broadcast before it loads the
    # scope from the store instead.
    catch_up_wait: float = 0.1
    # A prefork worker's main process holds the one subscription to the reload exchange and
    # relays it to its children, which report through it (store/broadcast/relay.py); False:
    # every child subscribes and reports for itself.
    host_relay: bool = True
    # The operators' console (worker/web): its users file (empty: ``web-users.json`` in the
    # state folder) and the secret its session cookies are signed with (empty: one made on
    # first use and kept in the state folder, readable by this user only).
    web_users_file: str = ""
    web_secret: str = field(default="", repr=False)

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        reload_broker: str | None = None,
        **overrides: Any,
    ) -> Settings:
        """Read the contract's variables; keyword ``overrides`` (e.g. ``database_url=``) win.
        ``reload_broker``: the broker the reload exchange lives on when it is not
        ``CELERY_BROKER_URL`` (an installed app's own, worker/install.py), checked in its place
        against a cache on a Redis Cluster."""
        unknown = set(overrides) - set(OVERRIDES)
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        env = dict(os.environ if environ is None else environ)
        env.update({OVERRIDES[k]: _text(v) for k, v in overrides.items() if v is not None})
        local_cache = env.get("OPTIONS_LOCAL_CACHE") or TASK
        if local_cache not in MODES:
            raise InvalidOption(
                "OPTIONS_LOCAL_CACHE", f"must be one of {MODES}, got {local_cache!r}"
            )
        queue_type = env.get("OPTIONS_TASK_QUEUE_TYPE") or "classic"
        if queue_type not in QUEUE_TYPES:
            raise InvalidOption(
                "OPTIONS_TASK_QUEUE_TYPE", f"must be one of {QUEUE_TYPES}, got {queue_type!r}"
            )
        unsigned_writes = (env.get("OPTIONS_UNSIGNED_WRITES") or REFUSE).lower()
        if unsigned_writes not in UNSIGNED_WRITES:
            raise InvalidOption(
                "OPTIONS_UNSIGNED_WRITES",
                f"must be one of {UNSIGNED_WRITES}, got {unsigned_writes!r}",
            )
        log_level = (env.get("OPTIONS_LOG_LEVEL") or "info").lower()
        if log_level not in LOG_LEVELS:
            raise InvalidOption(
                "OPTIONS_LOG_LEVEL", f"must be one of {LOG_LEVELS}, got {log_level!r}"
            )
        visibility_timeout = _positive_int(env, "OPTIONS_VISIBILITY_TIMEOUT", 300)
        write_retention = _positive_int(env, "OPTIONS_WRITE_RETENTION", 7 * DAY)
        # A task redelivered after its record was pruned would commit a second time: the
        # record must outlive every redelivery (visibility timeout, retries) by far.
        shortest = max(3600, 10 * visibility_timeout)
        if write_retention < shortest:
            raise InvalidOption(
                "OPTIONS_WRITE_RETENTION",
                f"must be at least {shortest} s (1 h, and 10 x OPTIONS_VISIBILITY_TIMEOUT), "
                f"got {write_retention}",
            )
        broker = env.get("CELERY_BROKER_URL") if reload_broker is None else reload_broker
        check_cluster_broker(env.get("OPTIONS_REDIS_URL") or "", broker or "")
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
            max_write_keys=_positive_int(env, "OPTIONS_MAX_WRITE_KEYS", DEFAULT_MAX_WRITE_KEYS),
            max_write_bytes=_positive_int(env, "OPTIONS_MAX_WRITE_BYTES", DEFAULT_MAX_WRITE_BYTES),
            max_scope_keys=_scope_limit(env, "OPTIONS_MAX_SCOPE_KEYS", DEFAULT_MAX_SCOPE_KEYS),
            max_scope_bytes=_scope_limit(env, "OPTIONS_MAX_SCOPE_BYTES", DEFAULT_MAX_SCOPE_BYTES),
            state_dir=Path(env.get("OPTIONS_STATE_DIR") or ".optionstore").absolute(),
            namespace=env.get("OPTIONS_NAMESPACE") or "optionstore",
            task_queue=env.get("OPTIONS_TASK_QUEUE") or "celery",
            log_format=env.get("OPTIONS_LOG_FORMAT") or "auto",
            log_level=log_level,
            visibility_timeout=visibility_timeout,
            write_retention=write_retention,
            history_retention=_positive_int(env, "OPTIONS_HISTORY_RETENTION", 90 * DAY),
            metrics_port=(
                _positive_int(env, "OPTIONS_METRICS_PORT", 1)
                if env.get("OPTIONS_METRICS_PORT")
                else None
            ),
            broker_master_name=env.get("OPTIONS_BROKER_MASTER_NAME") or None,
            task_queue_type=queue_type,
            registry_path=env.get("OPTIONS_REGISTRY") or "",
            registry_strict=_flag(env, "OPTIONS_REGISTRY_STRICT"),
            catch_up_wait=_seconds(env, "OPTIONS_CATCH_UP_WAIT", 0.1, most=10.0),
            host_relay=_flag(env, "OPTIONS_HOST_RELAY") is not False,
            signing_keys=_signing_keys(env),
            unsigned_writes=unsigned_writes,
            web_users_file=env.get("OPTIONS_WEB_USERS_FILE") or "",
            web_secret=env.get("OPTIONS_WEB_SECRET") or "",
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

    @property
    def web_users_path(self) -> Path:
        """The console's users file: ``OPTIONS_WEB_USERS_FILE``, else in the state folder."""
        return Path(self.web_users_file or self.state_dir / "web-users.json").absolute()

    @functools.cached_property
    def keyring(self) -> Keyring | None:
        """The keys this process signs and verifies with; None: signing is off. On the embedded
        default with no key set, the state folder's own (made on first use, shared by every
        process started from there)."""
        if self.signing_keys:
            return Keyring(self.signing_keys)
        if self.embedded:
            from store.embedded import ensure_signing_key

            return Keyring([ensure_signing_key(self.state_dir)])
        return None

    def broker_connection_options(self) -> dict[str, Any]:
        """What a kombu ``Connection`` to the broker needs beyond its URL (TLS, Sentinel)."""
        return broker_connection_options(self.broker_url, master_name=self.broker_master_name)

    def _embedded_urls(self) -> tuple[str, str]:
        # Imported here: processes pointed at real services never load the embedded servers.
        from store.embedded import ensure_embedded

        services = ensure_embedded(self.state_dir)
        return services.database_url, services.redis_url


def _text(value: Any) -> str:
    # A list of keys may be given as one (install(app, signing_key=["new", "old"])).
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def signing_keys_from_environ(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The keys OPTIONS_SIGNING_KEY or OPTIONS_SIGNING_KEY_FILE name, and nothing else read."""
    return _signing_keys(os.environ if environ is None else environ)


def _signing_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """OPTIONS_SIGNING_KEY, or the keys of the file OPTIONS_SIGNING_KEY_FILE names (one of the
    two); every error names the variable and never shows a key."""
    text, path = env.get("OPTIONS_SIGNING_KEY") or "", env.get("OPTIONS_SIGNING_KEY_FILE") or ""
    name = "OPTIONS_SIGNING_KEY"
    if text and path:
        raise InvalidOption("OPTIONS_SIGNING_KEY_FILE", "set it or OPTIONS_SIGNING_KEY, not both")
    if path:
        name = "OPTIONS_SIGNING_KEY_FILE"
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidOption(name, f"cannot read {path}: {type(exc).__name__}") from None
        if not text.strip():
            raise InvalidOption(name, f"{path} holds no key")
    return signing_keys(text, field=name)


def signing_keys(text: str, *, field: str = "signing_key") -> tuple[str, ...]:
    """The keys of a comma-separated list, each checked long enough (an error names ``field``
    and the key's position, never the key)."""
    keys = parse_keys(text)
    for position, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_CHARS:
            raise InvalidOption(
                field, f"key {position} has {len(key)} characters; at least {MIN_KEY_CHARS}"
            )
    return keys


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


def _seconds(env: Mapping[str, str], name: str, default: float, *, most: float) -> float:
    raw = env.get(name) or str(default)
    try:
        value = float(raw)
    except ValueError:
        raise InvalidOption(name, f"must be a number of seconds, got {raw!r}") from None
    if not 0 <= value <= most:  # also refuses nan
        raise InvalidOption(name, f"must be between 0 and {most:g} seconds, got {raw}")
    return value


def _scope_limit(env: Mapping[str, str], name: str, default: int) -> int:
    # Compared in PostgreSQL as a bigint: a larger number would fail every write, not this check.
    value = _positive_int(env, name, default)
    if value > MAX_ID:
        raise InvalidOption(name, f"must be at most {MAX_ID}, got {value}")
    return value


# Any parameter whose name says it is a secret: libpq's password and sslpassword, Sentinel's
# sentinel_password, a token or a key's passphrase.
_SECRET_PARAMS = re.compile(
    r"(?i)\b([a-z_]*(?:password|passwd|pwd|secret|token|passphrase)[a-z_]*)\s*=\s*"
    r"('(?:[^'\\]|\\.)*'|[^\s&;]*)"
)


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
