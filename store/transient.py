"""Which PostgreSQL and Redis errors mean "unavailable for now": retried or fallen back on, never
reported as a failed write. Decided by what an error means (its SQLSTATE, Redis's error code),
not by the exception class a driver happens to pick for it."""

from __future__ import annotations

import re

import psycopg
import psycopg_pool
import redis

# SQLSTATE classes in which every condition passes with time or an operator's action:
# 08 connection exception (PgBouncer reports nearly all of its own errors as 08P01: "server
# conn crashed?", "query_wait_timeout", "no more connections allowed", "pgbouncer cannot
# connect to server"), 53 insufficient resources (too many connections, disk or memory full),
# 57 operator intervention (shutdown, restart, a cancelled statement), 58 system error (I/O).
_TRANSIENT_CLASSES = frozenset({"08", "53", "57", "58"})
_TRANSIENT_CODES = frozenset(
    {
        "25006",  # read_only_sql_transaction: a primary demoted, or a standby promoted late
        "25P03",  # idle_in_transaction_session_timeout: the session was closed under us
        "25P04",  # transaction_timeout (PostgreSQL 17): likewise
        "40001",  # serialization_failure, and hot-standby conflicts
        "40P01",  # deadlock_detected: the other transaction went through, ours may now
        "55P03",  # lock_not_available: lock_timeout while a migration or a VACUUM FULL holds it
    }
)
# Class 57, but for good: the database is gone, retrying cannot bring it back.
_PERMANENT_CODES = frozenset({"57P04"})  # database_dropped
# 57014 query_canceled stays transient: it is what pg_cancel_backend (a failover script, an
# operator clearing locks) and statement_timeout under a lock pile-up raise. A write is one
# idempotent transaction keyed by its task id, so running it again is always safe, and
# failing it would drop a write that would succeed a moment later.

# PgBouncer's own errors, in case one reaches us without its SQLSTATE (a connection attempt
# that failed is reported by libpq as text only).
_POOLER_MESSAGES = (
    "server conn crashed",
    "query_wait_timeout",
    "no more connections allowed",
    "pgbouncer cannot connect to server",
    "server_login_retry",
    "client_login_timeout",
    "pooler is paused",
)

# Redis error codes (the first word of an error reply) that mean "not now": full (OOM), a
# replica or a failing disk refusing writes (READONLY, MISCONF, NOREPLICAS), loading its
# dataset, busy with a script, or a cluster or master in transition. Not MOVED or ASK: redis-py's
# cluster client follows them (and gives up on a slot map in flux with a ClusterError, below),
# so one reaches us only from a client that does not, a redis:// URL naming a cluster's node: a
# wrong URL, for good. Scripts report the error of the command that failed inside them after a
# prefix (": -OOM ..." in Redis 6, "OOM ... script: ..." in Redis 7), so the code is looked for
# after a dash too.
_REDIS_CODES = (
    "OOM",
    "READONLY",
    "MISCONF",
    "NOREPLICAS",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
)
_REDIS_CODE = re.compile(rf"(?:^|\s-)({'|'.join(_REDIS_CODES)})\b")
_REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    # Redirections that did not settle within redis-py's cluster client's 16 tries ("TTL
    # exhausted"): a slot map in flux, under a failover or a resharding. CLUSTERDOWN too.
    redis.exceptions.ClusterError,
    # A slot no primary serves: its primary died and no replica has taken over yet.
    redis.exceptions.SlotNotCoveredError,
)


def postgres_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says PostgreSQL (or the pooler before it) cannot serve us right now,
    so the same statement may succeed later: a read falls back, a write is retried."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        # Raised by the driver itself: a connection that failed, broke or was closed.
        driver = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
        return driver or _from_pooler(exc)
    if sqlstate in _PERMANENT_CODES:
        return False
    by_code = sqlstate in _TRANSIENT_CODES or sqlstate[:2] in _TRANSIENT_CLASSES
    return by_code or _from_pooler(exc)


def redis_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis cannot serve us right now (down, full, read-only, loading,
    busy, a cluster failing over): treated exactly like Redis down."""
    if isinstance(exc, _REDIS_UNAVAILABLE):
        return True
    if isinstance(exc, redis.exceptions.RedisClusterException):
        # redis-py's cluster client reports "no node reachable" as this, from the error of
        # the last node it tried: that error says what it means.
        cause = exc.__cause__ or exc.__context__
        return cause is not None and cause is not exc and redis_unavailable(cause)
    if isinstance(exc, redis.exceptions.ResponseError):
        return _REDIS_CODE.search(str(exc).lstrip()) is not None
    return False


def _from_pooler(exc: psycopg.Error) -> bool:
    text = str(exc).lower()
    return any(message in text for message in _POOLER_MESSAGES)
