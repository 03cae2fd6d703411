"""What ``optionstore status`` and the console's status page show: the services, the schema,
the outbox, the leader and every live process with what it has not applied."""

from __future__ import annotations

import time
from typing import Any

from store.redis.eviction import eviction_policy
from store.redis.presence import lagging
from store.settings import redact_url
from worker.cli.waits import presence


def status_report(settings: Any, backend: Any, *, broker: bool = True) -> dict[str, Any]:
    """What ``status`` shows (the console's status page too): the services, the schema, the
    outbox, the leader and every live process with what it has not applied."""
    from store.postgres.schema import SCHEMA_VERSION, schema_version

    report: dict[str, Any] = {
        "embedded": settings.embedded,
        "database_url": redact_url(settings.database_url),
        "redis_url": redact_url(settings.redis_url),
        "broker_url": redact_url(settings.broker_url),
        "local_cache": settings.local_cache,
        "signing": signing_report(settings),
    }
    with backend.db.connection() as conn:
        report["schema_version"] = schema_version(conn)
        report["schema_expected"] = SCHEMA_VERSION
        if report["schema_version"] >= 1:
            # Bounded counts (up to COUNT_CAP, on indexes): cheap on a database of any size.
            report["scopes"] = backend.db.count_scopes()
            report["unannounced_writes"] = backend.db.count_unannounced()
        if report["schema_version"] >= ROLLOUTS_SCHEMA:
            report["rollouts"] = watching_rollouts(conn)
    # A status report shows every failure instead of raising, each under its own name: a
    # database that is not migrated does not make Redis look down.
    try:
        report["redis"] = "up" if backend.redis and backend.redis.ping() else "down"
        report["redis_eviction"] = eviction_policy(backend.redis.client) if backend.redis else None
    except Exception as exc:
        report["redis"] = f"down ({type(exc).__name__})"
    try:
        report["leader"] = leader(backend, settings.namespace)
    except Exception as exc:
        report["leader"] = f"unknown ({type(exc).__name__})"
    try:
        report["processes"] = process_table(backend, settings.namespace)
    except Exception as exc:
        report["processes"] = []
        report["processes_error"] = type(exc).__name__
    try:
        # One broker connection: the console's live page leaves it out of each refresh.
        report["broker_eviction"] = broker_eviction(settings) if broker else None
    except Exception as exc:
        report["broker_eviction"] = f"unknown ({type(exc).__name__})"
    # No live process has applied nothing: that is not convergence.
    report["converged"] = bool(report["processes"]) and all(
        p["converged"] for p in report["processes"]
    )
    return report


# The migration that added options_rollout.
ROLLOUTS_SCHEMA = 12


def watching_rollouts(conn: Any) -> list[dict[str, Any]]:
    """The rollouts watching now (``optionstore rollouts`` shows their figures)."""
    rows = conn.execute(
        "SELECT id, scope, key, selector, extract(epoch FROM now() - started_at), watch_seconds"
        " FROM options_rollout WHERE state = 'watching' ORDER BY id"
    ).fetchall()
    return [
        {
            "id": row[0],
            "scope": row[1],
            "key": row[2],
            "selector": row[3],
            "elapsed_s": round(float(row[4]), 1),
            "watch_seconds": row[5],
        }
        for row in rows
    ]


def leader(backend: Any, namespace: str) -> str | None:
    """The worker main process that holds the lease (``host:pid``), or None."""
    if backend.redis is None:
        return None
    token = backend.redis.client.get(f"{namespace}:leader")
    if token is None:
        return None
    text = token.decode(errors="replace") if isinstance(token, bytes) else str(token)
    return text.rsplit(":", 1)[0]  # the token ends with a random tag of the lease's holder


def signing_report(settings: Any) -> dict[str, Any]:
    """Whether this environment signs and checks write tasks and reload messages, and with
    which keys, by id only: a key is never shown."""
    keyring = settings.keyring
    return {
        "enabled": keyring is not None,
        "key_ids": [] if keyring is None else list(keyring.ids),
        "signs_with": None if keyring is None else keyring.signing_id,
        "unsigned_writes": settings.unsigned_writes,
    }


def broker_eviction(settings: Any) -> str | None:
    """The broker's maxmemory-policy if it is a Redis (a worker refuses an allkeys-* one)."""
    from store.process import broker_connections

    connect, _ = broker_connections(settings.broker_url, master_name=settings.broker_master_name)
    with connect() as conn:
        if conn.transport.driver_type != "redis":
            return None
        return eviction_policy(conn.default_channel.client)


def process_table(backend: Any, namespace: str) -> list[dict[str, Any]]:
    """Each live worker process of ``namespace``, and which of the latest writes it has not
    applied."""
    reports = presence(backend, namespace).processes()
    latest: dict[str, tuple[Any, bool]] = {}
    for result, announced in backend.db.recent_writes(limit=200):
        latest.setdefault(result.scope, (result, announced))  # newest first: keep the first
    behind = lagging(reports, latest.values())
    now = time.time()
    return [
        {
            "process": r.name,
            "hostname": r.hostname,
            "pid": r.pid,
            "kind": r.kind,
            "pool": r.pool,
            "mode": r.mode,
            "synced": r.synced,
            "heard_ago_s": round(now - r.heard_at, 3) if r.heard_at else None,
            "subscribed_ago_s": round(now - r.synced_at, 3) if r.synced_at else None,
            "scopes_applied": len(r.revisions),
            "messages": r.messages,
            "redis_reads": r.redis_reads,
            "postgres_reads": r.postgres_reads,
            "converged": r.synced and not behind[r.name],
            "behind": behind[r.name],
        }
        for r in reports
    ]
