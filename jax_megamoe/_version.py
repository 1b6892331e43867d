"""The package version (one place; ``jax_megamoe.__version__`` re-exports it)."""

__version__ = "0.1.0"
