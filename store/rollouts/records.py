"""Rollouts in PostgreSQL (the record any leader finishes from), the leader's copy of the active
ones in Redis (what every process follows), and the health each process reports there."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from store.errors import InvalidOption
from store.model.writes import audit
from store.postgres.store import PostgresStore
from store.redis.cluster import RedisClient
from store.rollouts.model import (
    MAX_SAMPLES,
    PROMOTED,
    STATES,
    WATCHING,
    Health,
    Selector,
    Thresholds,
)

# Origins of the history entries a rollout writes besides its promotion (a normal write with
# origin "rollout"): the canary value served to some processes, and the end of that.
CANARY_ORIGIN = "canary"
CANARY_END_ORIGIN = "canary-end"
# What the leader's copy of the active rollouts lives for without a refresh: processes that
# find it gone (no leader for that long) stop serving canary values.
MIRROR_TTL = 30
# A health hash outlives its rollout by a day, for `rollouts` to show.
HEALTH_TTL = 24 * 3600
# Bounds on what is read back from Redis (written by any process: untrusted).
MAX_MIRROR_BYTES = 8 * 1024 * 1024
MAX_HEALTH_FIELDS = 10_000
MAX_HEALTH_BYTES = 16 * 1024
MAX_COUNT = 2**53
# The most rollouts `rollouts` lists at once.
MAX_LIST = 10_000

_COLUMNS = (
    "id, scope, key, old_value::text, new_value::text, base_revision, selector, members,"
    " watch_seconds, thresholds, state, requested, requested_by, actor, reason, started_at,"
    " ends_at, decided_at, decision, figures, extract(epoch FROM now() - started_at)"
)


@dataclass(frozen=True, slots=True)
class Rollout:
    """One rollout as recorded. Values are canonical JSON text (``old_value`` None: unset)."""

    id: int
    scope: str
    key: str
    old_value: str | None
    new_value: str
    base_revision: int
    selector: str
    members: list[str]
    watch_seconds: float
    thresholds: dict[str, Any]
    state: str
    requested: str | None
    requested_by: str | None
    actor: str | None
    reason: str | None
    started_at: datetime
    ends_at: datetime
    decided_at: datetime | None
    decision: str | None
    figures: dict[str, Any] | None
    elapsed: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope,
            "key": self.key,
            "old_value": None if self.old_value is None else json.loads(self.old_value),
            "old_set": self.old_value is not None,
            "new_value": json.loads(self.new_value),
            "base_revision": self.base_revision,
            "selector": self.selector,
            "members": self.members,
            "watch_seconds": self.watch_seconds,
            "thresholds": self.thresholds,
            "state": self.state,
            "requested": self.requested,
            "requested_by": self.requested_by,
            "actor": self.actor,
            "reason": self.reason,
            "started_at": self.started_at.isoformat(),
            "ends_at": self.ends_at.isoformat(),
            "decided_at": None if self.decided_at is None else self.decided_at.isoformat(),
            "decision": self.decision,
            "figures": self.figures,
            "elapsed_s": round(self.elapsed, 3),
        }


def _rollout(row: tuple[Any, ...]) -> Rollout:
    values = list(row)
    values[7] = list(values[7] or [])
    values[20] = float(values[20])
    return Rollout(*values)


def _current(conn: psycopg.Connection[Any], scope: str, key: str) -> tuple[int, str | None]:
    row = conn.execute(
        "SELECT s.revision, v.value::text FROM (SELECT %s::text AS scope) q"
        " LEFT JOIN options_scope s ON s.scope = q.scope"
        " LEFT JOIN options_value v ON v.scope = q.scope AND v.key = %s",
        (scope, key),
    ).fetchone()
    return (int(row[0] or 0), row[1]) if row else (0, None)


def mirror_key(namespace: str) -> str:
    return f"{namespace}:rollouts"


def health_key(namespace: str, rollout_id: int) -> str:
    return f"{namespace}:rollout:{rollout_id}:health"


class RolloutRecords:
    """The rollouts of one database and namespace: start, read, request, finish, mirror."""

    def __init__(
        self, postgres: PostgresStore, client: RedisClient | None, *, namespace: str
    ) -> None:
        self.postgres = postgres
        self.client = client
        self.namespace = namespace

    # -- PostgreSQL ---------------------------------------------------------------------------

    def start(
        self,
        *,
        scope: str,
        key: str,
        value_text: str,
        selector: Selector,
        watch_seconds: float,
        thresholds: Thresholds,
        live: Iterable[str] = (),
        actor: str | None = None,
        reason: str | None = None,
    ) -> Rollout:
        """Record a rollout and its canary value in history, in one transaction; refused (and
        nothing written) while another rollout watches the same key."""
        return self.start_many(
            [(scope, key, value_text)],
            selector=selector,
            watch_seconds=watch_seconds,
            thresholds=thresholds,
            live=live,
            actor=actor,
            reason=reason,
        )[0]

    def start_many(
        self,
        changes: list[tuple[str, str, str]],
        *,
        selector: Selector,
        watch_seconds: float,
        thresholds: Thresholds,
        live: Iterable[str] = (),
        actor: str | None = None,
        reason: str | None = None,
    ) -> list[Rollout]:
        """Record a rollout of each (scope, key, canonical JSON value) with the same selector,
        window and thresholds, and their canary values in history, all in one transaction:
        all of them, or (one key under another rollout) none."""
        if not (isinstance(watch_seconds, int | float) and math.isfinite(watch_seconds)) or not (
            0 < watch_seconds <= 7 * 24 * 3600
        ):
            raise InvalidOption(
                "watch", f"must be above 0 s and at most 7 days, not {watch_seconds}"
            )
        live = sorted(set(live))
        ids = []
        with self.postgres.connection() as conn, conn.transaction():
            # Scopes locked in one order: two requests over the same scopes never deadlock.
            for scope in sorted({scope for scope, _, _ in changes}):
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"rollout:{scope}",))
            for scope, key, value_text in changes:
                ids.append(
                    self._insert(
                        conn,
                        scope,
                        key,
                        value_text,
                        selector=selector,
                        watch_seconds=watch_seconds,
                        thresholds=thresholds,
                        live=live,
                        actor=actor,
                        reason=reason,
                    )
                )
        found = [self.get(rollout_id) for rollout_id in ids]
        assert all(found)
        return found  # type: ignore[return-value]  # all found, checked above

    def _insert(
        self,
        conn: psycopg.Connection[Any],
        scope: str,
        key: str,
        value_text: str,
        *,
        selector: Selector,
        watch_seconds: float,
        thresholds: Thresholds,
        live: list[str],
        actor: str | None,
        reason: str | None,
    ) -> int:
        revision, old_text = _current(conn, scope, key)
        try:
            with conn.transaction():
                inserted = conn.execute(
                    "INSERT INTO options_rollout (scope, key, old_value, new_value,"
                    " base_revision, selector, watch_seconds, thresholds, actor, reason,"
                    " ends_at) VALUES (%s, %s, %s::json, %s::json, %s, %s, %s, %s::jsonb,"
                    " %s, %s, now() + make_interval(secs => %s)) RETURNING id",
                    (
                        scope,
                        key,
                        old_text,
                        value_text,
                        revision,
                        selector.text,
                        watch_seconds,
                        json.dumps(thresholds.as_dict()),
                        actor,
                        reason,
                        watch_seconds,
                    ),
                ).fetchone()
        except psycopg.errors.UniqueViolation:
            raise InvalidOption(
                "key", f"{key!r} of {scope} is already under a rollout (see `rollouts`)"
            ) from None
        assert inserted is not None
        rollout_id = int(inserted[0])
        members = selector.choose(str(rollout_id), live)
        conn.execute("UPDATE options_rollout SET members = %s WHERE id = %s", (members, rollout_id))
        conn.execute(
            "INSERT INTO options_history (scope, key, old_value, new_value, revision,"
            " task_id, actor, reason, origin) VALUES (%s, %s, %s::json, %s::json, %s, %s,"
            " %s, %s, %s)",
            (
                scope,
                key,
                old_text,
                value_text,
                revision,
                f"rollout:{rollout_id}:canary",
                actor,
                f"canary to {selector.text}" + (f": {reason}" if reason else ""),
                CANARY_ORIGIN,
            ),
        )
        return rollout_id

    def get(self, rollout_id: int) -> Rollout | None:
        with self.postgres.connection() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM options_rollout WHERE id = %s",  # noqa: S608  # constant
                (rollout_id,),
            ).fetchone()
        return None if row is None else _rollout(row)

    def active(self) -> list[Rollout]:
        with self.postgres.connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM options_rollout"  # noqa: S608  # constant
                " WHERE state = 'watching' ORDER BY id"
            ).fetchall()
        return [_rollout(row) for row in rows]

    def recent(self, *, limit: int = 50) -> list[Rollout]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise InvalidOption(
                "limit", f"must be a whole number from 1 to {MAX_LIST}, got {limit}"
            )
        with self.postgres.connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM options_rollout"  # noqa: S608  # constant
                " ORDER BY (state = 'watching') DESC, id DESC LIMIT %s",
                (limit,),
            ).fetchall()
        return [_rollout(row) for row in rows]

    def request(self, rollout_id: int, action: str, *, actor: str | None) -> Rollout:
        """Ask the leader to promote or abort a watching rollout at its next round."""
        if action not in {"promote", "abort"}:
            raise InvalidOption("action", f"must be promote or abort, got {action!r}")
        actor = audit(actor).actor  # the rules of a write's actor: it goes into history
        with self.postgres.connection() as conn:
            row = conn.execute(
                "UPDATE options_rollout SET requested = %s, requested_by = %s"
                " WHERE id = %s AND state = 'watching' RETURNING id",
                (action, actor, rollout_id),
            ).fetchone()
        if row is None:
            found = self.get(rollout_id)
            state = "does not exist" if found is None else f"is {found.state}"
            raise InvalidOption("id", f"rollout {rollout_id} {state}, not watching")
        found = self.get(rollout_id)
        assert found is not None
        return found

    def finish(
        self, rollout: Rollout, state: str, *, decision: str, figures: dict[str, Any]
    ) -> bool:
        """End a watching rollout as ``state``. Unless promoted (its write is the history
        entry) the end is recorded in history, canary value -> the stored value every process
        goes back to, in the same transaction. False if it had already ended (another leader
        finished it)."""
        if state not in STATES or state == WATCHING:
            raise ValueError(f"not an end state: {state!r}")
        with self.postgres.connection() as conn, conn.transaction():
            row = conn.execute(
                "UPDATE options_rollout SET state = %s, decision = %s, figures = %s::jsonb,"
                " decided_at = now() WHERE id = %s AND state = 'watching' RETURNING id",
                (state, decision, json.dumps(figures), rollout.id),
            ).fetchone()
            if row is None:
                return False
            if state != PROMOTED:
                # What every process goes back to: the stored value (the old one, or on a
                # rollout superseded by another write, that write's), read under the scope's
                # row lock so that no write slips in between.
                current = conn.execute(
                    "SELECT s.revision, v.value::text FROM options_scope s"
                    " LEFT JOIN options_value v ON v.scope = s.scope AND v.key = %s"
                    " WHERE s.scope = %s FOR SHARE OF s",
                    (rollout.key, rollout.scope),
                ).fetchone()
                revision, stored = (int(current[0]), current[1]) if current else (0, None)
                conn.execute(
                    "INSERT INTO options_history (scope, key, old_value, new_value, revision,"
                    " task_id, actor, reason, origin) VALUES (%s, %s, %s::json, %s::json, %s,"
                    " %s, %s, %s, %s)",
                    (
                        rollout.scope,
                        rollout.key,
                        rollout.new_value,
                        stored,
                        revision,
                        f"rollout:{rollout.id}:{state}",
                        rollout.requested_by or rollout.actor,
                        decision,
                        CANARY_END_ORIGIN,
                    ),
                )
        return True

    def current(self, scope: str, key: str) -> tuple[int, str | None]:
        """The scope's revision and the key's stored value (canonical JSON; None: unset)."""
        with self.postgres.connection() as conn:
            return _current(conn, scope, key)

    def written(self, task_id: str) -> bool:
        """Whether a write with this task id committed (a promotion made before a takeover)."""
        with self.postgres.connection() as conn:
            row = conn.execute(
                "SELECT 1 FROM options_write WHERE task_id = %s", (task_id,)
            ).fetchone()
        return row is not None

    # -- Redis ----------------------------------------------------------------------------------

    def mirror(self, rollouts: list[Rollout] | None = None) -> None:
        """Copy the active rollouts to Redis, where every process reads them each second."""
        if self.client is None:
            return
        active = self.active() if rollouts is None else rollouts
        body = {
            "rollouts": [
                {
                    "id": r.id,
                    "scope": r.scope,
                    "key": r.key,
                    "value": json.loads(r.new_value),
                    "selector": r.selector,
                    "members": r.members,
                }
                for r in active
            ]
        }
        self.client.set(mirror_key(self.namespace), json.dumps(body), ex=MIRROR_TTL)

    def health(self, rollout_id: int) -> tuple[Health, Health]:
        """The canary's and the baseline's health, summed over the processes' reports."""
        canary, baseline = Health(), Health()
        if self.client is None:
            return canary, baseline
        key = health_key(self.namespace, rollout_id)
        if int(self.client.hlen(key)) > MAX_HEALTH_FIELDS:
            return canary, baseline  # not written by this fleet's processes: judge nothing
        for raw in self.client.hvals(key):
            parsed = parse_health(raw)
            if parsed is not None:
                is_canary, health = parsed
                (canary if is_canary else baseline).add(health)
        return canary, baseline


def parse_health(raw: bytes | str) -> tuple[bool, Health] | None:  # noqa: PLR0911  # one per check
    """One process's report (bounded and checked: any process can write it), or None."""
    if len(raw) > MAX_HEALTH_BYTES:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to decode
        return None
    if not isinstance(data, dict):
        return None
    counts = [data.get(name) for name in ("tasks", "failures", "retries")]
    if not all(type(c) is int and 0 <= c <= MAX_COUNT for c in counts):
        return None
    tasks, failures, retries = (int(c) for c in counts)  # type: ignore[arg-type]  # checked
    if failures > tasks or retries > tasks:
        return None  # a task run fails or retries at most once
    runtimes = data.get("runtimes")
    if not isinstance(runtimes, list) or len(runtimes) > min(MAX_SAMPLES, tasks):
        return None
    if not all(type(r) in {int, float} and math.isfinite(r) and 0 <= r <= 1e7 for r in runtimes):
        return None
    health = Health(tasks, failures, retries, [float(r) for r in runtimes], 1)
    return bool(data.get("canary")), health
