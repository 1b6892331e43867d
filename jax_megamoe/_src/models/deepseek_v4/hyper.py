"""Manifold-constrained hyper-connections (mHC) of DeepSeek V4, as DeepSeek's inference code computes them.

The residual stream is ``hc_mult`` parallel copies ``x [..., hc, d]``. Around each sublayer
(attention, MoE) of a block:

* ``hc_pre``: ``mixes = (flatten(x) @ fn^T) * rsqrt(mean(flatten(x)^2) + norm_eps)`` (f32; DeepSeek
  multiplies the projection by the row's rsqrt rather than normalising first, as Hugging Face
  does: equal up to rounding), split into ``pre [hc]``, ``post [hc]``, ``comb [hc, hc]``:
  ``pre = sigmoid(m * scale[0] + base) + hc_eps``, ``post = 2 * sigmoid(m * scale[1] + base)``,
  ``comb = softmax_rows(m * scale[2] + base) + hc_eps``, then one column normalisation and
  ``hc_sinkhorn_iters - 1`` (row, column) normalisations, each dividing by ``sum + hc_eps``.
  The sublayer input is ``sum_i pre_i * x_i`` (cast to ``x.dtype``).
* ``hc_post``: ``out_j = post_j * y + sum_i comb[i, j] * x_i`` (``comb`` is applied transposed:
  summed over its first axis), cast to ``y.dtype``.
* ``hc_head`` (before the final norm): ``pre = sigmoid(mixes * scale + base) + hc_eps`` and
  ``sum_i pre_i * x_i``; no post, no Sinkhorn.

Everything is f32 whatever the stream dtype, as in DeepSeek's code (its ``hc_*`` parameters are f32).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

__all__ = ["HyperSpec", "hc_mixes", "hc_split_sinkhorn", "hc_pre", "hc_post", "hc_head"]

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class HyperSpec:
    """The mHC settings of a model (static): streams, Sinkhorn iterations, eps values."""

    hc_mult: int
    sinkhorn_iters: int
    hc_eps: float
    norm_eps: float

    @classmethod
    def from_config(cls, config: DeepseekV4Config) -> HyperSpec:
        return cls(int(config.hc_mult), int(config.hc_sinkhorn_iters), float(config.hc_eps), float(config.rms_norm_eps))

    @property
    def mix_size(self) -> int:
        """Rows of a sublayer's ``fn``: ``hc`` pre + ``hc`` post + ``hc * hc`` comb."""
        return (2 + self.hc_mult) * self.hc_mult


def hc_mixes(x: jax.Array, fn: jax.Array, norm_eps: float) -> jax.Array:
    """``(flatten(x) @ fn^T) * rsqrt(mean(flatten(x)^2) + eps)`` in f32: ``x [..., hc, d]`` -> ``[..., rows(fn)]``."""
    flat = x.reshape(*x.shape[:-2], -1).astype(jnp.float32)
    rsqrt = jax.lax.rsqrt(jnp.mean(jnp.square(flat), axis=-1, keepdims=True) + jnp.float32(norm_eps))
    return jnp.einsum("...k,mk->...m", flat, fn.astype(jnp.float32), precision=_HI) * rsqrt


def hc_split_sinkhorn(
    mixes: jax.Array, scale: jax.Array, base: jax.Array, spec: HyperSpec
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(pre [..., hc], post [..., hc], comb [..., hc, hc])`` from ``mixes [..., (2+hc)*hc]`` (f32)."""
    hc, eps = spec.hc_mult, jnp.float32(spec.hc_eps)
    mixes = mixes.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    base = base.astype(jnp.float32)
    pre = jax.nn.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2.0 * jax.nn.sigmoid(mixes[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    logits = mixes[..., 2 * hc :].reshape(*mixes.shape[:-1], hc, hc) * scale[2] + base[2 * hc :].reshape(hc, hc)
    comb = jax.nn.softmax(logits, axis=-1) + eps
    comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)

    def body(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    comb = jax.lax.fori_loop(0, max(spec.sinkhorn_iters - 1, 0), body, comb)
    return pre, post, comb


def hc_pre(
    x: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, spec: HyperSpec
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Collapse the streams for a sublayer: ``(sum_i pre_i x_i  [..., d] in x.dtype, post, comb)``."""
    pre, post, comb = hc_split_sinkhorn(hc_mixes(x, fn, spec.norm_eps), scale, base, spec)
    y = jnp.sum(pre[..., None] * x.astype(jnp.float32), axis=-2)
    return y.astype(x.dtype), post, comb


def hc_post(y: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """Expand a sublayer output back to streams: ``out_j = post_j y + sum_i comb[i, j] residual_i``."""
    mixed = jnp.einsum("...ij,...id->...jd", comb, residual.astype(jnp.float32), precision=_HI)
    out = post[..., None] * y.astype(jnp.float32)[..., None, :] + mixed
    return out.astype(y.dtype)


def hc_head(x: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, spec: HyperSpec) -> jax.Array:
    """The final collapse before the model's norm: ``sum_i (sigmoid(m_i * scale + base_i) + eps) x_i``."""
    mixes = hc_mixes(x, fn, spec.norm_eps)
    pre = jax.nn.sigmoid(mixes * scale.astype(jnp.float32) + base.astype(jnp.float32)) + jnp.float32(spec.hc_eps)
    return jnp.sum(pre[..., None] * x.astype(jnp.float32), axis=-2).astype(x.dtype)
