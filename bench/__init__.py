"""Benchmarks: `python -m bench.overhead` (the sidecar's cost) and `python -m bench.faults` (resilience)."""
