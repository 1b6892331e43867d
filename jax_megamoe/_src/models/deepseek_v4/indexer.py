"""DeepSeek V4 Lightning Indexer (CSA layers), Flax NNX.

For a query at position ``t`` and the indexer's own compressed keys ``K_w`` (an
``index_head_dim``-wide :class:`DeepseekV4Compressor` over the same ratio-4 overlapping windows):

    score(t, w) = sum_h relu(q_{t,h} . K_w) * weights_proj(x_t)_h * index_head_dim^-1/2 * index_n_heads^-1/2

with ``q = wq_b(qr)`` (``qr`` = the attention's normed low-rank query) roped on its trailing
``qk_rope_head_dim`` channels at ``t``. Entries ``w >= (t + 1) // 4`` are masked; the query keeps the
``index_topk`` best of the rest (all of them when fewer). DeepSeek rotates ``q`` and ``K`` by the same
orthonormal Hadamard matrix before the product (it cancels in ``q . K``) so that its FP4
quantisation simulation loses less; both happen only with ``simulate_quant=True`` (:mod:`.qat`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_megamoe._src.models.deepseek_v4.compressor import DeepseekV4Compressor
from jax_megamoe._src.models.deepseek_v4.layers import Linear
from jax_megamoe._src.models.deepseek_v4.qat import fp4_roundtrip, hadamard
from jax_megamoe._src.models.deepseek_v4.rope import RopeSpec, apply_rope
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

__all__ = ["DeepseekV4Indexer"]


class DeepseekV4Indexer(nnx.Module):
    """Parameters ``wq_b``, ``weights_proj``, ``compressor.{wkv, wgate, ape, norm}`` (DeepSeek names).

    ``compress_ratio``: its compressor's; 4, the CSA layers' (the only ones with an indexer)."""

    def __init__(
        self,
        config: DeepseekV4Config,
        rope: RopeSpec,
        *,
        compress_ratio: int = 4,
        param_dtype: jnp.dtype = jnp.bfloat16,
        rngs: nnx.Rngs,
        simulate_quant: bool = False,
    ) -> None:
        self.simulate_quant = bool(simulate_quant)
        self.n_heads = int(config.index_n_heads)
        self.head_dim = int(config.index_head_dim)
        self.index_topk = int(config.index_topk)
        self.ratio = int(compress_ratio)
        if config.qk_rope_head_dim > self.head_dim:
            raise ValueError(f"index_head_dim: {self.head_dim} must be >= qk_rope_head_dim = {config.qk_rope_head_dim}")
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, param_dtype=param_dtype, rngs=rngs)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, param_dtype=param_dtype, rngs=rngs)
        self.compressor = DeepseekV4Compressor(
            config,
            compress_ratio,
            self.head_dim,
            rope,
            param_dtype=param_dtype,
            rngs=rngs,
            quant="fp4" if self.simulate_quant else None,
        )

    def select(
        self,
        x: jax.Array,
        qr: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        keys: jax.Array,
        visible: jax.Array,
    ) -> jax.Array:
        """bool ``[B, S, T]``: the compressed entries each query attends to.

        ``x`` f32 ``[B, S, H]``, ``qr`` f32 ``[B, S, q_lora_rank]``, ``cos``/``sin`` ``[B, S, rd / 2]``
        at the query positions, ``keys`` ``[B, T, index_head_dim]`` (the indexer compressor's
        entries), ``visible`` bool ``[B, S, T]`` (causally available entries).
        """
        b, s, _ = x.shape
        t = keys.shape[1]
        if t == 0:
            return jnp.zeros((b, s, 0), bool)
        q = self.wq_b(qr).reshape(b, s, self.n_heads, self.head_dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        if self.simulate_quant:
            q = fp4_roundtrip(hadamard(q), 32)
        w = self.weights_proj(x) * (self.head_dim**-0.5 * self.n_heads**-0.5)  # [B, S, h]
        logits = jnp.einsum("bshd,btd->bsht", q, keys.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        score = jnp.einsum("bsht,bsh->bst", jax.nn.relu(logits), w, precision=jax.lax.Precision.HIGHEST)
        score = jnp.where(visible, score, -jnp.inf)
        k = min(self.index_topk, t)
        _, idx = jax.lax.top_k(score, k)  # [B, S, k]
        chosen = jnp.zeros((b, s, t), bool)
        bi = jnp.arange(b)[:, None, None]
        si = jnp.arange(s)[None, :, None]
        chosen = chosen.at[bi, si, idx].set(True)
        return chosen & visible
