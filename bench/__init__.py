"""Benchmarks: commands that print figures (never tests).  ``python -m bench
all`` runs the suite; ``python -m bench.NAME`` runs one."""
