"""Operational scripts: load generator and benchmarks."""
