"""DeepSeek V4 MoE block in Flax NNX: gate, hash routing, routed experts (Mega MoE), shared expert.

What one MoE layer of DeepSeek V4 computes (the official ``inference/model.py``, "REF"), for the
collapsed, RMS-normed hidden states ``x`` ``bf16[T, H]`` of one layer and their token ids:

1. Gate (:class:`DeepseekV4Gate`): logits ``z = f32(x) @ f32(W_g)^T`` (fp32), scores
   ``s = sqrt(softplus(z))``. Hash layers (``layer_idx < num_hash_layers``, never the MTP block)
   take the experts from ``tid2eid[token_ids]``; the other layers take ``top_k(s + bias, K)`` (the
   bias only *selects*; flat top-k over all experts, ties to the lowest expert id). The weights are
   always the **unbiased** scores at the chosen ids, renormalised to sum to one
   (``norm_topk_prob``), times ``routed_scaling_factor`` (rho). **rho is folded into the returned
   ``topk_weights``** before the kernel, as newer SGLang does: the Mega MoE kernels multiply the
   weight into the SwiGLU output *before* requantising it, so this is where the kernel expects it
   (the sm_100 pre-dispatch has no rho of its own).
2. Routed experts (:class:`DeepseekV4MoE` through :func:`_routed_experts`): Mega MoE on MXFP4
   experts (``MoEWeights``), SwiGLU clamped at ``swiglu_limit`` (gate from above, up symmetric).
   On the GPU the fused kernel runs ``T`` padded to a static token bucket (:func:`token_bucket`),
   a prompt longer than the buffer's cap in chunks of it (:func:`jax_megamoe.ops.token_cap`), and
   a decode step of ``T * K`` at most the crossover on the decode kernels, unpadded; the pure-JAX
   reference runs on CPU and wherever the GPU cannot run the mode.
3. Shared expert (:class:`DeepseekV4SharedExpert`): the same clamped SwiGLU as ordinary XLA
   matmuls, no routing weight and no rho.
4. ``y = bf16(f32(routed) + shared_f32)``: the shared expert's fp32 output is added to the
   kernel's bf16 output in fp32 and rounded to bf16 once (SGLang adds two bf16 tensors in
   place, which rounds the shared output first; ours is the more accurate of the two and differs
   by at most one bf16 rounding). No residual: DeepSeek V4's hyper-connections add it.

Everything is a pure function of arrays under ``nnx.jit`` / ``jax.jit`` (through
``nnx.split``/``nnx.merge``); the token count ``T`` is static.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_megamoe._src.io import convert
from jax_megamoe._src.io.build import load_moe_layer
from jax_megamoe._src.io.safetensors_reader import CheckpointError, CheckpointSource
from jax_megamoe._src.io.v4_checkpoint import NIBBLE_ORDERS as _NIBBLE_ORDERS
from jax_megamoe._src.io.v4_checkpoint import MoELayer
from jax_megamoe._src.kernels import _decode, ops, parallel
from jax_megamoe._src.models.deepseek_v4.layers import Linear
from jax_megamoe._src.numerics import config as _cfg
from jax_megamoe._src.numerics import policy as _policy
from jax_megamoe._src.numerics import quant, reference
from jax_megamoe._src.numerics._validate import check_instance
from jax_megamoe._src.numerics.layout import MoEWeights
from jax_megamoe._src.numerics.policy import Policy
from jax_megamoe._src.numerics.progress import ProgressArg, text_progress_bar
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config, _check_int

__all__ = [
    "BACKENDS",
    "DeepseekV4Config",
    "DeepseekV4Gate",
    "DeepseekV4SharedExpert",
    "DeepseekV4MoE",
    "MoEBlockOptions",
    "BlockLoadOptions",
    "MoECheckpoint",
    "GateBias",
    "HashTable",
    "RoutedExperts",
    "ExactExperts",
    "EXPERT_KINDS",
    "random_moe_checkpoint",
    "random_checkpoint_scale_bytes",
    "text_progress_bar",
]

#: Backends a block can be asked for (the same names as ``jax_megamoe.ops``).
BACKENDS: tuple[str, ...] = ("auto", "ffi", "reference")


# ---------------------------------------------------------------------------------------------
# Variables
# ---------------------------------------------------------------------------------------------


class GateBias(nnx.Variable):
    """The gate's selection bias (``noaux_tc``): set by load balancing, not trained by gradients."""


class HashTable(nnx.Variable):
    """``tid2eid`` int32 ``[vocab, K]``: the experts of each token id on hash-routed layers."""


class RoutedExperts(nnx.Variable):
    """The routed experts as one ``MoEWeights`` pytree (kernel layout, fixed mode)."""


def _value(v: nnx.Variable) -> Any:
    return v.get_value()


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


_BF16_ONLY = (np.dtype(jnp.bfloat16),)
_BF16_OR_F32 = (np.dtype(jnp.bfloat16), np.dtype(np.float32))


def _check_x(x: Any, hidden: int, name: str = "x", dtypes: tuple[np.dtype, ...] = _BF16_ONLY) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    if len(x.shape) != 2:
        raise ValueError(f"{name}: expected a rank-2 array [T, H={hidden}], got shape {tuple(x.shape)}")
    if np.dtype(x.dtype) not in dtypes:
        want = " or ".join(d.name for d in dtypes)
        raise TypeError(f"{name}: dtype {np.dtype(x.dtype).name} is not supported; expected {want}")
    if x.shape[1] != hidden:
        raise ValueError(f"{name}: hidden size {x.shape[1]} does not match the config's hidden_size = {hidden}")


def _check_token_ids(token_ids: Any, num_tokens: int) -> None:
    if not hasattr(token_ids, "shape") or not hasattr(token_ids, "dtype"):
        raise TypeError(f"token_ids: expected an integer array, got {type(token_ids).__name__}")
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise TypeError(f"token_ids: dtype {np.dtype(token_ids.dtype).name} is not supported; expected int32")
    if tuple(token_ids.shape) != (num_tokens,):
        raise ValueError(f"token_ids: expected shape [{num_tokens}] (one id per row of x), got {list(token_ids.shape)}")


