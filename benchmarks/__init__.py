"""Benchmarks of opd_jax, each run from the repository root as ``python3 -m benchmarks.NAME``."""
