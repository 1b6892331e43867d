"""Benchmarks of jax_megamoe: run the scripts as ``python -m benchmarks.<name>`` from the repository
root (see README.md); the modules import each other as ``benchmarks.*``."""
