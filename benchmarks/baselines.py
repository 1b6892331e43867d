"""The layer every benchmark path computes, and the paths: DeepGEMM's kernel through the FFI, the
pure-XLA ways we know, tokamax, and the pure-JAX reference.

The function (DeepSeek V4 routed experts): for each token, for each of its K experts, gate/up GEMM,
SwiGLU with the clamp, times the routing weight (rho folded in), down GEMM, summed over the K slots.
Every path takes ``(x bf16 [T, H], idx int32 [T, K], w f32 [T, K], *path_weights)`` and returns bf16
``[T, H]``; its static options are bound with ``functools.partial``.

  ffi             (a) ``ops.mega_moe(..., backend="ffi")``: DeepGEMM's fused sm_90 kernel (FP8 weights)
  xla_gather      (b1) weights dequantised once to bf16; gather each token's K experts, batched einsum
  xla_capacity    (b2) bf16; tokens scattered into [E, C, H] (C = the largest expert load, no drops),
                  one batched einsum over all experts
  xla_ragged      (b3) bf16; sort (token, slot) rows by expert, ``jax.lax.ragged_dot`` (XLA:GPU's default
                  lowering of it is one dense dot over all experts with a masked operand)
  xla_ragged_cudnn, xla_ragged_triton
                  (b3) the same with XLA's experimental grouped-GEMM backends for ragged_dot switched
                  on per executable (``jax.jit(..., compiler_options=...)``; GPU only)
  tokamax_ragged  (c) bf16; as b3 with ``tokamax.ragged_dot`` (skipped when tokamax is not importable)
  fp8w_gather     (d) FP8 weights gathered per token, dequantised to bf16 inside the graph, bf16 MMA
  fp8w_capacity   (d) FP8 weights, capacity layout, dequantised per expert group inside the graph
  fp8_gather      (d) ``jax.nn.scaled_matmul``: FP8 x FP8 with the kernel's per-128 activation scales
                  and 128x128 weight scales (gathered per token)
  fp8_capacity    (d) ``jax.nn.scaled_matmul`` in the capacity layout
  fp8_ragged      (d) FP8 x FP8 ``ragged_dot`` per 128-wide K block, scales applied in f32
  reference       (e) ``jax_megamoe.reference.mega_moe``

Also here: the layer shapes (:func:`model_shape`), random FP8 experts in the kernel layout and the
formats the paths read, random top-K routing, and the float32 oracle the bf16 paths are checked
against. Timing, floors and the sweep are :mod:`benchmarks.sweep`; plots and tables
:mod:`benchmarks.report`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import _common as C
from jax_megamoe import quant, reference
from jax_megamoe.layout import MoEWeights, deinterleave_gate_up
from jax_megamoe.models.deepseek_v4 import DeepseekV4Config

F32 = jnp.float32
BF16 = jnp.bfloat16
F8 = jnp.float8_e4m3fn
GIB = C.GIB


# =============================================================================================
# Shapes
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class Shape:
    """One routed-expert layer's sizes (``num_experts`` may be fewer than the model's, see ``e_note``)."""

    name: str
    hidden: int
    intermediate: int
    num_experts: int  # experts this run holds (may be reduced, see e_note)
    full_experts: int  # the model's routed experts
    top_k: int
    rho: float  # routed scaling factor, folded into the routing weights
    clamp: float | None  # SwiGLU clamp (swiglu_limit)
    e_note: str = ""


def model_shape(name: str, *, smoke: bool) -> Shape:
    """V4-Flash (``"flash"``) or V4-Pro (``"pro"``) from :class:`DeepseekV4Config`; ``smoke``: tiny
    stand-ins with the same K, rho and clamp (for CPU runs)."""
    if name == "flash":
        c = DeepseekV4Config.v4_flash()
    elif name == "pro":
        c = DeepseekV4Config.v4_pro()
    else:
        raise ValueError(f"--models: unknown model {name!r} (flash, pro)")
    h, i, e, k = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok
    if smoke:  # tiny stand-ins with the same K, rho and clamp (valid sm_90 shapes)
        h, i, e = (512, 256, 16) if name == "flash" else (1024, 256, 24)
    return Shape(f"v4_{name}", h, i, e, e, k, float(c.routed_scaling_factor), c.activation_clamp)


def bytes_per_expert(fmt: str, hidden: int, intermediate: int) -> int:
    """Bytes of one expert's L1 + L2 weights in a path's weight format ('bf16' or 'fp8' with scales)."""
    n = 3 * hidden * intermediate  # [2I, H] + [H, I]
    if fmt == "bf16":
        return 2 * n
    if fmt == "fp8":
        sf = (2 * intermediate // 128) * (hidden // 128) + (hidden // 128) * (intermediate // 128)
        return n + 4 * sf
    raise ValueError(fmt)


# =============================================================================================
# Weights: random FP8 experts on the device, and the formats each path reads
# =============================================================================================

_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_E2M1_RMS = math.sqrt(68.5 / 8)
_MULT_RMS = math.sqrt((1 + 4 + 16) / 3)


def _random_fp8_matrix(key, n: int, k: int, elem_rms: float):
    """An expert matrix as a converted FP4 checkpoint looks on sm_90: e4m3 values (E2M1 codes times
    2^{0,1,2} per 32 columns, all exact in e4m3) with a power-of-two f32 scale per 128x128 block
    (so its bf16 dequantisation is exact). Element RMS about ``elem_rms``."""
    k1, k2, k3 = jax.random.split(key, 3)
    codes = jax.random.bits(k1, (n, k), jnp.uint8) & 15
    mult = jnp.exp2((jax.random.bits(k2, (n, k // 32), jnp.uint8) % 3).astype(F32))
    v = jnp.asarray(_E2M1)[codes] * jnp.repeat(mult, 32, axis=1)
    base = round(math.log2(elem_rms / (_E2M1_RMS * _MULT_RMS)))
    s_exp = base - 1 + (jax.random.bits(k3, (n // 128, k // 128), jnp.uint8) % 3).astype(jnp.int32)
    return v.astype(F8), jnp.exp2(s_exp.astype(F32))


@partial(jax.jit, static_argnames=("e", "h", "i"))
def _random_weights_leaves(key, *, e: int, h: int, i: int):
    def one(kk):
        ka, kb = jax.random.split(kk)
        l1, s1 = _random_fp8_matrix(ka, 2 * i, h, 2.0 / math.sqrt(h))  # gate/up pre-activations RMS ~2
        l2, s2 = _random_fp8_matrix(kb, h, i, 1.0 / math.sqrt(i))
        return l1, s1, l2, s2

    return lax.map(one, jax.random.split(key, e))


def random_fp8_weights(shape: Shape, seed: int) -> MoEWeights:
    """Mode 'fp8' kernel-layout weights (random data, so the gran-8 gate/up interleave of ``l1`` is
    just a relabelling: ``dequantize_expert`` gives the canonical [gate | up] rows)."""
    l1, s1, l2, s2 = _random_weights_leaves(
        jax.random.key(seed), e=shape.num_experts, h=shape.hidden, i=shape.intermediate
    )
    w = MoEWeights(l1, s1, l2, s2, "fp8", shape.hidden, shape.intermediate, shape.num_experts)
    return w.validate()


@jax.jit
def dequantize_all_bf16(weights: MoEWeights):
    """Every expert once, to bf16 in the layout ``ragged_dot`` wants: ``W13t [E, H, 2I]`` ([gate | up]
    columns) and ``W2t [E, I, H]``. Exact (e4m3 times a power of two fits bf16)."""

    def one(e):
        w13, w2 = weights.dequantize_expert(e)
        return w13.T.astype(BF16), w2.T.astype(BF16)

    return lax.map(one, jnp.arange(weights.num_local_experts, dtype=jnp.int32))


def interleaved_row_block(intermediate: int) -> np.ndarray:
    """For each row r of the gran-8 interleaved ``l1``, the 128-row scale block of its canonical row."""
    r = np.arange(2 * intermediate)
    canonical = ((r // 8) % 2) * intermediate + 8 * (r // 16) + r % 8
    return (canonical // 128).astype(np.int32)


def deinterleave_cols(h: jax.Array) -> jax.Array:
    """``[..., 2I]`` in the gran-8 interleaved row order of ``l1`` -> canonical ``[gate | up]``."""
    lead, n = h.shape[:-1], h.shape[-1]
    v = h.reshape(*lead, n // 16, 2, 8)
    g = v[..., 0, :].reshape(*lead, n // 2)
    u = v[..., 1, :].reshape(*lead, n // 2)
    return jnp.concatenate([g, u], axis=-1)


@jax.jit
def scale_rows(weights: MoEWeights):
    """Per-row K-block scales for ``scaled_matmul``: ``s1 [E, 2I, H/128]`` (rows in l1's interleaved
    order), ``s2 [E, H, I/128]``."""
    rb = interleaved_row_block(weights.intermediate)
    s1 = weights.l1_sf[:, rb, :]
    s2 = jnp.repeat(weights.l2_sf, 128, axis=1)
    return s1, s2


def _as_u8(a):
    return lax.bitcast_convert_type(a, jnp.uint8)


def _as_f8(a):
    return lax.bitcast_convert_type(a, F8)


@jax.jit
def blocked_fp8(weights: MoEWeights):
    """FP8 weights split into 128-wide K blocks for ``fp8_ragged``: ``l1 [H/128, E, 128, 2I]``
    (canonical [gate | up] columns) and ``l2 [I/128, E, 128, H]`` (rhs ``[group, k, n]`` per block)."""
    e, i, h = weights.num_local_experts, weights.intermediate, weights.hidden
    l1 = deinterleave_gate_up(_as_u8(weights.l1), 8)  # [E, 2I, H]
    l1 = l1.reshape(e, 2 * i, h // 128, 128).transpose(2, 0, 3, 1)
    l2 = _as_u8(weights.l2).reshape(e, h, i // 128, 128).transpose(2, 0, 3, 1)
    return _as_f8(l1), _as_f8(l2)


# =============================================================================================
# Routing sets
# =============================================================================================


def make_routing(t: int, e: int, k: int, rho: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uniform top-K of E (distinct experts per token, random slot order) and positive weights that
    sum to ``rho`` per token (DeepSeek V4 folds rho into the weights before the experts)."""
    scores = rng.random((t, e))
    idx = np.argpartition(scores, e - k, axis=1)[:, e - k :]
    idx = np.take_along_axis(idx, rng.permuted(np.tile(np.arange(k), (t, 1)), axis=1), axis=1)
    g = rng.random((t, k)) + 0.1
    w = (g / g.sum(axis=1, keepdims=True) * rho).astype(np.float32)
    return idx.astype(np.int32), w


