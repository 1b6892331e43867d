"""DeepSeek V4 attention in Flax NNX, as DeepSeek's inference code (``Attention``) computes it.

Per layer (``H`` query heads, one shared K=V head of ``head_dim`` D, ``rd = qk_rope_head_dim``):

1. ``qr = q_norm(wq_a(x))``; ``q = wq_b(qr)`` as ``[H, D]``, unweighted RMSNorm per head, RoPE on the
   trailing ``rd`` channels (interleaved pairs).
2. ``kv = kv_norm(wkv(x))`` ``[D]``, RoPE on its trailing ``rd`` channels; keys and values are the same.
3. Keys visible to a query at position ``t``: the sliding window ``t - W < p <= t`` (``W`` =
   ``sliding_window``) and, on compressed layers, compressed entries ``w < (t + 1) // r``: all of them
   on HCA layers (``r`` = 128), the Lightning Indexer's top ``index_topk`` on CSA layers (``r`` = 4).
4. ``softmax`` over the visible logits ``q . k / sqrt(D)`` with a learned per-head sink logit
   ``attn_sink`` in the denominator only; output rows de-rotated (inverse RoPE at ``t``).
5. Grouped low-rank output: the ``H * D`` output in ``o_groups`` groups, each through its slice of
   ``wo_a`` (``[o_groups * o_lora_rank, H * D / o_groups]``), then ``wo_b``.

RoPE: ``rope_theta`` on sliding-only layers, ``compress_rope_theta`` + YaRN on compressed layers
(:mod:`.rope`). Everything runs in float32 (inputs cast up); the result is cast to ``x.dtype``.

Cache (:class:`AttentionCache`, fixed shapes, a pytree): the sliding window is a ring of ``W`` slots
(position ``p`` in slot ``p % W``), the compressors keep their pending windows and a
``[B, max_len // r, D]`` buffer of compressed entries (:class:`CompressorCache`). A call with a
cache attends to the ring (the ``W`` positions before ``positions[:, 0]``) plus the ``S`` new tokens
plus all stored entries (masked), then writes the new tokens; prefill (``S > 1``, from 0 or
continuing) and one-token decode share the code, so one jitted step serves every position.

``simulate_quant=True`` adds DeepSeek's quantisation simulation (:mod:`.qat`): the K=V rows and
compressed entries round their non-RoPE channels through FP8 (blocks of 64), the indexer's queries
and keys go through a Hadamard rotation and FP4 (blocks of 32). Off by default: Hugging Face does
not simulate it, and the parity tests compare with Hugging Face.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_megamoe._src.models.deepseek_v4.compressor import (
    CompressorCache,
    DeepseekV4Compressor,
)
from jax_megamoe._src.models.deepseek_v4.indexer import DeepseekV4Indexer
from jax_megamoe._src.models.deepseek_v4.layers import Linear, RMSNorm, rms_norm
from jax_megamoe._src.models.deepseek_v4.qat import fp8_roundtrip
from jax_megamoe._src.models.deepseek_v4.rope import apply_rope, rope_cos_sin, rope_spec
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

__all__ = ["AttentionCache", "CompressorCache", "DeepseekV4Attention", "sink_attention"]

_HI = jax.lax.Precision.HIGHEST


class AttentionCache(NamedTuple):
    """Fixed-shape cache of one attention layer (a pytree; ``None`` fields are absent parts).

    ``window``: ``[B, W, D]`` ring of roped, normed K=V rows; position ``p`` lives in slot ``p % W``
    (which positions are live is implied by the next position to write). ``compressor``: the KV
    compressor's state and ``[B, max_len // r, D]`` entries (ratio > 0). ``indexer``: the Lightning
    Indexer compressor's state and ``[B, max_len // 4, index_head_dim]`` keys (ratio 4).
    """

    window: jax.Array
    compressor: CompressorCache | None = None
    indexer: CompressorCache | None = None


def sink_attention(q: jax.Array, keys: jax.Array, visible: jax.Array, sink: jax.Array, scale: float) -> jax.Array:
    """Single-K=V-head attention with a per-head sink logit in the softmax denominator.

    ``q`` f32 ``[B, S, H, D]``, ``keys`` f32 ``[B, N, D]`` (also the values), ``visible`` bool
    ``[B, S, N]``, ``sink`` f32 ``[H]``. Returns f32 ``[B, S, H, D]``.
    """
    logits = jnp.einsum("bshd,bnd->bhsn", q, keys, precision=_HI) * scale
    logits = jnp.where(visible[:, None], logits, -jnp.inf)
    sink = sink.astype(jnp.float32)[None, :, None]  # [1, H, 1]
    m = jnp.maximum(jnp.max(logits, axis=-1), sink)  # [B, H, S]
    p = jnp.exp(logits - m[..., None])
    denom = jnp.sum(p, axis=-1) + jnp.exp(sink - m)
    o = jnp.einsum("bhsn,bnd->bshd", p, keys, precision=_HI)
    return o / jnp.moveaxis(denom, 1, 2)[..., None]


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {value!r} must be a positive integer")
    return value


class DeepseekV4Attention(nnx.Module):
    """One DeepSeek V4 attention layer; attribute paths mirror the official ``layers.{i}.attn.*`` keys.

    Parameters: ``wq_a``, ``q_norm``, ``wq_b``, ``wkv``, ``kv_norm``, ``wo_a``, ``wo_b`` (``.weight``),
    ``attn_sink`` (f32 ``[H]``), ``compressor.{wkv, wgate, ape, norm}`` (ratio > 0),
    ``indexer.{wq_b, weights_proj, compressor.*}`` (ratio 4). Linear weights are ``[out, in]`` in
    ``param_dtype``; norm weights, ``ape`` and ``attn_sink`` are float32. ``simulate_quant``: DeepSeek's
    FP8 / FP4 activation round trips (see the module docstring), off by default.
    """

    def __init__(
        self,
        config: DeepseekV4Config,
        layer_idx: int,
        *,
        param_dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs,
        simulate_quant: bool = False,
    ) -> None:
        if not isinstance(config, DeepseekV4Config):
            raise TypeError(f"config: expected a DeepseekV4Config, got {type(config).__name__}")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx: {layer_idx!r} must be a non-negative integer")
        self.layer_idx = layer_idx
        self.compress_ratio = int(config.layer_compress_ratio(layer_idx))
        self.hidden_size = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.n_groups = config.o_groups
        self.o_lora_rank = config.o_lora_rank
        self.window = config.sliding_window
        self.eps = config.rms_norm_eps
        self.softmax_scale = self.head_dim**-0.5
        self.rope = rope_spec(config, self.compress_ratio)
        self.simulate_quant = bool(simulate_quant)
        if self.simulate_quant:
            if (self.head_dim - self.rope_dim) % 64:
                raise ValueError(
                    f"head_dim: {self.head_dim} - qk_rope_head_dim {self.rope_dim} must be a multiple of 64 "
                    "with simulate_quant (FP8 blocks of 64)"
                )
            ih = config.index_head_dim
            if self.compress_ratio == 4 and (ih % 32 or ih & (ih - 1)):
                raise ValueError(
                    f"index_head_dim: {ih} must be a power of two >= 32 with simulate_quant (Hadamard, FP4 blocks of 32)"
                )
        h, d = self.n_heads, self.head_dim
        kw = {"param_dtype": param_dtype, "rngs": rngs}
        self.wq_a = Linear(config.hidden_size, config.q_lora_rank, **kw)
        self.q_norm = RMSNorm(config.q_lora_rank, self.eps)
        self.wq_b = Linear(config.q_lora_rank, h * d, **kw)
        self.wkv = Linear(config.hidden_size, d, **kw)
        self.kv_norm = RMSNorm(d, self.eps)
        self.wo_a = Linear(h * d // self.n_groups, self.n_groups * self.o_lora_rank, **kw)
        self.wo_b = Linear(self.n_groups * self.o_lora_rank, config.hidden_size, **kw)
        self.attn_sink = nnx.Param(jnp.zeros((h,), jnp.float32))
        if self.compress_ratio:
            self.compressor = DeepseekV4Compressor(
                config, self.compress_ratio, d, self.rope, **kw, quant="fp8" if self.simulate_quant else None
            )
        if self.compress_ratio == 4:
            self.indexer = DeepseekV4Indexer(
                config, self.rope, compress_ratio=self.compress_ratio, **kw, simulate_quant=self.simulate_quant
            )

    # -- cache ----------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> AttentionCache:
        """Empty cache for ``batch`` rows and positions ``< max_len`` (K=V rows and entries in ``dtype``).

        ``dtype`` float32 gives results equal to the uncached forward; bfloat16 halves the memory
        (rows are rounded once when stored). Compressor pending state is always float32.
        """
        _check_positive("batch", batch)
        _check_positive("max_len", max_len)
        comp = self.compressor.init_cache(batch, max_len, dtype) if self.compress_ratio else None
        idx = self.indexer.compressor.init_cache(batch, max_len, dtype) if self.compress_ratio == 4 else None
        return AttentionCache(
            window=jnp.zeros((batch, self.window, self.head_dim), dtype), compressor=comp, indexer=idx
        )

    # -- forward --------------------------------------------------------------------------------
    def _check(self, x: jax.Array, positions: jax.Array, cache: AttentionCache | None) -> None:
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: shape {x.shape} must be [batch, seq, hidden_size = {self.hidden_size}]")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x: dtype {x.dtype} must be floating")
        if positions.shape != x.shape[:2]:
            raise ValueError(f"positions: shape {positions.shape} must be [batch, seq] = {x.shape[:2]}")
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"positions: dtype {positions.dtype} must be an integer type")
        if cache is None:
            return
        if not isinstance(cache, AttentionCache):
            raise TypeError(f"cache: expected an AttentionCache (init_cache), got {type(cache).__name__}")
        if cache.window.shape != (x.shape[0], self.window, self.head_dim):
            raise ValueError(
                f"cache: window shape {cache.window.shape} does not fit batch {x.shape[0]}, "
                f"sliding_window {self.window}, head_dim {self.head_dim}"
            )
        if (cache.compressor is None) != (self.compress_ratio == 0) or (cache.indexer is None) != (
            self.compress_ratio != 4
        ):
            raise ValueError(f"cache: was not made for a compress-ratio-{self.compress_ratio} layer")

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: AttentionCache | None = None
    ) -> tuple[jax.Array, AttentionCache | None]:
        """Attention over ``x`` ``[B, S, hidden]`` at ``positions`` int ``[B, S]`` (contiguous per row).

        Without ``cache``: causal attention within the S tokens (a sequence whose compression
        windows start at its first token; DeepSeek's prefill is ``positions = arange(S)``). With
        ``cache``: the S tokens continue the cached sequence at ``positions[:, 0]``; returns the
        updated cache. Returns ``(y [B, S, hidden] in x.dtype, cache)``.
        """
        self._check(x, positions, cache)
        b, s, _ = x.shape
        h, d, r = self.n_heads, self.head_dim, self.compress_ratio
        pos = positions.astype(jnp.int32)
        start = pos[:, 0]
        xf = x.astype(jnp.float32)
        cos, sin = rope_cos_sin(self.rope, pos)  # [B, S, rd/2]

        qr = self.q_norm(self.wq_a(xf))
        q = rms_norm(self.wq_b(qr).reshape(b, s, h, d), self.eps)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        kv = apply_rope(self.kv_norm(self.wkv(xf)), cos, sin)  # [B, S, D]
        if self.simulate_quant:
            nope = d - self.rope_dim
            kv = jnp.concatenate([fp8_roundtrip(kv[..., :nope], 64), kv[..., nope:]], axis=-1)

        t = pos[:, :, None]  # query positions [B, S, 1]
        if cache is None:
            keys, kpos = kv, pos
            new_cache = None
        else:
            ring = cache.window.astype(jnp.float32)
            slots = jnp.arange(self.window)[None, :]
            last = start[:, None] - 1
            ring_pos = last - jnp.mod(last - slots, self.window)  # newest position in each slot
            ring_pos = jnp.where(ring_pos >= 0, ring_pos, -(2**30))
            keys = jnp.concatenate([ring, kv], axis=1)
            kpos = jnp.concatenate([ring_pos, pos], axis=1)
        kp = kpos[:, None, :]
        visible = (kp <= t) & (kp > t - self.window)

        comp_cache = idx_cache = None
        if r:
            if cache is None:
                entries = self.compressor.dense(xf, start)
                n_seen = pos - start[:, None] + 1
            else:
                comp_cache = self.compressor.update(xf, start, cache.compressor)
                entries = comp_cache.entries.astype(jnp.float32)
                n_seen = pos + 1
            c_vis = jnp.arange(entries.shape[1])[None, None, :] < (n_seen // r)[:, :, None]  # [B, S, T]
            if r == 4:
                if cache is None:
                    ikeys = self.indexer.compressor.dense(xf, start)
                else:
                    idx_cache = self.indexer.compressor.update(xf, start, cache.indexer)
                    ikeys = idx_cache.entries
                c_vis = self.indexer.select(xf, qr, cos, sin, ikeys, c_vis)
            keys = jnp.concatenate([keys, entries], axis=1)
            visible = jnp.concatenate([visible, c_vis], axis=2)

        o = sink_attention(q, keys, visible, self.attn_sink[...], self.softmax_scale)
        o = apply_rope(o, cos[:, :, None], sin[:, :, None], inverse=True)  # [B, S, H, D]

        g = self.n_groups
        wo_a = self.wo_a.weight[...].astype(jnp.float32).reshape(g, self.o_lora_rank, h * d // g)
        o = jnp.einsum("bsgi,gri->bsgr", o.reshape(b, s, g, h * d // g), wo_a, precision=_HI)
        y = self.wo_b(o.reshape(b, s, g * self.o_lora_rank))

        if cache is not None:
            n_new = min(s, self.window)
            new_rows = kv[:, s - n_new :].astype(cache.window.dtype)
            new_slots = jnp.mod(pos[:, s - n_new :], self.window)
            window = jax.vmap(lambda w, i, v: w.at[i].set(v))(cache.window, new_slots, new_rows)
            new_cache = AttentionCache(window=window, compressor=comp_cache, indexer=idx_cache)
        return y.astype(x.dtype), new_cache