def _check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


# ---------------------------------------------------------------------------------------------
# Gate
# ---------------------------------------------------------------------------------------------


class DeepseekV4Gate(nnx.Module):
    """Router of one layer: ``(x bf16[T,H], token_ids int32[T] | None) -> (topk_idx, topk_weights)``.

    Parameters: ``weight`` bf16 ``[E, H]`` (``nnx.Param``, init N(0, 1/H) so logits are O(1));
    on non-hash layers ``bias`` f32 ``[E]`` (:class:`GateBias`, init 0 as in HF/SGLang);
    on hash layers ``tid2eid`` int32 ``[vocab, K]`` (:class:`HashTable`) initialised as SGLang's
    dummy init, ``tid2eid[t, k] = (t + k) % E`` (K distinct experts per row), to be replaced by
    the checkpoint's table. A hash layer has no ``bias`` attribute; other layers no ``tid2eid``.

    Returns ``topk_idx`` int32 ``[T, K]`` and ``topk_weights`` f32 ``[T, K]`` **including rho**.

    Token ids outside ``[0, vocab)`` on a hash layer (e.g. negative padding ids) are *not*
    clamped to a valid row: their row gets ``topk_idx = -1`` and weight 0 in every slot, the
    convention DeepGEMM and SGLang use for padded tokens (the kernels skip ``idx < 0``), so such
    a token receives only the shared expert. Nothing can raise on a traced value, hence no error.
    """

    def __init__(
        self,
        config: DeepseekV4Config,
        layer_idx: int,
        *,
        rngs: nnx.Rngs,
        is_mtp: bool = False,
        param_dtype: Any = jnp.bfloat16,
    ) -> None:
        if not isinstance(config, DeepseekV4Config):
            raise TypeError(f"config: expected a DeepseekV4Config, got {type(config).__name__}")
        _check_int("layer_idx", layer_idx, 0)
        self.config = config
        self.layer_idx = int(layer_idx)
        self.is_hash_layer = config.is_hash_layer(self.layer_idx, is_mtp=is_mtp)
        e, h, k = config.n_routed_experts, config.hidden_size, config.num_experts_per_tok
        w = jax.random.normal(rngs.params(), (e, h), jnp.float32) * (1.0 / math.sqrt(h))
        self.weight = nnx.Param(w.astype(param_dtype))
        if self.is_hash_layer:
            tid = np.arange(config.vocab_size, dtype=np.int64)[:, None]
            self.tid2eid = HashTable(jnp.asarray((tid + np.arange(k)[None, :]) % e, jnp.int32))
        else:
            self.bias = GateBias(jnp.zeros((e,), jnp.float32))

    def scores(self, x: jax.Array) -> jax.Array:
        """Unbiased affinities ``sqrt(softplus(f32(x) @ f32(W)^T))``, f32 ``[T, E]`` (always f32, as
        DeepSeek's ``Gate``; Hugging Face runs this linear in the model dtype)."""
        _check_x(x, self.config.hidden_size, dtypes=_BF16_OR_F32)
        w = _value(self.weight)
        logits = _dot_nt(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return jnp.sqrt(jax.nn.softplus(logits))

    def __call__(self, x: jax.Array, token_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        _check_x(x, cfg.hidden_size, dtypes=_BF16_OR_F32)
        t = x.shape[0]
        if token_ids is not None:
            _check_token_ids(token_ids, t)
        scores = self.scores(x)
        if self.is_hash_layer:
            if token_ids is None:
                raise ValueError(
                    f"token_ids: layer {self.layer_idx} is hash-routed (layer_idx < num_hash_layers = "
                    f"{cfg.num_hash_layers}) and needs the token id of every row of x"
                )
            table = _value(self.tid2eid)
            tid = jnp.asarray(token_ids).astype(jnp.int32)
            valid = (tid >= 0) & (tid < table.shape[0])
            rows = table[jnp.clip(tid, 0, table.shape[0] - 1)]
            topk_idx = jnp.where(valid[:, None], rows, -1).astype(jnp.int32)
        else:
            biased = scores + _value(self.bias)[None, :]
            _, topk_idx = jax.lax.top_k(biased, cfg.num_experts_per_tok)  # ties: lowest id first
            topk_idx = topk_idx.astype(jnp.int32)
        ok = topk_idx >= 0
        w = jnp.take_along_axis(scores, jnp.where(ok, topk_idx, 0), axis=1)
        w = jnp.where(ok, w, 0.0)
        if cfg.norm_topk_prob:
            w = w / (jnp.sum(w, axis=1, keepdims=True) + jnp.float32(cfg.renorm_eps))
        w = w * jnp.float32(cfg.routed_scaling_factor)
        return topk_idx, w.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Shared expert
# ---------------------------------------------------------------------------------------------


def _dot_nt(a: jax.Array, b: jax.Array, precision: Any = None) -> jax.Array:
    """``a @ b.T`` with fp32 accumulation, as one dot_general (no separate transpose op, so eager
    and jitted calls run the same contraction and give the same bits)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _clamped_swiglu(g: jax.Array, u: jax.Array, limit: float | None) -> jax.Array:
    if limit is not None:
        g = jnp.minimum(g, jnp.float32(limit))
        u = jnp.clip(u, -jnp.float32(limit), jnp.float32(limit))
    return jax.nn.silu(g) * u


class DeepseekV4SharedExpert(nnx.Module):
    """The shared expert: ``W2 . bf16(silu(min(x W1^T, L)) * clip(x W3^T, -L, L))``, returns f32 ``[T, H]``.

    ``w1``/``w3`` ``[I_s, H]`` and ``w2`` ``[H, I_s]`` are :class:`~.layers.Linear` modules whose
    ``weight`` (``nnx.Param``, bf16 by default) mirrors the checkpoint keys
    ``shared_experts.{w1,w2,w3}.weight``. The checkpoint stores them as FP8 e4m3 with 128x128
    UE8M0 block scales; :meth:`load_fp8` dequantizes them at load, exactly (an e4m3 value times a
    power of two always fits bf16). The matmuls are bf16 x bf16 with fp32 accumulation, the
    SwiGLU and clamp (same as the routed experts: gate from above, up symmetric) in fp32, the
    intermediate rounded to bf16 before the down projection as REF does; no routing weight, no
    rho. REF additionally quantizes the activations of its FP8 linears to FP8 per 128 columns;
    this module does not (it is closer to the exact function).

    ``exact=True`` (the model's ``experts="exact"``): x may be f32, the weights are cast to f32,
    and the intermediate is not rounded to bf16 (what Hugging Face computes in f32).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        swiglu_limit: float | None,
        rngs: nnx.Rngs,
        exact: bool = False,
        param_dtype: Any = jnp.bfloat16,
    ) -> None:
        _check_int("hidden_size", hidden_size, 1)
        _check_int("intermediate_size", intermediate_size, 1)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.swiglu_limit = None if swiglu_limit is None or float(swiglu_limit) <= 0 else float(swiglu_limit)
        self.exact = bool(exact)
        h, i = self.hidden_size, self.intermediate_size
        self.w1 = Linear(h, i, param_dtype=param_dtype, rngs=rngs)
        self.w3 = Linear(h, i, param_dtype=param_dtype, rngs=rngs)
        self.w2 = Linear(i, h, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.exact:
            _check_x(x, self.hidden_size, dtypes=_BF16_OR_F32)
            hi = jax.lax.Precision.HIGHEST
            x32 = x.astype(jnp.float32)
            g = _dot_nt(x32, _value(self.w1.weight).astype(jnp.float32), precision=hi)
            u = _dot_nt(x32, _value(self.w3.weight).astype(jnp.float32), precision=hi)
            h = _clamped_swiglu(g, u, self.swiglu_limit)
            return _dot_nt(h, _value(self.w2.weight).astype(jnp.float32), precision=hi)
        _check_x(x, self.hidden_size)
        g = _dot_nt(x, _value(self.w1.weight).astype(jnp.bfloat16))
        u = _dot_nt(x, _value(self.w3.weight).astype(jnp.bfloat16))
        h = _clamped_swiglu(g, u, self.swiglu_limit)
        return _dot_nt(h.astype(jnp.bfloat16), _value(self.w2.weight).astype(jnp.bfloat16))

    def load_fp8(
        self,
        w1: jax.Array | np.ndarray,
        w1_scale: jax.Array | np.ndarray,
        w2: jax.Array | np.ndarray,
        w2_scale: jax.Array | np.ndarray,
        w3: jax.Array | np.ndarray,
        w3_scale: jax.Array | np.ndarray,
    ) -> None:
        """Set the weights from the checkpoint's FP8 block-128 tensors (dequantized to bf16).

        ``w*`` are ``float8_e4m3fn`` (or their uint8 bytes); scales ``[N/128, K/128]`` as
        ``float8_e8m0fnu``, UE8M0 uint8 bytes, or f32.
        """

        def deq(name, q, s, shape):
            q = jnp.asarray(q)
            if q.dtype == jnp.uint8:
                q = jax.lax.bitcast_convert_type(q, jnp.float8_e4m3fn)
            if tuple(q.shape) != shape:
                raise ValueError(f"{name}: expected shape {list(shape)}, got {list(q.shape)}")
            s = np.asarray(s)
            if s.dtype == np.uint8:
                s = np.ldexp(np.float32(1.0), s.astype(np.int32) - 127).astype(np.float32)
            else:
                s = s.astype(np.float32)
            want = (shape[0] // 128, shape[1] // 128)
            if tuple(s.shape) != want:
                raise ValueError(f"{name}_scale: expected shape {list(want)}, got {list(s.shape)}")
            return quant.dequantize_fp8_block128(q, jnp.asarray(s)).astype(jnp.bfloat16)

        h, i = self.hidden_size, self.intermediate_size
        dt = _value(self.w1.weight).dtype
        self.w1.weight.set_value(deq("w1", w1, w1_scale, (i, h)).astype(dt))
        self.w3.weight.set_value(deq("w3", w3, w3_scale, (i, h)).astype(dt))
        self.w2.weight.set_value(deq("w2", w2, w2_scale, (h, i)).astype(dt))


# ---------------------------------------------------------------------------------------------
# Random MXFP4 checkpoints
# ---------------------------------------------------------------------------------------------


class MoECheckpoint(NamedTuple):
    """Routed experts of one layer in checkpoint format (the arguments of ``MoEWeights.from_checkpoint``)."""

    w13: np.ndarray  # uint8 [E, 2I, H/2]: packed E2M1, rows [gate | up], low nibble = even column
    w13_scale: np.ndarray  # uint8 [E, 2I, H/32]: UE8M0 bytes
    w2: np.ndarray  # uint8 [E, H, I/2]
    w2_scale: np.ndarray  # uint8 [E, H, I/32]


#: RMS of a uniformly random E2M1 code: sqrt(mean(0, .25, 1, 2.25, 4, 9, 16, 36)).
_E2M1_RMS = math.sqrt(68.5 / 8)
#: RMS gain of a scale exponent jittered uniformly over {-1, 0, +1}: sqrt((1/4 + 1 + 4) / 3).
_JITTER_RMS = math.sqrt(1.75)


def random_checkpoint_scale_bytes(k: int, target_rms: float) -> int:
    """Central UE8M0 byte of a random layer whose products with a unit-RMS input have RMS ~target.

    A dot product over ``k`` random E2M1 codes (RMS ``_E2M1_RMS``) with scale ``2^(s-127)``
    jittered by one exponent either way has RMS ``sqrt(k) * 2.93 * 1.32 * 2^(s-127)`` for a
    unit-RMS input; ``s`` is that solved for ``target_rms`` and rounded.
    """
    return 127 + int(round(math.log2(target_rms / (math.sqrt(k) * _E2M1_RMS * _JITTER_RMS))))


def _moe_dims(config: DeepseekV4Config, num_experts: int | None) -> tuple[int, int, int]:
    e = config.n_routed_experts if num_experts is None else num_experts
    _check_int("num_experts", e, 1)
    h, i = config.hidden_size, config.moe_intermediate_size
    if h % 32 or i % 32:
        raise ValueError(f"hidden_size/moe_intermediate_size: {h}/{i} must be multiples of 32 (MXFP4 groups)")
    return e, h, i


def random_moe_checkpoint(
    config: DeepseekV4Config,
    seed: int | np.random.SeedSequence = 0,
    *,
    num_experts: int | None = None,
    progress: Callable[[int, int], None] | bool | None = None,
    gate_up_rms: float = 2.0,
    down_rms: float = 1.0,
) -> MoECheckpoint:
    """Random routed experts in checkpoint format (numpy uint8), fast enough for full-size layers.

    Codes are uniformly random bytes (every E2M1 value, both signs); scale bytes are uniform over
    ``{c-1, c, c+1}`` with ``c`` from :func:`random_checkpoint_scale_bytes`, so for a unit-RMS
    input the gate/up pre-activations have RMS about ``gate_up_rms`` (2: the clamp at 10 bites on
    large inputs) and each expert's output about ``down_rms`` per unit-RMS intermediate. For
    V4-Flash that is bytes {119,120,121} for both w13 and w2; for ``tiny()`` {121,122,123} and
    {120,121,122}. The generator (SFC64 raw words, > 1 GB/s) is rarely the limit: V4-Flash's
    3.2 GiB took 10-17 s on a 2-core VM, almost all of it first-touch page faults of the output.
    ``progress(done_bytes, total_bytes)`` is called per expert; ``True`` picks
    :func:`text_progress_bar`. ``num_experts`` overrides ``config.n_routed_experts``.
    """
    e, h, i = _moe_dims(config, num_experts)
    if progress is True:
        progress = text_progress_bar("random MXFP4 experts")
    c13 = random_checkpoint_scale_bytes(h, gate_up_rms)
    c2 = random_checkpoint_scale_bytes(i, down_rms)
    for name, c in (("gate_up_rms", c13), ("down_rms", c2)):
        if not 2 <= c <= 252:
            raise ValueError(f"{name}: gives UE8M0 byte {c}, outside the usable range")
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    bitgen = np.random.SFC64(ss)
    rng = np.random.Generator(bitgen)
    shapes = ((2 * i, h // 2), (2 * i, h // 32), (h, i // 2), (h, i // 32))
    out = MoECheckpoint(*(np.empty((e, *s), np.uint8) for s in shapes))
    per_expert = sum(int(np.prod(s)) for s in shapes)
    total = e * per_expert

    def raw_bytes(n: int) -> np.ndarray:
        words = bitgen.random_raw(-(-n // 8))
        return words.view(np.uint8)[:n]

    for ex in range(e):
        out.w13[ex] = raw_bytes(out.w13[ex].size).reshape(shapes[0])
        out.w13_scale[ex] = rng.integers(c13 - 1, c13 + 2, shapes[1], dtype=np.uint8)
        out.w2[ex] = raw_bytes(out.w2[ex].size).reshape(shapes[2])
        out.w2_scale[ex] = rng.integers(c2 - 1, c2 + 2, shapes[3], dtype=np.uint8)
        if progress:
            progress((ex + 1) * per_expert, total)
    return out


def _random_moe_checkpoint_jax(
    config: DeepseekV4Config, key: jax.Array, num_experts: int | None = None
) -> MoECheckpoint:
    """The same distribution from a (possibly traced) JAX key: used under ``nnx.eval_shape``/jit init."""
    e, h, i = _moe_dims(config, num_experts)
    c13 = random_checkpoint_scale_bytes(h, 2.0)
    c2 = random_checkpoint_scale_bytes(i, 1.0)
    k1, k2, k3, k4 = jax.random.split(key, 4)

    def scales(k, shape, c):
        return jax.random.randint(k, shape, c - 1, c + 2, dtype=jnp.int32).astype(jnp.uint8)

    return MoECheckpoint(
        jax.random.bits(k1, (e, 2 * i, h // 2), jnp.uint8),
        scales(k2, (e, 2 * i, h // 32), c13),
        jax.random.bits(k3, (e, h, i // 2), jnp.uint8),
        scales(k4, (e, h, i // 32), c2),
    )


# ---------------------------------------------------------------------------------------------
# Routed experts: the one place where the backend is chosen
# ---------------------------------------------------------------------------------------------


def token_bucket(num_tokens: int, cap: int) -> int:
    """The static token count the kernel runs for ``num_tokens`` under a buffer of ``cap`` tokens
    (:func:`jax_megamoe.ops.token_cap`): the next power of two >= 16, at most ``cap``; above the
    cap, whole chunks of ``cap`` (the kernel runs them one after the other)."""
    if num_tokens > cap:
        return -(-num_tokens // cap) * cap
    b = 16
    while b < num_tokens:
        b *= 2
    return min(b, cap)


def _routed_experts(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    backend: str,
    *,
    activation_clamp: float | None,
    policy: Policy | None = None,
) -> jax.Array:
    """Routed experts ``bf16[T, H]``; ``topk_weights`` already carry rho (so the factor passed is 1).

    ``backend="reference"`` always runs ``jax_megamoe.reference.mega_moe``; otherwise the call
    goes to ``jax_megamoe.ops.mega_moe(..., backend=backend)`` (FFI kernels where available).
    """
    if backend != "reference":
        t, k = x.shape[0], topk_idx.shape[1]
        # The decode kernels (kernel="auto" at T * K <= their crossover) take any T: a bucket would
        # push a one-token step past the crossover onto the fused kernel.
        decode = _decode.choose_kernel(
            "auto", weights.mode, t, k, hidden=weights.hidden, intermediate=weights.intermediate
        ) == "decode"  # fmt: skip
        bucket = t if decode else token_bucket(t, ops.token_cap(t, policy=policy))
        if bucket != t and ops.choose_backend(backend, weights.mode, op="mega_moe") == "ffi":
            # Static token buckets: one kernel configuration per bucket instead of per T.
            # Pad rows route nowhere (idx -1, weight 0), so they cost nothing and give 0.
            pad = bucket - t
            y = ops.mega_moe(
                jnp.pad(x, ((0, pad), (0, 0))),
                jnp.pad(topk_idx, ((0, pad), (0, 0)), constant_values=-1),
                jnp.pad(topk_weights, ((0, pad), (0, 0))),
                weights,
                mode=weights.mode,
                activation_clamp=activation_clamp,
                backend=backend,
                options=ops.MoEOptions(policy=policy),
            )
            return y[:t]
        return ops.mega_moe(
            x, topk_idx, topk_weights, weights, mode=weights.mode, activation_clamp=activation_clamp, backend=backend,
            options=ops.MoEOptions(policy=policy),
        )  # fmt: skip
    return reference.mega_moe(x, topk_idx, topk_weights, weights, mode=weights.mode, activation_clamp=activation_clamp)


# ---------------------------------------------------------------------------------------------
# Exact routed experts (dense weights, f32 math)
# ---------------------------------------------------------------------------------------------

#: What a block's routed experts are: the kernels' quantized ``MoEWeights`` or dense weights.
EXPERT_KINDS: tuple[str, ...] = ("quantized", "exact")


class ExactExperts(nnx.Module):
    """Routed experts as dense weights: ``w13`` ``[E, 2I, H]`` (rows ``[w1 | w3]``: gate then up)
    and ``w2`` ``[E, H, I]`` (``nnx.Param`` in ``param_dtype``), with f32 math and no activation
    quantization: what Hugging Face's ``DeepseekV4Experts`` computes in f32.

    The routing weight multiplies ``silu(gate) * up`` *before* the down projection, as DeepSeek's
    ``Expert`` does (Hugging Face multiplies the down projection's output; in exact arithmetic the
    two are equal). Checkpoint experts ``e`` map to ``w13[e] = concat(w1, w3)`` and ``w2[e] = w2``.
    Rows are grouped by expert with a stable sort and run as two ``jax.lax.ragged_dot`` calls (no
    ``[T, E]`` dense product), so the cost is ``T * K`` expert rows whatever ``E`` is.
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, *, param_dtype: Any, rngs: nnx.Rngs
    ) -> None:
        for name, v in (
            ("num_experts", num_experts),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
        ):
            _check_int(name, v, 1)
        e, h, i = int(num_experts), int(hidden_size), int(intermediate_size)
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        k13, k2 = jax.random.split(rngs.params())
        self.w13 = nnx.Param((jax.random.normal(k13, (e, 2 * i, h), jnp.float32) / math.sqrt(h)).astype(param_dtype))
        self.w2 = nnx.Param((jax.random.normal(k2, (e, h, i), jnp.float32) / math.sqrt(i)).astype(param_dtype))

    def __call__(
        self, x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array, activation_clamp: float | None
    ) -> jax.Array:
        """``sum_k w_k * Expert_{idx_k}(x)`` in f32 ``[T, H]``; slots with ``idx < 0`` add nothing."""
        t, k = topk_idx.shape
        e, i = self.num_experts, self.intermediate_size
        hi = jax.lax.Precision.HIGHEST
        ok = topk_idx >= 0
        ids = jnp.where(ok, topk_idx, 0).reshape(-1)
        wts = jnp.where(ok, topk_weights.astype(jnp.float32), 0.0).reshape(-1)
        order = jnp.argsort(ids, stable=True)
        rows = order // k
        sizes = jnp.bincount(ids, length=e).astype(jnp.int32)
        xs = x.astype(jnp.float32)[rows]
        w13 = jnp.swapaxes(_value(self.w13).astype(jnp.float32), 1, 2)  # [E, H, 2I]
        gu = jax.lax.ragged_dot(xs, w13, sizes, precision=hi, preferred_element_type=jnp.float32)
        h = _clamped_swiglu(gu[:, :i], gu[:, i:], activation_clamp) * wts[order][:, None]
        w2 = jnp.swapaxes(_value(self.w2).astype(jnp.float32), 1, 2)  # [E, I, H]
        ys = jax.lax.ragged_dot(h, w2, sizes, precision=hi, preferred_element_type=jnp.float32)
        return jnp.zeros((t, self.hidden_size), jnp.float32).at[rows].add(ys)


# ---------------------------------------------------------------------------------------------
# The MoE block
# ---------------------------------------------------------------------------------------------


def _key_is_concrete(key: jax.Array) -> bool:
    return not isinstance(key, jax.core.Tracer)


def _seed_from_key(key: jax.Array) -> np.random.SeedSequence:
    data = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
    return np.random.SeedSequence([int(v) for v in data.reshape(-1).astype(np.uint64)])


@dataclasses.dataclass(frozen=True)
class MoEBlockOptions:
    """The rarely used options of :class:`DeepseekV4MoE`, grouped so the constructor keeps a short
    signature (frozen; hashable while ``weights`` is None).

    ``weights``: ready ``jax_megamoe.layout.MoEWeights`` (e.g. from a checkpoint) instead of random
    experts. ``is_mtp``: the block of the MTP layer (never hash-routed). ``progress``: passed to the
    random-expert generator (None / bool / ``callback(done, total)``). ``mesh`` / ``ep_axis`` /
    ``ep_dispatch``: expert parallelism (see :class:`DeepseekV4MoE`); ``ep_dispatch`` is one of
    ``jax_megamoe.parallel.DISPATCHES``. ``policy``: a :class:`jax_megamoe.policy.Policy` (default:
    the process policy, read once when the block is built).
    """

    weights: MoEWeights | None = None
    is_mtp: bool = False
    progress: Callable[[int, int], None] | bool | None = None
    mesh: jax.sharding.Mesh | None = None
    ep_axis: str = "ep"
    ep_dispatch: str = "auto"
    policy: Policy | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and not isinstance(self.weights, MoEWeights):
            raise TypeError(
                f"MoEBlockOptions.weights: expected a jax_megamoe.layout.MoEWeights or None, "
                f"got {type(self.weights).__name__}"
            )
        if not isinstance(self.is_mtp, (bool, np.bool_)):
            raise TypeError(f"MoEBlockOptions.is_mtp: expected a bool, got {self.is_mtp!r}")
        if self.progress is not None and not isinstance(self.progress, bool) and not callable(self.progress):
            raise TypeError(
                f"MoEBlockOptions.progress: expected None, a bool or a callback(done, total), got {self.progress!r}"
            )
        if self.mesh is not None and not isinstance(self.mesh, jax.sharding.Mesh):
            raise TypeError(
                f"MoEBlockOptions.mesh: expected a jax.sharding.Mesh or None, got {type(self.mesh).__name__}"
            )
        if not isinstance(self.ep_axis, str) or not self.ep_axis:
            raise TypeError(
                f"MoEBlockOptions.ep_axis: expected a mesh axis name (a non-empty str), got {self.ep_axis!r}"
            )
        if self.mesh is not None and self.ep_axis not in self.mesh.axis_names:
            raise ValueError(
                f"MoEBlockOptions.ep_axis: {self.ep_axis!r} is not an axis of the mesh {tuple(self.mesh.axis_names)}"
            )
        if self.ep_dispatch not in parallel.DISPATCHES:
            raise ValueError(
                f"MoEBlockOptions.ep_dispatch: {self.ep_dispatch!r} is not one of {', '.join(parallel.DISPATCHES)}"
            )
        if self.policy is not None and not isinstance(self.policy, Policy):
            raise TypeError(
                f"MoEBlockOptions.policy: expected a jax_megamoe.policy.Policy or None, got {type(self.policy).__name__}"
            )

    @staticmethod
    def of(options: MoEBlockOptions | None) -> MoEBlockOptions:
        """``options``, or the defaults for None (a TypeError naming the argument otherwise)."""
        if options is None:
            return MoEBlockOptions()
        return check_instance("options", options, MoEBlockOptions, "a jax_megamoe.models.deepseek_v4.MoEBlockOptions")


def _shared_expert(
    config: DeepseekV4Config, rngs: nnx.Rngs, param_dtype: Any, *, exact: bool
) -> DeepseekV4SharedExpert | None:
    """The block's shared expert (``None`` for ``n_shared_experts == 0``), for either expert kind."""
    if config.n_shared_experts == 0:
        return None
    return DeepseekV4SharedExpert(
        config.hidden_size,
        config.shared_intermediate_size,
        swiglu_limit=config.swiglu_limit,
        rngs=rngs,
        exact=exact,
        param_dtype=param_dtype,
    )


class DeepseekV4MoE(nnx.Module):
    """One DeepSeek V4 MoE layer: ``(x bf16[T, H], token_ids int32[T] | None) -> bf16[T, H]``.

    ``gate`` (:class:`DeepseekV4Gate`) -> routed experts (``experts``, a :class:`RoutedExperts`
    holding a ``jax_megamoe.layout.MoEWeights`` in ``mode``; run through :func:`_routed_experts`
    with ``activation_clamp = config.swiglu_limit`` and rho already in the weights) -> plus
    ``shared_experts`` (:class:`DeepseekV4SharedExpert`, None when ``n_shared_experts == 0``),
    added in fp32 and rounded to bf16 once. No residual.

    ``mode``: the kernel mode the experts are built for; None resolves it the way the ops do
    (``fp8`` on an sm_90 GPU, else the environment's sm_100 mode, ``fp8xfp4`` by default).
    ``options`` (:class:`MoEBlockOptions`) holds the rarely used settings below.
    ``weights``: ready ``MoEWeights`` (e.g. from a checkpoint); when None the experts are random
    MXFP4 bytes (:func:`random_moe_checkpoint`, seeded from ``rngs.params()``) converted with
    ``MoEWeights.from_checkpoint``; ``progress`` is passed to the generator.
    ``token_ids`` are required on hash layers (``layer_idx < num_hash_layers``, not MTP).
    ``mesh``/``ep_axis``/``ep_dispatch``: when a mesh is given the routed experts are placed
    ``P(ep_axis)`` on the expert dim and run through :func:`jax_megamoe.parallel.ep_moe` with
    ``dispatch=ep_dispatch``. ``"auto"`` takes the fused intranode kernel where it can run (one
    process, sm_90 GPUs, mode fp8, T/n within the kernel's cap: the same bits as the single-GPU
    kernel on 2 x H200) and the collective path elsewhere (bit for bit the single-device result).
    ``policy``: the settings the calls do not give (:class:`jax_megamoe.policy.Policy`; default the
    process policy, read once), kept with the block.

    ``experts="exact"``: the routed experts are :class:`ExactExperts` (dense ``param_dtype``
    weights, f32 math, no FP8/FP4 activation quantization; no kernel shape constraints, no mesh),
    the shared expert runs exact too, ``x`` may be f32 or bf16 and the result has ``x``'s dtype.
    ``param_dtype`` is the dtype of the gate, shared-expert and exact-expert weights (bf16 default).
    """

    def __init__(
        self,
        config: DeepseekV4Config,
        layer_idx: int,
        *,
        backend: str = "auto",
        mode: str | None = None,
        experts: str = "quantized",
        param_dtype: Any = jnp.bfloat16,
        rngs: nnx.Rngs,
        options: MoEBlockOptions | None = None,
    ) -> None:
        if not isinstance(config, DeepseekV4Config):
            raise TypeError(f"config: expected a DeepseekV4Config, got {type(config).__name__}")
        opts = MoEBlockOptions.of(options)
        if experts not in EXPERT_KINDS:
            raise ValueError(f"experts: {experts!r} is not one of {', '.join(EXPERT_KINDS)}")
        exact = experts == "exact"
        if exact and opts.mesh is not None:
            raise ValueError("options.mesh: experts='exact' runs on one device; use experts='quantized' with a mesh")
        if exact and opts.weights is not None:
            raise ValueError("options.weights: MoEWeights are quantized experts; experts='exact' takes dense weights")
        self.expert_kind = experts
        self.backend = _check_backend(backend)
        self.config = config
        if exact:
            self.mesh, self.ep_axis, self.ep_dispatch = None, "ep", "auto"
            self.policy = None
            self.mode = None
        else:
            # Expert parallelism (jax_megamoe.parallel.ep_moe) over mesh axis ep_axis; None: one device.
            self.mesh, self.ep_axis, self.ep_dispatch = opts.mesh, opts.ep_axis, opts.ep_dispatch
            if opts.weights is not None and mode is None:
                mode = getattr(opts.weights, "mode", None)
            # Every setting the block's calls do not give (token cap, graph targets, sm_100 mode, ...):
            # frozen here, so every trace of this block sees the same values.
            self.policy = _policy.resolve(opts.policy)
            self.mode = _policy.resolve_mode(mode, ops.device_arch(), self.policy)
            _cfg.validate_moe_shape(
                hidden=config.hidden_size,
                intermediate=config.moe_intermediate_size,
                num_experts=config.n_routed_experts,
                top_k=config.num_experts_per_tok,
                mode=self.mode,
            )
        self.gate = DeepseekV4Gate(config, layer_idx, rngs=rngs, is_mtp=opts.is_mtp, param_dtype=param_dtype)
        self.layer_idx = self.gate.layer_idx
        self.is_hash_layer = self.gate.is_hash_layer
        if exact:
            self.experts = ExactExperts(
                config.n_routed_experts,
                config.hidden_size,
                config.moe_intermediate_size,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            self.experts = RoutedExperts(self._routed_weights(rngs, opts))
        self.shared_experts = _shared_expert(config, rngs, param_dtype, exact=exact)

    def _routed_weights(self, rngs: nnx.Rngs, opts: MoEBlockOptions) -> MoEWeights:
        """``opts.weights`` (checked) or random experts, placed over the mesh when there is one."""
        weights = opts.weights
        if weights is None:
            key = rngs.params()
            if _key_is_concrete(key):
                ckpt = random_moe_checkpoint(self.config, _seed_from_key(key), progress=opts.progress)
            else:
                ckpt = _random_moe_checkpoint_jax(self.config, key)
            weights = MoEWeights.from_checkpoint(*ckpt, mode=self.mode)
        else:
            self._check_weights(weights)
        if self.mesh is not None:
            weights = parallel.shard_weights(weights, self.mesh, self.ep_axis)  # E/n experts per device, placed once
        return weights

    @classmethod
    def from_checkpoint(cls, path: CheckpointSource, layer_idx: int, **kwargs: Any) -> DeepseekV4MoE:
        """The block of layer ``layer_idx`` with every parameter loaded from a DeepSeek V4
        safetensors checkpoint folder, or from a folder written by ``python -m jax_megamoe.convert``.

        Takes :func:`load_moe_block`'s keywords (``backend``, ``mode``, ``config``, ``rngs``,
        ``load_options``, ``options``, then the constructor's), which keeps that one signature.
        ``config``: None infers it from the checkpoint's ``config.json`` (checked against the tensor
        shapes). ``load_options`` (:class:`BlockLoadOptions`): how the checkpoint is read;
        ``options`` (:class:`MoEBlockOptions`, no ``weights``) and other keyword arguments go to
        the constructor. See :func:`load_moe_block` (and
        :func:`jax_megamoe.checkpoint.load_moe_layer` for the FP4 -> FP8 conversion report of mode
        ``'fp8'``).
        """
        return load_moe_block(cls, path, layer_idx, **kwargs)

    def _check_weights(self, weights: Any) -> None:
        cfg = self.config
        want = {
            "mode": self.mode,
            "hidden": cfg.hidden_size,
            "intermediate": cfg.moe_intermediate_size,
            "num_experts": cfg.n_routed_experts,
        }
        for attr, v in want.items():
            got = getattr(weights, attr, v)
            if got != v:
                raise ValueError(f"weights: {attr} = {got!r} does not match the block's {attr} = {v!r}")

    @property
    def moe_weights(self) -> MoEWeights:
        """The routed experts' ``MoEWeights`` (quantized experts only)."""
        if self.expert_kind != "quantized":
            raise ValueError("experts: this block has exact (dense) experts, not MoEWeights")
        return _value(self.experts)

    def _call_exact(self, x: jax.Array, token_ids: jax.Array | None) -> jax.Array:
        cfg = self.config
        _check_x(x, cfg.hidden_size, dtypes=_BF16_OR_F32)
        if token_ids is not None:
            _check_token_ids(token_ids, x.shape[0])
        if x.shape[0] == 0:
            return jnp.zeros((0, cfg.hidden_size), x.dtype)
        topk_idx, topk_weights = self.gate(x, token_ids)
        y = self.experts(x, topk_idx, topk_weights, cfg.activation_clamp)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.astype(x.dtype)

    def __call__(self, x: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        if self.expert_kind == "exact":
            return self._call_exact(x, token_ids)
        cfg = self.config
        _check_x(x, cfg.hidden_size)
        t = x.shape[0]
        if token_ids is not None:
            _check_token_ids(token_ids, t)
        if t == 0:
            return jnp.zeros((0, cfg.hidden_size), jnp.bfloat16)
        topk_idx, topk_weights = self.gate(x, token_ids)
        if self.mesh is not None:
            # Gate and shared expert follow x's sharding (their weights are replicated); the routed
            # experts run sharded over ep_axis (T padded to a multiple of the axis size).
            y = parallel.ep_moe(
                x, topk_idx, topk_weights, self.moe_weights, mesh=self.mesh, axis=self.ep_axis,
                mode=self.mode, options=parallel.EPOptions(
                    activation_clamp=cfg.activation_clamp, backend=self.backend, dispatch=self.ep_dispatch,
                    pad_tokens=True, policy=self.policy,
                ),
            )  # fmt: skip
        else:
            y = _routed_experts(
                x, topk_idx, topk_weights, self.moe_weights, self.backend, activation_clamp=cfg.activation_clamp,
                policy=self.policy,
            )  # fmt: skip
        if self.shared_experts is not None:
            y = (y.astype(jnp.float32) + self.shared_experts(x)).astype(jnp.bfloat16)
        return y


# ---------------------------------------------------------------------------------------------
# Loading a block from a checkpoint
# ---------------------------------------------------------------------------------------------


#: The block class :func:`load_moe_block` builds (``DeepseekV4MoE`` or a subclass).
_Block = TypeVar("_Block", bound="DeepseekV4MoE")


def apply_layer(layer: MoELayer, block: _Block) -> _Block:
    """Set ``block``'s gate and shared-expert parameters to ``layer``'s (returns ``block``)."""
    gate = block.gate
    if bool(gate.is_hash_layer) != layer.is_hash_layer:
        raise ValueError(
            f"block: layer {block.layer_idx} is {'' if gate.is_hash_layer else 'not '}hash-routed but the loaded "
            f"layer {layer.layer_idx} is {'' if layer.is_hash_layer else 'not '}hash-routed"
        )

    def put(var: Any, value: np.ndarray, what: str) -> None:
        cur = var.get_value()
        if tuple(cur.shape) != tuple(value.shape) or np.dtype(cur.dtype) != value.dtype:
            raise ValueError(
                f"block: {what} is {np.dtype(cur.dtype).name}{list(cur.shape)} but the checkpoint gives "
                f"{value.dtype.name}{list(value.shape)}"
            )
        var.set_value(jnp.asarray(value))

    put(gate.weight, layer.gate_weight, "gate.weight")
    if layer.is_hash_layer:
        put(gate.tid2eid, layer.tid2eid, "gate.tid2eid")
    else:
        put(gate.bias, layer.gate_bias, "gate.bias")
    if layer.shared is not None:
        if block.shared_experts is None:
            raise ValueError("block: has no shared expert but the checkpoint layer has one")
        s = layer.shared
        block.shared_experts.load_fp8(s["w1"], s["w1_scale"], s["w2"], s["w2_scale"], s["w3"], s["w3_scale"])
    elif block.shared_experts is not None:
        raise ValueError("block: has a shared expert but the checkpoint layer has none")
    return block


@dataclasses.dataclass(frozen=True)
class BlockLoadOptions:
    """How :func:`load_moe_block` / :meth:`DeepseekV4MoE.from_checkpoint` read a checkpoint (frozen,
    hashable), grouped so the calls keep a short signature.

    ``progress``: a progress bar for reading the experts (None / bool / a description str /
    ``callback(done, total)``, as :func:`jax_megamoe.checkpoint.load_moe_layer`). ``nibble_order``:
    the FP4 nibble order of the checkpoint (``"low_even"`` | ``"high_even"``). ``verify``: check a
    converted folder's SHA-256 (False skips it). ``allow_nan_scales``: accept UE8M0 scale bytes
    ``0xFF`` (NaN) instead of refusing them.
    """

    progress: ProgressArg = None
    nibble_order: str = "low_even"
    verify: bool = True
    allow_nan_scales: bool = False

    def __post_init__(self) -> None:
        p = self.progress
        if p is not None and not isinstance(p, (bool, str)) and not callable(p):
            raise TypeError(
                f"BlockLoadOptions.progress: expected None, a bool, a str or a callback(done, total), got {p!r}"
            )
        if self.nibble_order not in _NIBBLE_ORDERS:
            raise ValueError(
                f"BlockLoadOptions.nibble_order: {self.nibble_order!r} is not one of {', '.join(_NIBBLE_ORDERS)}"
            )
        for name in ("verify", "allow_nan_scales"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"BlockLoadOptions.{name}: expected a bool, got {v!r}")

    @staticmethod
    def of(options: BlockLoadOptions | None) -> BlockLoadOptions:
        """``options``, or the defaults for None (a TypeError naming the argument otherwise)."""
        if options is None:
            return BlockLoadOptions()
        return check_instance(
            "load_options", options, BlockLoadOptions, "a jax_megamoe.models.deepseek_v4.BlockLoadOptions"
        )


def load_moe_block(
    cls: type[_Block],
    path: CheckpointSource,
    layer_idx: int,
    *,
    backend: str = "auto",
    mode: str | None = None,
    config: DeepseekV4Config | Mapping[str, Any] | None = None,
    rngs: nnx.Rngs | None = None,
    load_options: BlockLoadOptions | None = None,
    options: MoEBlockOptions | None = None,
    **block_kwargs: Any,
) -> _Block:
    """``cls(config, layer_idx, backend=..., mode=..., options=MoEBlockOptions(weights=...))`` with
    every parameter loaded.

    ``path`` is a checkpoint (see :func:`load_moe_layer`) or a folder written by
    ``python -m jax_megamoe.convert`` (recognised by its per-layer manifest; its mode must match
    ``mode`` when one is given). ``load_options`` (:class:`BlockLoadOptions`): progress, nibble
    order, ``verify`` (the converted folder's SHA-256 check) and ``allow_nan_scales`` (as in
    :func:`load_moe_layer`). ``options`` (:class:`MoEBlockOptions`, its ``weights`` None: the
    loaded experts take their place) and extra keyword arguments go to the block's constructor.
    """
    lo = BlockLoadOptions.of(load_options)
    block_opts = MoEBlockOptions.of(options)
    if block_opts.weights is not None:
        raise ValueError("options.weights: the loaded checkpoint gives the experts; pass options without weights")
    nibble_order, verify, allow_nan_scales, progress = lo.nibble_order, lo.verify, lo.allow_nan_scales, lo.progress
    if convert.is_converted_dir(path, layer_idx):
        layer = convert.load_converted(path, layer_idx, verify=verify)
        if mode is not None and mode != layer.mode:
            raise CheckpointError(
                f"{path}: layer {layer_idx} was converted for mode {layer.mode!r}, mode {mode!r} was requested; "
                "convert it again with that mode"
            )
        if config is not None and not isinstance(config, Mapping) and config != layer.config:
            raise CheckpointError(f"{path}: layer {layer_idx} was converted with config {layer.config}, not {config}")
    else:
        layer = load_moe_layer(
            path,
            layer_idx,
            mode=mode,
            config=config,
            nibble_order=nibble_order,
            progress=progress,
            allow_nan_scales=allow_nan_scales,
        )
    block = cls(
        layer.config,
        layer_idx,
        backend=backend,
        mode=layer.mode,
        rngs=nnx.Rngs(0) if rngs is None else rngs,
        options=dataclasses.replace(block_opts, weights=layer.weights),
        **block_kwargs,
    )
    return apply_layer(layer, block)
