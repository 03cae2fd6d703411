-- Canary rollouts (store/rollouts/): one row per rollout, so any leader can finish one after
-- a leader change, and a process that starts mid-window learns the active ones (through the
-- leader's copy in Redis). At most one rollout watches a key at a time.

    CREATE TABLE options_rollout (
        id bigserial PRIMARY KEY,
        scope text NOT NULL,
        key text NOT NULL,
        -- The value before the rollout (canonical JSON; NULL: the key was not set) and the
        -- canary value; the scope's revision when it started.
        old_value json,
        new_value json NOT NULL,
        base_revision bigint NOT NULL,
        -- queue:NAME, host:GLOB or percent:N; members: the processes a percentage chose.
        selector text NOT NULL,
        members text[] NOT NULL DEFAULT '{}',
        watch_seconds float8 NOT NULL CHECK (watch_seconds > 0),
        thresholds jsonb NOT NULL,
        state text NOT NULL DEFAULT 'watching'
            CHECK (state IN ('watching', 'promoted', 'reverted', 'aborted', 'superseded')),
        -- An operator's early promote or abort, carried out by the leader.
        requested text CHECK (requested IN ('promote', 'abort')),
        requested_by text,
        actor text,
        reason text,
        started_at timestamptz NOT NULL DEFAULT now(),
        ends_at timestamptz NOT NULL,
        decided_at timestamptz,
        decision text,
        figures jsonb
    );
    CREATE UNIQUE INDEX options_rollout_watching ON options_rollout (scope, key)
        WHERE state = 'watching';
