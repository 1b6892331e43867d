"""Benchmarks of jax_megamoe (run the scripts in this folder; see README.md).

A package only so that the tests can import the scripts' functions (``benchmarks.moe_layer``).
"""
