"""The whole DeepSeek V4 model in Flax NNX, as DeepSeek's inference code (``Block``, ``ParallelHead``,
``Transformer``) computes it.

``tokens [B, S]`` -> ``embed`` -> ``hc_mult`` copies of the stream ``[B, S, hc, H]`` -> per layer
(:class:`DeepseekV4Block`): ``hc_pre`` -> ``attn_norm`` -> attention -> ``hc_post``, then
``hc_pre`` -> ``ffn_norm`` -> MoE (:class:`~.moe.DeepseekV4MoE`, token ids for hash routing) ->
``hc_post`` -> ``hc_head`` collapse -> ``norm`` -> ``head`` (f32 logits for every position).

Attribute paths mirror the official checkpoint keys (``layers.3.attn.wq_a.weight`` is
``model.layers[3].attn.wq_a.weight``), except the routed experts: quantized experts are one
``ffn.experts`` :class:`~.moe.RoutedExperts` (``MoEWeights``), exact ones
``ffn.experts.w13 [E, 2I, H]`` (``w1`` rows then ``w3`` rows) and ``ffn.experts.w2 [E, H, I]``.

The ``config.num_nextn_predict_layers`` MTP blocks (``mtp.*`` in the checkpoint, DeepSeek's
multi-token-prediction head, :class:`~.mtp.DeepseekV4MTPBlock`) are ``model.mtp[k]``; the main
forward never runs them (they draft tokens for speculative decoding, :mod:`.mtp`). A config with
``num_nextn_predict_layers=0`` builds none (a loader then skips the ``mtp.*`` tensors).

The stream dtype is ``param_dtype`` (f32 for the parity tests, bf16 as DeepSeek runs); the mHC
mixing, norms, attention and logits compute in f32. Quantized experts get bf16 inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_megamoe._src.io.v4_model_checkpoint import mtp_compress_ratio
from jax_megamoe._src.models.deepseek_v4 import hyper
from jax_megamoe._src.models.deepseek_v4.attention import (
    AttentionCache,
    DeepseekV4Attention,
)
from jax_megamoe._src.models.deepseek_v4.layers import Linear, RMSNorm
from jax_megamoe._src.models.deepseek_v4.moe import EXPERT_KINDS, DeepseekV4MoE
from jax_megamoe._src.numerics._validate import check_instance
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

__all__ = [
    "DeepseekV4Block",
    "DeepseekV4ForCausalLM",
    "DeepseekV4MTPBlock",
    "ModelCache",
    "ModelOptions",
    "forward",
    "forward_streams",
    "jit_forward",
]

_HI = jax.lax.Precision.HIGHEST
#: std of the random hc ``fn`` / embedding init (Hugging Face's ``initializer_range``).
_INIT_STD = 0.02


class ModelCache(NamedTuple):
    """The fixed-shape cache of a whole model: one attention cache per layer (a pytree), and one
    per MTP block (``mtp``; only the draft step reads or writes those)."""

    layers: tuple[AttentionCache, ...]
    mtp: tuple[AttentionCache, ...] = ()


class Embedding(nnx.Module):
    """Token embedding ``weight [vocab, H]`` (``embed.weight``)."""

    def __init__(self, vocab_size: int, dim: int, *, param_dtype: Any, rngs: nnx.Rngs) -> None:
        w = jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32)
        self.weight = nnx.Param(w.astype(param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)


def _hc_params(spec: hyper.HyperSpec, hidden: int, rows: int, n_scale: int, rngs: nnx.Rngs):
    fn = jax.random.normal(rngs.params(), (rows, spec.hc_mult * hidden), jnp.float32) * _INIT_STD
    return nnx.Param(fn), nnx.Param(jnp.zeros((rows,), jnp.float32)), nnx.Param(jnp.ones((n_scale,), jnp.float32))


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How every layer of a :class:`DeepseekV4ForCausalLM` is built: the settings the model passes
    to each :class:`DeepseekV4Block` (frozen, hashable).

    ``backend``: the MoE backend (:class:`~.moe.DeepseekV4MoE`). ``experts``: ``"quantized"``
    (routed experts as ``MoEWeights`` in kernel mode ``mode``; None: as the ops resolve it) or
    ``"exact"`` (dense ``param_dtype`` experts, f32 math). ``param_dtype``: float32 or bfloat16, the
    Linear weights and the residual stream. ``simulate_quant``: the attention's FP8 KV / FP4 indexer
    quantisation simulation. See :class:`DeepseekV4ForCausalLM`.
    """

    backend: str = "auto"
    experts: str = "quantized"
    param_dtype: Any = jnp.bfloat16
    mode: str | None = None
    simulate_quant: bool = False

    def __post_init__(self) -> None:
        if self.experts not in EXPERT_KINDS:
            raise ValueError(f"experts: {self.experts!r} is not one of {', '.join(EXPERT_KINDS)}")
        dtype = np.dtype(self.param_dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(jnp.bfloat16)):
            raise TypeError(f"param_dtype: {dtype.name} is not supported; expected float32 or bfloat16")

    @staticmethod
    def of(options: ModelOptions | None) -> ModelOptions:
        """``options``, or the defaults for None (a TypeError naming the argument otherwise)."""
        if options is None:
            return ModelOptions()
        return check_instance("options", options, ModelOptions, "a jax_megamoe.models.deepseek_v4.ModelOptions")


