-- The console's search (worker/web/browse.py): scopes and keys by prefix, a page at a time
-- (keyset). In the "C" collation, so that LIKE 'prefix%' and the page order use the index
-- whatever the database's own collation is.

    CREATE INDEX options_scope_name_c ON options_scope ((scope COLLATE "C"));
    CREATE INDEX options_value_key_c ON options_value ((key COLLATE "C"), (scope COLLATE "C"));
    -- A scope's history, newest first, a page at a time.
    CREATE INDEX options_history_scope_id ON options_history (scope, id);
