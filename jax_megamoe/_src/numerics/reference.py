"""Pure-JAX pre-dispatch and Mega MoE: the definition of correct.

This module computes exactly what DeepGEMM's Mega MoE kernels compute (sgl-deep-gemm 0.2.5),
step for step in the same precisions, on any JAX backend. It is

* the oracle every GPU kernel is tested against (``pre_dispatch`` bit for bit,
  ``mega_moe`` up to accumulation order, see below), and
* the CPU path of :mod:`jax_megamoe.ops` (and the fallback for shapes the kernels reject).

Numerics (``deepgemm-mega-moe.md`` sections 6, 7 and 14):

``pre_dispatch``
    The bytes the pre-dispatch kernel writes into the input slots of the symmetric buffer.
    sm_100 modes quantise ``x`` per 32 columns with UE8M0 scales (amax floor ``1e-4``; MXFP4 codes
    for ``"mxf4xmxf4"``, e4m3 for ``"fp8xfp4"``); sm_90 ``"fp8"`` quantises per 128 columns with
    an f32 scale ``amax / 448``.

``mega_moe``, sm_100 (``"mxf4xmxf4"``, ``"fp8xfp4"``)
    For every token ``t`` and slot ``k`` with expert ``e = topk_idx[t, k] >= 0``::

        xd  = dequant(quant(x[t]))                       # as pre_dispatch, exact in f32
        h   = W1d[e] @ xd                                # f32, W1d = [gate | up] rows
        g   = bf16(h[:I]);  u = bf16(h[I:])              # rounded to bf16 first
        g   = min(g, C);    u = clip(u, -C, C)           # clamp in bf16 (C = bf16(f32(clamp)))
        g   = f32(g); u = f32(u)
        a   = ((g * (1 / (1 + exp(-g)))) * u) * w[t, k]  # every step f32 round-to-nearest
        ad  = dequant(requant(a))                        # per 32, UE8M0, no amax floor
        o_k = bf16(W2d[e] @ ad)
        y[t] = bf16(0 + f32(o_k0) + f32(o_k1) + ...)     # valid slots, ascending k

    Tokens without a valid slot give exactly 0.

``mega_moe``, sm_90 (``"fp8"``)
    Same structure with per-128 FP8 activations (f32 non-power-of-two scales), FP8 weights with
    128x128 f32 block scales, **no** bf16 rounding before the clamp (it clamps the f32 accumulator)
    and a per-128 requantisation with ``sf = fl(max(amax, 1e-10) * fl(1/448))``, ``inv = 1 / sf``.

What is and is not bitwise
    Pre-dispatch bytes are bitwise. The mega kernels accumulate block-scaled MMAs in their own order,
    so ``y`` agrees with a kernel up to accumulation rounding, which can occasionally flip one FP4/FP8
    code of the intermediate. Matmuls here run in f32 with ``Precision.HIGHEST``.
    ``fast_math`` is accepted for API parity with the kernels but ignored: the reference always uses an
    accurate ``exp`` (XLA's, within 2 ulp of ``expf`` like CUDA's) and a true division (the kernels'
    ``__expf`` / ``rcp.approx`` are not emulated). XLA:CPU flushes f32 subnormals in float arithmetic;
    the quantisers in :mod:`jax_megamoe.quant` work on bits where that could change a byte, and the
    remaining float steps (SwiGLU, matmuls) only lose values below 2^-126. NaN/inf activations are
    not a supported input: the clamp here propagates NaN (``jnp.minimum``) where the kernels' ``__hmin2``
    / ``cute::min`` may return the clamp constant.

Memory
    One DeepSeek V4-Flash layer's routed experts are 3.2 GB of packed FP4 but 25 GB as f32. ``mega_moe``
    therefore streams experts: (token, slot) pairs are sorted by expert, a ``while_loop`` visits only the
    experts that received rows, dequantises that one expert (W1 ``[2I, H]`` and W2 ``[H, I]`` in f32) and
    runs its rows through in fixed-size chunks. Weights are never gathered per token and never
    dequantised all at once; an expert nobody routed to is never dequantised.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_megamoe._src.numerics import config, quant
from jax_megamoe._src.numerics._validate import (
    ArrayIn,
    check_routing,
    is_traced,
    static_float,
    static_int,
)  # fmt: skip
from jax_megamoe._src.numerics.layout import MoEWeights

_HIGHEST = lax.Precision.HIGHEST

#: Largest number of (token, slot) rows one expert step pushes through its matmuls at once.
MAX_CHUNK_ROWS = 128
#: Smallest chunk (unless there are fewer rows than that in the whole call).
MIN_CHUNK_ROWS = 16


class PreDispatched(NamedTuple):
    """The four input slots of the symmetric buffer, as the kernels read them (``P`` = capacity).

    ``x``: ``uint8[P, H/2]`` MXFP4 codes (``"mxf4xmxf4"``) or ``float8_e4m3fn[P, H]``;
    ``x_sf``: ``int32[P, H/128]`` (four UE8M0 bytes, sm_100) or ``float32[P, H/128]`` (sm_90);
    ``topk_idx``: ``int64[P, K]`` under x64, else ``int32[P, K]`` (same values), ``-1`` = unused;
    ``topk_weights``: ``float32[P, K]``.
    """

    x: jax.Array
    x_sf: jax.Array
    topk_idx: jax.Array
    topk_weights: jax.Array


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


_check_routing = check_routing  # one definition (numerics._validate), used by the ops too


def _check_scaling(routed_scaling_factor: Any) -> None:
    """Reject a non-finite or non-numeric factor when it is concrete (a traced one is data)."""
    if is_traced(routed_scaling_factor):
        return
    static_float("routed_scaling_factor", routed_scaling_factor, finite=True)


def _check_num_max_tokens(num_max_tokens: Any, t: int) -> int:
    n = static_int("num_max_tokens", num_max_tokens, lo=1)
    if t > n:
        raise ValueError(f"x: {t} tokens exceed num_max_tokens={n}")
    return n


_INT32_MIN, _INT32_END = -(2**31), 2**31


def route_ids(topk_idx: ArrayIn, num_experts: int | None = None) -> jax.Array:
    """``topk_idx`` as int32, every id outside ``[0, num_experts)`` replaced by ``-1`` (routes nowhere).

    The range test happens in the ids' own dtype, *before* the cast: an int64 id ``>= 2**31`` cast
    first would wrap onto a real expert. A concrete NumPy int64 array is handled in NumPy, because
    with x64 off JAX itself would truncate it to int32 on the way in. With ``num_experts=None``
    (pre-dispatch, which copies ids as data) only ids outside the int32 range become ``-1``.
    """
    lo, end = (_INT32_MIN, _INT32_END) if num_experts is None else (0, int(num_experts))
    if isinstance(topk_idx, np.ndarray):
        ids = np.asarray(topk_idx)
        return jnp.asarray(np.where((ids >= lo) & (ids < end), ids, -1).astype(np.int32))
    ids = jnp.asarray(topk_idx)
    if num_experts is None and ids.dtype == jnp.int32:
        return ids
    info = jnp.iinfo(ids.dtype)
    keep = jnp.ones(ids.shape, jnp.bool_)
    if lo > info.min:
        keep = keep & (ids >= lo)
    if end <= info.max:
        keep = keep & (ids < end)
    return jnp.where(keep, ids, jnp.asarray(-1, ids.dtype)).astype(jnp.int32)


def _scale_weights(topk_weights: jax.Array, routed_scaling_factor: jax.Array) -> jax.Array:
    """``topk_weights * routed_scaling_factor`` in f32.

    The sm_90 pre-dispatch kernel does this multiply itself; the sm_100 kernel has no factor, so the
    caller folds it in with the same f32 multiply first. Both give the same bits (``w * 1.0f == w``).
    """
    return topk_weights.astype(jnp.float32) * jnp.asarray(routed_scaling_factor, jnp.float32)


def _idx_dtype() -> Any:
    """int64 where JAX can hold it (x64 on), else int32: JAX canonicalises int64 away with x64 off."""
    return jax.dtypes.canonicalize_dtype(jnp.int64)


# --------------------------------------------------------------------------------------------
# Activation quantisation (pre-dispatch formats) and the intermediate requantisation
# --------------------------------------------------------------------------------------------


def quantize_activations(x: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """``x`` bf16 ``[T, H]`` -> (codes, scales) in the pre-dispatch format of ``mode`` (bit-exact)."""
    if mode == "mxf4xmxf4":
        return quant.quantize_mxfp4(x)
    if mode == "fp8xfp4":
        return quant.quantize_fp8_ue8m0(x, group=32)
    return quant.quantize_fp8_per128(x)


def dequantize_activations(q: jax.Array, sf: jax.Array, mode: str) -> jax.Array:
    """Inverse of :func:`quantize_activations`, exact in f32."""
    if mode == "mxf4xmxf4":
        return quant.dequantize_mxfp4(q, sf)
    if mode == "fp8xfp4":
        return quant.dequantize_fp8_ue8m0(q, sf, group=32)
    return quant.dequantize_fp8_per128(q, sf)


def requantize_intermediate(a: jax.Array, mode: str) -> jax.Array:
    """The L1 epilogue's requantisation of ``a`` f32 ``[..., I]``, returned dequantised (f32).

    sm_100: per 32 columns, ``e = log2_ceil(fl(amax * fl(1/FMAX)))`` (no amax floor), codes
    ``rn.satfinite(a * 2^-e)`` in E2M1 (``"mxf4xmxf4"``) or e4m3 (``"fp8xfp4"``).
    sm_90: per 128 columns, ``sf = fl(max(amax, 1e-10) * fl(1/448))``, ``q = e4m3(a * (1 / sf))``.
    This is :func:`jax_megamoe.quant.fake_requant`; the dequantised value is the L2 GEMM's operand.
    """
    return quant.fake_requant(a, mode)


# --------------------------------------------------------------------------------------------
# Per-expert math
# --------------------------------------------------------------------------------------------


def swiglu(h: jax.Array, w: jax.Array, *, mode: str, activation_clamp: float | None) -> jax.Array:
    """L1 epilogue before requantisation: ``h`` f32 ``[M, 2I]`` ([gate | up]), ``w`` f32 ``[M]``.

    Returns ``a = ((silu(g) * u) * w)`` f32 ``[M, I]`` with the mode's rounding and clamp.
    """
    i = h.shape[-1] // 2
    g, u = h[..., :i], h[..., i:]
    clamp = None if activation_clamp is None or math.isinf(float(activation_clamp)) else float(activation_clamp)
    if mode in config.SM100_MODES:
        # Rounded to bf16 first, clamped in bf16 (the kernel's constant is f32 -> bf16 RN).
        g = g.astype(jnp.bfloat16)
        u = u.astype(jnp.bfloat16)
        if clamp is not None:
            c = jnp.asarray(clamp, jnp.float32).astype(jnp.bfloat16)
            g = jnp.minimum(g, c)
            u = jnp.minimum(jnp.maximum(u, -c), c)
        g = g.astype(jnp.float32)
        u = u.astype(jnp.float32)
    elif clamp is not None:
        # sm_90 clamps the f32 accumulator directly.
        c = jnp.float32(clamp)
        g = jnp.minimum(g, c)
        u = jnp.minimum(jnp.maximum(u, -c), c)
    one = jnp.float32(1.0)
    # A true IEEE division: XLA rewrites ``x / broadcast(c)`` into ``x * (1/c)``, but not this form
    # (full-shape divisor), so ``sig`` is the correctly rounded quotient like the kernel's ``1.0f / d``.
    sig = one / (one + jnp.exp(-g))
    silu = g * sig
    return (silu * u) * w.astype(jnp.float32)[..., None]


def expert_ffn(
    xd: jax.Array,
    w13: jax.Array,
    w2: jax.Array,
    w: jax.Array,
    *,
    mode: str,
    activation_clamp: float | None = None,
) -> jax.Array:
    """One expert on ``M`` rows: ``xd`` f32 ``[M, H]`` (dequantised activations), ``w13`` f32 ``[2I, H]``
    ([gate | up] rows), ``w2`` f32 ``[H, I]``, ``w`` f32 ``[M]`` routing weights -> ``bf16[M, H]``
    (the expert's combine slot, weight already applied)."""
    h = lax.dot_general(xd, w13, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32)
    a = swiglu(h, w, mode=mode, activation_clamp=activation_clamp)
    ad = requantize_intermediate(a, mode)
    o = lax.dot_general(ad, w2, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32)
    return o.astype(jnp.bfloat16)


# --------------------------------------------------------------------------------------------
# pre_dispatch
# --------------------------------------------------------------------------------------------


def pre_dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    *,
    mode: config.Mode,
    num_max_tokens: int,
    routed_scaling_factor: float = 1.0,
) -> PreDispatched:
    """The bytes DeepGEMM's pre-dispatch kernel writes into the buffer's input slots.

    Args:
      x: bf16 ``[T, H]``, ``T <= num_max_tokens``, ``H`` a multiple of 128.
      topk_idx: int32 (or int64) ``[T, K]``; ``-1`` marks an unused slot. Values are data, copied as
        they are, except int64 ids outside the int32 range, which become ``-1`` (the kernel reads int32
        ids; a cast would wrap them onto real experts).
      topk_weights: f32 ``[T, K]``.
      mode: ``"mxf4xmxf4"``, ``"fp8xfp4"`` (sm_100, per-32 UE8M0) or ``"fp8"`` (sm_90, per-128 f32 scale).
      num_max_tokens: the buffer's capacity ``P``, used **as given** for the row count of every output.
        It is not rounded up: pass the capacity the buffer was allocated with (for the kernels that is
        :func:`jax_megamoe.config.align_token_cap` of the requested cap).
      routed_scaling_factor: finite; multiplied into ``topk_weights`` in f32. The sm_90 kernel does that
        multiply itself; the sm_100 kernel has no factor, and folding it in with the same f32 multiply
        before the kernel gives the same bits, which is what this function returns for sm_100 modes.

    Returns:
      :class:`PreDispatched` with ``P`` rows. Rows ``>= T`` of ``topk_idx`` are ``-1`` and of
      ``topk_weights`` ``0``, as the kernel writes them. The kernel leaves rows ``>= T`` of ``x`` and
      ``x_sf`` untouched (the mega kernel never reads them); here they are defined as zero.
      ``topk_idx`` is int64 when ``jax_enable_x64`` is on; with x64 off JAX cannot hold int64, so the
      same values come back as int32.
    """
    config.check_mode(mode)
    t, h, k = _check_routing(x, topk_idx, topk_weights)
    config.validate_pre_dispatch_shape(hidden=h, top_k=k, mode=mode)
    cap = _check_num_max_tokens(num_max_tokens, t)
    _check_scaling(routed_scaling_factor)
    rsf = jnp.asarray(routed_scaling_factor, jnp.float32)
    return _pre_dispatch_jit(x, route_ids(topk_idx), topk_weights, rsf, mode=mode, cap=cap)


