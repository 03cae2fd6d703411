"""One Redis command on a connection of the client's pool, below redis-py's command layer.

redis-py's layer (its retry wrapper, events, observability, reply callbacks) costs more Python
than the command's own I/O: the hot commands of a first read (HGETALL) and of a process's
report (EVALSHA) skip it. A connection that fails mid-command is closed (its reply may be half
read) and the command handed to that layer, which runs it again with its own retries; any other
error is raised as redis-py raises it. A client that is not a plain pooled ``redis.Redis`` (one
connection held for good, or a cluster client) always goes through its layer.
"""

from __future__ import annotations

from typing import Any

import redis


def execute(client: Any, *args: Any) -> Any:
    """``client.execute_command(*args)``, minus redis-py's per-command layer; the raw reply
    (no reply callback: HGETALL answers a flat list on RESP2, a dict on RESP3)."""
    if not isinstance(client, redis.Redis) or client.connection is not None:
        return client.execute_command(*args)
    pool = client.connection_pool
    connection: Any = pool.get_connection()  # redis-py's Connection methods are untyped
    try:
        connection.send_command(*args)
        return connection.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        connection.disconnect()  # its reply may be half read
    except BaseException:
        connection.disconnect()
        raise
    finally:
        if connection.should_reconnect():  # the server announced maintenance
            connection.disconnect()
        pool.release(connection)
    # The connection failed: redis-py's layer runs the command again, with its retries.
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def hgetall(client: Any, key: str) -> dict[bytes, bytes]:
    """HGETALL as a dict of bytes, whichever protocol the client speaks."""
    reply = execute(client, "HGETALL", key)
    if isinstance(reply, dict):  # RESP3, or redis-py's layer after a failed connection
        return reply
    pairs = iter(reply)
    return dict(zip(pairs, pairs, strict=True))
