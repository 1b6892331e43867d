"""Routed-expert weights in the layouts DeepGEMM's Mega MoE kernels read (sgl-deep-gemm 0.2.5).

Everything here is pure ``jnp`` and jit-able, except the host-side summary of an FP4 -> FP8
conversion (:class:`ConversionReport`), which needs concrete arrays.

Canonical (checkpoint) format, per layer::

    w13        uint8 [E, 2I, H/2]   packed E2M1, rows [gate 0..I-1 | up 0..I-1], low nibble = even K
    w13_scale  uint8 [E, 2I, H/32]  UE8M0 bytes (float8_e8m0fnu accepted), one per 32 along K;
                                    0xFF (NaN) is refused unless allow_nan_scales=True
    w2         uint8 [E, H, I/2]
    w2_scale   uint8 [E, H, I/32]

Kernel formats (what :class:`MoEWeights` holds), following the wheel's
``deep_gemm.mega.transform_weights_for_mega_moe`` and ``deep_gemm.transform_weights_for_mega_moe_sm90``:

``mxf4xmxf4`` (sm_100)
    ``l1``    uint8 [E, 2I, H/2]   rows in the gran-16 *packed* gate/up interleave
    ``l1_sf`` int32 [E, H/128, 2I] 4 UE8M0 bytes per int32, MN-major; rows interleaved the same
              way, then UTCCP 4x32-transposed
    ``l2``    uint8 [E, H, I/2]    unchanged
    ``l2_sf`` int32 [E, I/128, H]  MN-major, UTCCP-transposed
``fp8xfp4`` (sm_100)
    as above but with the gran-8 gate/up interleave on ``l1`` and on the ``l1_sf`` rows
    (the wheel picks ``_interleave_weights_packed_fp4`` only for ``mxf4xmxf4`` / ``nvfp4xnvfp4``).
``fp8`` (sm_90)
    ``l1``    float8_e4m3fn [E, 2I, H]        gran-8 interleaved (data only)
    ``l1_sf`` float32 [E, 2I/128, H/128]      canonical [gate | up] order
    ``l2``    float8_e4m3fn [E, H, I]
    ``l2_sf`` float32 [E, H/128, I/128]

"Rows" are the MN axis of a weight (output features). For an SF array in its physical MN-major
form ``[..., K/128, MN]`` the rows are the *last* axis; every row transform takes ``axis=``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_megamoe._src.numerics import config as _config
from jax_megamoe._src.numerics._validate import ArrayIn, check_dtype, check_multiple, check_ndim
from jax_megamoe._src.numerics.quant import (
    decode_e2m1,
    dequantize_fp8_block128,
    dequantize_mxfp4_weight,
    encode_e4m3,
    pack_ue8m0,
    unpack_nibbles,
    unpack_ue8m0,
)

_FP8_MAX = 448.0
_BLOCK = 128  # FP8 scale block (sm_90) and UTCCP row block (sm_100)
_UTCCP_A, _UTCCP_C = 4, 32  # new_row[128b + 4c + a] = old_row[128b + 32a + c]

_E8M0 = np.dtype(jnp.float8_e8m0fnu)
_E4M3 = np.dtype(jnp.float8_e4m3fn)


# --------------------------------------------------------------------------------------------
# Row permutations
# --------------------------------------------------------------------------------------------


def _rows(name: str, x: Any, axis: int) -> tuple[jax.Array, int, int]:
    x = jnp.asarray(x)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for a rank-{x.ndim} array (shape {list(x.shape)})")
    ax = axis % x.ndim
    return x, ax, x.shape[ax]


def _permute_axis(x: jax.Array, ax: int, split: tuple[int, ...], perm: tuple[int, ...]) -> jax.Array:
    """Split axis ``ax`` into ``split``, permute those sub-axes by ``perm``, and merge them back."""
    shp = tuple(x.shape)
    k = len(split)
    y = x.reshape(shp[:ax] + split + shp[ax + 1 :])
    order = list(range(ax)) + [ax + p for p in perm] + list(range(ax + k, y.ndim))
    return jnp.transpose(y, order).reshape(shp)


def interleave_gate_up(w: ArrayIn, gran: int = 8, *, axis: int = -2, name: str = "w") -> jax.Array:
    """Rows ``[gate | up]`` -> ``[g0..g{gran-1}, u0..u{gran-1}, g{gran}.., u{gran}.., ...]``.

    DeepGEMM's ``_interleave_weights`` (``fp8xfp4`` L1 data and SF rows, sm_90 FP8 L1 data).
    """
    x, ax, n = _rows(name, w, axis)
    check_multiple(name, n, 2 * gran, f"rows on axis {axis}: two halves, each a multiple of gran={gran}")
    return _permute_axis(x, ax, (2, n // (2 * gran), gran), (1, 0, 2))


def deinterleave_gate_up(w: ArrayIn, gran: int = 8, *, axis: int = -2, name: str = "w") -> jax.Array:
    """Exact inverse of :func:`interleave_gate_up`."""
    x, ax, n = _rows(name, w, axis)
    check_multiple(name, n, 2 * gran, f"rows on axis {axis}: two halves, each a multiple of gran={gran}")
    return _permute_axis(x, ax, (n // (2 * gran), 2, gran), (1, 0, 2))


def interleave_gate_up_packed_fp4(w: ArrayIn, *, axis: int = -2, name: str = "w") -> jax.Array:
    """The gran-16 packed interleave of the FP4 kinds (``mxf4xmxf4``).

    Output unit ``u`` (32 rows) is built from gate rows ``16u..16u+15`` (G) and up rows
    ``16u..16u+15`` (U) as ``[G0,G2,..,G14, U0,U2,..,U14, G1,G3,..,G15, U1,U3,..,U15]``
    (DeepGEMM's ``_interleave_weights_packed_fp4``).
    """
    x, ax, n = _rows(name, w, axis)
    check_multiple(name, n, 32, f"rows on axis {axis}: two halves, each a multiple of 16")
    # source row = h*half + 16u + 2p + parity  ->  destination row = 32u + 16*parity + 8h + p
    return _permute_axis(x, ax, (2, n // 32, 8, 2), (1, 3, 0, 2))


def deinterleave_gate_up_packed_fp4(w: ArrayIn, *, axis: int = -2, name: str = "w") -> jax.Array:
    """Exact inverse of :func:`interleave_gate_up_packed_fp4`."""
    x, ax, n = _rows(name, w, axis)
    check_multiple(name, n, 32, f"rows on axis {axis}: two halves, each a multiple of 16")
    return _permute_axis(x, ax, (n // 32, 2, 2, 8), (2, 0, 3, 1))


def utccp_transpose(x: ArrayIn, *, axis: int = -2, name: str = "x") -> jax.Array:
    """UTCCP 4x32 transpose: within each 128-row block ``new[128b + 4c + a] = old[128b + 32a + c]``."""
    y, ax, n = _rows(name, x, axis)
    check_multiple(name, n, _BLOCK, f"rows on axis {axis}")
    return _permute_axis(y, ax, (n // _BLOCK, _UTCCP_A, _UTCCP_C), (0, 2, 1))


def utccp_untranspose(x: ArrayIn, *, axis: int = -2, name: str = "x") -> jax.Array:
    """Exact inverse of :func:`utccp_transpose`."""
    y, ax, n = _rows(name, x, axis)
    check_multiple(name, n, _BLOCK, f"rows on axis {axis}")
    return _permute_axis(y, ax, (n // _BLOCK, _UTCCP_C, _UTCCP_A), (0, 2, 1))


def _l1_interleave(mode: str) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """(interleave, inverse) applied to L1 rows in ``mode`` (as the 0.2.5 wheel chooses)."""
    if mode == "mxf4xmxf4":
        return interleave_gate_up_packed_fp4, deinterleave_gate_up_packed_fp4
    return interleave_gate_up, deinterleave_gate_up  # gran 8: fp8xfp4 (sm_100), fp8 data (sm_90)


# --------------------------------------------------------------------------------------------
# Byte reinterpretation and SF packing
# --------------------------------------------------------------------------------------------


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _as_uint8(name: str, x: Any, extra: tuple[Any, ...]) -> jax.Array:
    """``x`` as uint8 bytes; dtypes in ``extra`` are reinterpreted bit for bit."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    check_dtype(name, x, (np.uint8, *extra))
    x = jnp.asarray(x)
    if x.dtype != jnp.uint8:
        x = lax.bitcast_convert_type(x, jnp.uint8)
    return x


def _scale_bytes(name: str, x: Any) -> jax.Array:
    return _as_uint8(name, x, (_E8M0,))


def _data_bytes(name: str, x: Any) -> jax.Array:
    return _as_uint8(name, x, (np.int8,))  # safetensors stores packed E2M1 as I8


#: The opt-out named in every "UE8M0 NaN" error (one keyword on every public entry).
NAN_SCALES_OPT_OUT = "pass allow_nan_scales=True to load them anyway"


def nan_scale_message(
    name: str, scale: Any, dims: tuple[str, ...], *, lead: str = "", opt_out: str = NAN_SCALES_OPT_OUT
) -> str | None:
    """Why the UE8M0 bytes ``scale`` are refused, or None when none is 0xFF.

    0xFF is NaN in E8M0 (its only non-finite code; no real scale uses it) and turns every output
    that touches it non-finite without an error, so a byte 0xFF means a corrupt checkpoint.
    ``dims`` names ``scale``'s axes for the position of the first bad byte (after ``lead``, e.g.
    ``"expert 3, "``). The test is one ``max()`` pass (0xFF is the largest byte, so ``max == 0xFF``
    iff one is present): about 7x faster than ``np.any(x == 0xFF)``, which first builds a mask;
    the mask is built only on a hit.
    """
    u8 = np.asarray(scale)
    if u8.dtype.itemsize != 1:
        raise TypeError(f"{name}: expected one-byte UE8M0 scales, got {u8.dtype.name}")
    u8 = u8.view(np.uint8)
    if u8.size == 0 or int(u8.max()) != 0xFF:
        return None
    bad = u8 == 0xFF
    pos = lead + ", ".join(f"{d} {int(i)}" for d, i in zip(dims, np.argwhere(bad)[0]))
    return (
        f"{name}: {int(np.count_nonzero(bad))} UE8M0 scale bytes are 0xFF (NaN in E8M0, which would turn "
        f"the outputs non-finite), the first at {pos}; {opt_out}"
    )


def _check_nan_scales(name: str, x: Any, dims: tuple[str, ...], opt_out: str) -> None:
    """ValueError when the concrete UE8M0 bytes ``x`` hold a 0xFF (NaN in E8M0), naming ``name``,
    the first position (axes ``dims``) and the count. Tracers are skipped (nothing to look at
    under jit); a ``jax.Array`` is reduced where it lives, and read back only on a hit."""
    if _is_tracer(x):
        return
    if isinstance(x, jax.Array):
        b = x if x.dtype == jnp.uint8 else lax.bitcast_convert_type(x, jnp.uint8)
        if b.size == 0 or int(jnp.max(b)) != 0xFF:
            return
        x = np.asarray(b)
    msg = nan_scale_message(name, x, dims, opt_out=opt_out)
    if msg is not None:
        raise ValueError(msg)


def pack_sf_mn_major(sf_bytes: ArrayIn, *, name: str = "sf_bytes") -> jax.Array:
    """UE8M0 bytes ``uint8[..., MN, K/32]`` -> ``int32[..., K/128, MN]`` (MN-major, TMA-aligned).

    Byte ``j`` (little-endian) of int32 ``c`` holds K-group ``4c + j``; ``MN`` must be a multiple
    of 4 so that ``align(MN, 4) == MN`` (no padding rows). ``float8_e8m0fnu`` input is accepted.
    """
    sf = _scale_bytes(name, sf_bytes)
    if sf.ndim < 2:
        raise ValueError(f"{name}: expected at least rank 2 [..., MN, K/32], got shape {list(sf.shape)}")
    mn, kg = sf.shape[-2:]
    check_multiple(name, kg, 4, "scale groups along K (K/32); 4 go into one int32")
    check_multiple(name, mn, 4, "MN rows; the TMA-aligned stride align(MN, 4) must equal MN")
    return jnp.swapaxes(pack_ue8m0(sf), -1, -2)


def unpack_sf_mn_major(sf: ArrayIn, *, name: str = "sf") -> jax.Array:
    """Exact inverse of :func:`pack_sf_mn_major`: ``int32[..., K/128, MN]`` -> ``uint8[..., MN, K/32]``."""
    check_dtype(name, sf, np.int32)
    sf = jnp.asarray(sf)
    if sf.ndim < 2:
        raise ValueError(f"{name}: expected at least rank 2 [..., K/128, MN], got shape {list(sf.shape)}")
    return unpack_ue8m0(jnp.swapaxes(sf, -1, -2))


# --------------------------------------------------------------------------------------------
# FP4 (MXFP4) -> FP8 e4m3 with 128x128 power-of-two scales (sm_90)
# --------------------------------------------------------------------------------------------

_NEG = -(1 << 20)  # "no constraint" exponent for zero values
_D_MIN, _D_MAX = -60, 16  # clamp of the per-element exponent shift (see _convert_one)


def _ceil_log2_over_fp8_max(m: float) -> int:
    """Smallest t with m / 2^t <= 448, i.e. ceil(log2(m / 448)), computed exactly."""
    t = -64
    while m > _FP8_MAX * 2.0**t:
        t += 1
    return t


#: ceil(log2(|v| / 448)) for the E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (index = code & 7).
_TMAG = np.array([_NEG] + [_ceil_log2_over_fp8_max(m) for m in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)], dtype=np.int32)


