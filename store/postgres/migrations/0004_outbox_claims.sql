-- The relay claims outbox rows: a claimed row is not due again before next_attempt_at, so
-- two relays never announce it together and a failing one backs off (worker/duties/relay.py).
-- Retention deletes announced rows by age (worker/duties/retention.py), hence the index on every
-- row's commit time.

    ALTER TABLE options_write
        ADD COLUMN attempts integer NOT NULL DEFAULT 0,
        ADD COLUMN next_attempt_at timestamptz;
    CREATE INDEX options_write_committed ON options_write (committed_at);
