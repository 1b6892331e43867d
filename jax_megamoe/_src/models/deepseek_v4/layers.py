"""Small Flax NNX building blocks of DeepSeek V4 whose attributes mirror the checkpoint keys.

:class:`Linear` keeps the official ``[out, in]`` weight layout (``y = x @ W.T``) so a key such as
``layers.3.attn.wq_a.weight`` lands on ``...attn.wq_a.weight`` without a transpose;
:class:`RMSNorm` keeps its ``weight`` in float32 as DeepSeek's inference code does;
:func:`rms_norm` is the unweighted form (the per-head query norm of the attention).
All math runs in float32; results are cast back to the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Linear", "RMSNorm", "UnweightedRMSNorm", "rms_norm"]


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, in float32 (returns float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class Linear(nnx.Module):
    """Bias-free linear layer with the checkpoint's ``weight[out, in]`` (``y = x @ W.T``).

    The weight is an ``nnx.Param`` of ``param_dtype`` initialised N(0, 1/in) so activations stay
    O(1) for random-weight tests. ``__call__`` multiplies in float32 when ``compute_dtype`` is
    float32 (the default: DeepSeek V4's attention runs in float32 on CPU oracles) and returns
    ``compute_dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        param_dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs,
    ) -> None:
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {v!r} must be a positive integer")
        self.in_features = in_features
        self.out_features = out_features
        w = jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32)
        self.weight = nnx.Param((w * in_features**-0.5).astype(param_dtype))

    def __call__(self, x: jax.Array, compute_dtype: jnp.dtype = jnp.float32) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: last dim {x.shape[-1]} must equal in_features = {self.in_features}")
        w = self.weight[...].astype(compute_dtype)
        return jnp.einsum("...i,oi->...o", x.astype(compute_dtype), w, precision=jax.lax.Precision.HIGHEST)


class RMSNorm(nnx.Module):
    """RMSNorm with a float32 ``weight[dim]`` (ones at init), math in float32, output in ``x.dtype``.

    DeepSeek's checkpoint stores norm weights in bf16; its inference code (and this module) keeps
    them in float32.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, rngs: nnx.Rngs | None = None) -> None:
        del rngs  # deterministic init; the argument keeps the NNX constructor shape uniform
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: {dim!r} must be a positive integer")
        self.dim = dim
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: last dim {x.shape[-1]} must equal dim = {self.dim}")
        return (self.weight[...].astype(jnp.float32) * rms_norm(x, self.eps)).astype(x.dtype)


class UnweightedRMSNorm(nnx.Module):
    """RMSNorm without a weight (DeepSeek V4's per-head query norm); output in ``x.dtype``."""

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.eps).astype(x.dtype)
