-- Limits on what one scope holds, so that no read has to load an unbounded scope. Every scope
-- keeps how many keys it holds and the encoded size of its values (octet_length of each
-- value's JSON text): options_apply maintains both, this migration backfills them. A write that
-- would take a scope past p_max_keys or p_max_bytes (OPTIONS_MAX_SCOPE_KEYS and
-- OPTIONS_MAX_SCOPE_BYTES, passed by the caller) is refused with SQLSTATE OS003, nothing
-- written; its DETAIL is 'keys|bytes <would hold> <limit>'. Only a write that grows the scope
-- on a count is held to that count's limit: a scope over a limit from before this migration can
-- always be shrunk, by an unset or a smaller value. Counted and compared under the scope row's
-- lock, like the revision: concurrent writers cannot together pass a limit.
--
-- The limits default to NULL (none): a caller from before this migration, still running while
-- it is applied, keeps writing, and the counts stay exact.

    ALTER TABLE options_scope
        ADD COLUMN key_count bigint NOT NULL DEFAULT 0,
        ADD COLUMN value_bytes bigint NOT NULL DEFAULT 0;

    -- After the ALTER: its lock holds every writer off until this commits.
    UPDATE options_scope s SET key_count = v.n, value_bytes = v.b
        FROM (SELECT scope, count(*) AS n, sum(octet_length(value::text)) AS b
              FROM options_value GROUP BY scope) v
        WHERE s.scope = v.scope;

    DROP FUNCTION options_apply(text, text, text[], text[], text, text, text, text[], bigint,
                                text);

    CREATE FUNCTION options_apply(
        p_scope text, p_task_id text, p_keys text[], p_values text[],
        p_actor text DEFAULT NULL, p_reason text DEFAULT NULL,
        p_origin text DEFAULT NULL, p_announced text[] DEFAULT NULL,
        p_expected bigint DEFAULT NULL, p_fingerprint text DEFAULT NULL,
        p_max_keys bigint DEFAULT NULL, p_max_bytes bigint DEFAULT NULL)
    RETURNS TABLE (revision bigint, changed boolean, changes jsonb, committed_at float8,
                   first_run boolean)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_revision bigint;
        v_changes jsonb;
        v_at float8;
        v_changed boolean;
        v_recorded text;
        v_removes boolean := array_position(p_values, NULL) IS NOT NULL;
        v_keys bigint;
        v_bytes bigint;
        v_more_keys bigint;
        v_more_bytes bigint;
    BEGIN
        IF p_announced IS NOT NULL THEN
            -- By primary key only: see options_mark_announced.
            UPDATE options_write SET announced_at = coalesce(announced_at, now())
                WHERE task_id = ANY(p_announced);
        END IF;
        SELECT w.revision, w.changed, w.changes, extract(epoch FROM w.committed_at)::float8,
               w.fingerprint
            INTO v_revision, v_changed, v_changes, v_at, v_recorded
            FROM options_write w WHERE w.task_id = p_task_id;
        IF FOUND THEN
            IF v_recorded <> p_fingerprint THEN
                RAISE EXCEPTION 'task id % was already used for another write', p_task_id
                    USING ERRCODE = 'OS001';
            END IF;
            RETURN QUERY SELECT v_revision, v_changed, v_changes, v_at, false;
            RETURN;
        END IF;
        INSERT INTO options_scope AS s (scope) VALUES (p_scope)
            ON CONFLICT (scope) DO UPDATE SET scope = s.scope
            RETURNING s.revision, s.key_count, s.value_bytes INTO v_revision, v_keys, v_bytes;
        -- Compared under the scope row's lock: no other writer moves it in between.
        IF v_revision <> p_expected THEN
            RAISE EXCEPTION 'scope % is at revision %, not %', p_scope, v_revision, p_expected
                USING ERRCODE = 'OS002', DETAIL = v_revision::text;
        END IF;
        -- What changes, and by how much it grows the scope, in the same pass.
        SELECT coalesce(jsonb_object_agg(t.k, t.n), '{}'::jsonb),
               coalesce(sum((t.n IS NOT NULL)::int - (v.key IS NOT NULL)::int), 0),
               coalesce(sum(coalesce(octet_length(t.n), 0)
                            - coalesce(octet_length(v.value::text), 0)), 0)
            INTO v_changes, v_more_keys, v_more_bytes
            FROM unnest(p_keys, p_values) AS t(k, n)
            LEFT JOIN options_value v ON v.scope = p_scope AND v.key = t.k
            WHERE (t.n IS NULL AND v.key IS NOT NULL)
               OR (t.n IS NOT NULL AND (v.key IS NULL OR v.value::text <> t.n));
        IF v_more_keys > 0 AND v_keys + v_more_keys > p_max_keys THEN
            RAISE EXCEPTION 'scope % would hold % keys, more than %', p_scope,
                v_keys + v_more_keys, p_max_keys
                USING ERRCODE = 'OS003', DETAIL = format('keys %s %s', v_keys + v_more_keys,
                                                         p_max_keys);
        END IF;
        IF v_more_bytes > 0 AND v_bytes + v_more_bytes > p_max_bytes THEN
            RAISE EXCEPTION 'scope % would hold % bytes of values, more than %', p_scope,
                v_bytes + v_more_bytes, p_max_bytes
                USING ERRCODE = 'OS003', DETAIL = format('bytes %s %s', v_bytes + v_more_bytes,
                                                         p_max_bytes);
        END IF;
        IF v_changes <> '{}'::jsonb THEN
            v_revision := v_revision + 1;
            UPDATE options_scope SET revision = v_revision, updated_at = now(),
                                     key_count = v_keys + v_more_keys,
                                     value_bytes = v_bytes + v_more_bytes
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
                                        actor, reason, origin, fingerprint)
            VALUES (p_task_id, p_scope, v_revision, v_changes <> '{}'::jsonb, v_changes,
                    CASE WHEN v_changes <> '{}'::jsonb THEN NULL ELSE now() END,
                    p_actor, p_reason, p_origin, p_fingerprint)
            RETURNING extract(epoch FROM w.committed_at)::float8 INTO v_at;
        RETURN QUERY SELECT v_revision, v_changes <> '{}'::jsonb, v_changes, v_at, true;
    END
    $fn$;
