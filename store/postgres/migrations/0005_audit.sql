-- Audit: who asked for each write, why, and whether `optionstore apply` or `revert` made
-- it (origin). Kept on every history row, and on the write record, which also holds writes
-- that changed nothing: `plan` finds the last apply of a scope there. options_apply takes
-- them as three trailing arguments that default to NULL, so a 4-argument call (code of
-- the previous version during a rolling deploy) still resolves to it.

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
