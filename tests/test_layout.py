"""Kernel weight layouts: row transforms, SF packing, FP4 -> FP8 conversion and MoEWeights."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe import layout as L
from jax_megamoe import quant
from jax_megamoe.layout import ConversionReport, MoEWeights

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)
SM100 = ("mxf4xmxf4", "fp8xfp4")


# ------------------------------------------------------------------------------------------
# helpers (independent numpy oracles)
# ------------------------------------------------------------------------------------------


def np_codes(packed: np.ndarray) -> np.ndarray:
    """Low nibble = even column."""
    p = np.asarray(packed, np.uint8)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.uint8)
    out[..., 0::2] = p & 15
    out[..., 1::2] = p >> 4
    return out


def np_dequant_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float64 value of MXFP4 weights: e2m1(code) * 2^(s - 127) per 32 columns."""
    v = E2M1[np_codes(packed)]
    s = np.ldexp(1.0, np.asarray(scale, np.int64) - 127)
    return v * np.repeat(s, 32, axis=-1)


def np_dequant_fp8(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    qf = np.asarray(jnp.asarray(q).astype(jnp.float32), np.float64)
    s = np.asarray(s, np.float64)
    return qf * np.repeat(np.repeat(s, 128, axis=-2), 128, axis=-1)


def random_checkpoint(rng, e, h, i, lo=0, hi=255):
    """Random packed bytes (every nibble, -0 included) and random exponents in [lo, hi) (255, NaN
    in UE8M0, is refused by from_checkpoint unless allow_nan_scales=True: pass hi=256 with it)."""
    w13 = rng.integers(0, 256, (e, 2 * i, h // 2), dtype=np.uint8)
    s13 = rng.integers(lo, hi, (e, 2 * i, h // 32), dtype=np.uint8)
    w2 = rng.integers(0, 256, (e, h, i // 2), dtype=np.uint8)
    s2 = rng.integers(lo, hi, (e, h, i // 32), dtype=np.uint8)
    return w13, s13, w2, s2


def block_spread_scales(rng, e, n, k, spread=14, lo=100, hi=150):
    """UE8M0 bytes [E, N, K/32] whose exponents differ by at most `spread` inside each 128x128 block."""
    base = rng.integers(lo, hi, (e, n // 128, 1, k // 128, 1))
    off = rng.integers(0, spread + 1, (e, n // 128, 128, k // 128, 4))
    return (base + off).reshape(e, n, k // 32).astype(np.uint8)


def set_code(packed, e, row, col, code):
    """Write the 4-bit code of element (row, col) of expert e in place."""
    b = packed[e, row, col // 2]
    packed[e, row, col // 2] = (b & 0xF0) | code if col % 2 == 0 else (b & 0x0F) | (code << 4)


def force_edge(packed, scale, e, br, bc, spread):
    """In block (br, bc) of expert e: a value 6 * 2^(base+spread) and a value 0.5 * 2^base,
    so the block's exponent spread is exactly `spread` and its extreme values are present."""
    r0, c0 = 128 * br, 128 * bc
    base = int(scale[e, r0 : r0 + 128, c0 // 32 : c0 // 32 + 4].min())
    base = min(base, 255 - spread - 1)
    scale[e, r0, c0 // 32] = base + spread
    set_code(packed, e, r0, c0, 7)  # +6
    scale[e, r0 + 1, c0 // 32 + 1] = base
    set_code(packed, e, r0 + 1, c0 + 32, 9)  # -0.5
    # keep every other group of the block within [base, base + spread]
    blk = scale[e, r0 : r0 + 128, c0 // 32 : c0 // 32 + 4]
    np.clip(blk, base, base + spread, out=blk)


def lossless_checkpoint(rng, e, h, i):
    """Random MXFP4 experts whose FP8 128x128 conversion is exact (spread <= 14 per block)."""
    w13 = rng.integers(0, 256, (e, 2 * i, h // 2), dtype=np.uint8)
    w2 = rng.integers(0, 256, (e, h, i // 2), dtype=np.uint8)
    s13 = block_spread_scales(rng, e, 2 * i, h)
    s2 = block_spread_scales(rng, e, h, i)
    force_edge(w13, s13, 0, 0, 0, 14)  # the boundary case, spread exactly 14
    force_edge(w2, s2, e - 1, 1, 1, 14)
    return w13, s13, w2, s2


# ------------------------------------------------------------------------------------------
# hand-worked index examples
# ------------------------------------------------------------------------------------------


def test_gran16_packed_interleave_hand_example():
    # 32 rows: gate rows 0..15, up rows 16..31; one output unit.
    expected = [
        0,
        2,
        4,
        6,
        8,
        10,
        12,
        14,  # G0, G2, .., G14
        16,
        18,
        20,
        22,
        24,
        26,
        28,
        30,  # U0, U2, .., U14
        1,
        3,
        5,
        7,
        9,
        11,
        13,
        15,  # G1, G3, .., G15
        17,
        19,
        21,
        23,
        25,
        27,
        29,
        31,
    ]  # U1, U3, .., U15
    rows = jnp.arange(32, dtype=jnp.int32)[:, None] * jnp.ones((1, 3), jnp.int32)
    out = np.asarray(L.interleave_gate_up_packed_fp4(rows))
    assert out[:, 0].tolist() == expected
    assert (out == out[:, :1]).all()
    assert np.asarray(L.deinterleave_gate_up_packed_fp4(out))[:, 0].tolist() == list(range(32))


def test_gran16_packed_interleave_two_units():
    # 64 rows: gate 0..31, up 32..63; unit 1 is built from gate 16..31 and up 48..63.
    out = np.asarray(L.interleave_gate_up_packed_fp4(jnp.arange(64)[:, None]))[:, 0].tolist()
    assert out[32:] == [
        16,
        18,
        20,
        22,
        24,
        26,
        28,
        30,
        48,
        50,
        52,
        54,
        56,
        58,
        60,
        62,
        17,
        19,
        21,
        23,
        25,
        27,
        29,
        31,
        49,
        51,
        53,
        55,
        57,
        59,
        61,
        63,
    ]


def test_gran8_interleave_hand_example():
    expected = [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        16,
        17,
        18,
        19,
        20,
        21,
        22,
        23,
        8,
        9,
        10,
        11,
        12,
        13,
        14,
        15,
        24,
        25,
        26,
        27,
        28,
        29,
        30,
        31,
    ]
    out = np.asarray(L.interleave_gate_up(jnp.arange(32)[:, None], 8))[:, 0]
    assert out.tolist() == expected
    assert np.asarray(L.deinterleave_gate_up(out[:, None], 8))[:, 0].tolist() == list(range(32))
    # gran 4 (generic) on 16 rows
    out4 = np.asarray(L.interleave_gate_up(jnp.arange(16)[:, None], 4))[:, 0]
    assert out4.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]


def test_utccp_hand_example():
    out = np.asarray(L.utccp_transpose(jnp.arange(256)[:, None]))[:, 0]
    # new_row[128b + 4c + a] = old_row[128b + 32a + c]
    assert out[:12].tolist() == [0, 32, 64, 96, 1, 33, 65, 97, 2, 34, 66, 98]
    assert out[124:132].tolist() == [31, 63, 95, 127, 128, 160, 192, 224]
    assert out[255] == 255
    for b in range(2):
        for c in range(32):
            for a in range(4):
                assert out[128 * b + 4 * c + a] == 128 * b + 32 * a + c
    assert np.asarray(L.utccp_untranspose(out[:, None]))[:, 0].tolist() == list(range(256))
    # the kernel's own index formula (transform_sf_token_idx in sm100_fp8_fp4_mega_moe.cuh)
    pos = [(i & ~127) + (i & 31) * 4 + ((i >> 5) & 3) for i in range(256)]
    assert all(out[p] == i for i, p in enumerate(pos))


def test_sf_pack_hand_example():
    # one expert, MN = 4 rows, K = 256 (8 groups): row m holds bytes 10m+1 .. 10m+8
    b = (np.arange(4)[:, None] * 10 + np.arange(1, 9)[None, :]).astype(np.uint8)[None]
    packed = np.asarray(L.pack_sf_mn_major(b))
    assert packed.shape == (1, 2, 4) and packed.dtype == np.int32
    # byte j of int32 c = group 4c + j (little-endian), stored MN-major [K/128][MN]
    assert packed[0, 0, 0] == 0x04030201
    assert packed[0, 1, 0] == 0x08070605
    assert packed[0, 0, 3] == 0x2221201F  # 31, 32, 33, 34
    assert packed[0, 1, 2] == 0x1C1B1A19  # 25, 26, 27, 28
    assert np.array_equal(np.asarray(L.unpack_sf_mn_major(packed)), b)


# ------------------------------------------------------------------------------------------
# inverses are exact on random data
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "fwd,inv,rows",
    [
        (functools.partial(L.interleave_gate_up, gran=8), functools.partial(L.deinterleave_gate_up, gran=8), 48),
        (functools.partial(L.interleave_gate_up, gran=16), functools.partial(L.deinterleave_gate_up, gran=16), 96),
        (L.interleave_gate_up_packed_fp4, L.deinterleave_gate_up_packed_fp4, 96),
        (L.utccp_transpose, L.utccp_untranspose, 384),
    ],
)
def test_row_transform_inverses(seed, fwd, inv, rows):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (3, rows, 5), dtype=np.uint8)
    y = fwd(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not np.array_equal(np.asarray(y), x)  # it does permute
    assert np.array_equal(np.asarray(inv(y)), x)
    assert np.array_equal(np.asarray(fwd(inv(x))), x)
    # a row permutation: every row of y is a row of x, columns untouched
    assert sorted(map(bytes, np.asarray(y).reshape(-1, 5))) == sorted(map(bytes, x.reshape(-1, 5)))
    # along another axis (the physical MN-major SF keeps rows last)
    xt = np.swapaxes(x, -1, -2)
    assert np.array_equal(np.asarray(fwd(xt, axis=-1)), np.swapaxes(np.asarray(y), -1, -2))
    assert np.array_equal(np.asarray(inv(fwd(xt, axis=-1), axis=-1)), xt)
    # float data and jit
    xf = rng.standard_normal((2, rows, 3)).astype(np.float32)
    assert np.array_equal(np.asarray(jax.jit(lambda a: inv(fwd(a)))(xf)), xf)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sf_pack_roundtrip(seed):
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (3, 256, 16), dtype=np.uint8)  # every byte value, 255 included
    p = L.pack_sf_mn_major(b)
    assert p.shape == (3, 4, 256) and p.dtype == jnp.int32
    assert np.array_equal(np.asarray(L.unpack_sf_mn_major(p)), b)
    # reference packing: little-endian int32 of 4 consecutive groups, transposed to MN-major
    ref = np.swapaxes(np.ascontiguousarray(b).view("<i4"), -1, -2)
    assert np.array_equal(np.asarray(p), ref)
    # float8_e8m0fnu input is reinterpreted byte for byte
    e8 = b.view(jnp.float8_e8m0fnu)
    assert np.array_equal(np.asarray(L.pack_sf_mn_major(e8)), ref)


@pytest.mark.parametrize("mode", SM100)
@pytest.mark.parametrize("seed", [0, 1])
def test_checkpoint_roundtrip_bit_exact(mode, seed):
    rng = np.random.default_rng(seed)
    ck = random_checkpoint(rng, e=4, h=256, i=256, hi=256)  # every scale byte, 0xFF (NaN) included
    w = MoEWeights.from_checkpoint(*ck, mode=mode, allow_nan_scales=True)
    back = w.to_checkpoint()
    for name, got, want in zip(("w13", "w13_scale", "w2", "w2_scale"), back, ck):
        assert got.dtype == jnp.uint8, name
        assert np.array_equal(np.asarray(got), want), name
    # int8 data (safetensors I8) and float8_e8m0fnu scales give the same leaves
    w_alt = MoEWeights.from_checkpoint(
        ck[0].view(np.int8),
        ck[1].view(jnp.float8_e8m0fnu),
        ck[2].view(np.int8),
        ck[3].view(jnp.float8_e8m0fnu),
        mode=mode,
        allow_nan_scales=True,
    )
    for a, b in zip(jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(w_alt)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _perm_packed16(n):
    half = n // 2
    out = []
    for u in range(half // 16):
        g = [16 * u + j for j in range(16)]
        up = [half + r for r in g]
        out += g[0::2] + up[0::2] + g[1::2] + up[1::2]
    return np.array(out)


def _perm_gran8(n):
    half = n // 2
    out = []
    for u in range(half // 8):
        out += list(range(8 * u, 8 * u + 8)) + list(range(half + 8 * u, half + 8 * u + 8))
    return np.array(out)


def _perm_utccp(n):
    src = np.empty(n, np.int64)
    for b in range(n // 128):
        for a in range(4):
            for c in range(32):
                src[128 * b + 4 * c + a] = 128 * b + 32 * a + c
    return src


@pytest.mark.parametrize("mode", SM100)
def test_sm100_layout_matches_loop_construction(mode):
    """Kernel layout built element by element from the wheel's definitions, in numpy."""
    rng = np.random.default_rng(7)
    e, h, i = 2, 256, 256
    w13, s13, w2, s2 = random_checkpoint(rng, e, h, i, hi=256)
    w = MoEWeights.from_checkpoint(w13, s13, w2, s2, mode=mode, allow_nan_scales=True)
    il = _perm_packed16(2 * i) if mode == "mxf4xmxf4" else _perm_gran8(2 * i)
    assert np.array_equal(np.asarray(w.l1), w13[:, il])
    assert np.array_equal(np.asarray(w.l2), w2)
    # SF: pack (4 bytes -> int32, little-endian), interleave rows, UTCCP, MN-major [E, K/128, MN]
    packed13 = np.ascontiguousarray(s13).view("<i4")  # [E, 2I, H/128]
    src = il[_perm_utccp(2 * i)]
    assert np.array_equal(np.asarray(w.l1_sf), np.swapaxes(packed13[:, src], 1, 2))
    packed2 = np.ascontiguousarray(s2).view("<i4")
    assert np.array_equal(np.asarray(w.l2_sf), np.swapaxes(packed2[:, _perm_utccp(h)], 1, 2))
    assert w.l1_sf.shape == (e, h // 128, 2 * i) and w.l2_sf.shape == (e, i // 128, h)


# ------------------------------------------------------------------------------------------
# dequantize_expert
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", SM100)
def test_dequantize_expert_sm100(mode):
    rng = np.random.default_rng(3)
    e, h, i = 4, 256, 256
    w13, s13, w2, s2 = random_checkpoint(rng, e, h, i, lo=100, hi=150)
    w = MoEWeights.from_checkpoint(w13, s13, w2, s2, mode=mode)

    @jax.jit
    def all_experts(w):
        return jax.lax.map(w.dequantize_expert, jnp.arange(w.num_local_experts, dtype=jnp.int32))

    d13, d2 = all_experts(w)
    assert d13.shape == (e, 2 * i, h) and d2.shape == (e, h, i) and d13.dtype == jnp.float32
    for x in range(e):
        assert np.array_equal(np.asarray(d13[x]), np.asarray(quant.dequantize_mxfp4_weight(w13[x], s13[x])))
        assert np.array_equal(np.asarray(d2[x]), np.asarray(quant.dequantize_mxfp4_weight(w2[x], s2[x])))
    assert np.array_equal(np.asarray(d13), np_dequant_fp4(w13, s13))  # and the float64 oracle
    # eager, Python-int index
    a, b = w.dequantize_expert(2)
    assert np.array_equal(np.asarray(a), np.asarray(d13[2])) and np.array_equal(np.asarray(b), np.asarray(d2[2]))


def test_dequantize_expert_fp8_lossless():
    rng = np.random.default_rng(4)
    e, h, i = 3, 512, 256
    w13, s13, w2, s2 = lossless_checkpoint(rng, e, h, i)
    w, rep = MoEWeights.from_checkpoint_with_report(w13, s13, w2, s2, mode="fp8")
    assert rep.lossless and rep.max_abs_error == 0.0 and rep.rel_l2_error == 0.0
    assert rep.max_exponent_spread == 14
    d13, d2 = jax.jit(lambda w, x: jax.lax.map(w.dequantize_expert, x))(w, jnp.arange(e, dtype=jnp.int32))
    for x in range(e):
        assert np.array_equal(np.asarray(d13[x]), np.asarray(quant.dequantize_mxfp4_weight(w13[x], s13[x])))
        assert np.array_equal(np.asarray(d2[x]), np.asarray(quant.dequantize_mxfp4_weight(w2[x], s2[x])))


# ------------------------------------------------------------------------------------------
# FP4 -> FP8 128x128
# ------------------------------------------------------------------------------------------


def test_fp4_to_fp8_exact_when_spread_at_most_14():
    rng = np.random.default_rng(5)
    e, n, k = 3, 256, 512
    packed = rng.integers(0, 256, (e, n, k // 2), dtype=np.uint8)
    scale = block_spread_scales(rng, e, n, k)
    force_edge(packed, scale, 0, 0, 0, 14)
    force_edge(packed, scale, 2, 1, 3, 14)
    # an all-zero block (+0 and -0 codes) -> S = 1
    packed[1, 128:256, 64:128] = rng.choice(np.array([0x00, 0x08, 0x80, 0x88], np.uint8), (128, 64))
    q, s, rep = L.fp4_to_fp8_block128(packed, scale)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (e, n, k)
    assert s.dtype == jnp.float32 and s.shape == (e, n // 128, k // 128)
    orig = np_dequant_fp4(packed, scale)
    assert np.array_equal(np_dequant_fp8(q, s), orig)
    # S = 2^ceil(log2(amax / 448)) from the float64 values; 1 for the zero block
    amax = np.abs(orig.reshape(e, n // 128, 128, k // 128, 128)).max(axis=(2, 4))
    want = np.where(amax > 0, np.exp2(np.ceil(np.log2(np.where(amax > 0, amax, 1) / 448.0))), 1.0)
    assert np.array_equal(np.asarray(s, np.float64), want)
    assert np.asarray(s)[1, 1, 1] == 1.0
    assert (
        np.abs(np_dequant_fp8(q, s)).reshape(e, n // 128, 128, k // 128, 128).max(axis=(2, 4)).max() <= 448 * want.max()
    )
    assert rep.lossless and rep.num_lossy_blocks == 0 and rep.num_flushed_elements == 0
    assert rep.num_blocks == e * (n // 128) * (k // 128) and rep.num_experts == e
    assert rep.max_exponent_spread == 14 and rep.lossy_experts == ()
    assert rep.error_bound == 0.0 and rep.max_abs_error == 0.0
    print(rep)


def test_fp4_to_fp8_lossy_blocks_are_counted_and_measured():
    rng = np.random.default_rng(6)
    e, n, k = 3, 256, 512
    packed = rng.integers(0, 256, (e, n, k // 2), dtype=np.uint8)
    scale = block_spread_scales(rng, e, n, k)
    # three blocks get a group 16 below a group carrying +-6 -> its 0.5 flushes to zero
    lossy = [(0, 1, 2), (2, 0, 0), (2, 1, 3)]
    for x, br, bc in lossy:
        force_edge(packed, scale, x, br, bc, 16)
    q, s, rep = L.fp4_to_fp8_block128(packed, scale)
    orig = np_dequant_fp4(packed, scale)
    conv = np_dequant_fp8(q, s)
    err = conv - orig
    blk_err = np.abs(err).reshape(e, n // 128, 128, k // 128, 128).max(axis=(2, 4))
    assert sorted(zip(*np.nonzero(blk_err))) == lossy
    assert rep.num_lossy_blocks == 3 and rep.lossy_experts == (0, 2) and not rep.lossless
    assert rep.num_lossy_elements == int((err != 0).sum()) >= 3
    assert rep.num_flushed_elements == int(((orig != 0) & (conv == 0)).sum()) >= 3
    assert rep.max_exponent_spread == 16
    measured_max = float(np.abs(err).max())
    measured_rel = float(np.sqrt((err**2).sum() / (orig**2).sum()))
    assert rep.max_abs_error == measured_max
    assert rep.rel_l2_error == pytest.approx(measured_rel, rel=1e-4)
    assert 0 < measured_max <= rep.error_bound
    # per element: |error| <= S * 2^-10 of its block
    bound = np.repeat(np.repeat(np.asarray(s, np.float64) * 2.0**-10, 128, 1), 128, 2)
    assert (np.abs(err) <= bound).all()
    print(f"lossy case: max abs error {measured_max:.3e} <= bound {rep.error_bound:.3e}; rel L2 {measured_rel:.3e}")
    print(rep)


def test_fp8_mode_lossy_report_and_dequantize_within_bound():
    rng = np.random.default_rng(8)
    e, h, i = 2, 512, 256
    w13, s13, w2, s2 = lossless_checkpoint(rng, e, h, i)
    force_edge(w13, s13, 1, 2, 1, 20)  # lossy L1 block (rows 256..383 = up rows 0..127)
    force_edge(w2, s2, 0, 3, 0, 18)  # lossy L2 block
    seen = []
    w, rep = MoEWeights.from_checkpoint_with_report(
        w13, s13, w2, s2, mode="fp8", progress=lambda d, t: seen.append((d, t)), experts_per_step=2
    )
    assert rep.num_lossy_blocks == 2 and rep.lossy_experts == (0, 1)
    assert rep.max_exponent_spread == 20
    assert sorted(seen) == [(d, 2 * e) for d in range(1, 2 * e + 1)]
    errs = []
    for x in range(e):
        d13, d2 = w.dequantize_expert(jnp.int32(x))
        errs.append(np.abs(np.asarray(d13, np.float64) - np_dequant_fp4(w13[x], s13[x])).max())
        errs.append(np.abs(np.asarray(d2, np.float64) - np_dequant_fp4(w2[x], s2[x])).max())
    assert max(errs) == rep.max_abs_error <= rep.error_bound
    assert errs[0] == 0 and errs[3] == 0  # expert 0's L1 and expert 1's L2 are untouched
    # the kernel layout: L1 data gran-8 interleaved, scales canonical
    q13, q13_s, q2, q2_s = w.to_fp8()
    q, s_ref, _ = L.fp4_to_fp8_block128(w13, s13, report=False)
    assert np.array_equal(np.asarray(q13).view(np.uint8), np.asarray(q).view(np.uint8))
    assert np.array_equal(np.asarray(w.l1).view(np.uint8), np.asarray(q).view(np.uint8)[:, _perm_gran8(2 * i)])
    assert np.array_equal(np.asarray(q13_s), np.asarray(s_ref))


def test_fp4_to_fp8_under_jit_without_report():
    rng = np.random.default_rng(9)
    packed = rng.integers(0, 256, (2, 128, 128), dtype=np.uint8)
    scale = block_spread_scales(rng, 2, 128, 256)
    q, s, rep = jax.jit(lambda p, c: L.fp4_to_fp8_block128(p, c, report=False))(packed, scale)
    assert rep is None
    assert np.array_equal(np_dequant_fp8(q, s), np_dequant_fp4(packed, scale))
    with pytest.raises(TypeError, match="packed"):
        jax.jit(lambda p, c: L.fp4_to_fp8_block128(p, c)[0])(packed, scale)


def test_fp4_to_fp8_progress_and_batching(capfd):
    rng = np.random.default_rng(14)
    packed = rng.integers(0, 256, (5, 128, 64), dtype=np.uint8)
    scale = block_spread_scales(rng, 5, 128, 128)
    q1, s1, r1 = L.fp4_to_fp8_block128(packed, scale, progress=True)
    err = capfd.readouterr().err
    assert "5/5" in err and "1/5" in err
    seen = []
    q2, s2, r2 = L.fp4_to_fp8_block128(packed, scale, progress=lambda d, t: seen.append((d, t)), experts_per_step=2)
    assert sorted(seen) == [(d, 5) for d in range(1, 6)]
    assert np.array_equal(np.asarray(q1).view(np.uint8), np.asarray(q2).view(np.uint8))
    assert np.array_equal(np.asarray(s1), np.asarray(s2)) and r1 == r2
    with pytest.raises(ValueError, match="^experts_per_step"):
        L.fp4_to_fp8_block128(packed, scale, experts_per_step=0)
    with pytest.raises(TypeError, match="^progress"):
        L.fp4_to_fp8_block128(packed, scale, progress="yes")


def test_conversion_report_merge():
    a = ConversionReport(2, 4, 4 * 16384, 1, 3, 2, 0.5, 1.0, 0.75, 100.0, 15, -3, 4, (1,))
    b = ConversionReport(2, 2, 2 * 16384, 0, 0, 0, 0.0, 0.0, 0.0, 21.0, 9, -5, 2, ())
    m = a.merge(b)
    assert m.num_blocks == 6 and m.num_lossy_blocks == 1 and m.lossy_experts == (1,)
    assert m.min_scale_log2 == -5 and m.max_scale_log2 == 4 and m.max_exponent_spread == 15
    assert m.rel_l2_error == pytest.approx((0.75 / 121.0) ** 0.5)
    assert "lossy" in str(m) and "exact" in str(b)
    hash(m)  # frozen, hashable


# ------------------------------------------------------------------------------------------
# MoEWeights as a pytree, from_fp8, validation
# ------------------------------------------------------------------------------------------


def test_moe_weights_pytree_and_jit():
    rng = np.random.default_rng(10)
    ck = random_checkpoint(rng, 2, 256, 128)
    w = MoEWeights.from_checkpoint(*ck, mode="mxf4xmxf4")
    leaves, treedef = jax.tree_util.tree_flatten(w)
    assert len(leaves) == 4  # static fields are not leaves
    assert w.num_experts == 2 and w.hidden == 256 and w.intermediate == 128 and w.arch == 10
    assert (
        w.nbytes
        == sum(x.nbytes for x in leaves)
        == 2 * (256 * 128 + (256 // 128) * 256 * 4 + 256 * 64 + (128 // 128) * 256 * 4)
    )
    w2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(w2, MoEWeights) and w2.mode == "mxf4xmxf4"
    # through jit as an argument and a result
    w3 = jax.jit(lambda w: w)(w)
    assert isinstance(w3, MoEWeights) and w3.mode == w.mode and w3.hidden == 256
    # from_checkpoint itself is jit-able with a static mode
    wj = jax.jit(functools.partial(MoEWeights.from_checkpoint, mode="mxf4xmxf4"))(*ck)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, jax.tree_util.tree_leaves(wj)))
    assert "mxf4xmxf4" in repr(w) and "uint8[2, 256, 128]" in repr(w)
    # abstract evaluation works (ShapeDtypeStruct leaves)
    sds = jax.eval_shape(lambda w: w, w)
    assert sds.validate_for("mxf4xmxf4", hidden=256, intermediate=128, num_experts=2) is sds


def test_from_fp8_roundtrip_and_dequantize():
    rng = np.random.default_rng(11)
    e, h, i = 2, 512, 256
    w13 = rng.integers(0, 256, (e, 2 * i, h), dtype=np.uint8)
    w13[(w13 & 0x7F) == 0x7F] = 0  # no NaN codes
    w2 = rng.integers(0, 256, (e, h, i), dtype=np.uint8)
    w2[(w2 & 0x7F) == 0x7F] = 1
    w13, w2 = w13.view(jnp.float8_e4m3fn), w2.view(jnp.float8_e4m3fn)
    s13 = np.exp2(rng.integers(-8, 8, (e, 2 * i // 128, h // 128))).astype(np.float32)
    s2 = np.exp2(rng.integers(-8, 8, (e, h // 128, i // 128))).astype(np.float32)
    w = MoEWeights.from_fp8(w13, s13, w2, s2)
    assert w.mode == "fp8" and w.arch == 9 and w.l1.dtype == jnp.float8_e4m3fn
    assert np.array_equal(np.asarray(w.l1).view(np.uint8), w13.view(np.uint8)[:, _perm_gran8(2 * i)])
    assert np.array_equal(np.asarray(w.l1_sf), s13)  # scales stay canonical
    for got, want in zip(w.to_fp8(), (w13, s13, w2, s2)):
        assert np.array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
    d13, d2 = w.dequantize_expert(jnp.int32(1))
    assert np.array_equal(np.asarray(d13), np.asarray(quant.dequantize_fp8_block128(w13[1], s13[1])))
    assert np.array_equal(np.asarray(d2), np_dequant_fp8(w2[1], s2[1]).astype(np.float32))


def _ck(e=4, h=256, i=256, seed=12):
    return random_checkpoint(np.random.default_rng(seed), e, h, i)


def test_errors_shapes_name_the_argument():
    w13, s13, w2, s2 = _ck()
    with pytest.raises(ValueError, match=r"^w2: expected shape \[E=4, H=256, I/2=128\], got \[2, 256, 128\]"):
        MoEWeights.from_checkpoint(w13, s13, w2[:2], s2, mode="fp8xfp4")
    with pytest.raises(ValueError, match=r"^w13_scale: expected shape \[E=4"):
        MoEWeights.from_checkpoint(w13, s13[:3], w2, s2, mode="fp8xfp4")
    with pytest.raises(ValueError, match=r"^w2_scale: expected shape"):
        MoEWeights.from_checkpoint(w13, s13, w2, s2[..., :4], mode="mxf4xmxf4")
    with pytest.raises(ValueError, match=r"^w13_scale: expected shape .*H/32=8"):
        MoEWeights.from_checkpoint(w13, s13[..., :4], w2, s2, mode="mxf4xmxf4")
    with pytest.raises(ValueError, match=r"^w13: expected a rank-3"):
        MoEWeights.from_checkpoint(w13[0], s13, w2, s2, mode="mxf4xmxf4")


def test_errors_dtypes_name_the_argument():
    w13, s13, w2, s2 = _ck()
    with pytest.raises(TypeError, match=r"^w13: dtype float32"):
        MoEWeights.from_checkpoint(w13.astype(np.float32), s13, w2, s2, mode="mxf4xmxf4")
    with pytest.raises(TypeError, match=r"^w2_scale: dtype int32"):
        MoEWeights.from_checkpoint(w13, s13, w2, s2.astype(np.int32), mode="mxf4xmxf4")
    with pytest.raises(TypeError, match=r"^w13_scale: dtype float32"):
        MoEWeights.from_checkpoint(w13, s13.astype(np.float32), w2, s2, mode="fp8")
    with pytest.raises(TypeError, match=r"^w13: dtype uint8"):
        MoEWeights.from_fp8(w13, s13, w2, s2)
    with pytest.raises(TypeError, match=r"^sf: dtype uint8"):
        L.unpack_sf_mn_major(s13)
    with pytest.raises(TypeError, match=r"^packed: dtype float32"):
        L.fp4_to_fp8_block128(w13.astype(np.float32), s13)


def test_errors_hidden_intermediate_mode():
    rng = np.random.default_rng(13)
    # hidden = 192: not a multiple of 128 (nor of the kernels' 256)
    ck = random_checkpoint(rng, 2, 192, 256)
    with pytest.raises(ValueError, match=r"^hidden: 192 must be a multiple of 256.*w13"):
        MoEWeights.from_checkpoint(*ck, mode="mxf4xmxf4")
    with pytest.raises(ValueError, match=r"^packed: 192 .* must be a multiple of 128"):
        L.fp4_to_fp8_block128(ck[2].swapaxes(1, 2)[:, :, :96].copy(), ck[3][:, :, :6])
    # fp8 (sm_90) needs H % 512: 256 passes sm_100 but not sm_90
    ck = random_checkpoint(rng, 2, 256, 256)
    MoEWeights.from_checkpoint(*ck, mode="fp8xfp4")
    with pytest.raises(ValueError, match=r"^hidden: 256 must be a multiple of 512 for mode 'fp8'"):
        MoEWeights.from_checkpoint(*ck, mode="fp8")
    with pytest.raises(ValueError, match=r"^intermediate: 192 must be a multiple of 128"):
        MoEWeights.from_checkpoint(*random_checkpoint(rng, 2, 256, 192), mode="fp8xfp4")
    with pytest.raises(ValueError, match=r"^mode: 'nvfp4' is not a kernel mode"):
        MoEWeights.from_checkpoint(*ck, mode="nvfp4")
    with pytest.raises(ValueError, match=r"^sf_bytes: 6 .*multiple of 4"):
        L.pack_sf_mn_major(np.ones((1, 6, 8), np.uint8))
    with pytest.raises(ValueError, match=r"^w: 40 .*multiple of 32"):
        L.interleave_gate_up_packed_fp4(np.ones((40, 2), np.uint8))
    with pytest.raises(ValueError, match=r"^x: 64 .*multiple of 128"):
        L.utccp_transpose(np.ones((64, 2), np.uint8))


def test_validate_for_rejects_wrong_layout():
    w13, s13, w2, s2 = _ck(e=2, h=512, i=256)
    w8 = MoEWeights.from_checkpoint(w13, s13, w2, s2, mode="fp8xfp4")
    w4 = MoEWeights.from_checkpoint(w13, s13, w2, s2, mode="mxf4xmxf4")
    wh = MoEWeights.from_checkpoint(w13, s13, w2, s2, mode="fp8")
    assert w8.validate_for("fp8xfp4", hidden=512, intermediate=256, num_experts=2) is w8
    with pytest.raises(
        ValueError,
        match=r"^weights: built for mode 'fp8xfp4' \(sm_100\) but mode 'mxf4xmxf4' was requested.*interleave",
    ):
        w8.validate_for("mxf4xmxf4")
    with pytest.raises(
        ValueError, match=r"^weights: built for mode 'mxf4xmxf4' \(sm_100\) but mode 'fp8xfp4' was requested"
    ):
        w4.validate_for("fp8xfp4")
    with pytest.raises(
        ValueError, match=r"^weights: built for mode 'fp8' \(sm_90\) but mode 'mxf4xmxf4' was requested"
    ):
        wh.validate_for("mxf4xmxf4")
    with pytest.raises(
        ValueError, match=r"^weights: built for mode 'mxf4xmxf4' \(sm_100\) but mode 'fp8' was requested"
    ):
        w4.validate_for("fp8")
    with pytest.raises(ValueError, match=r"^weights: hidden is 512 but hidden=1024"):
        w4.validate_for("mxf4xmxf4", hidden=1024)
    with pytest.raises(ValueError, match=r"^weights: num_experts is 2"):
        w4.validate_for("mxf4xmxf4", num_experts=8)
    with pytest.raises(ValueError, match=r"^mode: 'bf16'"):
        w4.validate_for("bf16")
    with pytest.raises(ValueError, match=r"^weights: to_checkpoint\(\)"):
        wh.to_checkpoint()
    with pytest.raises(ValueError, match=r"^weights: to_fp8\(\)"):
        w4.to_fp8()
    with pytest.raises(ValueError, match=r"^e: expert 2 is out of range"):
        w4.dequantize_expert(2)
    # hand-built weights with a leaf in the wrong layout
    bad = MoEWeights(w4.l1, jnp.swapaxes(w4.l1_sf, 1, 2), w4.l2, w4.l2_sf, "mxf4xmxf4", 512, 256, 2)
    with pytest.raises(ValueError, match=r"^weights.l1_sf: expected shape \[2, 4, 512\]"):
        bad.validate()
    bad = MoEWeights(w4.l1, w4.l1_sf, w4.l2, w4.l2_sf.astype(jnp.float32), "mxf4xmxf4", 512, 256, 2)
    with pytest.raises(TypeError, match=r"^weights.l2_sf: dtype float32"):
        bad.validate_for("mxf4xmxf4")
    # an expert-parallel slice: local leaves, global num_experts
    local = jax.tree_util.tree_map(lambda a: a[:1], w4)
    assert local.num_local_experts == 1 and local.num_experts == 2
    local.validate_for("mxf4xmxf4", num_experts=2)
