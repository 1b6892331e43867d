"""One DeepSeek V4 routed-expert layer: FFI Mega MoE vs the best pure-XLA MoE, swept over tokens.

For V4-Flash and V4-Pro layer shapes and T = 1, 8, 64, 256, 1024, 4096 tokens this times, in one
process on one device, paths that all compute the same function (top-K routed experts: gate/up
GEMM, SwiGLU with the clamp, times the routing weight, down GEMM, summed over the K slots) with the
same routing and the same weights:

  ffi             (a) ``ops.mega_moe(..., backend="ffi")``: DeepGEMM's fused sm_90 kernel (FP8 weights);
                  where it cannot run (no sm_90 GPU, no FFI library, ...) it is skipped with the error
                  message
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
  reference       (e) ``jax_megamoe.reference.mega_moe`` (timed on CPU, or with --include-reference)

Every path's output is checked once per point on a fixed set of rows (64 rows spread over T) against
an oracle: the bf16-activation paths (b, c, fp8w_*) against a float32 evaluation of the same
function (bf16 activations, exact dequantised weights, f32 math); the FP8-activation paths (ffi,
fp8_*) against the reference, which follows the kernel's numerics. Tolerances are in the JSON.

Roofline per point: the weight bytes a path must read (distinct experts hit x bytes per expert in
that path's weight format) over the measured HBM bandwidth (a large device copy), and the FLOPs
``2*T*K*(2I*H + H*I)`` over the measured matmul peak (a large bf16 matmul; FP8 MMA paths use a
measured FP8 matmul where the device runs one); the floor is the larger, and every time is also
reported as a multiple of its floor.

    python benchmarks/moe_layer.py                        # full sweep (GPU)
    python benchmarks/moe_layer.py --quick                # < 3 min on an H100
    python benchmarks/moe_layer.py --quick --cpu-smoke    # tiny shapes on CPU, < 60 s (CI)
    python benchmarks/moe_layer.py --from-json benchmarks/results/moe_layer.json --write-results benchmarks/RESULTS.md

On a CPU device the layer shapes are always shrunk to tiny ones (as --cpu-smoke; the output says so)
unless --no-shrink is given. Outputs ``moe_layer.json`` and ``moe_layer.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any
from jax_megamoe.ops import MoEOptions

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402

if __name__ == "__main__":
    C.set_gpu_memory_fraction()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from jax_megamoe import quant, reference  # noqa: E402
from jax_megamoe.layout import MoEWeights  # noqa: E402
from jax_megamoe.models.deepseek_v4 import DeepseekV4Config  # noqa: E402

SCHEMA = "jax_megamoe.benchmarks.moe_layer/1"
FULL_TOKENS = (1, 8, 64, 256, 1024, 4096)
QUICK_TOKENS = (1, 64, 1024)
SMOKE_TOKENS = (1, 16)
CHECK_ROWS = 64
F32 = jnp.float32
BF16 = jnp.bfloat16
F8 = jnp.float8_e4m3fn
GIB = 2**30

#: Relative L2 tolerances of the per-point checks.
TOL = {
    # bf16 activations and weights, f32 accumulation, SwiGLU output rounded to bf16: vs the f32 oracle
    "bf16_vs_f32": 1e-2,
    # FP8 per-128 activations + FP8 requantised intermediate, as the kernel: vs the reference
    "fp8_vs_reference": 1e-2,
    # the reference itself vs the f32 oracle (differs by the FP8 activation quantisation only)
    "reference_vs_f32": 1e-1,
}


# =============================================================================================
# Shapes
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class Shape:
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


def layer_flops(tokens: int, top_k: int, hidden: int, intermediate: int) -> int:
    """``2 * T * K * (2I*H + H*I)``: the two GEMMs of every routed (token, slot) pair."""
    return 2 * tokens * top_k * (2 * intermediate * hidden + hidden * intermediate)


def roofline(
    *, tokens: int, top_k: int, hidden: int, intermediate: int, distinct_experts: float, fmt: str,
    hbm_bytes_per_s: float, flops_per_s: float,
) -> dict[str, Any]:
    """The floor of one layer call: max(weight bytes / bandwidth, FLOPs / matmul peak)."""
    nbytes = distinct_experts * bytes_per_expert(fmt, hidden, intermediate)
    flops = layer_flops(tokens, top_k, hidden, intermediate)
    t_mem = nbytes / hbm_bytes_per_s
    t_math = flops / flops_per_s
    return {
        "weight_bytes": nbytes,
        "flops": flops,
        "t_memory_s": t_mem,
        "t_compute_s": t_math,
        "floor_s": max(t_mem, t_math),
        "bound": "memory" if t_mem >= t_math else "compute",
    }


def choose_experts(shape: Shape, limit_bytes: int | None, override: int | None, with_bf16: bool = True) -> Shape:
    """Reduce E when FP8 (+ bf16, when a bf16 path runs) copies of every expert would not fit in 60%
    of the device pool."""
    if override is not None:
        if override < shape.top_k:
            raise ValueError(f"--experts: {override} < top-k {shape.top_k}")
        note = "" if override == shape.full_experts else f"E reduced to {override} of {shape.full_experts} by --experts"
        return dataclasses.replace(shape, num_experts=override, e_note=note)
    if limit_bytes is None:
        return shape
    fp8 = bytes_per_expert("fp8", shape.hidden, shape.intermediate)
    bf16 = bytes_per_expert("bf16", shape.hidden, shape.intermediate) if with_bf16 else 0
    fit = int(0.6 * limit_bytes // (fp8 + bf16))
    if fit >= shape.num_experts:
        return shape
    e = max(shape.top_k, (fit // 32) * 32 or fit)
    what = f"FP8 ({fp8 * shape.full_experts / GIB:.1f} GiB)" + (
        f" + bf16 ({bf16 * shape.full_experts / GIB:.1f} GiB) copies" if with_bf16 else " copy"
    )
    note = (
        f"E reduced to {e} of {shape.full_experts}: the {what} of all {shape.full_experts} experts exceed 60% of the "
        f"{limit_bytes / GIB:.1f} GiB device pool; every path uses the same {e} experts and routing"
        + (" (the FP8-only paths fit more: --paths ffi,fp8w_capacity,fp8_capacity,fp8_ragged)" if with_bf16 else "")
    )
    return dataclasses.replace(shape, num_experts=e, e_note=note)


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
    from jax_megamoe.layout import deinterleave_gate_up

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
    idx = np.argpartition(scores, e - k, axis=1)[:, e - k:]
    idx = np.take_along_axis(idx, rng.permuted(np.tile(np.arange(k), (t, 1)), axis=1), axis=1)
    g = rng.random((t, k)) + 0.1
    w = (g / g.sum(axis=1, keepdims=True) * rho).astype(np.float32)
    return idx.astype(np.int32), w


@dataclasses.dataclass
class InputSets:
    sets: list[tuple[jax.Array, jax.Array, jax.Array]]  # (x bf16 [T,H], idx int32 [T,K], w f32 [T,K])
    idx_host: list[np.ndarray]
    capacity: int  # the largest expert load over the sets (no token is ever dropped)
    distinct: float  # mean distinct experts hit per set
    check_rows: np.ndarray


def make_inputs(shape: Shape, t: int, n_sets: int, seed: int) -> InputSets:
    rng = np.random.default_rng([seed, t, shape.num_experts])
    sets, hosts, loads, distinct = [], [], [], []
    for _ in range(n_sets):
        x = rng.standard_normal((t, shape.hidden), dtype=np.float32)
        idx, w = make_routing(t, shape.num_experts, shape.top_k, shape.rho, rng)
        sets.append((jnp.asarray(x, BF16), jnp.asarray(idx), jnp.asarray(w)))
        hosts.append(idx)
        loads.append(np.bincount(idx.reshape(-1), minlength=shape.num_experts).max())
        distinct.append(len(np.unique(idx)))
    if t >= CHECK_ROWS:
        rows = np.unique(np.round(np.linspace(0, t - 1, CHECK_ROWS)).astype(np.int64))
    else:
        rows = np.arange(CHECK_ROWS) % t  # fixed size: one oracle compile per model
    return InputSets(sets, hosts, int(max(loads)), float(np.mean(distinct)), rows)


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
        out = tokamax.ragged_dot(
            lhs, rhs, sizes, preferred_element_type=out_dtype, implementation=implementation
        )
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
        x, idx, w, weights, mode="fp8", activation_clamp=clamp, backend="ffi",
        options=MoEOptions(num_max_tokens=cap or x.shape[0], reserved_sms=reserved_sms, kernel=kernel)
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
    PathSpec("xla_ragged_cudnn", "(b3) ragged_dot, XLA cuDNN grouped GEMM", "bf16", "bf16", "f32",
             gpu_only="an XLA:GPU ragged_dot backend (compiler option)"),
    PathSpec("xla_ragged_triton", "(b3) ragged_dot, XLA Triton grouped GEMM", "bf16", "bf16", "f32",
             gpu_only="an XLA:GPU ragged_dot backend (compiler option)"),
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
# Ceilings
# =============================================================================================


def measure_ceilings(*, small: bool, time_budget: float) -> dict[str, Any]:
    """HBM bandwidth (jitted ``a + 1`` over a large f32 array: bytes read + written) and matmul
    peaks (square bf16 and FP8 matmuls on random data)."""
    out: dict[str, Any] = {}
    n_copy = (4 if small else 512) * 2**20  # f32 elements: 16 MiB or 2 GiB
    a = jax.random.normal(jax.random.key(0), (n_copy,), F32)
    add = jax.jit(lambda v: v + 1.0)
    t = C.measure(add, [(a,)], budget_s=time_budget, sample_s=0.02 if not small else 0.05, min_samples=5)
    out["hbm_bytes_per_s"] = 2 * a.nbytes / t.median_s
    out["hbm_method"] = f"jit(a + 1) on f32[{n_copy}] ({a.nbytes / 2**20:.0f} MiB), read + write, median of {t.samples}"
    del a
    m = 512 if small else 8192
    ka, kb = jax.random.split(jax.random.key(1))
    x = jax.random.normal(ka, (m, m), F32).astype(BF16)
    y = jax.random.normal(kb, (m, m), F32).astype(BF16)
    mm = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=F32).astype(BF16))
    t = C.measure(mm, [(x, y)], budget_s=time_budget, sample_s=0.02 if not small else 0.05, min_samples=5)
    out["bf16_flops_per_s"] = 2 * m**3 / t.median_s
    out["bf16_method"] = f"{m}x{m}x{m} bf16 matmul (f32 accumulate, bf16 out), median of {t.samples}"
    try:
        xq, yq = x.astype(F8), y.astype(F8)
        mm8 = jax.jit(lambda p, q: jnp.dot(p, q.T, preferred_element_type=BF16))
        t = C.measure(mm8, [(xq, yq)], budget_s=time_budget, sample_s=0.02 if not small else 0.05, min_samples=5)
        out["fp8_flops_per_s"] = 2 * m**3 / t.median_s
        out["fp8_method"] = f"{m}x{m}x{m} e4m3 matmul (A @ B^T, bf16 out), median of {t.samples}"
    except Exception as e:  # noqa: BLE001
        out["fp8_flops_per_s"] = None
        out["fp8_method"] = f"skipped: {type(e).__name__}: {_first_line(e)}"
    return out


def compute_peaks(ceil: dict[str, Any]) -> dict[str, float]:
    """Matmul peak per MMA input type. An FP8 matmul slower than bf16 is not a native FP8 GEMM, so
    FP8-MMA floors then use the bf16 peak (never a floor above what bf16 MMAs reach)."""
    bf16 = ceil["bf16_flops_per_s"]
    return {"bf16": bf16, "fp8": max(bf16, ceil.get("fp8_flops_per_s") or 0.0)}


def _first_line(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else type(e).__name__
    return s[:n]


# =============================================================================================
# The sweep
# =============================================================================================


class Sweep:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t_start = time.time()
        self.deadline = self.t_start + args.budget_s
        if args.deadline:
            self.deadline = min(self.deadline, args.deadline) if args.budget_given else args.deadline
        self.sticky: dict[str, str] = {}  # path -> reason it is skipped from now on
        self.fail_count: dict[str, int] = {}
        self.tokamax_choice: tuple[str | None, Any] | None = None
        self.tokamax_note = ""
        self.platform = jax.devices()[0].platform
        self.result: dict[str, Any] = {}
        self.ffi_warm: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.model_deadline = self.deadline

    # ---- helpers ------------------------------------------------------------------------

    def out_json(self) -> Path:
        return Path(self.args.out) / "moe_layer.json"

    def save(self) -> None:
        C.write_json(self.out_json(), self.result)

    def remaining(self) -> float:
        return min(self.deadline, self.model_deadline) - time.time()

    def share_time(self, models_left: int) -> None:
        """Give the next model an equal share of the time left (a slow model cannot starve the next)."""
        now = time.time()
        self.model_deadline = now + max(0.0, self.deadline - now) / max(1, models_left)

    def wanted(self) -> list[PathSpec]:
        names = self.args.paths
        return [p for p in PATHS if names is None or p.name in names]

    def wants_bf16(self) -> bool:
        """Whether any wanted path reads the bf16 copy (the FP8-only paths fit full V4-Pro on an H100)."""
        return any(p.weight_format == "bf16" for p in self.wanted())

    # ---- availability ---------------------------------------------------------------------

    def static_skip(self, p: PathSpec) -> str | None:
        if p.name in self.sticky:
            return self.sticky[p.name]
        if p.gpu_only and self.platform != "gpu":
            return f"no GPU ({self.platform}): {p.gpu_only}"
        if p.name == "reference" and self.platform == "gpu" and not self.args.include_reference:
            return "reference is timed on CPU only (pass --include-reference on a GPU)"
        if p.name == "tokamax_ragged":
            err = tokamax_import_error()
            if err:
                return err
        return None

    # ---- per model ------------------------------------------------------------------------

    def run_model(self, shape: Shape, tokens: list[int]) -> dict[str, Any]:
        a = self.args
        C.log(
            f"{shape.name}: H={shape.hidden} I={shape.intermediate} E={shape.num_experts} K={shape.top_k} "
            f"rho={shape.rho} clamp={shape.clamp}" + (f" [{shape.e_note}]" if shape.e_note else "")
        )
        t0 = time.perf_counter()
        weights = random_fp8_weights(shape, a.seed)
        w13t = w2t = None
        if self.wants_bf16():
            w13t, w2t = dequantize_all_bf16(weights)
        jax.block_until_ready((weights, w13t, w2t))
        setup_s = time.perf_counter() - t0
        fp8_b = bytes_per_expert("fp8", shape.hidden, shape.intermediate) * shape.num_experts
        bf16_b = bytes_per_expert("bf16", shape.hidden, shape.intermediate) * shape.num_experts
        C.log(
            f"{shape.name}: weights FP8 {fp8_b / GIB:.2f} GiB"
            + (f" + bf16 {bf16_b / GIB:.2f} GiB" if w13t is not None else " (no bf16 path asked for)")
            + f" ready in {setup_s:.1f} s"
        )
        model = {
            "name": shape.name,
            "hidden": shape.hidden,
            "intermediate": shape.intermediate,
            "num_experts": shape.num_experts,
            "full_experts": shape.full_experts,
            "top_k": shape.top_k,
            "routed_scaling_factor": shape.rho,
            "activation_clamp": shape.clamp,
            "e_note": shape.e_note,
            "weight_bytes": {"fp8": fp8_b, "bf16": bf16_b},
            "bytes_per_expert": {
                f: bytes_per_expert(f, shape.hidden, shape.intermediate) for f in ("fp8", "bf16")
            },
            "setup_s": setup_s,
            "points": [],
        }
        ctx = ModelCtx(shape, weights, w13t, w2t)
        self.result["models"].append(model)
        if "ffi" in [p.name for p in self.wanted()] and self.static_skip(PATH_BY_NAME["ffi"]) is None:
            self.prewarm_ffi(ctx, tokens)
        try:
            for t in tokens:
                if self.remaining() <= 0:
                    model["points"].append({"tokens": t, "skipped": "time budget exhausted (--budget-s / --deadline)"})
                    C.log(f"{shape.name} T={t}: skipped, time budget exhausted")
                    self.save()
                    continue
                try:
                    model["points"].append(self.run_point(ctx, t))
                except Exception as e:  # noqa: BLE001 - e.g. the oracle ran out of memory: next point
                    C.log(f"{shape.name} T={t}: failed: {type(e).__name__}: {_first_line(e)}")
                    if a.verbose:
                        traceback.print_exc()
                    model["points"].append({"tokens": t, "skipped": f"failed: {type(e).__name__}: {_first_line(e)}"})
                    gc.collect()
                self.save()
        finally:
            self.ffi_warm.clear()
            ctx.free()
            del weights, w13t, w2t
            gc.collect()
        return model

    def prewarm_ffi(self, ctx: ModelCtx, tokens: list[int]) -> None:
        """Detect the FFI path once (trace only), then compile + first-run it for every T in
        background threads: the mega kernel's nvcc JIT (per token count) overlaps the XLA paths."""
        shape = ctx.shape
        inp = make_inputs(shape, tokens[0], 1, self.args.seed + 99)
        fn = ctx.ffi_fn = self.ffi_jit(shape)
        try:
            fn.lower(*inp.sets[0], ctx.weights)
        except Exception as e:  # noqa: BLE001
            self.sticky["ffi"] = self.classify(e, "ffi")[1]
            C.log(f"ffi: skipped: {self.sticky['ffi']}")
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, self.args.ffi_prewarm))

        cap = self.args.ffi_num_max_tokens

        def warm(t: int) -> float:
            if cap is not None and t > cap:
                return 0.0
            s = make_inputs(shape, t, 1, self.args.seed + 99).sets[0]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*s, ctx.weights))
            return time.perf_counter() - t0

        for t in tokens:
            self.ffi_warm[t] = self._pool.submit(warm, t)

    def ffi_jit(self, shape: Shape):
        a = self.args
        return jax.jit(partial(ffi_mega_moe, clamp=shape.clamp, cap=a.ffi_num_max_tokens, reserved_sms=a.ffi_reserved_sms))

    # ---- per point ------------------------------------------------------------------------

    def run_point(self, ctx: ModelCtx, t: int) -> dict[str, Any]:
        a, shape = self.args, ctx.shape
        inp = make_inputs(shape, t, a.sets, a.seed)
        x0, i0, w0 = inp.sets[0]
        rows = jnp.asarray(inp.check_rows)
        xs, is_, ws = x0[rows], i0[rows], w0[rows]
        y_f32 = np.asarray(f32_oracle(xs, is_, ws, ctx.weights, clamp=shape.clamp))
        ref_cache: list[np.ndarray] = []

        def y_ref() -> np.ndarray:
            if not ref_cache:
                ref_cache.append(np.asarray(reference_mega_moe(xs, is_, ws, ctx.weights, clamp=shape.clamp)).astype(np.float32))
            return ref_cache[0]

        peaks = compute_peaks(self.result["ceilings"])
        ceil = self.result["ceilings"]
        floors = {}
        for fmt, mma in (("bf16", "bf16"), ("fp8", "fp8"), ("fp8", "bf16")):
            floors[f"{fmt}_weights_{mma}_mma"] = roofline(
                tokens=t, top_k=shape.top_k, hidden=shape.hidden, intermediate=shape.intermediate,
                distinct_experts=inp.distinct, fmt=fmt, hbm_bytes_per_s=ceil["hbm_bytes_per_s"], flops_per_s=peaks[mma],
            )
        point: dict[str, Any] = {
            "tokens": t,
            "distinct_experts": inp.distinct,
            "capacity": inp.capacity,
            "capacity_factor": inp.capacity * shape.num_experts / (t * shape.top_k),
            "flops": layer_flops(t, shape.top_k, shape.hidden, shape.intermediate),
            "floors": floors,
            "check_rows": len(inp.check_rows),
            "paths": {},
        }
        C.log(
            f"{shape.name} T={t}: {inp.distinct:.1f} distinct experts, capacity {inp.capacity}, floor "
            f"fp8 {C.fmt_time(floors['fp8_weights_fp8_mma']['floor_s'])} / bf16 {C.fmt_time(floors['bf16_weights_bf16_mma']['floor_s'])}"
        )
        for p in self.wanted():
            rec = self.run_path(ctx, p, t, inp, floors, y_f32, y_ref)
            point["paths"][p.name] = rec
            if rec["status"] == "ok":
                chk = rec["check"]
                C.log(
                    f"  {p.name:15s} {C.fmt_time(rec['median_s']):>10s} (p10 {C.fmt_time(rec['p10_s'])}, p90 "
                    f"{C.fmt_time(rec['p90_s'])}) {rec['time_over_floor']:7.1f}x floor  check {chk['oracle']} "
                    f"{chk['rel_l2']:.2e} {'ok' if chk['pass'] else 'FAIL'}"
                )
            else:
                C.log(f"  {p.name:15s} {rec['status']}: {rec['reason']}")
        point["best"] = best_of(point["paths"])
        del inp
        return point

    def path_args(self, ctx: ModelCtx, p: PathSpec, inp: InputSets):
        """(jitted function, path weights) or raises _Skip."""
        shape = ctx.shape
        clamp = shape.clamp
        if p.name == "ffi":
            if ctx.ffi_fn is None:
                ctx.ffi_fn = self.ffi_jit(shape)
            return ctx.ffi_fn, (ctx.weights,)
        if p.name == "reference":
            return jax.jit(partial(reference_mega_moe, clamp=clamp)), (ctx.weights,)
        if p.name in RAGGED_BACKENDS:
            return (
                jax.jit(partial(xla_ragged, clamp=clamp, out_dtype=BF16), compiler_options=RAGGED_BACKENDS[p.name]),
                (ctx.w13t, ctx.w2t),
            )
        if p.name in ("xla_gather", "xla_capacity", "xla_ragged", "tokamax_ragged"):
            wts = (ctx.w13t, ctx.w2t)
            if p.name == "xla_gather":
                return jax.jit(partial(xla_gather, clamp=clamp)), wts
            if p.name == "xla_capacity":
                return jax.jit(partial(xla_capacity, clamp=clamp, cap=inp.capacity)), wts
            if p.name == "xla_ragged":
                return jax.jit(partial(xla_ragged, clamp=clamp)), wts
            impl, dt = self.tokamax_choice or (None, F32)
            return jax.jit(partial(tokamax_ragged, clamp=clamp, implementation=impl, out_dtype=dt)), wts
        w = ctx.weights
        q = (w.l1, w.l1_sf, w.l2, w.l2_sf)
        if p.name == "fp8w_gather":
            return jax.jit(partial(fp8w_gather, clamp=clamp)), q
        if p.name == "fp8w_capacity":
            return jax.jit(partial(fp8w_capacity, clamp=clamp, cap=inp.capacity, group=ctx.expert_group(inp.capacity))), q
        if p.name in ("fp8_gather", "fp8_capacity"):
            s1, s2 = ctx.scales()
            f = fp8_gather if p.name == "fp8_gather" else partial(fp8_capacity, cap=inp.capacity)
            return jax.jit(partial(f, clamp=clamp)), (w.l1, s1, w.l2, s2)
        if p.name == "fp8_ragged":
            need = bytes_per_expert("fp8", shape.hidden, shape.intermediate) * shape.num_experts
            lim = C.memory_limit()
            if ctx.blocked is None and lim is not None and ctx.resident_bytes() + need > 0.8 * lim:
                raise _Skip(
                    f"its K-blocked FP8 copy ({need / GIB:.1f} GiB) does not fit next to the other weights "
                    f"({ctx.resident_bytes() / GIB:.1f} GiB of a {lim / GIB:.1f} GiB pool); use --experts"
                )
            l1b, l2b = ctx.blocks()
            return jax.jit(partial(fp8_ragged, clamp=clamp)), (l1b, w.l1_sf, l2b, w.l2_sf)
        raise ValueError(p.name)

    def gather_limit(self, ctx: ModelCtx) -> float:
        if self.args.gather_max_gib is not None:
            return self.args.gather_max_gib * GIB
        lim = C.memory_limit()
        if lim is None:
            return 2 * GIB
        return min(8 * GIB, 0.25 * max(0, lim - ctx.resident_bytes()))

    def run_path(self, ctx: ModelCtx, p: PathSpec, t: int, inp: InputSets, floors, y_f32, y_ref) -> dict[str, Any]:
        shape = ctx.shape
        rec: dict[str, Any] = {"status": "skipped", "reason": None}
        reason = self.static_skip(p)
        if reason is None and p.gather:
            g = t * shape.top_k * bytes_per_expert(p.weight_format, shape.hidden, shape.intermediate)
            if p.weight_format == "fp8" and p.mma == "bf16":
                g += t * shape.top_k * bytes_per_expert("bf16", shape.hidden, shape.intermediate)  # + its bf16 copy
            if g > self.gather_limit(ctx):
                reason = (
                    f"gathering {t}x{shape.top_k} experts would materialise {_gib(g)} per call "
                    f"(limit {_gib(self.gather_limit(ctx))}, --gather-max-gib)"
                )
        if reason is None and p.name == "ffi" and self.args.ffi_num_max_tokens and t > self.args.ffi_num_max_tokens:
            reason = f"T={t} exceeds the kernel buffer's token cap --ffi-num-max-tokens {self.args.ffi_num_max_tokens}"
        if reason is None and p.name in ctx.oom and t >= ctx.oom[p.name]:
            reason = f"ran out of memory at T={ctx.oom[p.name]} (its memory grows with T)"
        if reason is None and self.remaining() <= 0:
            reason = "time budget exhausted (--budget-s / --deadline)"
        if reason is not None:
            rec["reason"] = reason
            return rec
        try:
            if p.name == "tokamax_ragged" and self.tokamax_choice is None:
                self.pick_tokamax(ctx, inp)
            fn, wts = self.path_args(ctx, p, inp)
            call = _Bound(fn, wts)
            warm_s = None
            if p.name == "ffi" and t in self.ffi_warm:
                warm_s = self.ffi_warm[t].result()
            t0 = time.perf_counter()
            y0 = call(*inp.sets[0])
            jax.block_until_ready(y0)
            first = time.perf_counter() - t0
            y0 = np.asarray(y0).astype(np.float32)[inp.check_rows]
            check = self.check(p, y0, y_f32, y_ref)
            budget = min(self.args.time_per_path, max(0.0, self.remaining()))
            timing = C.measure(
                call, inp.sets, budget_s=budget, sample_s=self.args.sample_s, first_call_s=first,
                min_samples=self.args.min_samples,
            )
        except _Skip as e:
            rec["reason"] = str(e)
            return rec
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
            status, reason = self.classify(e, p.name)
            rec["status"], rec["reason"] = status, reason
            if reason.startswith("out of memory"):
                ctx.oom[p.name] = min(t, ctx.oom.get(p.name, t))
            if self.args.verbose:
                traceback.print_exc()
            gc.collect()
            return rec
        finally:
            ctx.blocked = None  # fp8_ragged's copy lives for one point only
        floor = floors[f"{p.weight_format}_weights_{p.mma}_mma"]
        rec.update(timing.as_dict())
        if warm_s is not None:
            rec["first_call_s"] = warm_s  # the background compile + first run
        rec.update(
            status="ok",
            check=check,
            floor_s=floor["floor_s"],
            floor_kind=f"{p.weight_format}_weights_{p.mma}_mma",
            time_over_floor=timing.median_s / floor["floor_s"],
            floor_fraction=floor["floor_s"] / timing.median_s,
            weight_bytes_touched=floor["weight_bytes"],
            achieved_weight_bytes_per_s=floor["weight_bytes"] / timing.median_s,
            achieved_flops_per_s=floor["flops"] / timing.median_s,
        )
        if p.name == "tokamax_ragged":
            rec["implementation"] = self.tokamax_note
        if p.name in ("xla_capacity", "fp8w_capacity", "fp8_capacity"):
            rec["capacity"] = inp.capacity
            rec["expert_rows_computed"] = inp.capacity * shape.num_experts
        self.fail_count.pop(p.name, None)
        return rec

    def check(self, p: PathSpec, y, y_f32, y_ref) -> dict[str, Any]:
        rel_f32 = C.rel_l2(y, y_f32)
        out: dict[str, Any] = {"rel_l2_vs_f32": rel_f32}
        if p.name == "reference":
            out.update(oracle="f32", rel_l2=rel_f32, tol=TOL["reference_vs_f32"])
            out["rel_l2_vs_reference_rows"] = C.rel_l2(y, y_ref())
        elif p.oracle == "reference":
            r = C.rel_l2(y, y_ref())
            out.update(oracle="reference", rel_l2=r, tol=TOL["fp8_vs_reference"])
        else:
            out.update(oracle="f32", rel_l2=rel_f32, tol=TOL["bf16_vs_f32"])
        out["pass"] = bool(math.isfinite(out["rel_l2"]) and out["rel_l2"] <= out["tol"])
        return out

    def classify(self, e: BaseException, name: str) -> tuple[str, str]:
        from jax_megamoe import ops

        msg = f"{type(e).__name__}: {_first_line(e)}"
        text = str(e)
        if isinstance(e, ops.BackendUnavailableError):
            self.sticky[name] = f"unavailable: {_first_line(e)}"
            return "skipped", self.sticky[name]
        if isinstance(e, NotImplementedError) or any(
            s in text for s in ("UNIMPLEMENTED", "not implemented", "Not implemented", "not supported",
                                "Unsupported", "unsupported", "MLIR translation rule", "No such compile option")
        ):
            self.sticky[name] = f"not supported here: {msg}"
            return "skipped", self.sticky[name]
        if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
            return "skipped", f"out of memory: {msg}"
        self.fail_count[name] = self.fail_count.get(name, 0) + 1
        if self.fail_count[name] >= 2:
            self.sticky[name] = f"failed twice, not retried: {msg}"
        return "failed", msg

    def pick_tokamax(self, ctx: ModelCtx, inp: InputSets) -> None:
        """First tokamax configuration that compiles and runs here (Mosaic GPU kernel first)."""
        notes = []
        for impl, dt in (("mosaic", F32), ("mosaic", BF16), (None, F32)):
            try:
                fn = jax.jit(partial(tokamax_ragged, clamp=ctx.shape.clamp, implementation=impl, out_dtype=dt))
                jax.block_until_ready(fn(*inp.sets[0], ctx.w13t, ctx.w2t))
            except Exception as e:  # noqa: BLE001
                notes.append(f"implementation={impl!r} out={jnp.dtype(dt).name}: {type(e).__name__}: {_first_line(e, 160)}")
                continue
            self.tokamax_choice = (impl, dt)
            self.tokamax_note = f"implementation={impl!r}, out={jnp.dtype(dt).name}" + (
                f" (tried first: {'; '.join(notes)})" if notes else ""
            )
            return
        raise RuntimeError("no tokamax ragged_dot implementation ran: " + "; ".join(notes))


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


