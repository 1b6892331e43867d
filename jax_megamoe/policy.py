"""Every setting, read once from the environment into one frozen :class:`Policy` (explicit arguments win)."""

from jax_megamoe._src.numerics.policy import (
    Policy,
    current,
    describe,
    ENV,
)

__all__ = [
    "Policy",
    "current",
    "describe",
    "ENV",
]
