"""Benchmarks: ``python -m benchmarks.NAME [--smoke]`` writes JSON, a PNG and a RESULTS.md
section (search, build, latency, end_to_end, accuracy)."""
