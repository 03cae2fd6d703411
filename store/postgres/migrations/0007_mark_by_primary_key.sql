-- Marking commits announced looks each one up by primary key. With "AND announced_at IS
-- NULL" in the statement, the planner takes the partial index of unannounced commits,
-- which also holds every commit marked since the last vacuum: a mark, and so each write,
-- then cost time in proportion to the writes made since (measured: options_apply's server
-- CPU from 410 to 910 us over 18,000 writes). A row the relay marked first keeps its time
-- (coalesce). History reads each changed key's old value by primary key (a correlated
-- lookup, not a join that sorts the whole scope's values).

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
