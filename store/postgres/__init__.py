"""PostgreSQL, the source of truth: the store (pool, writes, loads, outbox), the outbox marks and
the migrations (``migrations/NNNN_name.sql``, applied in order)."""