@partial(jax.jit, static_argnames=("mode", "cap"))
def _pre_dispatch_jit(x, topk_idx, topk_weights, routed_scaling_factor, *, mode: str, cap: int) -> PreDispatched:
    t, h = x.shape
    k = topk_idx.shape[1]
    pad = cap - t
    if t > 0:
        xq, xsf = quantize_activations(x, mode)
    else:  # nothing to quantise; every row is padding
        xq, xsf = _empty_act_slots(0, h, mode)
    xq = jnp.pad(xq, ((0, pad), (0, 0)))
    xsf = jnp.pad(xsf, ((0, pad), (0, 0)))
    w = jnp.pad(_scale_weights(topk_weights, routed_scaling_factor), ((0, pad), (0, 0)))
    idx = jnp.pad(topk_idx.astype(_idx_dtype()), ((0, pad), (0, 0)), constant_values=-1)
    assert idx.shape == (cap, k)
    return PreDispatched(xq, xsf, idx, w)


def _empty_act_slots(rows: int, h: int, mode: str) -> tuple[jax.Array, jax.Array]:
    if mode == "mxf4xmxf4":
        return jnp.zeros((rows, h // 2), jnp.uint8), jnp.zeros((rows, h // 128), jnp.int32)
    if mode == "fp8xfp4":
        return jnp.zeros((rows, h), jnp.float8_e4m3fn), jnp.zeros((rows, h // 128), jnp.int32)
    return jnp.zeros((rows, h), jnp.float8_e4m3fn), jnp.zeros((rows, h // 128), jnp.float32)


# --------------------------------------------------------------------------------------------
# mega_moe
# --------------------------------------------------------------------------------------------


def _check_weights(weights: Any, mode: str, hidden: int, top_k: int) -> None:
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights: expected a jax_megamoe.layout.MoEWeights, got {type(weights).__name__}")
    weights.validate_for(mode, hidden=hidden)
    if top_k > weights.num_experts:
        raise ValueError(f"topk_idx: top_k={top_k} exceeds num_experts={weights.num_experts}")
    if mode in config.SM100_MODES and top_k > config.MAX_TOPK_SM100:
        raise ValueError(f"topk_idx: top_k={top_k} exceeds the sm_100 kernel's limit of {config.MAX_TOPK_SM100}")
    if weights.intermediate % config.ACT_GROUP[mode] != 0:
        raise ValueError(
            f"weights: intermediate={weights.intermediate} must be a multiple of {config.ACT_GROUP[mode]} "
            f"(the requantisation group of mode {mode!r})"
        )


def default_chunk_rows(num_rows: int, num_experts: int) -> int:
    """Rows per expert step: about the mean rows per expert, a power of two in [16, 128]."""
    mean = -(-num_rows // max(1, min(num_experts, num_rows)))
    c = 1 << max(0, (mean - 1).bit_length())
    return max(1, min(num_rows, max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, c))))


def mega_moe(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    mode: config.Mode,
    activation_clamp: float | None = None,
    options: config.MoEOptions | None = None,
) -> jax.Array:
    """Routed experts of one MoE layer, as the Mega MoE kernel computes them -> ``bf16[T, H]``.

    Args:
      x: bf16 ``[T, H]``, ``H`` a multiple of 128 and equal to ``weights.hidden``.
      topk_idx: int32 (or int64) ``[T, K]``; ``-1`` (any negative id) skips the slot. Ids ``>= E``
        (``weights.num_local_experts``: the reference is one rank holding every expert) are skipped
        too; the kernel's behaviour for them is undefined.
      topk_weights: f32 ``[T, K]``, applied before the requantisation (as the kernel does).
      weights: a :class:`jax_megamoe.layout.MoEWeights` built for ``mode``.
      mode: ``"mxf4xmxf4"``, ``"fp8xfp4"`` or ``"fp8"``; static.
      activation_clamp: ``None`` (no clamp) or a number ``>= 0``: gate ``min(g, C)``, up
        ``clip(u, -C, C)``; static.
      options: a :class:`jax_megamoe.ops.MoEOptions` (default: none set). Read here:
        ``routed_scaling_factor``, multiplied into ``topk_weights`` in f32 (sm_90: inside
        pre-dispatch; sm_100: folded in before it, same bits); ``num_max_tokens``: when given, ``T``
        must not exceed it (the kernel's buffer capacity); ``chunk_rows``: rows per expert step
        (static; default :func:`default_chunk_rows`), which only changes speed and memory, never the
        result. ``fast_math`` is accepted for parity with the kernels (the reference always
        computes an accurate ``exp`` and a true division); the kernel-only fields are ignored.

    Returns:
      ``y`` bf16 ``[T, H]``; rows whose slots are all unused are exactly 0.
    """
    opts = config.MoEOptions.of(options)
    routed_scaling_factor, num_max_tokens, chunk_rows = opts.routed_scaling_factor, opts.num_max_tokens, opts.chunk_rows
    config.check_mode(mode)
    t, h, k = _check_routing(x, topk_idx, topk_weights)
    if h % 128 != 0:
        raise ValueError(f"x: hidden={h} must be a multiple of 128")
    _check_weights(weights, mode, h, k)
    clamp = config.check_clamp(activation_clamp)
    _check_scaling(routed_scaling_factor)
    if num_max_tokens is not None:
        _check_num_max_tokens(num_max_tokens, t)
    chunk_rows = static_int("chunk_rows", chunk_rows, lo=1, allow_none=True)
    if t == 0:
        return jnp.zeros((0, h), jnp.bfloat16)
    if clamp is not None and math.isinf(clamp):
        clamp = None
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(t * k, weights.num_local_experts)
    idx = route_ids(topk_idx, weights.num_local_experts)
    rsf = jnp.asarray(routed_scaling_factor, jnp.float32)
    return _mega_moe_jit(x, idx, topk_weights, rsf, weights, mode=mode, clamp=clamp, chunk=chunk_rows)


@partial(jax.jit, static_argnames=("mode", "clamp", "chunk"))
def _mega_moe_jit(x, topk_idx, topk_weights, routed_scaling_factor, weights, *, mode, clamp, chunk):
    topk_weights = _scale_weights(topk_weights, routed_scaling_factor)
    t, h = x.shape
    k = topk_idx.shape[1]
    e_total = weights.num_local_experts  # single rank: every expert is local
    n = t * k
    c = min(chunk, n)

    # Activations exactly as the kernel's pre-dispatch leaves them, dequantised (exact in f32).
    xq, xsf = quantize_activations(x, mode)
    xd = dequantize_activations(xq, xsf, mode)

    # Flatten (token, slot) pairs; row r = t * K + k. Invalid slots sort last (key E).
    idx = topk_idx.reshape(n)
    valid = (idx >= 0) & (idx < e_total)
    key = jnp.where(valid, idx, e_total)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    counts = jnp.zeros((e_total + 1,), jnp.int32).at[key].add(1)[:e_total]
    offsets = jnp.cumsum(counts) - counts  # exclusive prefix sum: first sorted row of each expert
    active = jnp.nonzero(counts > 0, size=e_total, fill_value=0)[0].astype(jnp.int32)
    num_active = jnp.sum(counts > 0).astype(jnp.int32)

    w_flat = topk_weights.reshape(n).astype(jnp.float32)
    # Padded so a chunk that runs past the last row stays in bounds (its extra rows are masked).
    order_pad = jnp.concatenate([order, jnp.zeros((c,), jnp.int32)])
    # Per-slot outputs in sorted order; an expert's chunk may spill into the rows of later experts
    # (which overwrite them afterwards) or into the tail (invalid rows, masked at the end).
    out_sorted = jnp.zeros((n + c, h), jnp.bfloat16)

    def expert_step(j, out):
        e = active[j]
        cnt = counts[e]
        start = offsets[e]
        w13, w2 = weights.dequantize_expert(e)  # one expert, f32 [2I, H] and [H, I]
        w13 = w13.astype(jnp.float32)
        w2 = w2.astype(jnp.float32)

        def chunk_step(i, out):
            s = start + i * c
            rows = lax.dynamic_slice(order_pad, (s,), (c,))
            tok = rows // k
            o = expert_ffn(xd[tok], w13, w2, w_flat[rows], mode=mode, activation_clamp=clamp)
            return lax.dynamic_update_slice(out, o, (s, jnp.int32(0)))

        return lax.fori_loop(0, (cnt + c - 1) // c, chunk_step, out)

    out_sorted = lax.fori_loop(0, num_active, expert_step, out_sorted)

    # Back to slot order; unused slots contribute nothing.
    inv = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    slots = jnp.where(valid[:, None], out_sorted[inv], jnp.zeros((), jnp.bfloat16)).reshape(t, k, h)

    # Combine: fp32 adds from 0 in ascending k, then bf16. Adding +0 for an unused slot is exact.
    acc = jnp.zeros((t, h), jnp.float32)
    for kk in range(k):
        acc = acc + slots[:, kk].astype(jnp.float32)
    acc = jnp.where(acc == 0, jnp.float32(0), acc)  # 0 + (-0) is +0 in the kernel; XLA may fold 0 + x
    return acc.astype(jnp.bfloat16)
