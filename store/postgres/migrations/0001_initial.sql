-- The schema's first version: scopes with their revisions, values, history, and the
-- record of each write task.

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
