"""DeepSeek V4 KV compressor (CSA ratio 4 with overlapping windows, HCA ratio 128), Flax NNX.

One compressed entry per window of ``r`` consecutive tokens (window ``w`` = positions
``[w r, (w + 1) r)``), as DeepSeek's ``Compressor``:

* ``kv = wkv(x)``, ``z = wgate(x) + ape[pos % r]`` (float32);
* HCA (no overlap): ``C_w = sum_j softmax_j(z_j) * kv_j`` over the window's ``r`` tokens, per channel;
* CSA (overlap, ``wkv`` / ``wgate`` / ``ape`` are ``2 d`` wide): the first ``d`` channels of window
  ``w - 1`` and the last ``d`` channels of window ``w`` form one ``2 r``-token softmax pool
  (window ``-1`` is empty: zero kv, ``-inf`` gate, weight 0);
* ``C_w = norm(C_w)`` (weighted RMSNorm), then RoPE on its trailing ``qk_rope_head_dim`` channels at
  position ``w r`` (the layer's compressed-layer RoPE).

Entry ``w`` exists once token ``(w + 1) r - 1`` has been seen; a query at position ``t`` may use
entries ``w < (t + 1) // r``.

Two evaluations of the same function: :meth:`DeepseekV4Compressor.dense` (no cache: the S tokens
are the whole sequence, windows start at its first token) and :meth:`DeepseekV4Compressor.update`
(cache: the pending tokens of the incomplete window, and for CSA the previous full window, are
carried in :class:`CompressorCache`, so any chunking of the sequence gives the same entries).

``quant`` (off by default, as Hugging Face): DeepSeek's quantisation simulation of the entries,
``"fp8"`` (the KV compressor: non-RoPE channels through FP8 in blocks of 64) or ``"fp4"`` (the
indexer's compressor: Hadamard rotation, then FP4 in blocks of 32); see :mod:`.qat`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_megamoe._src.models.deepseek_v4.layers import Linear, RMSNorm
from jax_megamoe._src.models.deepseek_v4.qat import (
    fp4_roundtrip,
    fp8_roundtrip,
    hadamard,
)
from jax_megamoe._src.models.deepseek_v4.rope import RopeSpec, apply_rope, rope_cos_sin
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

__all__ = ["CompressorCache", "DeepseekV4Compressor"]


class CompressorCache(NamedTuple):
    """Fixed-shape compressor state of one layer (a pytree).

    ``kv`` / ``gate``: float32 ``[B, c r, c d]`` (``c`` = 2 for CSA, 1 for HCA): the raw ``wkv`` /
    ``wgate`` projections (no ``ape``) of the window-aligned positions ``[(n - c + 1) r, (n + 1) r)``
    where ``n = next_position // r``; slot ``i`` holds position ``(n - c + 1) r + i``. Slots at or
    after the next position are stale (ignored: a window is pooled only once complete); the
    CSA overlap slots of window ``-1`` hold zero kv and ``-inf`` gate. ``entries``:
    ``[B, max_len // r, d]`` compressed entries (entry ``w`` valid once ``(w + 1) r`` tokens were seen).
    """

    kv: jax.Array
    gate: jax.Array
    entries: jax.Array


class DeepseekV4Compressor(nnx.Module):
    """Gated-pooling KV compressor; parameters ``wkv``, ``wgate``, ``ape``, ``norm`` (DeepSeek names)."""

    def __init__(
        self,
        config: DeepseekV4Config,
        compress_ratio: int,
        head_dim: int,
        rope: RopeSpec,
        *,
        param_dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs,
        quant: str | None = None,
    ) -> None:
        if compress_ratio < 1:
            raise ValueError(f"compress_ratio: {compress_ratio} must be >= 1 for a compressor")
        if quant not in (None, "fp8", "fp4"):
            raise ValueError(f"quant: {quant!r} must be None, 'fp8' or 'fp4'")
        self.quant = quant
        self.ratio = int(compress_ratio)
        self.head_dim = int(head_dim)
        self.overlap = self.ratio == 4
        self.coff = 2 if self.overlap else 1
        self.rope = rope
        width = self.coff * self.head_dim
        self.wkv = Linear(config.hidden_size, width, param_dtype=param_dtype, rngs=rngs)
        self.wgate = Linear(config.hidden_size, width, param_dtype=param_dtype, rngs=rngs)
        self.ape = nnx.Param(jnp.zeros((self.ratio, width), jnp.float32))
        self.norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    # -- state ----------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> CompressorCache:
        """Empty state for ``batch`` rows and up to ``max_len`` positions (entries in ``dtype``)."""
        c, r, d = self.coff, self.ratio, self.head_dim
        return CompressorCache(
            kv=jnp.zeros((batch, c * r, c * d), jnp.float32),
            gate=jnp.full((batch, c * r, c * d), -jnp.inf, jnp.float32),
            entries=jnp.zeros((batch, max_len // r, d), dtype),
        )

    # -- the pooling shared by both paths ---------------------------------------------------------
    def _pool(self, kv: jax.Array, gate: jax.Array, first_pos: jax.Array) -> jax.Array:
        """Pool window-aligned projections into normed, roped entries.

        ``kv`` / ``gate``: f32 ``[B, (c - 1) r + n r, c d]`` where the leading ``(c - 1) r`` rows are
        the window before the first pooled one; ``first_pos`` int ``[B]`` is the RoPE position of the
        first pooled entry (entry ``i`` at ``first_pos + i r``). Returns ``f32[B, n, d]``.
        """
        c, r, d = self.coff, self.ratio, self.head_dim
        b = kv.shape[0]
        n = kv.shape[1] // r - (c - 1)
        ape = self.ape[...].astype(jnp.float32)
        kv = kv.reshape(b, n + c - 1, r, c * d)
        gate = gate.reshape(b, n + c - 1, r, c * d) + ape
        if self.overlap:
            kv = jnp.concatenate([kv[:, :-1, :, :d], kv[:, 1:, :, d:]], axis=2)  # [B, n, 2r, d]
            gate = jnp.concatenate([gate[:, :-1, :, :d], gate[:, 1:, :, d:]], axis=2)
        pooled = jnp.sum(kv * jax.nn.softmax(gate, axis=2), axis=2)  # [B, n, d]
        pooled = self.norm(pooled)
        pos = first_pos[:, None] + jnp.arange(n)[None, :] * r
        cos, sin = rope_cos_sin(self.rope, pos)
        pooled = apply_rope(pooled, cos, sin)
        if self.quant == "fp8":
            rd = self.rope.dim
            pooled = jnp.concatenate([fp8_roundtrip(pooled[..., : d - rd], 64), pooled[..., d - rd :]], axis=-1)
        elif self.quant == "fp4":
            pooled = fp4_roundtrip(hadamard(pooled), 32)
        return pooled

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.astype(jnp.float32)
        return self.wkv(x), self.wgate(x)

    # -- no cache ---------------------------------------------------------------------------------
    def dense(self, x: jax.Array, first_position: jax.Array) -> jax.Array:
        """Entries of the complete windows of ``x`` ``[B, S, H]`` (a sequence starting at a window start).

        ``first_position`` int ``[B]`` is the position of ``x[:, 0]`` (entry ``i`` is roped at
        ``first_position + i r``; DeepSeek and Hugging Face start at 0). Returns ``f32[B, S // r, d]``.
        """
        c, r, d = self.coff, self.ratio, self.head_dim
        b, s, _ = x.shape
        n = s // r
        if n == 0:
            return jnp.zeros((b, 0, d), jnp.float32)
        kv, gate = self._project(x[:, : n * r])
        if c == 2:
            kv = jnp.concatenate([jnp.zeros((b, r, c * d), jnp.float32), kv], axis=1)
            gate = jnp.concatenate([jnp.full((b, r, c * d), -jnp.inf, jnp.float32), gate], axis=1)
        return self._pool(kv, gate, first_position.astype(jnp.int32))

    # -- with cache -------------------------------------------------------------------------------
    def update(self, x: jax.Array, start: jax.Array, cache: CompressorCache) -> CompressorCache:
        """Feed ``x`` ``[B, S, H]`` at positions ``start[b] + [0, S)``; emit every window it completes.

        Returns the new state; ``entries`` gains the completed windows (positions beyond
        ``max_len`` are dropped).
        """
        c, r, d = self.coff, self.ratio, self.head_dim
        s = x.shape[1]
        kv_new, gate_new = self._project(x)
        n_win = (r - 1 + s + r - 1) // r  # windows that can complete: ceil((r - 1 + S) / r)
        ext_len = c * r + n_win * r
        start = start.astype(jnp.int32)
        end = start + s

        def build(state_kv, state_gate, new_kv, new_gate, p0):
            ext_kv = jnp.zeros((ext_len, c * d), jnp.float32).at[: c * r].set(state_kv)
            ext_gate = jnp.full((ext_len, c * d), -jnp.inf, jnp.float32).at[: c * r].set(state_gate)
            off = (c - 1) * r + p0 % r
            ext_kv = jax.lax.dynamic_update_slice(ext_kv, new_kv, (off, 0))
            ext_gate = jax.lax.dynamic_update_slice(ext_gate, new_gate, (off, 0))
            return ext_kv, ext_gate

        ext_kv, ext_gate = jax.vmap(build)(cache.kv, cache.gate, kv_new, gate_new, start)
        # windows p0 // r + j, j < n_win, laid out from ext row (c - 1) r (the previous one before it)
        span = (c - 1) * r + n_win * r
        first = start // r
        pooled = self._pool(ext_kv[:, :span], ext_gate[:, :span], first * r)  # [B, n_win, d]
        w_idx = first[:, None] + jnp.arange(n_win)[None, :]
        complete = (w_idx + 1) * r <= end[:, None]
        cap = cache.entries.shape[1]
        w_idx = jnp.where(complete, w_idx, cap)  # out of range -> dropped

        def write(entries, idx, vals):
            return entries.at[idx].set(vals.astype(entries.dtype), mode="drop")

        entries = jax.vmap(write)(cache.entries, w_idx, pooled)

        def carry(e_kv, e_gate, p0, p1):
            o = (p1 // r - p0 // r) * r
            return (
                jax.lax.dynamic_slice(e_kv, (o, 0), (c * r, c * d)),
                jax.lax.dynamic_slice(e_gate, (o, 0), (c * r, c * d)),
            )

        st_kv, st_gate = jax.vmap(carry)(ext_kv, ext_gate, start, end)
        return CompressorCache(kv=st_kv, gate=st_gate, entries=entries)
