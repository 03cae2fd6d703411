"""optionstore benchmarks: every figure a ratio to a baseline measured in the same run.

``python -m bench`` (or ``make bench``) runs them on real PostgreSQL, Redis and worker processes,
prints a table and writes ``bench/results/latest.json`` and ``bench/RESULTS.json``.
"""
