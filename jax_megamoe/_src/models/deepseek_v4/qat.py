"""DeepSeek V4's quantisation *simulation* in attention (opt-in: ``simulate_quant=True``).

DeepSeek's inference code rounds some attention activations through low-precision formats and
back ("QAT" round trips, ``act_quant(..., inplace=True)`` / ``fp4_act_quant(..., inplace=True)``),
because the model was trained that way:

* the sliding-window K=V rows and the KV compressor's entries: the non-RoPE channels through
  FP8 E4M3 in blocks of 64 channels, one power-of-two (UE8M0) scale per block
  ``2^ceil(log2(amax / 448))`` (``amax`` floored at 1e-4); the RoPE channels stay as they are;
* the Lightning Indexer's queries and compressed keys: rotated by the orthonormal Walsh-Hadamard
  matrix (``H / sqrt(n)``), then through FP4 E2M1 in blocks of 32 with a UE8M0 scale
  ``2^ceil(log2(amax / 6))`` (``amax`` floored at ``6 * 2^-126``).

Rounding is to nearest even on the format's grid (values are clamped to its largest finite value
first). Hugging Face's port does none of this, so the HF parity tests run with it off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["fp4_roundtrip", "fp8_roundtrip", "hadamard", "pow2_ceil"]


def pow2_ceil(x: jax.Array) -> jax.Array:
    """Smallest power of two >= ``x`` (``x`` > 0, float32), exact."""
    m, e = jnp.frexp(x)  # x = m * 2^e, m in [0.5, 1)
    e = jnp.where(m == 0.5, e - 1, e)
    return jnp.ldexp(jnp.ones_like(x), e)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    if x.shape[-1] % block:
        raise ValueError(f"x: last dim {x.shape[-1]} must be a multiple of the block size {block}")
    return x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)


def fp8_roundtrip(x: jax.Array, block: int = 64) -> jax.Array:
    """FP8 E4M3 quantise + dequantise in blocks of ``block`` along the last axis (UE8M0 scales)."""
    z = _blocks(x, block)
    amax = jnp.maximum(jnp.max(jnp.abs(z), axis=-1, keepdims=True), 1e-4)
    s = pow2_ceil(amax / 448.0)
    q = jnp.clip(z / s, -448.0, 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    return (q * s).reshape(x.shape)


def fp4_roundtrip(x: jax.Array, block: int = 32) -> jax.Array:
    """FP4 E2M1 quantise + dequantise in blocks of ``block`` along the last axis (UE8M0 scales)."""
    z = _blocks(x, block)
    amax = jnp.maximum(jnp.max(jnp.abs(z), axis=-1, keepdims=True), 6.0 * 2.0**-126)
    s = pow2_ceil(amax / 6.0)
    q = jnp.clip(z / s, -6.0, 6.0).astype(jnp.float4_e2m1fn).astype(jnp.float32)
    return (q * s).reshape(x.shape)


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
    """Orthonormal Walsh-Hadamard transform of the last axis (a power of two), float32."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"x: last dim {n} must be a power of two for the Hadamard transform")
    return jnp.einsum(
        "...i,ij->...j", x.astype(jnp.float32), jnp.asarray(_hadamard_matrix(n)), precision=jax.lax.Precision.HIGHEST
    )