class _Skip(Exception):
    pass


class _Bound:
    """``fn(*inputs, *weights)`` as a callable of the inputs alone (what the timer rotates)."""

    def __init__(self, fn, wts):
        self.fn, self.wts = fn, wts

    def __call__(self, *inputs):
        return self.fn(*inputs, *self.wts)


class ModelCtx:
    """The weights of one model in every format the paths read (extra formats made on first use)."""

    def __init__(self, shape: Shape, weights: MoEWeights, w13t, w2t):
        self.shape, self.weights, self.w13t, self.w2t = shape, weights, w13t, w2t
        self._scales = None
        self.blocked = None  # fp8_ragged's K-blocked copy: made per point, dropped after the path ran
        self.ffi_fn = None  # one jitted FFI function per model (shared with the prewarm threads)
        self.oom: dict[str, int] = {}  # path -> smallest T that ran out of memory

    def scales(self):
        if self._scales is None:
            self._scales = scale_rows(self.weights)
        return self._scales

    def blocks(self):
        if self.blocked is None:
            self.blocked = blocked_fp8(self.weights)
        return self.blocked

    def resident_bytes(self) -> int:
        arrs = [self.weights.l1, self.weights.l1_sf, self.weights.l2, self.weights.l2_sf]
        if self.w13t is not None:
            arrs += [self.w13t, self.w2t]
        for extra in (self._scales, self.blocked):
            if extra is not None:
                arrs.extend(extra)
        return int(sum(a.nbytes for a in arrs))

    def expert_group(self, cap: int) -> int:
        """Experts per step of fp8w_capacity: their bf16 copies stay under ~1 GiB (a divisor of E)."""
        e = self.shape.num_experts
        per = bytes_per_expert("bf16", self.shape.hidden, self.shape.intermediate)
        g = max(1, min(e, GIB // per))
        while e % g:
            g -= 1
        return g

    def free(self) -> None:
        self._scales = self.blocked = self.ffi_fn = None
        self.weights = self.w13t = self.w2t = None


def best_of(paths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def ok(n):
        r = paths.get(n)
        return r is not None and r["status"] == "ok" and r["check"]["pass"]

    def pick(names):
        c = [n for n in names if ok(n)]
        return min(c, key=lambda n: paths[n]["median_s"]) if c else None

    bf16 = pick(XLA_BF16)
    xla_any = pick([p.name for p in PATHS if p.name not in ("ffi", "reference")])
    out: dict[str, Any] = {"best_xla_bf16": bf16, "best_xla_any": xla_any}
    if bf16:
        out["best_xla_bf16_s"] = paths[bf16]["median_s"]
    if xla_any:
        out["best_xla_any_s"] = paths[xla_any]["median_s"]
    if ok("ffi") and xla_any:
        out["ffi_speedup_vs_best_xla"] = paths[xla_any]["median_s"] / paths["ffi"]["median_s"]
    return out


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
            _TOKAMAX_ERR.append(f"tokamax not importable: {type(e).__name__}: {_first_line(e, 200)}")
        return _TOKAMAX_ERR[0]


# =============================================================================================
# Reports: PNG and RESULTS.md
# =============================================================================================

_STYLE = {
    "ffi": dict(color="black", lw=2.5, marker="o"),
    "xla_gather": dict(color="tab:blue", marker="v"),
    "xla_capacity": dict(color="tab:orange", marker="s"),
    "xla_ragged": dict(color="tab:green", marker="D"),
    "xla_ragged_cudnn": dict(color="darkgreen", marker="D", ls="--"),
    "xla_ragged_triton": dict(color="lime", marker="D", ls="--"),
    "tokamax_ragged": dict(color="tab:olive", marker="P"),
    "fp8w_gather": dict(color="tab:purple", marker="v", ls=":"),
    "fp8w_capacity": dict(color="tab:brown", marker="s", ls=":"),
    "fp8_gather": dict(color="tab:pink", marker="v", ls="-."),
    "fp8_capacity": dict(color="tab:cyan", marker="s", ls="-."),
    "fp8_ragged": dict(color="tab:red", marker="D", ls="-."),
    "reference": dict(color="tab:gray", marker="x"),
}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in result["models"] if any("paths" in q for q in m["points"])]
    n = max(1, len(models))
    fig, axes = plt.subplots(1, n, figsize=(7.5 * n, 5.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        pts = [p for p in m["points"] if "paths" in p]
        for name in [p.name for p in PATHS]:
            xs, ys, lo, hi = [], [], [], []
            for p in pts:
                r = p["paths"].get(name)
                if r and r["status"] == "ok":
                    xs.append(p["tokens"])
                    ys.append(r["median_s"] * 1e6)
                    lo.append(r["p10_s"] * 1e6)
                    hi.append(r["p90_s"] * 1e6)
            if xs:
                st = dict(_STYLE.get(name, {}))
                ax.plot(xs, ys, label=PATH_BY_NAME[name].label if name in PATH_BY_NAME else name, ms=4, **st)
                ax.fill_between(xs, lo, hi, color=st.get("color"), alpha=0.12, lw=0)
        for key, lab, col in (
            ("fp8_weights_fp8_mma", "floor, FP8 weights + FP8 MMA", "black"),
            ("bf16_weights_bf16_mma", "floor, bf16 weights + bf16 MMA", "tab:green"),
        ):
            xs = [p["tokens"] for p in pts]
            ys = [p["floors"][key]["floor_s"] * 1e6 for p in pts]
            if xs:
                ax.plot(xs, ys, ls="--", color=col, lw=1.2, alpha=0.8, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ts = sorted({p["tokens"] for p in pts})
        if ts:
            ax.set_xticks(ts, [str(t) for t in ts])
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time per layer call (us), median; band p10-p90")
        title = f"{m['name']}: H={m['hidden']} I={m['intermediate']} E={m['num_experts']} K={m['top_k']}"
        if m["num_experts"] != m["full_experts"]:
            title += f" (of {m['full_experts']})"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", framealpha=0.7)
    dev = result.get("device", {})
    fig.suptitle(f"routed-expert layer on {dev.get('kind', '?')} ({result.get('date', '')})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rate(v: float | None, unit: str) -> str:
    if not v:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if v >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def results_markdown(result: dict[str, Any], png: str | None = None) -> str:
    """The moe_layer section of RESULTS.md; ``png``: the plot's path relative to that file."""
    dev, ver, ceil = result["device"], result["versions"], result["ceilings"]
    lines = [
        "## Routed-expert layer sweep (`benchmarks/moe_layer.py`)",
        "",
        f"- device: **{dev.get('kind')}** ({dev.get('platform')}), date {result.get('date')}",
        f"- versions: jax {ver.get('jax')}, jaxlib {ver.get('jaxlib')}, jax_megamoe {ver.get('jax_megamoe')}"
        + (f" (git {ver['git_head']})" if ver.get("git_head") else "")
        + (f", tokamax {ver['tokamax']}" if ver.get("tokamax") else "")
        + (f", {ver['platform_version']}" if ver.get("platform_version") else ""),
        f"- command: `{result.get('command')}`",
        f"- measured ceilings: HBM {_rate(ceil['hbm_bytes_per_s'], 'B/s')} ({ceil.get('hbm_method')}); "
        f"bf16 matmul {_rate(ceil['bf16_flops_per_s'], 'FLOP/s')}; FP8 matmul "
        + (_rate(ceil["fp8_flops_per_s"], "FLOP/s") if ceil.get("fp8_flops_per_s") else str(ceil.get("fp8_method"))),
    ]
    if result.get("shrink_note"):
        lines.append(f"- **{result['shrink_note']}**")
    tol = result.get("tolerances", TOL)
    lines += [
        f"- checks: {result.get('check_rows', CHECK_ROWS)} rows per point, relative L2, against the f32 oracle (bf16-activation "
        f"paths, tol {tol['bf16_vs_f32']:g}) or the reference (FP8-activation paths, tol {tol['fp8_vs_reference']:g})",
        "- cells: median time per layer call (time / roofline floor of that path's weight format and MMA type); "
        "`-`: not run, reasons below. Timing: " + str(result.get("timing_method", "")),
        "",
    ]
    if png:
        lines += [f"![time per layer call vs tokens]({png})", ""]
    skips: dict[tuple[str, str], list[str]] = {}
    fails: list[str] = []
    for m in result["models"]:
        if "error" in m:
            lines += [f"### {m['name']}", "", f"*failed: {m['error']}*", ""]
            continue
        lines.append(f"### {m['name']}: H={m['hidden']}, I={m['intermediate']}, E={m['num_experts']}, K={m['top_k']}")
        if m.get("e_note"):
            lines.append(f"\n*{m['e_note']}*")
        lines.append("")
        pts = m["points"]
        lines.append("| | " + " | ".join(f"T={q['tokens']}" for q in pts) + " |")
        lines.append("|---|" + "---:|" * len(pts))

        def row(label, fn):
            cells = []
            for q in pts:
                if "paths" not in q:
                    cells.append(f"*{q.get('skipped', 'not run')}*")
                else:
                    cells.append(fn(q))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

        row("experts hit", lambda q: f"{q['distinct_experts']:.1f}")
        row("floor FP8 (fp8 MMA)", lambda q: C.fmt_time(q["floors"]["fp8_weights_fp8_mma"]["floor_s"]))
        row("floor bf16", lambda q: C.fmt_time(q["floors"]["bf16_weights_bf16_mma"]["floor_s"]))
        names = [p.name for p in PATHS if any(p.name in q.get("paths", {}) for q in pts)]
        for n in names:
            def cell(q, n=n):
                r = q["paths"].get(n, {})
                if r.get("status") == "ok":
                    mark = "" if r["check"]["pass"] else " **check FAIL**"
                    if not r["check"]["pass"]:
                        fails.append(f"{m['name']} T={q['tokens']} {n}: rel L2 {r['check']['rel_l2']:.3g} > {r['check']['tol']:g}")
                    return f"{C.fmt_time(r['median_s'])} ({r['time_over_floor']:.1f}x){mark}"
                if r.get("reason"):
                    skips.setdefault((n, r["reason"]), []).append(f"{m['name']} T={q['tokens']}")
                return "-" if r.get("status") != "failed" else "failed"

            row(f"`{n}`", cell)
        row("**best XLA**", lambda q: (
            f"`{q['best']['best_xla_any']}` {C.fmt_time(q['best']['best_xla_any_s'])}" if q["best"].get("best_xla_any") else "-"
        ))
        row("best XLA bf16 (b)", lambda q: (
            f"`{q['best']['best_xla_bf16']}`" if q["best"].get("best_xla_bf16") else "-"
        ))
        row("**FFI speed-up**", lambda q: (
            f"{q['best']['ffi_speedup_vs_best_xla']:.2f}x" if q["best"].get("ffi_speedup_vs_best_xla") else "-"
        ))
        lines.append("")
    if fails:
        lines += ["### Check failures", ""] + [f"- {f}" for f in fails] + [""]
    if skips:
        lines += ["### Not run or failed", ""]
        for (n, why), where in sorted(skips.items()):
            lines.append(f"- `{n}` ({', '.join(where)}): {why}")
        lines.append("")
    return "\n".join(lines)


# =============================================================================================
# CLI
# =============================================================================================


def _int_list(s: str) -> list[int]:
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"{s!r}: need integers >= 1")
    return out


def _experts(s: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = int(v)
        else:
            out["*"] = int(part)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flash,pro", help="comma list of flash, pro (default both)")
    p.add_argument("--tokens", type=_int_list, default=None, help=f"token counts (default {FULL_TOKENS}; --quick {QUICK_TOKENS})")
    p.add_argument("--quick", action="store_true", help="fewer token counts and shorter timing (< 3 min on an H100)")
    p.add_argument("--cpu-smoke", action="store_true", help=f"tiny shapes, tokens {SMOKE_TOKENS} (implied on a CPU device)")
    p.add_argument("--no-shrink", action="store_true", help="on a CPU device, keep the real layer shapes")
    p.add_argument("--experts", type=_experts, default={}, help="E for every model (N) or per model (flash=N,pro=M)")
    p.add_argument("--paths", default=None, help="comma list of paths to run (default all): " + ", ".join(x.name for x in PATHS))
    p.add_argument("--include-reference", action="store_true", help="also time the pure-JAX reference on a GPU")
    p.add_argument("--out", default=str(C.REPO / "benchmarks" / "results"), help="output folder (JSON + PNG)")
    p.add_argument("--write-results", default=None, help="also fill this RESULTS.md (its moe_layer section)")
    p.add_argument("--from-json", default=None, help="no measuring: re-render the PNG / RESULTS.md from this JSON")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new points after this many seconds")
    p.add_argument("--deadline", type=float, default=None, help="same, as a Unix time (wins over --budget-s)")
    p.add_argument("--time-per-path", type=float, default=None, help="seconds of timed samples per path and point")
    p.add_argument("--sample-s", type=float, default=None, help="target length of one timing sample (s)")
    p.add_argument("--min-samples", type=int, default=5)
    p.add_argument("--sets", type=int, default=None, help="rotating input sets (x, routing) per point (default 4; CPU smoke 2)")
    p.add_argument("--gather-max-gib", type=float, default=None, help="largest per-call weight gather of the gather paths")
    p.add_argument("--ffi-prewarm", type=int, default=1, help="threads compiling the FFI path's token counts ahead (the JIT serialises nvcc runs anyway)")
    p.add_argument("--ffi-num-max-tokens", type=int, default=None,
                   help="token cap of the FFI kernel's buffer for every T (default: each point's own T, the smallest)")
    p.add_argument("--ffi-reserved-sms", type=int, default=None, help="SMs the FFI kernel leaves free (default: the op's, 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing paths")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if m not in ("flash", "pro"):
            p.error(f"--models: unknown model {m!r} (flash, pro)")
    if a.paths is not None:
        a.paths = [s.strip() for s in a.paths.split(",") if s.strip()]
        bad = [s for s in a.paths if s not in PATH_BY_NAME]
        if bad:
            p.error(f"--paths: unknown {bad}; choose from {', '.join(PATH_BY_NAME)}")
    if a.sets is not None and a.sets < 1:
        p.error("--sets must be >= 1")
    return a


def finalize(args: argparse.Namespace, result: dict[str, Any]) -> None:
    out = Path(args.out)
    png = out / "moe_layer.png"
    try:
        plot(result, png)
        C.log(f"wrote {png}")
    except Exception as e:  # noqa: BLE001
        C.log(f"plot failed: {type(e).__name__}: {e}")
    if args.write_results:
        md = Path(args.write_results)
        rel = os.path.relpath(png.resolve(), md.resolve().parent) if png.is_file() else None
        C.replace_section(md, "moe_layer", results_markdown(result, rel))
        C.log(f"wrote the moe_layer section of {args.write_results}")


def summary_table(result: dict[str, Any]) -> str:
    rows = []
    for m in result["models"]:
        for q in m["points"]:
            if "paths" not in q:
                continue
            b = q["best"]
            ffi = q["paths"].get("ffi", {})
            rows.append(
                f"{m['name']:9s} T={q['tokens']:5d}  best XLA {b.get('best_xla_any') or '-':15s} "
                f"{C.fmt_time(b.get('best_xla_any_s')):>10s}   ffi "
                + (C.fmt_time(ffi['median_s']) if ffi.get("status") == "ok" else f"({ffi.get('status', '-')})")
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        import json

        result = json.loads(Path(args.from_json).read_text())
        if args.out == str(C.REPO / "benchmarks" / "results"):
            args.out = str(Path(args.from_json).parent)
        finalize(args, result)
        return 0
    dev = C.device_info()
    on_cpu = dev["platform"] == "cpu"
    smoke = args.cpu_smoke or (on_cpu and not args.no_shrink)
    if args.tokens is None:
        args.tokens = list(SMOKE_TOKENS if smoke else (QUICK_TOKENS if args.quick else FULL_TOKENS))
    args.budget_given = args.budget_s is not None or args.quick
    if args.budget_s is None:
        args.budget_s = 50.0 if smoke else (160.0 if args.quick else 540.0)
    if args.time_per_path is None:
        args.time_per_path = 0.03 if smoke else (0.12 if args.quick else 0.3)
    if args.sample_s is None:
        args.sample_s = 0.01 if on_cpu else 0.003
    if smoke:
        args.min_samples = min(args.min_samples, 3)
        if args.gather_max_gib is None:
            args.gather_max_gib = 1 / 16
    if args.sets is None:
        args.sets = 2 if smoke else 4
    shrink_note = ""
    if smoke:
        shrink_note = (
            "CPU smoke run: tiny stand-in shapes (flash -> H=512 I=256 E=16, pro -> H=1024 I=256 E=24, same K/rho/clamp); "
            "numbers say nothing about the real layers"
            + ("" if args.cpu_smoke else " (shrunk automatically on a CPU device; --no-shrink keeps the real shapes)")
        )
        C.log(shrink_note)
    sweep = Sweep(args)
    C.log(f"device {dev['kind']} ({dev['platform']}), pool {((dev['memory_bytes_limit'] or 0) / GIB):.1f} GiB; tokens {args.tokens}")
    t0 = time.perf_counter()
    ceilings = measure_ceilings(small=smoke or on_cpu, time_budget=0.1 if smoke else 1.0)
    C.log(
        f"ceilings: HBM {ceilings['hbm_bytes_per_s'] / 1e9:.0f} GB/s, bf16 {ceilings['bf16_flops_per_s'] / 1e12:.1f} TFLOP/s, "
        f"fp8 " + (f"{ceilings['fp8_flops_per_s'] / 1e12:.1f} TFLOP/s" if ceilings.get("fp8_flops_per_s") else ceilings["fp8_method"])
        + f" ({time.perf_counter() - t0:.1f} s)"
    )
    extra = {}
    if tokamax_import_error() is None:
        import tokamax

        extra["tokamax"] = getattr(tokamax, "__version__", "?")
    sweep.result = {
        "schema": SCHEMA,
        "date": C.utc_now(),
        "command": C.command_line(),
        "device": dev,
        "versions": C.versions(extra),
        "cpu_smoke": smoke,
        "shrink_note": shrink_note,
        "args": {k: v for k, v in vars(args).items()},
        "ceilings": ceilings,
        "tolerances": TOL,
        "check_rows": CHECK_ROWS,
        "timing_method": (
            "jit; first call (compile) excluded; samples of n back-to-back calls rotating over "
            f"{args.sets} pre-generated (x, routing) sets, blocked on the last; per-call = sample / n; "
            "median, p10, p90 over samples"
        ),
        "paths": {p.name: dataclasses.asdict(p) for p in PATHS},
        "models": [],
    }
    lim = dev["memory_bytes_limit"]
    for i, name in enumerate(args.models):
        sweep.share_time(len(args.models) - i)
        shape = model_shape(name, smoke=smoke)
        override = args.experts.get(name, args.experts.get("*"))
        shape = choose_experts(shape, None if smoke else lim, override, with_bf16=sweep.wants_bf16())
        try:
            sweep.run_model(shape, args.tokens)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory making the weights: the next model still runs
            C.log(f"{shape.name}: failed: {type(e).__name__}: {_first_line(e)}")
            if args.verbose:
                traceback.print_exc()
            sweep.result["models"].append({"name": shape.name, "error": f"{type(e).__name__}: {_first_line(e)}", "points": []})
            gc.collect()
    sweep.result["elapsed_s"] = time.time() - sweep.t_start
    sweep.result["skipped_paths"] = dict(sweep.sticky)
    sweep.save()
    if sweep._pool is not None:
        sweep._pool.shutdown(wait=False, cancel_futures=True)
    C.log(f"wrote {sweep.out_json()}")
    finalize(args, sweep.result)
    print("== summary ==")
    print(summary_table(sweep.result))
    fails = [
        (m["name"], q["tokens"], n)
        for m in sweep.result["models"]
        for q in m["points"]
        for n, r in q.get("paths", {}).items()
        if r.get("status") == "ok" and not r["check"]["pass"]
    ]
    if fails:
        print(f"CHECK FAILURES: {fails}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