def _pow2_f32(t: jax.Array) -> jax.Array:
    """Exact float32 ``2**t`` for integer ``t`` in [-149, 127] (subnormals built from bits)."""
    t = t.astype(jnp.int32)
    normal = jnp.left_shift(jnp.clip(t + 127, 1, 254), 23)
    sub = jnp.left_shift(jnp.int32(1), jnp.clip(t + 149, 0, 22))
    return lax.bitcast_convert_type(jnp.where(t >= -126, normal, sub), jnp.float32)


def _convert_one(packed: jax.Array, scale: jax.Array, with_stats: bool) -> tuple[jax.Array, jax.Array, Any]:
    """One expert: ``uint8[N, K/2]``, ``uint8[N, K/32]`` -> ``(q f8[N, K], t int32[N/128, K/128], stats)``.

    Works in the exponent domain, so no value ever over- or underflows float32: an element is
    ``e2m1 * 2^(s - 127)``, the block scale is ``S = 2^t`` with ``t = max ceil(log2(|v|/448))``
    over the block's nonzero values (0 for an all-zero block), and ``q = e4m3_rne(e2m1 *
    2^(s - 127 - t))``. Shifts below -60 are clamped (their values round to 0 either way).
    """
    n, k2 = packed.shape
    k = 2 * k2
    nbr, nbc = n // _BLOCK, k // _BLOCK
    codes = unpack_nibbles(packed)  # [N, K]
    blk = (nbr, _BLOCK, nbc, _BLOCK // 32, 32)
    mag = (codes & 7).astype(jnp.int32).reshape(blk)
    nz = mag != 0
    sexp = scale.astype(jnp.int32).reshape(blk[:-1] + (1,)) - 127
    need = jnp.where(nz, sexp + jnp.asarray(_TMAG)[mag], _NEG)
    tmax = need.max(axis=(1, 3, 4))
    t = jnp.where(tmax == _NEG, 0, tmax)  # [nbr, nbc]
    d = jnp.clip(sexp - t[:, None, :, None, None], _D_MIN, _D_MAX)
    target = decode_e2m1(codes).reshape(blk) * _pow2_f32(d)
    q = encode_e4m3(target)
    stats = None
    if with_stats:
        qf = q.astype(jnp.float32)
        err = qf - target
        ax = (1, 3, 4)
        gnz = nz.any(axis=-1, keepdims=True)
        s_u = scale.astype(jnp.int32).reshape(blk[:-1] + (1,))
        smax = jnp.where(gnz, s_u, -1).max(axis=ax)
        smin = jnp.where(gnz, s_u, 256).min(axis=ax)
        stats = dict(
            lossy=(err != 0).sum(axis=ax, dtype=jnp.int32),
            flushed=(nz & (qf == 0)).sum(axis=ax, dtype=jnp.int32),
            sse=(err * err).sum(axis=ax),
            ssr=(target * target).sum(axis=ax),
            maxerr=jnp.abs(err).max(axis=ax),
            spread=jnp.where(smax >= 0, smax - smin, 0),
        )
    return q.reshape(n, k), t, stats


@dataclasses.dataclass(frozen=True)
class _Progress:
    """Progress sink handed to ``jax.debug.callback``; hashable by value so that repeated calls
    with the same user callable reuse the compiled conversion."""

    fn: Callable[[int, int], None] | None  # None: print to stderr about every 10%
    offset: int
    total: int

    def __call__(self, done: int) -> None:
        done += self.offset
        if self.fn is not None:
            self.fn(done, self.total)
        elif done == self.total or done % max(1, self.total // 10) == 0:
            print(f"jax_megamoe: FP4 -> FP8 {done}/{self.total} expert tensors", file=sys.stderr, flush=True)


def _progress_fn(progress: Any, offset: int, total: int) -> _Progress | None:
    if progress is None or progress is False:
        return None
    if progress is True:
        return _Progress(None, offset, total)
    if not callable(progress):
        raise TypeError(f"progress: expected None, a bool or a callable(done, total), got {type(progress).__name__}")
    return _Progress(progress, offset, total)


def _convert_all(
    packed: jax.Array,
    scale: jax.Array,
    *,
    interleave: bool,
    with_stats: bool,
    batch_size: int,
    progress: _Progress | None,
) -> tuple[jax.Array, jax.Array, Any]:
    """All experts, one (or ``batch_size``) at a time through ``lax.map``; f32 work stays per expert."""
    num_e = packed.shape[0]

    def body(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, Any]:
        i, p, s = args
        q, t, st = _convert_one(p, s, with_stats)
        if interleave:
            q = interleave_gate_up(q, 8)
        if progress is not None:
            jax.debug.callback(lambda idx: progress(int(np.max(idx)) + 1), i)
        return q, t, st

    bs = None if batch_size <= 1 else min(batch_size, num_e)
    q, t, st = lax.map(body, (jnp.arange(num_e, dtype=jnp.int32), packed, scale), batch_size=bs)
    return q, _pow2_f32(t), (t, st)


def _check_eps(experts_per_step: Any) -> None:
    if not isinstance(experts_per_step, (int, np.integer)) or experts_per_step < 1:
        raise ValueError(f"experts_per_step: {experts_per_step!r} must be an integer >= 1")


_convert_all_jit = jax.jit(_convert_all, static_argnames=("interleave", "with_stats", "batch_size", "progress"))


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What an FP4 -> FP8 (128x128) conversion lost. Errors are in weight units (after scaling).

    ``max_exponent_spread``: the largest difference between UE8M0 exponents of 32-groups with
    nonzero values inside one 128x128 block; a spread <= 14 guarantees an exact block.
    ``error_bound``: ``max S * 2^-10`` over lossy blocks (half the e4m3 subnormal step); every
    element's error is at most this. Sums are accumulated in float64 across blocks and experts.
    """

    num_experts: int
    num_blocks: int
    num_elements: int
    num_lossy_blocks: int
    num_lossy_elements: int
    num_flushed_elements: int  # nonzero FP4 values that became 0 in FP8
    max_abs_error: float
    error_bound: float
    sum_sq_error: float
    sum_sq_ref: float
    max_exponent_spread: int
    min_scale_log2: int  # range of log2(S) over all blocks
    max_scale_log2: int
    lossy_experts: tuple[int, ...]

    @property
    def lossless(self) -> bool:
        return self.num_lossy_blocks == 0

    @property
    def rel_l2_error(self) -> float:
        """``||dequant(fp8) - fp4|| / ||fp4||`` (0 for all-zero weights)."""
        return math.sqrt(self.sum_sq_error / self.sum_sq_ref) if self.sum_sq_ref > 0 else 0.0

    def merge(self, other: ConversionReport) -> ConversionReport:
        """Combine the reports of two tensors of the same experts (e.g. L1 and L2)."""
        return ConversionReport(
            num_experts=max(self.num_experts, other.num_experts),
            num_blocks=self.num_blocks + other.num_blocks,
            num_elements=self.num_elements + other.num_elements,
            num_lossy_blocks=self.num_lossy_blocks + other.num_lossy_blocks,
            num_lossy_elements=self.num_lossy_elements + other.num_lossy_elements,
            num_flushed_elements=self.num_flushed_elements + other.num_flushed_elements,
            max_abs_error=max(self.max_abs_error, other.max_abs_error),
            error_bound=max(self.error_bound, other.error_bound),
            sum_sq_error=self.sum_sq_error + other.sum_sq_error,
            sum_sq_ref=self.sum_sq_ref + other.sum_sq_ref,
            max_exponent_spread=max(self.max_exponent_spread, other.max_exponent_spread),
            min_scale_log2=min(self.min_scale_log2, other.min_scale_log2),
            max_scale_log2=max(self.max_scale_log2, other.max_scale_log2),
            lossy_experts=tuple(sorted(set(self.lossy_experts) | set(other.lossy_experts))),
        )

    def summary(self) -> str:
        head = (
            f"FP4 -> FP8 128x128: {self.num_experts} experts, {self.num_blocks} blocks, "
            f"max exponent spread {self.max_exponent_spread}, log2(S) in "
            f"[{self.min_scale_log2}, {self.max_scale_log2}]"
        )
        if self.lossless:
            return head + "; exact (every block lossless)"
        ex = ", ".join(map(str, self.lossy_experts[:16])) + (", ..." if len(self.lossy_experts) > 16 else "")
        return (
            f"{head}; {self.num_lossy_blocks} lossy blocks in experts [{ex}], "
            f"{self.num_lossy_elements} elements rounded ({self.num_flushed_elements} to zero), "
            f"max abs error {self.max_abs_error:.3e} (bound {self.error_bound:.3e}), "
            f"relative L2 error {self.rel_l2_error:.3e}"
        )

    __str__ = summary


def _report(t: Any, st: dict[str, Any]) -> ConversionReport:
    t = np.asarray(t).astype(np.int64)  # [E, nbr, nbc]
    st = {k: np.asarray(v) for k, v in st.items()}
    s = np.ldexp(1.0, t)  # exact in float64
    lossy_b = st["lossy"] > 0
    num_e = t.shape[0]
    return ConversionReport(
        num_experts=num_e,
        num_blocks=int(t.size),
        num_elements=int(t.size) * _BLOCK * _BLOCK,
        num_lossy_blocks=int(lossy_b.sum()),
        num_lossy_elements=int(st["lossy"].astype(np.int64).sum()),
        num_flushed_elements=int(st["flushed"].astype(np.int64).sum()),
        max_abs_error=float((s * st["maxerr"].astype(np.float64)).max(initial=0.0)),
        error_bound=float(np.where(lossy_b, s * 2.0**-10, 0.0).max(initial=0.0)),
        sum_sq_error=float((s * s * st["sse"].astype(np.float64)).sum()),
        sum_sq_ref=float((s * s * st["ssr"].astype(np.float64)).sum()),
        max_exponent_spread=int(st["spread"].max(initial=0)),
        min_scale_log2=int(t.min(initial=0)),
        max_scale_log2=int(t.max(initial=0)),
        lossy_experts=tuple(int(e) for e in np.nonzero(lossy_b.reshape(num_e, -1).any(axis=1))[0]),
    )


def fp4_to_fp8_block128(
    packed: ArrayIn,
    scale: ArrayIn,
    *,
    report: bool = True,
    progress: bool | Callable[[int, int], None] | None = None,
    experts_per_step: int = 1,
) -> tuple[jax.Array, jax.Array, ConversionReport | None]:
    """MXFP4 ``uint8[E, N, K/2]`` + UE8M0 ``uint8[E, N, K/32]`` -> FP8 e4m3 with 128x128 scales.

    Returns ``(q float8_e4m3fn[E, N, K], s float32[E, N/128, K/128], report)`` with
    ``S = 2^ceil(log2(amax/448))`` per block (``S = 1`` for an all-zero block) and
    ``q = e4m3_rne(v / S)``; ``q * S`` equals the FP4 value exactly wherever the block's UE8M0
    exponents (of groups holding nonzero values) differ by at most 14. Rows stay in the given
    (canonical) order.

    A scale byte of 255 (NaN in UE8M0, never in a real checkpoint) is treated as ``2^128`` here;
    :meth:`MoEWeights.from_checkpoint` refuses it unless ``allow_nan_scales=True``.

    Experts are converted ``experts_per_step`` at a time (``lax.map``), so float32 temporaries
    exist for one expert only. ``progress``: ``True`` prints to stderr, or pass
    ``callable(done, total)``. ``report=True`` needs concrete arrays (it reads per-block statistics
    back to the host); under ``jax.jit`` pass ``report=False`` (the third result is then ``None``).
    """
    p = _data_bytes("packed", packed)
    check_ndim("packed", p, 3)
    e, n, k2 = p.shape
    check_multiple("packed", n, _BLOCK, "N, rows")
    check_multiple("packed", 2 * k2, _BLOCK, "K = 2 * packed.shape[-1]")
    s = _scale_bytes("scale", scale)
    _check_shape("scale", s, (("E", e), ("N", n), ("K/32", 2 * k2 // 32)))
    if report and (_is_tracer(p) or _is_tracer(s)):
        raise TypeError(
            "packed: report=True needs concrete arrays (the report is computed on the host); "
            "under jax.jit call fp4_to_fp8_block128(..., report=False)"
        )
    _check_eps(experts_per_step)
    prog = _progress_fn(progress, 0, e)
    q, sf, (t, st) = _convert_all_jit(
        p, s, interleave=False, with_stats=report, batch_size=int(experts_per_step), progress=prog
    )
    if prog is not None and not _is_tracer(q):
        q.block_until_ready()  # every progress line is out before we return
    return q, sf, (_report(t, st) if report else None)


# --------------------------------------------------------------------------------------------
# MoEWeights
# --------------------------------------------------------------------------------------------


def _check_shape(name: str, x: Any, dims: tuple[tuple[str, int], ...]) -> None:
    """Shape check whose message names each dimension, e.g. ``[E=8, H=512, I/2=256]``."""
    got = tuple(x.shape)
    if got != tuple(v for _, v in dims):
        want = "[" + ", ".join(f"{k}={v}" for k, v in dims) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(got)}")


def _arch_name(mode: str) -> str:
    return "sm_90" if mode in _config.SM90_MODES else "sm_100"


def _l1_layout_name(mode: str) -> str:
    return {
        "mxf4xmxf4": "gran-16 packed gate/up interleave",
        "fp8xfp4": "gran-8 gate/up interleave",
        "fp8": "FP8 128x128, gran-8 interleaved data",
    }[mode]


def _validate_dims(mode: str, num_experts: int, hidden: int, intermediate: int, source: str) -> None:
    try:
        _config.validate_moe_shape(
            hidden=hidden, intermediate=intermediate, num_experts=num_experts, top_k=1, mode=mode
        )
    except ValueError as err:
        raise ValueError(
            f"{err} (hidden={hidden}, intermediate={intermediate}, num_experts={num_experts} come from {source})"
        ) from None


@jax.jit
def _build_sm100_mxf4(w13: jax.Array, s13: jax.Array, w2: jax.Array, s2: jax.Array) -> tuple[jax.Array, ...]:
    return _build_sm100(w13, s13, w2, s2, "mxf4xmxf4")


@jax.jit
def _build_sm100_fp8xfp4(w13: jax.Array, s13: jax.Array, w2: jax.Array, s2: jax.Array) -> tuple[jax.Array, ...]:
    return _build_sm100(w13, s13, w2, s2, "fp8xfp4")


def _build_sm100(w13: jax.Array, s13: jax.Array, w2: jax.Array, s2: jax.Array, mode: str) -> tuple[jax.Array, ...]:
    il, _ = _l1_interleave(mode)
    l1 = il(w13)
    l1_sf = utccp_transpose(il(pack_sf_mn_major(s13), axis=-1), axis=-1)
    l2_sf = utccp_transpose(pack_sf_mn_major(s2), axis=-1)
    return l1, l1_sf, w2, l2_sf


def _unbuild_sm100(
    l1: jax.Array, l1_sf: jax.Array, l2: jax.Array, l2_sf: jax.Array, mode: str
) -> tuple[jax.Array, ...]:
    _, inv = _l1_interleave(mode)
    w13 = inv(l1)
    s13 = unpack_sf_mn_major(inv(utccp_untranspose(l1_sf, axis=-1), axis=-1))
    s2 = unpack_sf_mn_major(utccp_untranspose(l2_sf, axis=-1))
    return w13, s13, l2, s2


_unbuild_jit = jax.jit(_unbuild_sm100, static_argnames=("mode",))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class MoEWeights:
    """Routed-expert weights of one layer in a kernel layout (a JAX pytree).

    Leaves: ``l1``, ``l1_sf``, ``l2``, ``l2_sf`` (see the module docstring for each mode's
    layout). Static (part of the treedef, not leaves): ``mode``, ``hidden``, ``intermediate``,
    ``num_experts``. ``num_experts`` is the layer's expert count; under expert parallelism the
    leaves may hold a contiguous slice of it (``num_local_experts`` = leading leaf dimension).

    Build with :meth:`from_checkpoint` (MXFP4 checkpoint tensors, any mode) or :meth:`from_fp8`
    (FP8 checkpoint, mode ``'fp8'``); the constructor itself does no checking (pytree
    unflattening goes through it) — call :meth:`validate` on hand-built instances.
    """

    l1: jax.Array
    l1_sf: jax.Array
    l2: jax.Array
    l2_sf: jax.Array
    mode: str
    hidden: int
    intermediate: int
    num_experts: int

    # ---- shapes ---------------------------------------------------------------------------

    @staticmethod
    def kernel_shapes(
        mode: str, num_experts: int, hidden: int, intermediate: int
    ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{leaf name: (shape, dtype)}`` of the kernel layout for ``mode``."""
        _config.check_mode(mode)
        e, h, i = num_experts, hidden, intermediate
        if mode == "fp8":
            return {
                "l1": ((e, 2 * i, h), _E4M3),
                "l1_sf": ((e, 2 * i // _BLOCK, h // _BLOCK), np.dtype(np.float32)),
                "l2": ((e, h, i), _E4M3),
                "l2_sf": ((e, h // _BLOCK, i // _BLOCK), np.dtype(np.float32)),
            }
        return {
            "l1": ((e, 2 * i, h // 2), np.dtype(np.uint8)),
            "l1_sf": ((e, h // _BLOCK, 2 * i), np.dtype(np.int32)),
            "l2": ((e, h, i // 2), np.dtype(np.uint8)),
            "l2_sf": ((e, i // _BLOCK, h), np.dtype(np.int32)),
        }

    @property
    def num_local_experts(self) -> int:
        return int(self.l1.shape[0])

    @property
    def arch(self) -> int:
        """Compute-capability major the layout is for (10 = sm_100, 9 = sm_90)."""
        return _config.arch_of_mode(self.mode)

    @property
    def nbytes(self) -> int:
        return int(
            sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in (self.l1, self.l1_sf, self.l2, self.l2_sf))
        )

    def __repr__(self) -> str:
        def leaf(x: Any) -> str:
            if hasattr(x, "dtype") and hasattr(x, "shape"):
                return f"{np.dtype(x.dtype).name}{list(x.shape)}"
            return repr(x)  # pytree utilities may put other objects in leaf positions

        leaves = ", ".join(f"{k}={leaf(getattr(self, k))}" for k in ("l1", "l1_sf", "l2", "l2_sf"))
        return (
            f"MoEWeights(mode={self.mode!r}, num_experts={self.num_experts}, hidden={self.hidden}, "
            f"intermediate={self.intermediate}, {leaves})"
        )

    # ---- checks ---------------------------------------------------------------------------

    def validate(self, *, allow_nan_scales: bool = False) -> MoEWeights:
        """Check every leaf against the static fields (works on tracers and ShapeDtypeStructs).

        In the sm_100 modes, scale leaves that are host numpy arrays (hand-built weights) are also
        scanned for UE8M0 bytes 0xFF (NaN), unless ``allow_nan_scales``. ``jax.Array`` leaves are
        not: ``ops`` validates on every call, and a device reduction there would add a host sync
        per call; such leaves normally come from :meth:`from_checkpoint`, which checked its scales.
        """
        _config.check_mode(self.mode, "weights.mode")
        e_loc = self.num_local_experts
        if e_loc < 1 or self.num_experts % e_loc != 0:
            raise ValueError(
                f"weights.l1: {e_loc} local experts must be >= 1 and divide num_experts={self.num_experts}"
            )
        want = self.kernel_shapes(self.mode, e_loc, self.hidden, self.intermediate)
        for leaf, (shape, dtype) in want.items():
            x = getattr(self, leaf)
            check_dtype(f"weights.{leaf}", x, dtype)
            if tuple(x.shape) != shape:
                raise ValueError(
                    f"weights.{leaf}: expected shape {list(shape)} for mode {self.mode!r} "
                    f"(E_local={e_loc}, H={self.hidden}, I={self.intermediate}), got {list(x.shape)}"
                )
        if self.mode in _config.SM100_MODES and not allow_nan_scales:
            for leaf in ("l1_sf", "l2_sf"):
                x = getattr(self, leaf)
                if isinstance(x, np.ndarray):  # int32 words of 4 UE8M0 bytes, little-endian
                    b = np.ascontiguousarray(x, "<i4").view(np.uint8).reshape(*x.shape, 4)
                    _check_nan_scales(
                        f"weights.{leaf}",
                        b,
                        ("expert", "K/128 word", "MN row (kernel order)", "byte"),
                        "pass allow_nan_scales=True to validate() to accept them",
                    )
        return self

    def validate_for(
        self,
        mode: str,
        hidden: int | None = None,
        intermediate: int | None = None,
        num_experts: int | None = None,
        *,
        allow_nan_scales: bool = False,
    ) -> MoEWeights:
        """Raise ValueError unless these weights are laid out for ``mode`` and the given sizes
        (and pass :meth:`validate`, ``allow_nan_scales`` included)."""
        _config.check_mode(mode)
        if not isinstance(self, MoEWeights):
            raise TypeError(f"weights: expected a jax_megamoe.layout.MoEWeights, got {type(self).__name__}")
        if self.mode != mode:
            hint = (
                "the FP8 128x128 layout and the FP4 layouts are different data"
                if "fp8" in (self.mode, mode)
                else f"the L1 gate/up interleave differs ({_l1_layout_name(self.mode)} vs "
                f"{_l1_layout_name(mode)}) and the kernel would silently compute wrong results"
            )
            raise ValueError(
                f"weights: built for mode {self.mode!r} ({_arch_name(self.mode)}) but mode {mode!r} "
                f"was requested (an {_arch_name(mode)} layout); {hint}. Rebuild them with "
                f"MoEWeights.from_checkpoint(..., mode={mode!r})"
            )
        for what, have, req in (
            ("hidden", self.hidden, hidden),
            ("intermediate", self.intermediate, intermediate),
            ("num_experts", self.num_experts, num_experts),
        ):
            if req is not None and int(req) != have:
                raise ValueError(f"weights: {what} is {have} but {what}={req} was requested")
        return self.validate(allow_nan_scales=allow_nan_scales)

    # ---- constructors ---------------------------------------------------------------------

    @staticmethod
    def _check_checkpoint(
        w13: ArrayIn, w13_scale: ArrayIn, w2: ArrayIn, w2_scale: ArrayIn, mode: str, allow_nan_scales: bool = False
    ) -> tuple[jax.Array, ...]:
        _config.check_mode(mode)
        w13, w2 = _data_bytes("w13", w13), _data_bytes("w2", w2)
        s13, s2 = _scale_bytes("w13_scale", w13_scale), _scale_bytes("w2_scale", w2_scale)
        check_ndim("w13", w13, 3)
        e, two_i, h2 = w13.shape
        check_multiple("w13", two_i, 2, "rows: [gate | up]")
        h, i = 2 * h2, two_i // 2
        _validate_dims(mode, e, h, i, f"w13's shape {list(w13.shape)} = [E, 2I, H/2]")
        _check_shape("w13_scale", s13, (("E", e), ("2I", two_i), ("H/32", h // 32)))
        _check_shape("w2", w2, (("E", e), ("H", h), ("I/2", i // 2)))
        _check_shape("w2_scale", s2, (("E", e), ("H", h), ("I/32", i // 32)))
        if not allow_nan_scales:
            opt_out = "pass allow_nan_scales=True to MoEWeights.from_checkpoint to accept them"
            for name, arg, conv in (("w13_scale", w13_scale, s13), ("w2_scale", w2_scale, s2)):
                # a numpy argument is checked on the host, before it ever reaches a device
                _check_nan_scales(name, arg if isinstance(arg, np.ndarray) else conv, ("expert", "row", "col"), opt_out)
        return w13, s13, w2, s2

    @classmethod
    def from_checkpoint(
        cls,
        w13: ArrayIn,
        w13_scale: ArrayIn,
        w2: ArrayIn,
        w2_scale: ArrayIn,
        *,
        mode: str,
        progress: bool | Callable[[int, int], None] | None = None,
        experts_per_step: int = 1,
        allow_nan_scales: bool = False,
    ) -> MoEWeights:
        """Kernel-layout weights from MXFP4 checkpoint tensors (see the module docstring).

        ``w13``/``w2`` may be uint8 or int8 (reinterpreted), scales uint8 or float8_e8m0fnu.
        For ``mode='fp8'`` the experts are converted to FP8 with 128x128 power-of-two scales
        (:func:`fp4_to_fp8_block128`); use :meth:`from_checkpoint_with_report` to see what that
        conversion lost. Jit-able with ``mode`` static.

        A scale byte 0xFF (NaN in UE8M0) would make the outputs non-finite with no error, so
        concrete scales holding one raise ValueError naming the argument, the first
        ``[expert, row, col]`` and the count, unless ``allow_nan_scales=True`` (traced scales,
        under ``jax.jit``, cannot be looked at and are not checked).
        """
        w, _ = cls._from_checkpoint(
            (w13, w13_scale, w2, w2_scale),
            mode,
            False,
            progress=progress,
            experts_per_step=experts_per_step,
            allow_nan_scales=allow_nan_scales,
        )
        return w

    @classmethod
    def from_checkpoint_with_report(
        cls, w13: ArrayIn, w13_scale: ArrayIn, w2: ArrayIn, w2_scale: ArrayIn, *, mode: str, **options: Any
    ) -> tuple[MoEWeights, ConversionReport | None]:
        """:meth:`from_checkpoint` plus the FP4 -> FP8 :class:`ConversionReport` of L1 and L2
        merged (``None`` for the sm_100 modes, which keep the FP4 bytes). Needs concrete arrays.

        ``options`` are :meth:`from_checkpoint`'s (``progress``, ``experts_per_step``,
        ``allow_nan_scales``); the signature is written once, there."""
        return cls._from_checkpoint((w13, w13_scale, w2, w2_scale), mode, True, **options)

    @classmethod
    def _from_checkpoint(
        cls,
        tensors: tuple[ArrayIn, ArrayIn, ArrayIn, ArrayIn],
        mode: str,
        want_report: bool,
        *,
        progress: bool | Callable[[int, int], None] | None = None,
        experts_per_step: int = 1,
        allow_nan_scales: bool = False,
    ) -> tuple[MoEWeights, ConversionReport | None]:
        """``tensors``: ``(w13, w13_scale, w2, w2_scale)`` in checkpoint format."""
        w13, s13, w2, s2 = cls._check_checkpoint(*tensors, mode, allow_nan_scales)
        e, two_i, h2 = w13.shape
        h, i = 2 * h2, two_i // 2
        meta = dict(mode=mode, hidden=h, intermediate=i, num_experts=e)
        if mode in _config.SM100_MODES:
            build = _build_sm100_mxf4 if mode == "mxf4xmxf4" else _build_sm100_fp8xfp4
            return cls(*build(w13, s13, w2, s2), **meta), None
        if want_report and any(_is_tracer(a) for a in (w13, s13, w2, s2)):
            raise TypeError(
                "w13: from_checkpoint_with_report needs concrete arrays (the report is computed on the "
                "host); under jax.jit use MoEWeights.from_checkpoint"
            )
        _check_eps(experts_per_step)
        p1 = _progress_fn(progress, 0, 2 * e)  # L1 then L2: 2E steps
        p2 = _progress_fn(progress, e, 2 * e)
        kw = dict(with_stats=want_report, batch_size=int(experts_per_step))
        l1, l1_sf, (t1, st1) = _convert_all_jit(w13, s13, interleave=True, progress=p1, **kw)
        l2, l2_sf, (t2, st2) = _convert_all_jit(w2, s2, interleave=False, progress=p2, **kw)
        if p1 is not None and not _is_tracer(l2):
            l2.block_until_ready()
        rep = _report(t1, st1).merge(_report(t2, st2)) if want_report else None
        return cls(l1, l1_sf, l2, l2_sf, **meta), rep

    @classmethod
    def from_fp8(cls, w13: ArrayIn, w13_scale: ArrayIn, w2: ArrayIn, w2_scale: ArrayIn) -> MoEWeights:
        """Mode ``'fp8'`` weights from an FP8 checkpoint: ``w13 float8_e4m3fn[E, 2I, H]`` (rows
        ``[gate | up]``), ``w13_scale float32[E, 2I/128, H/128]``, ``w2 float8_e4m3fn[E, H, I]``,
        ``w2_scale float32[E, H/128, I/128]``. Only the L1 data is interleaved (gran 8)."""
        check_dtype("w13", w13, _E4M3)
        check_dtype("w13_scale", w13_scale, np.float32)
        check_dtype("w2", w2, _E4M3)
        check_dtype("w2_scale", w2_scale, np.float32)
        check_ndim("w13", w13, 3)
        e, two_i, h = w13.shape
        check_multiple("w13", two_i, 2, "rows: [gate | up]")
        i = two_i // 2
        _validate_dims("fp8", e, h, i, f"w13's shape {list(w13.shape)} = [E, 2I, H]")
        _check_shape("w13_scale", w13_scale, (("E", e), ("2I/128", two_i // _BLOCK), ("H/128", h // _BLOCK)))
        _check_shape("w2", w2, (("E", e), ("H", h), ("I", i)))
        _check_shape("w2_scale", w2_scale, (("E", e), ("H/128", h // _BLOCK), ("I/128", i // _BLOCK)))
        l1 = _interleave8_jit(jnp.asarray(w13))
        return cls(l1, jnp.asarray(w13_scale), jnp.asarray(w2), jnp.asarray(w2_scale), "fp8", h, i, e)

    # ---- inverses -------------------------------------------------------------------------

    def to_checkpoint(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Canonical ``(w13, w13_scale, w2, w2_scale)`` uint8 tensors (sm_100 modes), bit exact."""
        if self.mode not in _config.SM100_MODES:
            raise ValueError(
                f"weights: to_checkpoint() inverts the sm_100 layouts; these weights are mode {self.mode!r} "
                "(FP8, the FP4 bytes are gone); use to_fp8() for their canonical FP8 tensors"
            )
        return _unbuild_jit(self.l1, self.l1_sf, self.l2, self.l2_sf, mode=self.mode)

    def to_fp8(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Canonical FP8 ``(w13 [E, 2I, H], w13_scale, w2, w2_scale)`` of mode ``'fp8'`` weights."""
        if self.mode != "fp8":
            raise ValueError(f"weights: to_fp8() needs mode 'fp8' weights, these are mode {self.mode!r}")
        return _deinterleave8_jit(self.l1), self.l1_sf, self.l2, self.l2_sf

    def dequantize_expert(self, e: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(w13 f32[2I, H], w2 f32[H, I])`` of local expert ``e`` in canonical order ([gate | up]).

        ``e`` may be a traced int32 (inside ``lax.scan``); only that expert's data is read. An
        out-of-range traced index is clamped, as ``lax.dynamic_index_in_dim`` does.
        """
        if isinstance(e, (int, np.integer)) and not 0 <= int(e) < self.num_local_experts:
            raise ValueError(f"e: expert {int(e)} is out of range [0, {self.num_local_experts})")

        def take(a: jax.Array) -> jax.Array:
            return lax.dynamic_index_in_dim(a, e, axis=0, keepdims=False)

        if self.mode == "fp8":
            w13 = dequantize_fp8_block128(deinterleave_gate_up(take(self.l1), 8), take(self.l1_sf))
            w2 = dequantize_fp8_block128(take(self.l2), take(self.l2_sf))
            return w13, w2
        _, inv = _l1_interleave(self.mode)
        p13 = inv(take(self.l1))
        s13 = unpack_sf_mn_major(inv(utccp_untranspose(take(self.l1_sf), axis=-1), axis=-1))
        s2 = unpack_sf_mn_major(utccp_untranspose(take(self.l2_sf), axis=-1))
        return dequantize_mxfp4_weight(p13, s13), dequantize_mxfp4_weight(take(self.l2), s2)


_interleave8_jit = jax.jit(lambda x: interleave_gate_up(x, 8))
_deinterleave8_jit = jax.jit(lambda x: deinterleave_gate_up(x, 8))

jax.tree_util.register_dataclass(
    MoEWeights,
    data_fields=["l1", "l1_sf", "l2", "l2_sf"],
    meta_fields=["mode", "hidden", "intermediate", "num_experts"],
)
