"""The transient-error rules of store/transient.py and the write task's retry decision, on the
real psycopg, psycopg_pool and redis exception classes (no services needed)."""

from __future__ import annotations

import psycopg
import psycopg_pool
import pytest
import redis

from store.errors import InvalidOption, StoreUnavailable
from store.transient import postgres_unavailable, redis_unavailable
from tasks.base import worth_retrying

TRANSIENT_SQLSTATES = [
    "08000",  # connection_exception
    "08003",  # connection_does_not_exist
    "08006",  # connection_failure
    "08P01",  # protocol_violation: how PgBouncer reports its own errors
    "25006",  # read_only_sql_transaction: a failover
    "25P03",  # idle_in_transaction_session_timeout
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "53000",  # insufficient_resources
    "53100",  # disk_full
    "53200",  # out_of_memory
    "53300",  # too_many_connections
    "55P03",  # lock_not_available
    "57014",  # query_canceled
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "57P05",  # idle_session_timeout
    "58000",  # system_error
    "58030",  # io_error
]
PERMANENT_SQLSTATES = [
    "23505",  # unique_violation
    "22P02",  # invalid_text_representation
    "42601",  # syntax_error
    "42P01",  # undefined_table (schema not migrated)
    "42501",  # insufficient_privilege
    "28P01",  # invalid_password
    "3D000",  # invalid_catalog_name (no such database)
    "54000",  # program_limit_exceeded
    "57P04",  # database_dropped
    "XX000",  # internal_error
]


def _database_error(sqlstate: str, message: str = "from the server") -> psycopg.Error:
    error: psycopg.Error = psycopg.errors.lookup(sqlstate)(message)
    return error


@pytest.mark.parametrize("sqlstate", TRANSIENT_SQLSTATES)
def test_transient_sqlstates_are_retried(sqlstate: str) -> None:
    """Every SQLSTATE that passes with time (failover, shutdown, pooler, resources) is transient
    and retried by the write task, whatever psycopg class it maps to."""
    error = _database_error(sqlstate)
    assert postgres_unavailable(error), sqlstate
    assert worth_retrying(error), sqlstate


@pytest.mark.parametrize("sqlstate", PERMANENT_SQLSTATES)
def test_permanent_sqlstates_fail_at_once(sqlstate: str) -> None:
    """A SQLSTATE that no wait can fix (bad SQL, no privilege, a dropped database) is not
    transient: the write task fails instead of retrying forever."""
    error = _database_error(sqlstate)
    assert not postgres_unavailable(error), sqlstate
    assert not worth_retrying(error), sqlstate


def test_read_only_transaction_is_transient_though_not_an_operational_error() -> None:
    """25006 maps to psycopg's InternalError, yet a read-only database (a failover) is
    retried."""
    error = _database_error("25006", "cannot execute INSERT in a read-only transaction")
    assert not isinstance(error, psycopg.OperationalError)
    assert postgres_unavailable(error)


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("connection failed: Connection refused"),
        psycopg.OperationalError("consuming input failed: server closed the connection"),
        psycopg.InterfaceError("the connection is closed"),
        psycopg_pool.PoolTimeout("couldn't get a connection after 5.00 sec"),
        psycopg.DatabaseError("ERROR:  pgbouncer cannot connect to server"),
        psycopg.DatabaseError("server conn crashed?"),
        psycopg.DatabaseError("query_wait_timeout"),
        psycopg.DatabaseError("no more connections allowed (max_client_conn)"),
    ],
    ids=repr,
)
def test_driver_and_pooler_errors_without_sqlstate_are_transient(error: psycopg.Error) -> None:
    """A broken or refused connection, an exhausted pool, or a PgBouncer message without a
    SQLSTATE is transient."""
    assert error.sqlstate is None
    assert postgres_unavailable(error)


def test_other_errors_are_not_database_unavailability() -> None:
    """A driver error of another kind, or any non-database exception, is not transient."""
    assert not postgres_unavailable(psycopg.ProgrammingError("query has 2 placeholders"))
    assert not postgres_unavailable(psycopg.DataError("value out of range"))
    assert not postgres_unavailable(ValueError("nope"))
    assert not postgres_unavailable(redis.exceptions.ConnectionError("down"))


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        # What redis-py raises for "-OOM ..." (the code stripped off), Redis 7 scripts included.
        redis.exceptions.OutOfMemoryError(
            "command not allowed when used memory > 'maxmemory'. script: a6c4, on @user_script:14."
        ),
        # Redis 6.2: an OOM inside a script arrives as a plain ResponseError.
        redis.exceptions.ResponseError(
            "Error running script (call to f_a6c4): @user_script:14: @user_script: 14: "
            "-OOM command not allowed when used memory > 'maxmemory'."
        ),
        redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
        redis.exceptions.ResponseError(
            "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."
        ),
        redis.exceptions.ResponseError(
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to "
            "persist to disk."
        ),
        redis.exceptions.ResponseError("NOREPLICAS Not enough good replicas to write."),
        redis.exceptions.ResponseError("LOADING Redis is loading the dataset in memory"),
        redis.exceptions.MasterDownError("Link with MASTER is down"),
        redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
        redis.exceptions.ClusterDownError("The cluster is down"),
        redis.exceptions.ResponseError("READONLY You can't write against a read only replica."),
    ],
    ids=repr,
)
def test_redis_refusing_or_down_is_unavailable(error: redis.RedisError) -> None:
    """Redis down, full (OOM, also inside a script), read-only, loading, busy or in a failover
    counts as Redis unavailable, and a write that met it is retried."""
    assert redis_unavailable(error)
    assert worth_retrying(error)


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ResponseError("ERR wrong number of arguments for 'hset' command"),
        redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
        redis.exceptions.ResponseError("BUSYGROUP Consumer Group name already exists"),
        redis.exceptions.ResponseError("ERR Error running script: user_script:1: bad argument"),
        redis.exceptions.DataError("Invalid input of type: 'dict'"),
        ValueError("nope"),
    ],
    ids=repr,
)
def test_redis_errors_of_our_own_making_are_not_unavailability(error: Exception) -> None:
    """A Redis answer that points at a bug (wrong type, bad arguments, a script error) is not
    mistaken for an outage."""
    assert not redis_unavailable(error)


def test_invalid_input_is_never_retried() -> None:
    """InvalidOption fails a write at once, while StoreUnavailable is retried."""
    assert not worth_retrying(InvalidOption("key", "too long"))
    assert not worth_retrying(ValueError("bad"))
    assert worth_retrying(StoreUnavailable("PostgreSQL failed moments ago"))
