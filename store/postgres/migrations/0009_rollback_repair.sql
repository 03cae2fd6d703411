-- A database that went back in time (a restore from a dump, a failover to a replica that
-- lacked the last commits) hands out revisions that the caches already hold with other
-- values. Two things let the fleet notice and repair it (worker/duties/reconcile.py):
--
-- options_clock: one row the leader moves forward every round, and mirrors in Redis. A clock
-- found behind Redis's copy means the database lost commits since. Its database_id names this
-- database's records in Redis: a restored dump or a promoted replica keeps it, another
-- database in the same namespace (a new one, a test's) has its own.
--
-- options_rebase: moves a scope's revision past the highest one ever announced for it (kept
-- in Redis), without changing a value. It skips one revision (p_above + 2), so that no cache
-- can take the rebase as the direct successor of what it holds: every cache drops the scope
-- and reloads it from here. The write record (origin 'rebase', no changes) is announced like
-- any other, by the writer or else by the outbox relay.

    CREATE TABLE options_clock (
        id          integer PRIMARY KEY CHECK (id = 1),
        tick        bigint NOT NULL,
        database_id text NOT NULL DEFAULT gen_random_uuid()::text
    );
    INSERT INTO options_clock (id, tick) VALUES (1, 0);

    CREATE FUNCTION options_advance_clock(p_known bigint) RETURNS bigint
    LANGUAGE sql AS $fn$
        UPDATE options_clock SET tick = greatest(tick, p_known) + 1 WHERE id = 1 RETURNING tick
    $fn$;

    CREATE FUNCTION options_rebase(p_scope text, p_above bigint, p_task_id text)
    RETURNS TABLE (revision bigint, committed_at float8)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_revision bigint;
        v_at float8;
    BEGIN
        -- A scope created after the dump is absent here: it comes back, empty.
        INSERT INTO options_scope AS s (scope) VALUES (p_scope)
            ON CONFLICT (scope) DO UPDATE SET scope = s.scope
            RETURNING s.revision INTO v_revision;
        IF v_revision > p_above THEN
            RETURN;  -- already past every announced revision: nothing to repair
        END IF;
        v_revision := p_above + 2;
        UPDATE options_scope SET revision = v_revision, updated_at = now()
            WHERE scope = p_scope;
        INSERT INTO options_write AS w (task_id, scope, revision, changed, changes, origin,
                                        actor, reason)
            VALUES (p_task_id, p_scope, v_revision, true, '{}'::jsonb, 'rebase', 'optionstore',
                    format('revision %s was already announced: the database went back', p_above))
            RETURNING extract(epoch FROM w.committed_at)::float8 INTO v_at;
        RETURN QUERY SELECT v_revision, v_at;
    END
    $fn$;
