"""Benchmarks: `python -m eagle_fast.bench <name>`; each compares providers side by side in one run."""
