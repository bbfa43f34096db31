"""Benchmarks: `python -m benchmarks.chat`, `python -m benchmarks.train`, `python -m benchmarks.memory`."""
