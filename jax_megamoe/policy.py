"""Every setting, read once from the environment into one frozen :class:`Policy` (explicit arguments win)."""

from jax_megamoe._src.numerics.policy import (
    ENV,
    Locations,
    Policy,
    current,
    describe,
    resolve_mode,
)

__all__ = [
    "Policy",
    "Locations",
    "current",
    "describe",
    "resolve_mode",
    "ENV",
]