# =============================================================================================
# Paths (each: (x, idx, w, *path_weights) -> bf16 [T, H]; static keywords bound with partial)
# =============================================================================================


def _swiglu(h, w, clamp):
    """The kernel's L1 epilogue in f32 (clamp on the f32 accumulator, as sm_90), weight applied."""
    return reference.swiglu(h, w, mode="fp8", activation_clamp=clamp)


def _sort_by_expert(idx, e):
    n = idx.size
    flat = idx.reshape(n)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inv = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    return flat, order, inv, sizes


def _capacity_slots(idx, e, cap):
    """Row ``flat * cap + position within its expert`` of every (token, slot) pair in [E * cap]."""
    flat, order, _, sizes = _sort_by_expert(idx, e)
    starts = jnp.cumsum(sizes) - sizes
    pos_sorted = jnp.arange(flat.size, dtype=jnp.int32) - starts[flat[order]]
    pos = jnp.zeros_like(flat).at[order].set(pos_sorted)
    return flat * cap + pos


def _combine(o_slots, t, k):
    """[T*K, H] per-slot outputs -> bf16 [T, H], summed over the slots in f32."""
    return o_slots.reshape(t, k, -1).astype(F32).sum(axis=1).astype(BF16)


def xla_gather(x, idx, w, w13t, w2t, *, clamp):
    t, k = idx.shape
    i = w2t.shape[1]
    h = jnp.einsum("th,tkhf->tkf", x, w13t[idx], preferred_element_type=F32)
    a = _swiglu(h.reshape(t * k, 2 * i), w.reshape(t * k), clamp).astype(BF16).reshape(t, k, i)
    o = jnp.einsum("tki,tkih->tkh", a, w2t[idx], preferred_element_type=F32)
    return o.sum(axis=1).astype(BF16)