class DeepseekV4Block(nnx.Module):
    """One decoder layer: mHC around attention and around the MoE (DeepSeek's ``Block``).

    Parameters (official names): ``attn_norm.weight``, ``attn.*``, ``ffn_norm.weight``, ``ffn.*``,
    ``hc_attn_fn [(2+hc)*hc, hc*H]``, ``hc_attn_base``, ``hc_attn_scale [3]`` and the same for
    ``hc_ffn_*`` (all f32). ``options``: the model's :class:`ModelOptions` (None: the defaults).
    ``__call__(x [B, S, hc, H], positions, token_ids, cache)``.
    """

    def __init__(
        self, config: DeepseekV4Config, layer_idx: int, *, rngs: nnx.Rngs, options: ModelOptions | None = None
    ) -> None:
        if not isinstance(config, DeepseekV4Config):
            raise TypeError(f"config: expected a DeepseekV4Config, got {type(config).__name__}")
        opts = ModelOptions.of(options)
        self.config = config
        self.layer_idx = int(layer_idx)
        self.spec = hyper.HyperSpec.from_config(config)
        self.stream_dtype = np.dtype(opts.param_dtype)
        h = config.hidden_size
        self.attn_norm = RMSNorm(h, config.rms_norm_eps)
        self.attn = DeepseekV4Attention(
            config, self.layer_idx, param_dtype=opts.param_dtype, rngs=rngs, simulate_quant=opts.simulate_quant
        )
        self.ffn_norm = RMSNorm(h, config.rms_norm_eps)
        self.ffn = DeepseekV4MoE(
            config,
            self.layer_idx,
            backend=opts.backend,
            mode=opts.mode,
            experts=opts.experts,
            param_dtype=opts.param_dtype,
            rngs=rngs,
        )
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _hc_params(self.spec, h, self.spec.mix_size, 3, rngs)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _hc_params(self.spec, h, self.spec.mix_size, 3, rngs)

    def _ffn(self, y: jax.Array, token_ids: jax.Array) -> jax.Array:
        b, s, h = y.shape
        flat = y.reshape(b * s, h)
        if self.ffn.expert_kind == "quantized":
            flat = flat.astype(jnp.bfloat16)
        out = self.ffn(flat, token_ids.reshape(b * s))
        return out.reshape(b, s, h).astype(y.dtype)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        token_ids: jax.Array,
        cache: AttentionCache | None = None,
    ) -> tuple[jax.Array, AttentionCache | None]:
        """``x [B, S, hc, H]`` (stream dtype) -> ``(x', cache')``."""
        spec = self.spec
        y, post, comb = hyper.hc_pre(x, self.hc_attn_fn[...], self.hc_attn_scale[...], self.hc_attn_base[...], spec)
        y, cache = self.attn(self.attn_norm(y), positions, cache)
        x = hyper.hc_post(y.astype(x.dtype), x, post, comb)
        y, post, comb = hyper.hc_pre(x, self.hc_ffn_fn[...], self.hc_ffn_scale[...], self.hc_ffn_base[...], spec)
        y = self._ffn(self.ffn_norm(y), token_ids)
        x = hyper.hc_post(y, x, post, comb)
        return x, cache


