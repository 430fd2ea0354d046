"""Benchmark scripts (one per area) and the harness they share; not part of the installed library."""