def xla_capacity(x, idx, w, w13t, w2t, *, clamp, cap):
    t, k = idx.shape
    e, hid, two_i = w13t.shape
    slot = _capacity_slots(idx, e, cap)
    tok = jnp.arange(t * k, dtype=jnp.int32) // k
    xd = jnp.zeros((e * cap, hid), BF16).at[slot].set(x[tok], unique_indices=True).reshape(e, cap, hid)
    wd = jnp.zeros((e * cap,), F32).at[slot].set(w.reshape(-1), unique_indices=True)
    h = jnp.einsum("ech,ehf->ecf", xd, w13t, preferred_element_type=F32)
    a = _swiglu(h.reshape(e * cap, two_i), wd, clamp).astype(BF16).reshape(e, cap, two_i // 2)
    o = jnp.einsum("eci,eih->ech", a, w2t, preferred_element_type=F32).reshape(e * cap, hid)
    return _combine(o[slot], t, k)


def _ragged(x, idx, w, w13t, w2t, *, clamp, dot):
    t, k = idx.shape
    e = w13t.shape[0]
    _, order, inv, sizes = _sort_by_expert(idx, e)
    xs = x[order // k]
    h = dot(xs, w13t, sizes)
    a = _swiglu(h.astype(F32), w.reshape(-1)[order], clamp).astype(BF16)
    o = dot(a, w2t, sizes)
    return _combine(o[inv], t, k)


def xla_ragged(x, idx, w, w13t, w2t, *, clamp, out_dtype=F32):
    dot = partial(lax.ragged_dot, preferred_element_type=out_dtype)
    return _ragged(x, idx, w, w13t, w2t, clamp=clamp, dot=dot)


#: XLA:GPU rewrites ``ragged_dot`` into one dense dot over all groups with a masked [E, M, K] lhs
#: (E times the FLOPs) unless one of its experimental grouped-GEMM backends is switched on; these
#: per-executable compiler options do that for the two variants below (bf16 output: the cuDNN
#: fusion takes only f16/bf16 results).
RAGGED_BACKENDS = {
    "xla_ragged_cudnn": {"xla_gpu_experimental_use_ragged_dot_fusion": True},
    "xla_ragged_triton": {
        "xla_gpu_experimental_triton_ragged_dot": True,
        "xla_gpu_experimental_use_ragged_dot_fusion": False,
    },
}


def tokamax_ragged(x, idx, w, w13t, w2t, *, clamp, implementation, out_dtype):
    import tokamax

    def dot(lhs, rhs, sizes):
        # tokamax's Mosaic kernel wants more than 8 rows to be a multiple of 8 (T*K = 12 at T=2 failed):
        # zero rows pad the last group and are sliced off (their products are never read).
        m = lhs.shape[0]
        pad = (-m) % 8 if m > 8 else 0
        if pad:
            lhs = jnp.pad(lhs, ((0, pad), (0, 0)))
            sizes = sizes.at[-1].add(pad)
        out = tokamax.ragged_dot(lhs, rhs, sizes, preferred_element_type=out_dtype, implementation=implementation)
        return out[:m]

    return _ragged(x, idx, w, w13t, w2t, clamp=clamp, dot=dot)


def _dequant_l1_bf16(l1, l1_sf):
    """FP8 ``[..., 2I(interleaved), H]`` with ``[..., 2I/128, H/128]`` scales -> bf16 (exact)."""
    rb = interleaved_row_block(l1.shape[-2] // 2)
    s = jnp.repeat(jnp.take(l1_sf, jnp.asarray(rb), axis=-2), 128, axis=-1)
    return l1.astype(BF16) * s.astype(BF16)


def _dequant_l2_bf16(l2, l2_sf):
    s = jnp.repeat(jnp.repeat(l2_sf, 128, axis=-2), 128, axis=-1)
    return l2.astype(BF16) * s.astype(BF16)


def fp8w_gather(x, idx, w, l1, l1_sf, l2, l2_sf, *, clamp):
    t, k = idx.shape
    i = l2.shape[-1]
    w1 = _dequant_l1_bf16(l1[idx], l1_sf[idx])  # [T, K, 2I, H]
    h = deinterleave_cols(jnp.einsum("th,tkfh->tkf", x, w1, preferred_element_type=F32))
    a = _swiglu(h.reshape(t * k, 2 * i), w.reshape(t * k), clamp).astype(BF16).reshape(t, k, i)
    w2 = _dequant_l2_bf16(l2[idx], l2_sf[idx])  # [T, K, H, I]
    o = jnp.einsum("tki,tkhi->tkh", a, w2, preferred_element_type=F32)
    return o.sum(axis=1).astype(BF16)


def fp8w_capacity(x, idx, w, l1, l1_sf, l2, l2_sf, *, clamp, cap, group):
    t, k = idx.shape
    e, two_i, hid = l1.shape
    slot = _capacity_slots(idx, e, cap)
    tok = jnp.arange(t * k, dtype=jnp.int32) // k
    xd = jnp.zeros((e * cap, hid), BF16).at[slot].set(x[tok], unique_indices=True).reshape(e // group, group, cap, hid)
    wd = jnp.zeros((e * cap,), F32).at[slot].set(w.reshape(-1), unique_indices=True).reshape(e // group, group, cap)

    def step(args):  # `group` experts: dequantise to bf16 in the graph, then two batched GEMMs
        xg, wg, q1, s1, q2, s2 = args
        h = deinterleave_cols(jnp.einsum("gch,gfh->gcf", xg, _dequant_l1_bf16(q1, s1), preferred_element_type=F32))
        a = _swiglu(h.reshape(group * cap, two_i), wg.reshape(-1), clamp).astype(BF16).reshape(group, cap, two_i // 2)
        return jnp.einsum("gci,ghi->gch", a, _dequant_l2_bf16(q2, s2), preferred_element_type=F32)

    def grp(a):
        return a.reshape(e // group, group, *a.shape[1:])

    o = lax.map(step, (xd, wd, grp(l1), grp(l1_sf), grp(l2), grp(l2_sf)))
    return _combine(o.reshape(e * cap, hid)[slot], t, k)


def _quant_x(x):
    return quant.quantize_fp8_per128(x)  # the kernel's pre-dispatch format: e4m3 + f32 per 128


def fp8_gather(x, idx, w, l1, s1, l2, s2, *, clamp):
    t, k = idx.shape
    n = t * k
    flat = idx.reshape(n)
    tok = jnp.arange(n, dtype=jnp.int32) // k
    xq, xsf = _quant_x(x)
    h = jax.nn.scaled_matmul(xq[tok][:, None, :], l1[flat], xsf[tok][:, None, :], s1[flat])[:, 0, :]
    a = _swiglu(deinterleave_cols(h), w.reshape(n), clamp)
    aq, asf = quant.requant_fp8_per128(a)
    o = jax.nn.scaled_matmul(aq[:, None, :], l2[flat], asf[:, None, :], s2[flat])[:, 0, :]
    return _combine(o.astype(BF16), t, k)


def fp8_capacity(x, idx, w, l1, s1, l2, s2, *, clamp, cap):
    t, k = idx.shape
    e, two_i, hid = l1.shape
    slot = _capacity_slots(idx, e, cap)
    tok = jnp.arange(t * k, dtype=jnp.int32) // k
    xq, xsf = _quant_x(x)
    xqd = _as_f8(jnp.zeros((e * cap, hid), jnp.uint8).at[slot].set(_as_u8(xq)[tok], unique_indices=True))
    xsfd = jnp.zeros((e * cap, hid // 128), F32).at[slot].set(xsf[tok], unique_indices=True)
    wd = jnp.zeros((e * cap,), F32).at[slot].set(w.reshape(-1), unique_indices=True)
    h = jax.nn.scaled_matmul(xqd.reshape(e, cap, hid), l1, xsfd.reshape(e, cap, -1), s1)
    a = _swiglu(deinterleave_cols(h).reshape(e * cap, two_i), wd, clamp)
    aq, asf = quant.requant_fp8_per128(a)
    o = jax.nn.scaled_matmul(aq.reshape(e, cap, -1), l2, asf.reshape(e, cap, -1), s2)
    return _combine(o.reshape(e * cap, hid).astype(BF16)[slot], t, k)


def _ragged_kblocks(lhs_q, lhs_sf, rhs_blocks, rhs_sf_rows, sizes):
    """sum_kb ragged_dot(lhs_q[:, kb], rhs_blocks[kb]) * lhs_sf[:, kb] * rhs_sf_rows[kb] (f32)."""
    n = lhs_q.shape[0]
    nb, _, _, m = rhs_blocks.shape

    def body(kb, acc):
        lhs = _as_f8(lax.dynamic_slice_in_dim(_as_u8(lhs_q), kb * 128, 128, axis=1))
        part = lax.ragged_dot(lhs, rhs_blocks[kb], sizes, preferred_element_type=F32)
        sc = lax.dynamic_index_in_dim(lhs_sf, kb, axis=1, keepdims=True) * jnp.repeat(rhs_sf_rows[kb], 128, axis=1)
        return acc + part * sc

    return lax.fori_loop(0, nb, body, jnp.zeros((n, m), F32))


def fp8_ragged(x, idx, w, l1b, l1_sf, l2b, l2_sf, *, clamp):
    t, k = idx.shape
    e = l1b.shape[1]
    flat, order, inv, sizes = _sort_by_expert(idx, e)
    es = flat[order]
    xq, xsf = _quant_x(x)
    tok = order // k
    xs_q = _as_f8(_as_u8(xq)[tok])
    h = _ragged_kblocks(xs_q, xsf[tok], l1b, jnp.transpose(l1_sf[es], (2, 0, 1)), sizes)
    a = _swiglu(h, w.reshape(-1)[order], clamp)
    aq, asf = quant.requant_fp8_per128(a)
    o = _ragged_kblocks(aq, asf, l2b, jnp.transpose(l2_sf[es], (2, 0, 1)), sizes)
    return _combine(o.astype(BF16)[inv], t, k)


def ffi_mega_moe(x, idx, w, weights, *, clamp, cap=None, reserved_sms=None, kernel="fused"):
    """The FFI path; ``cap``: the fused kernel's token cap (default: this call's T, i.e. the smallest);
    ``kernel``: ``ops.mega_moe``'s kernel choice (this sweep times DeepGEMM's fused kernel by default)."""
    from jax_megamoe import ops

    return ops.mega_moe(
        x,
        idx,
        w,
        weights,
        mode="fp8",
        activation_clamp=clamp,
        backend="ffi",
        options=ops.MoEOptions(num_max_tokens=cap or x.shape[0], reserved_sms=reserved_sms, kernel=kernel),
    )


def reference_mega_moe(x, idx, w, weights, *, clamp):
    return reference.mega_moe(x, idx, w, weights, mode="fp8", activation_clamp=clamp)


@dataclasses.dataclass(frozen=True)
class PathSpec:
    name: str
    label: str
    weight_format: str  # what the path reads per expert: 'fp8' or 'bf16'
    mma: str  # the MMA input type: 'bf16' or 'fp8' (picks the compute peak of the floor)
    oracle: str  # 'f32' or 'reference'
    gather: bool = False  # materialises T*K experts' weights
    gpu_only: str = ""  # reason it cannot run on CPU ('' = runs anywhere)


PATHS: tuple[PathSpec, ...] = (
    PathSpec("ffi", "(a) FFI Mega MoE", "fp8", "fp8", "reference", gpu_only="the FFI kernels need an sm_90 GPU"),
    PathSpec("xla_gather", "(b1) XLA bf16 gather", "bf16", "bf16", "f32", gather=True),
    PathSpec("xla_capacity", "(b2) XLA bf16 capacity einsum", "bf16", "bf16", "f32"),
    PathSpec("xla_ragged", "(b3) XLA bf16 sort + ragged_dot", "bf16", "bf16", "f32"),
    PathSpec(
        "xla_ragged_cudnn",
        "(b3) ragged_dot, XLA cuDNN grouped GEMM",
        "bf16",
        "bf16",
        "f32",
        gpu_only="an XLA:GPU ragged_dot backend (compiler option)",
    ),
    PathSpec(
        "xla_ragged_triton",
        "(b3) ragged_dot, XLA Triton grouped GEMM",
        "bf16",
        "bf16",
        "f32",
        gpu_only="an XLA:GPU ragged_dot backend (compiler option)",
    ),
    PathSpec("tokamax_ragged", "(c) tokamax.ragged_dot bf16", "bf16", "bf16", "f32"),
    PathSpec("fp8w_gather", "(d) FP8 weights, gather, bf16 MMA", "fp8", "bf16", "f32", gather=True),
    PathSpec("fp8w_capacity", "(d) FP8 weights, capacity, bf16 MMA", "fp8", "bf16", "f32"),
    PathSpec("fp8_gather", "(d) scaled_matmul FP8xFP8 gather", "fp8", "fp8", "reference", gather=True),
    PathSpec("fp8_capacity", "(d) scaled_matmul FP8xFP8 capacity", "fp8", "fp8", "reference"),
    PathSpec("fp8_ragged", "(d) FP8xFP8 ragged_dot per K block", "fp8", "fp8", "reference"),
    PathSpec("reference", "(e) pure-JAX reference", "fp8", "fp8", "reference"),
)
PATH_BY_NAME = {p.name: p for p in PATHS}
XLA_BF16 = ("xla_gather", "xla_capacity", "xla_ragged", "xla_ragged_cudnn", "xla_ragged_triton")


# =============================================================================================
# Oracles (on CHECK_ROWS rows of input set 0)
# =============================================================================================


@partial(jax.jit, static_argnames=("clamp",))
def f32_oracle(x, idx, w, weights: MoEWeights, *, clamp):
    """The function every bf16 path computes, in f32: bf16 activations, exact dequantised weights,
    f32 HIGHEST matmuls, no intermediate rounding. Loops over the experts the rows hit."""
    t, _ = idx.shape
    e = weights.num_local_experts
    xf = x.astype(F32)
    hit = jnp.zeros((e,), bool).at[idx.reshape(-1)].set(True)
    active = jnp.nonzero(hit, size=e, fill_value=0)[0].astype(jnp.int32)
    hp = lax.Precision.HIGHEST

    def body(j, y):
        ex = active[j]
        w13, w2 = weights.dequantize_expert(ex)
        coef = jnp.sum(jnp.where(idx == ex, w, 0.0), axis=1)
        h = jnp.dot(xf, w13.T, precision=hp)
        a = _swiglu(h, coef, clamp)
        return y + jnp.dot(a, w2.T, precision=hp)

    return lax.fori_loop(0, jnp.sum(hit).astype(jnp.int32), body, jnp.zeros((t, weights.hidden), F32))


# =============================================================================================
# tokamax (optional)
# =============================================================================================

_TOKAMAX_ERR: list[str | None] = []
_tk_lock = threading.Lock()


def tokamax_import_error() -> str | None:
    """None when ``tokamax`` imports; else why not. ``xprof`` (only used by tokamax's own
    benchmarking module) is stubbed when it is missing."""
    with _tk_lock:
        if _TOKAMAX_ERR:
            return _TOKAMAX_ERR[0]
        try:
            try:
                import xprof.cli.tools  # noqa: F401
            except ImportError:
                import types

                for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
                    sys.modules.setdefault(name, types.ModuleType(name))
                sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None  # type: ignore[attr-defined]
            import tokamax  # noqa: F401

            _TOKAMAX_ERR.append(None)
        except Exception as e:  # noqa: BLE001
            _TOKAMAX_ERR.append(f"tokamax not importable: {type(e).__name__}: {C.first_line(e, 200)}")
        return _TOKAMAX_ERR[0]
