"""DeepSeek V4 rotary embedding: partial, interleaved RoPE on the trailing ``qk_rope_head_dim`` dims.

What DeepSeek's inference code computes (``precompute_freqs_cis`` / ``apply_rotary_emb``):

* one inverse frequency per channel pair, ``theta ** (-2i / rd)`` for ``i < rd / 2`` (``rd`` =
  ``qk_rope_head_dim``), in float32;
* on the compressed layers (compress ratio 4 or 128) the base is ``compress_rope_theta`` and,
  when YaRN is on (``yarn_factor`` is not ``None``), the frequencies are blended with a linear ramp
  between the correction dims of ``beta_fast`` / ``beta_slow`` (floor / ceil, clamped to
  ``[0, rd / 2 - 1]``): ``f * (1 - s) + f / factor * s`` with ``s`` the ramp; pure sliding-window
  layers use ``rope_theta`` and no YaRN. There is **no** YaRN magnitude scale (mscale): cos / sin
  are used as they are. (Hugging Face forces ``attention_factor = 1.0`` for this reason; without
  it its YaRN helper would multiply cos / sin by ``0.1 * ln(factor) + 1``.)
* the rotation pairs consecutive channels ``(x[2i], x[2i+1])`` as one complex number, is applied
  to the *last* ``rd`` channels of a head (the first ``head_dim - rd`` are left alone), at angle
  ``position * f_i`` computed in float32; ``inverse=True`` rotates by the negative angle
  (the attention output is de-rotated at the query position).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

__all__ = ["RopeSpec", "apply_rope", "inv_freq", "rope_cos_sin", "rope_spec"]


class RopeSpec(NamedTuple):
    """Static description of one layer's RoPE (hashable)."""

    dim: int
    theta: float
    yarn_factor: float | None = None
    yarn_original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def rope_spec(config: DeepseekV4Config, compress_ratio: int) -> RopeSpec:
    """The RoPE of a layer: compressed layers use ``compress_rope_theta`` (+ YaRN), others ``rope_theta``."""
    if compress_ratio:
        return RopeSpec(
            dim=config.qk_rope_head_dim,
            theta=float(config.compress_rope_theta),
            yarn_factor=None if config.yarn_factor is None else float(config.yarn_factor),
            yarn_original_max_position=int(config.yarn_original_max_position),
            beta_fast=float(config.yarn_beta_fast),
            beta_slow=float(config.yarn_beta_slow),
        )
    return RopeSpec(dim=config.qk_rope_head_dim, theta=float(config.rope_theta))


def inv_freq(spec: RopeSpec) -> np.ndarray:
    """float32 ``[dim // 2]`` inverse frequencies (YaRN-blended when ``spec.yarn_factor`` is set)."""
    dim = spec.dim
    freqs = 1.0 / (np.float32(spec.theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    freqs = freqs.astype(np.float32)
    if spec.yarn_factor is not None and spec.yarn_original_max_position > 0:

        def corr_dim(rotations: float) -> float:
            return (
                dim * math.log(spec.yarn_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))
            )

        low = max(math.floor(corr_dim(spec.beta_fast)), 0)
        high = min(math.ceil(corr_dim(spec.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
        smooth = (1 - ramp).astype(np.float32)
        freqs = (freqs / np.float32(spec.yarn_factor) * (1 - smooth) + freqs * smooth).astype(np.float32)
    return freqs


def rope_cos_sin(spec: RopeSpec, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos / sin ``f32[..., dim // 2]`` at integer ``positions`` (angle = f32(position) * f32(freq))."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(spec))
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, inverse: bool = False) -> jax.Array:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of ``x`` (interleaved pairs), in float32.

    ``cos`` / ``sin`` broadcast against ``x[..., :-rd]`` without the last axis, e.g. ``[B, S, rd/2]``
    for ``x`` ``[B, S, D]`` or ``[B, S, 1, rd/2]`` for ``x`` ``[B, S, H, D]``.
    """
    rd = 2 * cos.shape[-1]
    if rd == 0:
        return x.astype(jnp.float32)
    x = x.astype(jnp.float32)
    nope, rope = x[..., :-rd], x[..., -rd:]
    pairs = rope.reshape(*rope.shape[:-1], rd // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(rope.shape)
    return jnp.concatenate([nope, out], axis=-1)
