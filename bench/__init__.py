"""Benchmarks: compared variants run side by side in one process run."""
