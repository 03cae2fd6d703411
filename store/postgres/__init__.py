"""PostgreSQL, the source of truth: the store (pool, writes, loads, outbox), the outbox marks and
the schema (``schema.py`` applies ``migrations/NNNN_name.sql`` in order)."""
