-- Recent commits by time, for the heartbeat's high-water marks and the cache reconciler
-- (worker/duties/reconcile.py): both ask "which scopes changed in the last few seconds/minutes".

    CREATE INDEX options_write_recent ON options_write (committed_at) WHERE changed;