def _block_config(config: DeepseekV4Config) -> DeepseekV4Config:
    """``config`` with explicit compress ratios for the layers and the MTP blocks (so the block's
    attention, built at index ``num_hidden_layers + k``, gets :func:`mtp_compress_ratio`) and no
    hash layer at or past ``num_hidden_layers`` (the MTP block is never hash-routed)."""
    n = config.num_hidden_layers
    ratios = tuple(config.layer_compress_ratio(i) for i in range(n))
    ratios += tuple(mtp_compress_ratio(config, k) for k in range(config.num_nextn_predict_layers))
    return dataclasses.replace(config, compress_ratios=ratios, num_hash_layers=min(config.num_hash_layers, n))


class DeepseekV4MTPBlock(DeepseekV4Block):
    """MTP block ``k`` (DeepSeek's ``MTPBlock``): a :class:`~.model.DeepseekV4Block` at layer index
    ``num_hidden_layers + k`` plus ``e_proj``, ``h_proj`` (``[H, H]``), ``enorm``, ``hnorm``,
    ``norm`` and ``hc_head_{fn,base,scale}`` (attribute paths mirror ``mtp.k.*``). The arguments
    are the model's (see :class:`~.model.DeepseekV4ForCausalLM`). Math in f32 (the two projections'
    sum is rounded to the stream dtype once)."""

    def __init__(
        self, config: DeepseekV4Config, k: int, *, rngs: nnx.Rngs, options: ModelOptions | None = None
    ) -> None:
        if not isinstance(config, DeepseekV4Config):
            raise TypeError(f"config: expected a DeepseekV4Config, got {type(config).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < config.num_nextn_predict_layers:
            raise ValueError(f"k: {k!r} must be an MTP block index in [0, {config.num_nextn_predict_layers})")
        opts = ModelOptions.of(options)
        param_dtype = opts.param_dtype
        super().__init__(_block_config(config), config.num_hidden_layers + k, rngs=rngs, options=opts)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.mtp_index = k
        self.e_proj = Linear(h, h, param_dtype=param_dtype, rngs=rngs)
        self.h_proj = Linear(h, h, param_dtype=param_dtype, rngs=rngs)
        self.enorm = RMSNorm(h, eps)
        self.hnorm = RMSNorm(h, eps)
        self.norm = RMSNorm(h, eps)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _hc_params(self.spec, h, self.spec.hc_mult, 1, rngs)

    def __call__(  # type: ignore[override]
        self,
        streams: jax.Array,
        embedded: jax.Array,
        positions: jax.Array,
        token_ids: jax.Array,
        cache: AttentionCache | None = None,
    ) -> tuple[jax.Array, AttentionCache | None]:
        """``streams [B, S, hc, H]`` (the main model's, at ``positions``) and ``embedded [B, S, H]``
        (the embedding of the next tokens ``token_ids``) -> ``(norm(hc_head(block(...))) [B, S, H],
        cache')``; the model's head turns it into draft logits."""
        e = self.enorm(embedded.astype(jnp.float32))
        x = self.h_proj(self.hnorm(streams.astype(jnp.float32))) + self.e_proj(e)[:, :, None, :]
        x, cache = super().__call__(x.astype(self.stream_dtype), positions, token_ids, cache)
        y = hyper.hc_head(x, self.hc_head_fn[...], self.hc_head_scale[...], self.hc_head_base[...], self.spec)
        return self.norm(y), cache


class DeepseekV4ForCausalLM(nnx.Module):
    """DeepSeek V4 (``Transformer`` of DeepSeek's inference code), with its
    ``config.num_nextn_predict_layers`` MTP blocks as ``mtp`` (none when that is 0: the way to save
    their memory).

    ``experts``: ``"quantized"`` (routed experts as ``MoEWeights`` on the Mega MoE ops / reference,
    the kernel mode ``mode`` (None: as the ops resolve it); needs the kernels' alignments, e.g.
    ``DeepseekV4Config.tiny()``) or ``"exact"`` (dense ``param_dtype`` experts, f32 math: what Hugging
    Face computes). ``param_dtype``: Linear weights and the residual stream (norm weights, hc
    parameters, ``attn_sink``/``ape`` stay f32). ``backend`` as :class:`~.moe.DeepseekV4MoE`.
    ``simulate_quant``: the attention's FP8 KV / FP4 indexer quantisation *simulation* of DeepSeek's
    inference code (off by default: exact f32, what Hugging Face computes).
    Parameters are random (for tests); a loader overwrites them from a checkpoint.
    """

    def __init__(
        self,
        config: DeepseekV4Config,
        *,
        backend: str = "auto",
        experts: str = "quantized",
        param_dtype: Any = jnp.bfloat16,
        mode: str | None = None,
        rngs: nnx.Rngs,
        simulate_quant: bool = False,
    ) -> None:
        if not isinstance(config, DeepseekV4Config):
            raise TypeError(f"config: expected a DeepseekV4Config, got {type(config).__name__}")
        self.options = ModelOptions(
            backend=backend, experts=experts, param_dtype=param_dtype, mode=mode, simulate_quant=simulate_quant
        )
        self.config = config
        self.spec = hyper.HyperSpec.from_config(config)
        self.param_dtype = np.dtype(param_dtype)
        h, v = config.hidden_size, config.vocab_size
        self.embed = Embedding(v, h, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [DeepseekV4Block(config, i, rngs=rngs, options=self.options) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.head = _Head(h, v, param_dtype=param_dtype, rngs=rngs)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _hc_params(self.spec, h, self.spec.hc_mult, 1, rngs)
        self.mtp = nnx.List(
            [
                DeepseekV4MTPBlock(config, k, rngs=rngs, options=self.options)
                for k in range(config.num_nextn_predict_layers)
            ]
        )

    def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> ModelCache:
        """An empty :class:`ModelCache` for ``batch`` sequences of up to ``max_len`` positions."""
        return ModelCache(
            tuple(layer.attn.init_cache(batch, max_len, dtype) for layer in self.layers),
            tuple(block.attn.init_cache(batch, max_len, dtype) for block in self.mtp),
        )

    def __call__(
        self, tokens: jax.Array, positions: jax.Array | None = None, cache: ModelCache | None = None
    ) -> tuple[jax.Array, ModelCache | None]:
        """``(logits f32 [B, S, vocab], cache)``; see :func:`forward`."""
        return forward(self, cache, tokens, positions)


class _Head(nnx.Module):
    """The LM head ``weight [vocab, H]`` (``head.weight``); logits in f32 (DeepSeek keeps it f32)."""

    def __init__(self, dim: int, vocab_size: int, *, param_dtype: Any, rngs: nnx.Rngs) -> None:
        w = jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32) * dim**-0.5
        self.weight = nnx.Param(w.astype(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...h,vh->...v", x.astype(jnp.float32), self.weight[...].astype(jnp.float32), precision=_HI)


def _check_inputs(model: DeepseekV4ForCausalLM, cache: Any, tokens: Any, positions: Any) -> None:
    if not isinstance(model, DeepseekV4ForCausalLM):
        raise TypeError(f"model: expected a DeepseekV4ForCausalLM, got {type(model).__name__}")
    for name, a in (("tokens", tokens), ("positions", positions)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name}: expected an int32 array [batch, seq], got {type(a).__name__}")
        if len(a.shape) != 2:
            raise ValueError(f"{name}: expected shape [batch, seq], got {tuple(a.shape)}")
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise TypeError(f"{name}: dtype {np.dtype(a.dtype).name} is not supported; expected int32")
    if tuple(positions.shape) != tuple(tokens.shape):
        raise ValueError(f"positions: shape {tuple(positions.shape)} must equal tokens' {tuple(tokens.shape)}")
    if cache is not None:
        if not isinstance(cache, ModelCache):
            raise TypeError(f"cache: expected a ModelCache (model.init_cache), got {type(cache).__name__}")
        if len(cache.layers) != len(model.layers):
            raise ValueError(f"cache: has {len(cache.layers)} layers, the model {len(model.layers)}")


def forward(
    model: DeepseekV4ForCausalLM,
    cache: ModelCache | None,
    tokens: jax.Array,
    positions: jax.Array | None = None,
) -> tuple[jax.Array, ModelCache | None]:
    """Logits f32 ``[B, S, vocab]`` for ``tokens`` int32 ``[B, S]`` at ``positions`` int32 ``[B, S]``.

    ``cache=None``: a plain causal forward over the S tokens (positions default to ``arange(S)``).
    With a cache (``model.init_cache``): the tokens continue each cached sequence at
    ``positions[:, 0]`` (contiguous per row); returns the updated cache. Prefill (S > 1) and
    one-token decode steps have fixed shapes, so one jitted function serves every position
    (``nnx.jit(forward)`` or :func:`jit_forward`).
    """
    logits, _, cache = forward_streams(model, cache, tokens, positions)
    return logits, cache


def forward_streams(
    model: DeepseekV4ForCausalLM,
    cache: ModelCache | None,
    tokens: jax.Array,
    positions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, ModelCache | None]:
    """:func:`forward` that also returns the hidden streams ``[B, S, hc, H]`` after the last layer
    (before the hyper-head): the input of the MTP draft step (:func:`~.mtp.mtp_draft`)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32)[None], tokens.shape)
    _check_inputs(model, cache, tokens, positions)
    tokens = tokens.astype(jnp.int32)
    positions = positions.astype(jnp.int32)
    e = model.embed(tokens).astype(model.param_dtype)  # [B, S, H]
    x = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], model.spec.hc_mult, e.shape[-1]))
    new_layers = []
    for i, layer in enumerate(model.layers):
        x, c = layer(x, positions, tokens, None if cache is None else cache.layers[i])
        new_layers.append(c)
    y = hyper.hc_head(x, model.hc_head_fn[...], model.hc_head_scale[...], model.hc_head_base[...], model.spec)
    logits = model.head(model.norm(y))
    return logits, x, (None if cache is None else cache._replace(layers=tuple(new_layers)))


def _merged_forward(graphdef: Any, state: Any, cache: Any, tokens: jax.Array, positions: jax.Array):
    return forward(nnx.merge(graphdef, state), cache, tokens, positions)


_jitted_forward = jax.jit(_merged_forward, static_argnums=0)


def jit_forward(
    model: DeepseekV4ForCausalLM,
) -> Callable[[ModelCache | None, jax.Array, jax.Array], tuple[jax.Array, ModelCache | None]]:
    """A jitted ``step(cache, tokens, positions) -> (logits, cache)`` over ``model``'s current
    parameters (``nnx.split`` once, ``nnx.merge`` inside the trace). Models of the same structure
    share one compile per input shape (the graph definition is the static key)."""
    graphdef, state = nnx.split(model)

    def step(cache: ModelCache | None, tokens: jax.Array, positions: jax.Array) -> tuple[jax.Array, ModelCache | None]:
        return _jitted_forward(graphdef, state, cache, tokens, positions)

    return step
