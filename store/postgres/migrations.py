"""PostgreSQL schema: numbered migrations applied once, under an advisory lock."""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

from store.errors import MigrationError

# Appended to, never edited: a deployed database records how many of these it has run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE options_scope (
        scope      text PRIMARY KEY,
        revision   bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE options_value (
        scope    text NOT NULL REFERENCES options_scope (scope),
        key      text NOT NULL,
        value    json NOT NULL,
        revision bigint NOT NULL,
        PRIMARY KEY (scope, key)
    );
    CREATE TABLE options_history (
        id         bigserial PRIMARY KEY,
        scope      text NOT NULL,
        key        text NOT NULL,
        old_value  json,
        new_value  json,
        revision   bigint NOT NULL,
        changed_at timestamptz NOT NULL DEFAULT now(),
        task_id    text
    );
    CREATE INDEX options_history_scope_key ON options_history (scope, key, revision);
    -- One row per write task: makes a re-run return the first run's result, and
    -- doubles as the outbox of announcements (announced_at NULL = not yet announced).
    CREATE TABLE options_write (
        task_id      text PRIMARY KEY,
        scope        text NOT NULL,
        revision     bigint NOT NULL,
        changed      boolean NOT NULL,
        changes      jsonb NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        announced_at timestamptz
    );
    CREATE INDEX options_write_unannounced ON options_write (committed_at)
        WHERE announced_at IS NULL;
    """,
    # A write in one round trip: the whole of PostgresStore.apply as one function call, run as
    # its own transaction.
    """
    CREATE FUNCTION options_apply(p_scope text, p_task_id text, p_keys text[], p_values text[])
    RETURNS TABLE (revision bigint, changed boolean, changes jsonb, committed_at float8,
                   first_run boolean)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_revision bigint;
        v_changes jsonb;
        v_at float8;
    BEGIN
        RETURN QUERY
            SELECT w.revision, w.changed, w.changes, extract(epoch FROM w.committed_at)::float8,
                   false
            FROM options_write w WHERE w.task_id = p_task_id;
        IF FOUND THEN
            RETURN;  -- a re-run of a committed task: its recorded result, nothing written
        END IF;
        -- The upsert takes the scope's row lock: writers of one scope commit in turn, so
        -- revisions are gapless and history is in revision order.
        INSERT INTO options_scope AS s (scope) VALUES (p_scope)
            ON CONFLICT (scope) DO UPDATE SET scope = s.scope
            RETURNING s.revision INTO v_revision;
        -- key -> new canonical JSON text (a JSON string) or null for a removal, for the keys
        -- whose stored text differs.
        SELECT coalesce(jsonb_object_agg(t.k, t.n), '{}'::jsonb) INTO v_changes
            FROM unnest(p_keys, p_values) AS t(k, n)
            LEFT JOIN options_value v ON v.scope = p_scope AND v.key = t.k
            WHERE (t.n IS NULL AND v.key IS NOT NULL)
               OR (t.n IS NOT NULL AND (v.key IS NULL OR v.value::text <> t.n));
        IF v_changes <> '{}'::jsonb THEN
            v_revision := v_revision + 1;
            UPDATE options_scope SET revision = v_revision, updated_at = now()
                WHERE scope = p_scope;
            INSERT INTO options_history (scope, key, old_value, new_value, revision, task_id)
                SELECT p_scope, c.key, v.value, (c.value #>> '{}')::json, v_revision, p_task_id
                FROM jsonb_each(v_changes) AS c
                LEFT JOIN options_value v ON v.scope = p_scope AND v.key = c.key
                ORDER BY c.key;
            INSERT INTO options_value AS o (scope, key, value, revision)
                SELECT p_scope, c.key, (c.value #>> '{}')::json, v_revision
                FROM jsonb_each(v_changes) AS c WHERE jsonb_typeof(c.value) = 'string'
                ON CONFLICT (scope, key) DO UPDATE
                SET value = EXCLUDED.value, revision = EXCLUDED.revision;
            DELETE FROM options_value v USING jsonb_each(v_changes) AS c
                WHERE v.scope = p_scope AND v.key = c.key AND jsonb_typeof(c.value) = 'null';
        END IF;
        INSERT INTO options_write AS w (task_id, scope, revision, changed, changes, announced_at)
            VALUES (p_task_id, p_scope, v_revision, v_changes <> '{}'::jsonb, v_changes,
                    CASE WHEN v_changes <> '{}'::jsonb THEN NULL ELSE now() END)
            RETURNING extract(epoch FROM w.committed_at)::float8 INTO v_at;
        RETURN QUERY SELECT v_revision, v_changes <> '{}'::jsonb, v_changes, v_at, true;
    END
    $fn$;

    -- Losing this mark in a crash only means one more (harmless) announcement by the relay,
    -- so it need not wait for the WAL flush.
    CREATE FUNCTION options_mark_announced(p_task_ids text[]) RETURNS void
    LANGUAGE sql SET synchronous_commit = off AS $fn$
        UPDATE options_write SET announced_at = now()
        WHERE task_id = ANY(p_task_ids) AND announced_at IS NULL;
    $fn$;
    """,
    # Recent commits by time, for the heartbeat's high-water marks and the cache reconciler
    # (worker/duties/reconcile.py): both ask "which scopes changed in the last few seconds/minutes".
    """
    CREATE INDEX options_write_recent ON options_write (committed_at) WHERE changed;
    """,
    # The relay claims outbox rows: a claimed row is not due again before next_attempt_at, so
    # two relays never announce it together and a failing one backs off (worker/duties/relay.py).
    # Retention deletes announced rows by age (worker/duties/retention.py), hence the index on every
    # row's commit time.
    """
    ALTER TABLE options_write
        ADD COLUMN attempts integer NOT NULL DEFAULT 0,
        ADD COLUMN next_attempt_at timestamptz;
    CREATE INDEX options_write_committed ON options_write (committed_at);
    """,
    # Audit: who asked for each write, why, and whether `optionstore apply` or `revert` made
    # it (origin). Kept on every history row, and on the write record, which also holds writes
    # that changed nothing: `plan` finds the last apply of a scope there. options_apply takes
    # them as three trailing arguments that default to NULL, so a 4-argument call (code of
    # the previous version during a rolling deploy) still resolves to it.
    """
    ALTER TABLE options_history
        ADD COLUMN actor text, ADD COLUMN reason text, ADD COLUMN origin text;
    ALTER TABLE options_write
        ADD COLUMN actor text, ADD COLUMN reason text, ADD COLUMN origin text;
    CREATE INDEX options_write_origin ON options_write (scope, origin, revision)
        WHERE origin IS NOT NULL;
    DROP FUNCTION options_apply(text, text, text[], text[]);
    CREATE FUNCTION options_apply(p_scope text, p_task_id text, p_keys text[], p_values text[],
                                  p_actor text DEFAULT NULL, p_reason text DEFAULT NULL,
                                  p_origin text DEFAULT NULL)
    RETURNS TABLE (revision bigint, changed boolean, changes jsonb, committed_at float8,
                   first_run boolean)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_revision bigint;
        v_changes jsonb;
        v_at float8;
    BEGIN
        RETURN QUERY
            SELECT w.revision, w.changed, w.changes, extract(epoch FROM w.committed_at)::float8,
                   false
            FROM options_write w WHERE w.task_id = p_task_id;
        IF FOUND THEN
            RETURN;
        END IF;
        INSERT INTO options_scope AS s (scope) VALUES (p_scope)
            ON CONFLICT (scope) DO UPDATE SET scope = s.scope
            RETURNING s.revision INTO v_revision;
        SELECT coalesce(jsonb_object_agg(t.k, t.n), '{}'::jsonb) INTO v_changes
            FROM unnest(p_keys, p_values) AS t(k, n)
            LEFT JOIN options_value v ON v.scope = p_scope AND v.key = t.k
            WHERE (t.n IS NULL AND v.key IS NOT NULL)
               OR (t.n IS NOT NULL AND (v.key IS NULL OR v.value::text <> t.n));
        IF v_changes <> '{}'::jsonb THEN
            v_revision := v_revision + 1;
            UPDATE options_scope SET revision = v_revision, updated_at = now()
                WHERE scope = p_scope;
            INSERT INTO options_history (scope, key, old_value, new_value, revision, task_id,
                                         actor, reason, origin)
                SELECT p_scope, c.key, v.value, (c.value #>> '{}')::json, v_revision, p_task_id,
                       p_actor, p_reason, p_origin
                FROM jsonb_each(v_changes) AS c
                LEFT JOIN options_value v ON v.scope = p_scope AND v.key = c.key
                ORDER BY c.key;
            INSERT INTO options_value AS o (scope, key, value, revision)
                SELECT p_scope, c.key, (c.value #>> '{}')::json, v_revision
                FROM jsonb_each(v_changes) AS c WHERE jsonb_typeof(c.value) = 'string'
                ON CONFLICT (scope, key) DO UPDATE
                SET value = EXCLUDED.value, revision = EXCLUDED.revision;
            DELETE FROM options_value v USING jsonb_each(v_changes) AS c
                WHERE v.scope = p_scope AND v.key = c.key AND jsonb_typeof(c.value) = 'null';
        END IF;
        INSERT INTO options_write AS w (task_id, scope, revision, changed, changes, announced_at,
                                        actor, reason, origin)
            VALUES (p_task_id, p_scope, v_revision, v_changes <> '{}'::jsonb, v_changes,
                    CASE WHEN v_changes <> '{}'::jsonb THEN NULL ELSE now() END,
                    p_actor, p_reason, p_origin)
            RETURNING extract(epoch FROM w.committed_at)::float8 INTO v_at;
        RETURN QUERY SELECT v_revision, v_changes <> '{}'::jsonb, v_changes, v_at, true;
    END
    $fn$;
    """,
    # The write path's cost. options_apply marks, in its own transaction, the commits this
    # process announced since its previous write (p_announced): no round trip, and no commit,
    # of their own. It writes options_value only for the kinds of change it holds (sets,
    # removals). options_mark_announced (the relay's, and a process's idle flush) commits
    # without waiting for the WAL flush: a function's SET clause is undone when the function
    # returns, before the COMMIT, so the setting is now made for the whole transaction.
    """
    DROP FUNCTION options_apply(text, text, text[], text[], text, text, text);
    CREATE FUNCTION options_apply(p_scope text, p_task_id text, p_keys text[], p_values text[],
                                  p_actor text DEFAULT NULL, p_reason text DEFAULT NULL,
                                  p_origin text DEFAULT NULL, p_announced text[] DEFAULT NULL)
    RETURNS TABLE (revision bigint, changed boolean, changes jsonb, committed_at float8,
                   first_run boolean)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_revision bigint;
        v_changes jsonb;
        v_at float8;
        v_removes boolean := array_position(p_values, NULL) IS NOT NULL;
    BEGIN
        IF p_announced IS NOT NULL THEN
            UPDATE options_write SET announced_at = now()
                WHERE task_id = ANY(p_announced) AND announced_at IS NULL;
        END IF;
        RETURN QUERY
            SELECT w.revision, w.changed, w.changes, extract(epoch FROM w.committed_at)::float8,
                   false
            FROM options_write w WHERE w.task_id = p_task_id;
        IF FOUND THEN
            RETURN;
        END IF;
        INSERT INTO options_scope AS s (scope) VALUES (p_scope)
            ON CONFLICT (scope) DO UPDATE SET scope = s.scope
            RETURNING s.revision INTO v_revision;
        SELECT coalesce(jsonb_object_agg(t.k, t.n), '{}'::jsonb) INTO v_changes
            FROM unnest(p_keys, p_values) AS t(k, n)
            LEFT JOIN options_value v ON v.scope = p_scope AND v.key = t.k
            WHERE (t.n IS NULL AND v.key IS NOT NULL)
               OR (t.n IS NOT NULL AND (v.key IS NULL OR v.value::text <> t.n));
        IF v_changes <> '{}'::jsonb THEN
            v_revision := v_revision + 1;
            UPDATE options_scope SET revision = v_revision, updated_at = now()
                WHERE scope = p_scope;
            INSERT INTO options_history (scope, key, old_value, new_value, revision, task_id,
                                         actor, reason, origin)
                SELECT p_scope, c.key, v.value, (c.value #>> '{}')::json, v_revision, p_task_id,
                       p_actor, p_reason, p_origin
                FROM jsonb_each(v_changes) AS c
                LEFT JOIN options_value v ON v.scope = p_scope AND v.key = c.key
                ORDER BY c.key;
            -- A write of removals only (p_values all NULL) inserts nothing, one of sets only
            -- deletes nothing.
            IF NOT v_removes OR EXISTS (SELECT 1 FROM unnest(p_values) n WHERE n IS NOT NULL) THEN
                INSERT INTO options_value AS o (scope, key, value, revision)
                    SELECT p_scope, c.key, (c.value #>> '{}')::json, v_revision
                    FROM jsonb_each(v_changes) AS c WHERE jsonb_typeof(c.value) = 'string'
                    ON CONFLICT (scope, key) DO UPDATE
                    SET value = EXCLUDED.value, revision = EXCLUDED.revision;
            END IF;
            IF v_removes THEN
                DELETE FROM options_value v USING jsonb_each(v_changes) AS c
                    WHERE v.scope = p_scope AND v.key = c.key AND jsonb_typeof(c.value) = 'null';
            END IF;
        END IF;
        INSERT INTO options_write AS w (task_id, scope, revision, changed, changes, announced_at,
                                        actor, reason, origin)
            VALUES (p_task_id, p_scope, v_revision, v_changes <> '{}'::jsonb, v_changes,
                    CASE WHEN v_changes <> '{}'::jsonb THEN NULL ELSE now() END,
                    p_actor, p_reason, p_origin)
            RETURNING extract(epoch FROM w.committed_at)::float8 INTO v_at;
        RETURN QUERY SELECT v_revision, v_changes <> '{}'::jsonb, v_changes, v_at, true;
    END
    $fn$;

    DROP FUNCTION options_mark_announced(text[]);
    CREATE FUNCTION options_mark_announced(p_task_ids text[]) RETURNS void
    LANGUAGE plpgsql AS $fn$
    BEGIN
        -- Losing this mark in a crash only means one more (harmless) announcement by the
        -- relay: the commit need not wait for the WAL flush.
        PERFORM set_config('synchronous_commit', 'off', true);
        UPDATE options_write SET announced_at = now()
            WHERE task_id = ANY(p_task_ids) AND announced_at IS NULL;
    END
    $fn$;
    """,
    # Marking commits announced looks each one up by primary key. With "AND announced_at IS
    # NULL" in the statement, the planner takes the partial index of unannounced commits,
    # which also holds every commit marked since the last vacuum: a mark, and so each write,
    # then cost time in proportion to the writes made since (measured: options_apply's server
    # CPU from 410 to 910 us over 18,000 writes). A row the relay marked first keeps its time
    # (coalesce). History reads each changed key's old value by primary key (a correlated
    # lookup, not a join that sorts the whole scope's values).
    """
    CREATE OR REPLACE FUNCTION options_apply(
        p_scope text, p_task_id text, p_keys text[], p_values text[],
        p_actor text DEFAULT NULL, p_reason text DEFAULT NULL,
        p_origin text DEFAULT NULL, p_announced text[] DEFAULT NULL)
    RETURNS TABLE (revision bigint, changed boolean, changes jsonb, committed_at float8,
                   first_run boolean)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_revision bigint;
        v_changes jsonb;
        v_at float8;
        v_removes boolean := array_position(p_values, NULL) IS NOT NULL;
    BEGIN
        IF p_announced IS NOT NULL THEN
            -- By primary key only: see options_mark_announced.
            UPDATE options_write SET announced_at = coalesce(announced_at, now())
                WHERE task_id = ANY(p_announced);
        END IF;
        RETURN QUERY
            SELECT w.revision, w.changed, w.changes, extract(epoch FROM w.committed_at)::float8,
                   false
            FROM options_write w WHERE w.task_id = p_task_id;
        IF FOUND THEN
            RETURN;
        END IF;
        INSERT INTO options_scope AS s (scope) VALUES (p_scope)
            ON CONFLICT (scope) DO UPDATE SET scope = s.scope
            RETURNING s.revision INTO v_revision;
        SELECT coalesce(jsonb_object_agg(t.k, t.n), '{}'::jsonb) INTO v_changes
            FROM unnest(p_keys, p_values) AS t(k, n)
            LEFT JOIN options_value v ON v.scope = p_scope AND v.key = t.k
            WHERE (t.n IS NULL AND v.key IS NOT NULL)
               OR (t.n IS NOT NULL AND (v.key IS NULL OR v.value::text <> t.n));
        IF v_changes <> '{}'::jsonb THEN
            v_revision := v_revision + 1;
            UPDATE options_scope SET revision = v_revision, updated_at = now()
                WHERE scope = p_scope;
            INSERT INTO options_history (scope, key, old_value, new_value, revision, task_id,
                                         actor, reason, origin)
                SELECT p_scope, c.key,
                       (SELECT v.value FROM options_value v
                        WHERE v.scope = p_scope AND v.key = c.key),
                       (c.value #>> '{}')::json, v_revision, p_task_id, p_actor, p_reason, p_origin
                FROM jsonb_each(v_changes) AS c
                ORDER BY c.key;
            -- A write of removals only (p_values all NULL) inserts nothing, one of sets only
            -- deletes nothing.
            IF NOT v_removes OR EXISTS (SELECT 1 FROM unnest(p_values) n WHERE n IS NOT NULL) THEN
                INSERT INTO options_value AS o (scope, key, value, revision)
                    SELECT p_scope, c.key, (c.value #>> '{}')::json, v_revision
                    FROM jsonb_each(v_changes) AS c WHERE jsonb_typeof(c.value) = 'string'
                    ON CONFLICT (scope, key) DO UPDATE
                    SET value = EXCLUDED.value, revision = EXCLUDED.revision;
            END IF;
            IF v_removes THEN
                DELETE FROM options_value v USING jsonb_each(v_changes) AS c
                    WHERE v.scope = p_scope AND v.key = c.key AND jsonb_typeof(c.value) = 'null';
            END IF;
        END IF;
        INSERT INTO options_write AS w (task_id, scope, revision, changed, changes, announced_at,
                                        actor, reason, origin)
            VALUES (p_task_id, p_scope, v_revision, v_changes <> '{}'::jsonb, v_changes,
                    CASE WHEN v_changes <> '{}'::jsonb THEN NULL ELSE now() END,
                    p_actor, p_reason, p_origin)
            RETURNING extract(epoch FROM w.committed_at)::float8 INTO v_at;
        RETURN QUERY SELECT v_revision, v_changes <> '{}'::jsonb, v_changes, v_at, true;
    END
    $fn$;

    CREATE OR REPLACE FUNCTION options_mark_announced(p_task_ids text[]) RETURNS void
    LANGUAGE plpgsql AS $fn$
    BEGIN
        -- Losing this mark in a crash only means one more (harmless) announcement by the
        -- relay: the commit need not wait for the WAL flush.
        PERFORM set_config('synchronous_commit', 'off', true);
        UPDATE options_write SET announced_at = coalesce(announced_at, now())
            WHERE task_id = ANY(p_task_ids);
    END
    $fn$;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
_LOCK_ID = 0x6F7074_7374  # "optst": one lock for every migrating process


def migrate(conninfo: str) -> tuple[int, int]:
    """Bring the schema up to date; returns (version before, version after)."""
    with psycopg.connect(conninfo) as conn, conn.transaction():
        # Concurrent migrators queue here; the second one finds the work done.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute("CREATE TABLE IF NOT EXISTS options_schema (version integer NOT NULL)")
        row = conn.execute("SELECT version FROM options_schema").fetchone()
        before = row[0] if row else 0
        if row is None:
            conn.execute("INSERT INTO options_schema (version) VALUES (0)")
        if before > SCHEMA_VERSION:
            raise MigrationError(
                f"database schema is version {before}, newer than this code's {SCHEMA_VERSION}"
            )
        for number in range(before, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[number].encode())
        conn.execute("UPDATE options_schema SET version = %s", (SCHEMA_VERSION,))
    return before, SCHEMA_VERSION


def schema_version(conn: psycopg.Connection[TupleRow]) -> int:
    try:
        with conn.transaction():
            row = conn.execute("SELECT version FROM options_schema").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0
