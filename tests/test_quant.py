"""Bit-exact tests of jax_megamoe.quant against an independent float64 numpy oracle.

The oracle never calls the implementation: E2M1 and E4M3 are nearest-value searches over tables built
from the format definitions (ties to the even code, explicit saturation), cross-checked against
ml_dtypes; UE8M0 exponents come from ``np.frexp`` in float64; every f32 rounding the kernels do
(``amax / 6.0f``, ``amax * fl(1/6)``, ``x * inv``, ``1.0f / sf``) is an exact float64 operation
followed by one float64 -> float32 cast (innocuous double rounding for a single f32 op on f32 inputs,
subnormals included since numpy does not flush them).

Random data is fresh every run: each test draws its own seed (printed in failure messages) and the
hypothesis tests draw theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

from jax_megamoe._src.numerics import quant as Q

F32 = np.float32
F64 = np.float64
BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning"),  # NaN payloads
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),  # oracle's inf results
]

HYP = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# independent oracle
# --------------------------------------------------------------------------------------------------

E2M1_MAG = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], F64)


def _e4m3_table():
    """Positive finite e4m3fn values by code 0..126, from the format definition (bias 7, 3 mantissa bits)."""
    vals = []
    for b in range(127):
        e, m = b >> 3, b & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals, F64)


E4M3_POS = _e4m3_table()
E2M1_MID = (E2M1_MAG[1:] + E2M1_MAG[:-1]) / 2  # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
E4M3_MID = (E4M3_POS[1:] + E4M3_POS[:-1]) / 2


def nearest_code(mag, table):
    """Index of the nearest table entry to ``mag`` (>= 0, <= table[-1]); ties go to the even index."""
    hi = np.clip(np.searchsorted(table, mag, side="left"), 0, len(table) - 1)
    lo = np.clip(hi - 1, 0, len(table) - 1)
    dlo = mag - table[lo]
    dhi = table[hi] - mag
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    return np.where(pick_hi, hi, lo).astype(np.uint8)


def o_e2m1(v):
    """Pre-dispatch E2M1 rule: RNE, saturate at 6, no negative zero, NaN -> 0."""
    v = np.asarray(v, F64)
    nan = np.isnan(v)
    code = nearest_code(np.where(nan, 0.0, np.minimum(np.abs(v), 6.0)), E2M1_MAG)
    code = np.where(nan, 0, code).astype(np.uint8)
    return code | (((v < 0) & (code != 0)).astype(np.uint8) << 3)


def o_e2m1_cvt(v):
    """PTX cvt.rn.satfinite.e2m1x2 (CUDA's reference emulation): sign bit kept, NaN -> +6."""
    v = np.asarray(v, F64)
    nan = np.isnan(v)
    code = nearest_code(np.where(nan, 0.0, np.minimum(np.abs(v), 6.0)), E2M1_MAG)
    code = code | (np.signbit(v).astype(np.uint8) << 3)
    return np.where(nan, 7, code).astype(np.uint8)


def o_e4m3(v):
    """e4m3fn byte with RNE and SATFINITE; every NaN -> 0x7F (the sm_90 hardware drops a NaN's sign)."""
    v = np.asarray(v, F64)
    nan = np.isnan(v)
    code = nearest_code(np.where(nan, 0.0, np.minimum(np.abs(v), 448.0)), E4M3_POS)
    code = code | (np.signbit(v).astype(np.uint8) << 7)
    return np.where(nan, 0x7F, code).astype(np.uint8)


def o_ceil_exp(x):
    """Smallest p with 2^p >= x, for x > 0 finite (float64 frexp)."""
    m, ex = np.frexp(x)
    return np.where(m == 0.5, ex - 1, ex).astype(np.int64)


def o_f32(x):
    """One IEEE round to f32 of an exact float64 value (subnormals kept)."""
    return np.asarray(x, F64).astype(F32).astype(F64)


def o_groups(x, g):
    x = np.asarray(x).astype(F32).astype(F64)
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def o_amax(g):
    return np.fmax.reduce(np.abs(g), axis=-1, initial=0.0)  # fmaxf chain from +0: NaN ignored


def o_pack_nibbles(codes):
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def o_pack_words(sf_bytes):
    return np.ascontiguousarray(sf_bytes.astype(np.uint8)).view("<i4").astype(np.int32)


def o_pre_ue8m0(x, group, fmax):
    """sm_100 pre-dispatch: returns (scaled f64 values [.., G, g], sf bytes)."""
    g = o_groups(x, group)
    amax = np.maximum(o_amax(g), F64(F32(1e-4)))
    raw = o_f32(amax / fmax)
    byte = np.clip(o_ceil_exp(raw) + 127, 1, 254)
    v = o_f32(g * 2.0 ** (127 - byte)[..., None])
    return v, byte.astype(np.uint8)


def o_quantize_mxfp4(x):
    v, b = o_pre_ue8m0(x, 32, 6.0)
    codes = o_e2m1(v).reshape(*v.shape[:-2], -1)
    return o_pack_nibbles(codes), o_pack_words(b)


def o_quantize_fp8_ue8m0(x, group):
    v, b = o_pre_ue8m0(x, group, 448.0)
    return o_e4m3(v).reshape(*v.shape[:-2], -1), o_pack_words(b)


def o_quantize_fp8_per128(x):
    g = o_groups(x, 128)
    amax = np.maximum(o_amax(g), F64(F32(1e-10)))
    scale = o_f32(amax / 448.0)
    inv = o_f32(1.0 / scale)
    q = o_e4m3(o_f32(g * inv[..., None]))
    return q.reshape(*g.shape[:-2], -1), scale.astype(F32)


INV6 = F64(F32(1.0) / F32(6.0))
INV448 = F64(F32(1.0) / F32(448.0))


def o_requant_exp(amax, c):
    """fast_log2_ceil(fl32(amax * c)): exponent field - 127 + (mantissa != 0) of the f32 product."""
    s = o_f32(amax * c)
    e = np.where(s == 0, -127, np.where(s < 2.0**-126, -126, o_ceil_exp(np.where(s == 0, 1.0, s))))
    return e.astype(np.int64)


def o_requant_ue8m0(a, c):
    g = o_groups(a, 32)
    e = o_requant_exp(o_amax(g), c)
    v = o_f32(g * (2.0 ** (-e.astype(F64)))[..., None])
    return v, (e + 127).astype(np.uint8), e


def o_requant_mxfp4(a):
    v, b, _ = o_requant_ue8m0(a, INV6)
    return o_pack_nibbles(o_e2m1_cvt(v).reshape(*v.shape[:-2], -1)), b


def o_requant_fp8_ue8m0(a):
    v, b, _ = o_requant_ue8m0(a, INV448)
    return o_e4m3(v).reshape(*v.shape[:-2], -1), b


def o_requant_fp8_per128(a):
    g = o_groups(a, 128)
    sf = o_f32(np.maximum(o_amax(g), F64(F32(1e-10))) * INV448)
    inv = o_f32(1.0 / sf)
    return o_e4m3(o_f32(g * inv[..., None])).reshape(*g.shape[:-2], -1), sf.astype(F32)


def o_e2m1_value(codes):
    mag = E2M1_MAG[codes & 7]
    return np.where(codes & 8, -mag, mag)


def o_e4m3_value(b):
    b = np.asarray(b, np.uint8)
    mag = E4M3_POS[np.minimum(b & 0x7F, 126)]
    v = np.where(b & 0x80, -mag, mag)
    return np.where((b & 0x7F) == 0x7F, np.nan, v)


def o_ue8m0(b):
    b = np.asarray(b).astype(np.int64)
    return np.where(b == 255, np.nan, np.ldexp(1.0, b - 127))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def fresh_seed():
    return int(np.random.SeedSequence().entropy % (2**32))


def u8(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a


def assert_same(got, want, what, seed=None):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    bad = np.argwhere(got != want)
    if bad.size:
        i = tuple(bad[0])
        raise AssertionError(
            f"{what}: {len(bad)} of {got.size} differ (seed {seed}); first at {i}: got {got[i]!r} want {want[i]!r}"
        )


def assert_f32_bits(got, want, what, seed=None):
    """Bitwise f32 equality; any NaN matches any NaN."""
    got = np.asarray(got, F32)
    want = np.asarray(want, F64).astype(F32)
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    assert_same(nan_g, nan_w, what + " (NaN positions)", seed)
    assert_same(np.where(nan_g, 0, got.view(np.uint32)), np.where(nan_w, 0, want.view(np.uint32)), what, seed)


def f32_neighbours(values, k=3):
    """Every f32 within k ulps of each value (both signs)."""
    b = np.asarray(values, F32).view(np.int32).astype(np.int64)
    off = np.arange(-k, k + 1)
    bits = (b[:, None] + off[None, :]).ravel()
    bits = bits[(bits >= 0) & (bits < 0x7F800000)].astype(np.uint32)
    v = bits.view(F32)
    return np.concatenate([v, -v])


def bf16_neighbours(values):
    b = np.asarray(values, F32).astype(BF16).view(np.uint16).astype(np.int64)
    bits = np.concatenate([b - 1, b, b + 1])
    bits = bits[(bits >= 0) & (bits < 0x7F80)].astype(np.uint16)
    v = bits.view(BF16).astype(F32)
    return np.concatenate([v, -v])


SPECIALS = np.array(
    [
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        np.nan,
        -np.nan,
        1e-45,
        -1e-45,
        1e-40,
        -1e-40,
        1.1754942e-38,
        3.4028235e38,
        -3.4028235e38,
    ],
    F32,
)

jq = {
    "quantize_mxfp4": jax.jit(Q.quantize_mxfp4),
    "quantize_fp8_ue8m0": jax.jit(Q.quantize_fp8_ue8m0, static_argnames="group"),
    "quantize_fp8_per128": jax.jit(Q.quantize_fp8_per128),
    "requant_mxfp4": jax.jit(Q.requant_mxfp4),
    "requant_fp8_ue8m0": jax.jit(Q.requant_fp8_ue8m0),
    "requant_fp8_per128": jax.jit(Q.requant_fp8_per128),
    "encode_e2m1": jax.jit(Q.encode_e2m1),
    "encode_e2m1_cvt": jax.jit(Q.encode_e2m1_cvt),
    "encode_e4m3": jax.jit(Q.encode_e4m3),
}


# --------------------------------------------------------------------------------------------------
# oracle self-checks against ml_dtypes (so the oracle itself is trustworthy)
# --------------------------------------------------------------------------------------------------


def test_oracle_tables_match_ml_dtypes():
    assert_same(E4M3_POS.astype(F32), np.arange(127, dtype=np.uint8).view(E4M3).astype(F32), "e4m3 table")
    f4 = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(F32)
    assert_same(Q.E2M1_VALUES.view(np.uint32), f4.view(np.uint32), "E2M1_VALUES vs ml_dtypes (incl. -0.0)")
    assert Q.E2M1_VALUES.dtype == np.float32 and Q.E2M1_VALUES.shape == (16,)


# --------------------------------------------------------------------------------------------------
# E2M1
# --------------------------------------------------------------------------------------------------


def _e2m1_probe(rng):
    thresholds = np.concatenate([E2M1_MID, E2M1_MAG, [6.0, 6.5, 7.0, 100.0]])
    return np.concatenate(
        [
            f32_neighbours(thresholds, 4),
            rng.uniform(-8, 8, 200_000).astype(F32),
            rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(F32),
            SPECIALS,
        ]
    )


def test_encode_e2m1_exact():
    seed = fresh_seed()
    v = _e2m1_probe(np.random.default_rng(seed))
    assert_same(np.asarray(jq["encode_e2m1"](v)), o_e2m1(v), "encode_e2m1", seed)
    assert_same(np.asarray(jq["encode_e2m1_cvt"](v)), o_e2m1_cvt(v), "encode_e2m1_cvt", seed)
    # cvt semantics agree with ml_dtypes' float4_e2m1fn cast (RNE, saturating, signed zero) except NaN
    ok = ~np.isnan(v)
    f4 = v[ok].astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    assert_same(np.asarray(jq["encode_e2m1_cvt"](v))[ok], f4, "encode_e2m1_cvt vs ml_dtypes", seed)


def test_encode_e2m1_rules_and_bf16():
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0], F32)
    assert list(np.asarray(Q.encode_e2m1(ties))) == [0, 2, 2, 4, 4, 6, 6, 0, 8 | 2, 8 | 6]
    special = np.array([-0.0, -0.1, np.nan, -np.nan, 7.0, -np.inf, np.inf], F32)
    assert list(np.asarray(Q.encode_e2m1(special))) == [0, 0, 0, 0, 7, 15, 7]
    assert list(np.asarray(Q.encode_e2m1_cvt(special))) == [8, 8, 7, 7, 7, 15, 7]
    xb = np.random.default_rng(fresh_seed()).standard_normal(4096).astype(BF16)
    assert_same(np.asarray(Q.encode_e2m1(jnp.asarray(xb))), o_e2m1(xb.astype(F32)), "encode_e2m1 bf16")


def test_decode_and_nibbles_match_ml_dtypes_and_jax_f4():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    codes = np.arange(16, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float4_e2m1fn).astype(F32)
    assert_same(np.asarray(Q.decode_e2m1(codes)).view(np.uint32), ref.view(np.uint32), "decode_e2m1")
    packed = rng.integers(0, 256, (7, 48), dtype=np.uint8)
    unpacked = np.asarray(Q.unpack_nibbles(packed))
    want = np.stack([packed & 15, packed >> 4], -1).reshape(7, 96)
    assert_same(unpacked, want, "unpack_nibbles", seed)
    assert_same(np.asarray(Q.pack_nibbles(unpacked)), packed, "pack_nibbles(unpack_nibbles)", seed)
    # JAX's own uint8 -> float4_e2m1fn bitcast reads the low nibble first: same order as ours
    f4 = lax.bitcast_convert_type(jnp.asarray(packed), jnp.float4_e2m1fn).astype(jnp.float32)
    assert f4.shape == (7, 48, 2)
    ours = np.asarray(Q.decode_e2m1(Q.unpack_nibbles(packed)))
    assert_same(np.asarray(f4).reshape(7, 96), ours, "jax f4 order", seed)
    assert list(np.asarray(f4[0, 0])) == [
        E2M1_MAG[packed[0, 0] & 7] * (-1 if packed[0, 0] & 8 else 1),
        E2M1_MAG[(packed[0, 0] >> 4) & 7] * (-1 if packed[0, 0] & 128 else 1),
    ]
    # pack_nibbles masks to the low nibble of each code
    assert int(np.asarray(Q.pack_nibbles(np.array([0x1F, 0xF2], np.uint8)))[0]) == 0x2F


# --------------------------------------------------------------------------------------------------
# UE8M0
# --------------------------------------------------------------------------------------------------


def test_ue8m0_to_float_all_bytes():
    b = np.arange(256, dtype=np.uint8)
    got = np.asarray(Q.ue8m0_to_float(b))
    assert_f32_bits(got, o_ue8m0(b), "ue8m0_to_float")
    assert got.view(np.uint32)[0] == 0x00400000  # 2^-127, a subnormal, exactly
    assert np.isnan(got[255])
    ref = b.view(ml_dtypes.float8_e8m0fnu).astype(F32)
    assert_f32_bits(got, ref, "ue8m0_to_float vs ml_dtypes")
    via_e8m0 = np.asarray(Q.ue8m0_to_float(jnp.asarray(b.view(ml_dtypes.float8_e8m0fnu))))
    assert_f32_bits(via_e8m0, ref, "ue8m0_to_float(float8_e8m0fnu)")
    jx = lax.bitcast_convert_type(jnp.asarray(b), jnp.float8_e8m0fnu).astype(jnp.float32)
    assert_f32_bits(np.asarray(jx), ref, "jax e8m0 decode")


def test_pack_unpack_ue8m0_little_endian():
    seed = fresh_seed()
    sfb = np.random.default_rng(seed).integers(0, 256, (5, 3, 16), dtype=np.uint8)
    words = np.asarray(Q.pack_ue8m0(sfb))
    assert words.dtype == np.int32 and words.shape == (5, 3, 4)
    assert_same(words, o_pack_words(sfb), "pack_ue8m0", seed)
    w = int(words[0, 0, 0]) & 0xFFFFFFFF
    assert [(w >> (8 * j)) & 0xFF for j in range(4)] == list(sfb[0, 0, :4])
    assert_same(np.asarray(Q.unpack_ue8m0(words)), sfb, "unpack_ue8m0", seed)


# --------------------------------------------------------------------------------------------------
# E4M3
# --------------------------------------------------------------------------------------------------


def _e4m3_probe(rng):
    anchors = np.concatenate([E4M3_POS, E4M3_MID, [464.0, 470.0, 480.0, 1e4, 2.0**-10, 3 * 2.0**-11]])
    start = int(rng.integers(0, 4099))
    stride = np.arange(start, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(F32)
    return np.concatenate(
        [
            f32_neighbours(anchors, 4),
            stride,
            rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32).view(F32),
            (rng.standard_normal(300_000) * 2.0 ** rng.integers(-14, 10, 300_000)).astype(F32),
            SPECIALS,
            np.array([0x7FC00001, 0xFFC00000, 0x7F800001, 0xFF812345], np.uint32).view(F32),
        ]
    )


def test_encode_e4m3_exact_dense():
    seed = fresh_seed()
    v = _e4m3_probe(np.random.default_rng(seed))
    got = np.asarray(jq["encode_e4m3"](v))
    assert got.dtype == E4M3
    want = o_e4m3(v)
    assert_same(got.view(np.uint8), want, "encode_e4m3 vs float64 oracle", seed)
    # the same bytes as ml_dtypes' RNE cast once saturation (SATFINITE) is applied by hand
    ok = ~np.isnan(v)
    ml = np.clip(v[ok], -448, 448).astype(E4M3).view(np.uint8)
    assert_same(got.view(np.uint8)[ok], ml, "encode_e4m3 vs ml_dtypes", seed)
    # every NaN (both signs, any payload) -> 0x7F, as sm_90's cvt.rn.satfinite.e4m3x2.f32 (ml_dtypes keeps the sign)
    assert (~ok).sum() > 1000 and (np.signbit(v[~ok])).any()
    assert (got.view(np.uint8)[~ok] == 0x7F).all()


def test_encode_e4m3_edges():
    # subnormal ties: 0.5, 1.5, 2.5 and 7.5 units of 2^-9 round to 0, 2, 2 and 8 (= 2^-6, the carry)
    v = np.array(
        [
            448,
            449,
            463.99,
            464,
            464.01,
            1e30,
            np.inf,
            -np.inf,
            -0.0,
            0.0,
            -1e-40,
            2.0**-10,
            3 * 2.0**-10,
            5 * 2.0**-10,
            3 * 2.0**-11,
            2.0**-9,
            7.5 * 2.0**-9,
            480,
            496,
            15 * 2.0**-4,
            np.nan,
            -np.nan,
        ],
        F32,
    )
    got = list(np.asarray(Q.encode_e4m3(v)).view(np.uint8))
    assert got == [
        0x7E,
        0x7E,
        0x7E,
        0x7E,
        0x7E,
        0x7E,
        0x7E,
        0xFE,
        0x80,
        0x00,
        0x80,
        0x00,
        0x02,
        0x02,
        0x01,
        0x01,
        0x08,
        0x7E,
        0x7E,
        0x37,
        0x7F,
        0x7F,
    ]
    xb = np.random.default_rng(fresh_seed()).standard_normal(4096).astype(BF16)
    got = np.asarray(Q.encode_e4m3(jnp.asarray(xb))).view(np.uint8)
    assert_same(got, o_e4m3(xb.astype(F32)), "encode_e4m3(bf16)")


def test_e4m3_decode_all_bytes():
    b = np.arange(256, dtype=np.uint8)
    got = lax.bitcast_convert_type(jnp.asarray(b), jnp.float8_e4m3fn).astype(jnp.float32)
    assert_f32_bits(np.asarray(got), o_e4m3_value(b), "e4m3 -> f32")
    assert_f32_bits(np.asarray(got), b.view(E4M3).astype(F32), "e4m3 -> f32 vs ml_dtypes")


def test_exact_division_matches_ieee():
    """amax / 6.0f, amax / 448.0f and 1.0f / sf must be IEEE divisions. XLA rewrites x / c into
    x * (1/c) and XLA:GPU's division is approximate, so quant.py divides with integer arithmetic;
    check it on dense inputs."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [
            rng.integers(0x2E000000, 0x7F000000, 400_000, dtype=np.uint64).astype(np.uint32).view(F32),
            f32_neighbours(
                np.array([6.0, 448.0, 3.0, 7.0, 1e-4, 1e-10, 1.5, 1.75]) * 2.0 ** rng.integers(-20, 20, 8), 8
            ),
            np.array([np.inf, 3.4028235e38, 1e-10, 1e-4], F32),
        ]
    )
    x = np.abs(x)
    for odd, p2, d in ((3, 1, 6.0), (7, 6, 448.0)):
        got = np.asarray(jax.jit(lambda v: Q._div_exact(v, odd, p2))(x))
        want = x / F32(d)
        assert_same(got.view(np.uint32), want.view(np.uint32), f"x / {d}", seed)
    # 1.0f / sf (sm_90 paths): XLA:GPU's division is not IEEE, so quant.py does a long division
    s = x[(x > 1e-30) & (x < 1e30)]
    s = np.concatenate([s, np.array([1.0, 2.0**-100, 2.0**100, 1.5, 3.0, 7.0, 448.0, 1e-10 / 448], F32)])
    got = np.asarray(jax.jit(Q._recip_exact)(s))
    assert_same(got.view(np.uint32), (F32(1) / s).view(np.uint32), "1 / s", seed)
    assert np.asarray(Q._recip_exact(np.array([np.inf], F32)))[0] == 0


# --------------------------------------------------------------------------------------------------
# data for the quantisers
# --------------------------------------------------------------------------------------------------


def wide_rows(rng, rows, h, group, lo, hi):
    """Normal values, each group with its own amplitude 2^U(lo, hi)."""
    amp = 2.0 ** rng.uniform(lo, hi, (rows, h // group, 1))
    return (rng.standard_normal((rows, h // group, group)) * amp).reshape(rows, h)


def tie_rows(rng, h, group, fmax, mids, k_range):
    """Each group: one element = +-fmax * 2^k (so the scale is exactly 2^k), the rest +-mids * 2^k."""
    rows = []
    for _ in range(2):
        k = rng.integers(*k_range, (h // group, 1))
        picks = rng.choice(mids, (h // group, group))
        picks *= rng.choice([-1.0, 1.0], picks.shape)
        picks[:, 0] = fmax * rng.choice([-1.0, 1.0], h // group)
        rows.append((picks * 2.0**k).reshape(h))
    # bf16 neighbours of the midpoints: just off the tie
    near = bf16_neighbours(mids).astype(F64)
    k = rng.integers(*k_range, (h // group, 1))
    picks = rng.choice(near, (h // group, group))
    picks[:, 0] = fmax
    rows.append((picks * 2.0**k).reshape(h))
    return rows


def special_rows(rng, h):
    zero = np.zeros(h)
    tiny = rng.standard_normal(h) * 1e-6  # below the 1e-4 amax floor
    sub = rng.integers(1, 128, h) * 2.0**-133 * rng.choice([-1.0, 1.0], h)  # bf16 subnormals
    mixed = rng.standard_normal(h)
    mixed[rng.integers(0, h, 6)] = np.nan
    mixed[rng.integers(0, h, 6)] = -np.nan  # a negative NaN still encodes as e4m3 0x7F
    mixed[:32] = -0.0  # a whole group of negative zeros
    mixed[40:45] = -0.0
    return [zero, tiny, sub, mixed]


def pre_dispatch_input(rng, h, group, fmax, mids, lo, hi):
    rows = [*special_rows(rng, h), *tie_rows(rng, h, group, fmax, mids, (-20, 20))]
    rows.append(wide_rows(rng, 9, h, group, lo, hi))
    x = np.concatenate([np.reshape(r, (-1, h)) for r in rows]).astype(F32).astype(BF16)
    assert np.isnan(x.astype(F32)).any() and (x.astype(F32) == 0).all(axis=1).any()
    return x


E2M1_TIE_MIDS = np.concatenate([E2M1_MID, E2M1_MAG])
E4M3_TIE_MIDS = np.concatenate([E4M3_MID, E4M3_POS])


def assert_ties_present(scaled, mids, what):
    """Guard against a silently weak test: the constructed inputs must really hit exact midpoints."""
    hit = np.isin(np.abs(scaled[np.isfinite(scaled)]), mids)
    assert hit.sum() >= 64, f"{what}: only {hit.sum()} exact ties were constructed"


# --------------------------------------------------------------------------------------------------
# pre-dispatch quantisers
# --------------------------------------------------------------------------------------------------

H = 512


@HYP
@given(seed=st.integers(0, 2**32 - 1), lo=st.integers(-40, 0), span=st.integers(0, 50))
def test_quantize_mxfp4_exact(seed, lo, span):
    rng = np.random.default_rng(seed)
    x = pre_dispatch_input(rng, H, 32, 6.0, E2M1_TIE_MIDS, lo, lo + span)
    v, _ = o_pre_ue8m0(x, 32, 6.0)
    assert_ties_present(v, E2M1_MID, "mxfp4")
    codes, sf = jq["quantize_mxfp4"](jnp.asarray(x))
    w_codes, w_sf = o_quantize_mxfp4(x)
    assert codes.dtype == jnp.uint8 and codes.shape == (x.shape[0], H // 2)
    assert sf.dtype == jnp.int32 and sf.shape == (x.shape[0], H // 128)
    assert_same(np.asarray(codes), w_codes, "mxfp4 packed codes", seed)
    assert_same(np.asarray(sf), w_sf, "mxfp4 sf words", seed)
    # f32 input with the same values gives the same bytes
    c32, s32 = jq["quantize_mxfp4"](jnp.asarray(x.astype(F32)))
    assert_same(np.asarray(c32), w_codes, "mxfp4 (f32 input)", seed)
    assert_same(np.asarray(s32), w_sf, "mxfp4 sf (f32 input)", seed)


@HYP
@given(
    seed=st.integers(0, 2**32 - 1),
    lo=st.integers(-40, 0),
    span=st.integers(0, 50),
    group=st.sampled_from([32, 64, 128]),
)
def test_quantize_fp8_ue8m0_exact(seed, lo, span, group):
    rng = np.random.default_rng(seed)
    x = pre_dispatch_input(rng, H, group, 448.0, E4M3_TIE_MIDS, lo, lo + span)
    v, _ = o_pre_ue8m0(x, group, 448.0)
    assert_ties_present(v, E4M3_MID, "fp8 ue8m0")
    q, sf = jq["quantize_fp8_ue8m0"](jnp.asarray(x), group=group)
    w_q, w_sf = o_quantize_fp8_ue8m0(x, group)
    assert q.dtype == jnp.float8_e4m3fn and sf.dtype == jnp.int32 and sf.shape == (x.shape[0], H // group // 4)
    assert_same(np.asarray(q).view(np.uint8), w_q, f"fp8 ue8m0 bytes (group {group})", seed)
    assert_same(np.asarray(sf), w_sf, f"fp8 ue8m0 sf words (group {group})", seed)


@HYP
@given(seed=st.integers(0, 2**32 - 1), lo=st.integers(-40, 0), span=st.integers(0, 50))
def test_quantize_fp8_per128_exact(seed, lo, span):
    rng = np.random.default_rng(seed)
    rows = [*special_rows(rng, H)]
    # amax = 448 * 2^k makes the f32 scale exactly 2^k, so midpoints are exact ties
    rows += tie_rows(rng, H, 128, 448.0, E4M3_TIE_MIDS, (-10, 10))
    rows.append(wide_rows(rng, 9, H, 128, lo, lo + span))
    x = np.concatenate([np.reshape(r, (-1, H)) for r in rows]).astype(F32).astype(BF16)
    q, sf = jq["quantize_fp8_per128"](jnp.asarray(x))
    w_q, w_sf = o_quantize_fp8_per128(x)
    assert q.dtype == jnp.float8_e4m3fn and sf.dtype == jnp.float32 and sf.shape == (x.shape[0], H // 128)
    assert_same(np.asarray(q).view(np.uint8), w_q, "fp8 per128 bytes", seed)
    assert_same(np.asarray(sf).view(np.uint32), w_sf.view(np.uint32), "fp8 per128 scales", seed)
    # negative bf16 subnormals (row 2) must encode as -0 (0x80), not +0
    neg = x[2].astype(F32) < 0
    assert (np.asarray(q).view(np.uint8)[2][neg] == 0x80).all()


def test_pre_dispatch_special_rows_expected_bytes():
    """Hand-derived bytes for the all-zero row and a floor-limited row (amax floor 1e-4)."""
    x = jnp.zeros((2, 128), jnp.bfloat16).at[1, 5].set(-3e-5)
    codes, sf = Q.quantize_mxfp4(x)
    # fl(1e-4f / 6) = 1.6667e-5 -> smallest power of two above: 2^-15 -> byte 112
    assert (np.asarray(Q.unpack_ue8m0(sf)) == 112).all()
    c = np.asarray(Q.unpack_nibbles(codes))
    assert (c[0] == 0).all()
    assert c[1, 5] == 8 | 2 and (np.delete(c[1], 5) == 0).all()  # bf16(-3e-5) * 2^15 = -0.98 -> -1.0
    q, sf8 = Q.quantize_fp8_ue8m0(x.at[1, 5].set(1.0))
    assert int(np.asarray(Q.unpack_ue8m0(sf8))[0, 0]) == 105  # fl(1e-4f / 448) in (2^-23, 2^-22]
    assert int(np.asarray(Q.unpack_ue8m0(sf8))[1, 0]) == 127 - 8  # 1/448 -> 2^-8


# --------------------------------------------------------------------------------------------------
# kernel requantisation (no floor)
# --------------------------------------------------------------------------------------------------


def requant_input(rng, n, group, fmax, mids, lo, hi):
    rows = [np.zeros(n), rng.standard_normal(n) * 1e-30]
    # subnormal and near-underflow groups: amax = k * 2^-149 around the fl(amax*c) == 0 boundary
    ks = np.array([1, 2, 3, 4, 5, 222, 223, 224, 225, 1000, 2**22, 2**23 - 1, 2**23, 6 * 2**21, 7 * 2**21])
    sub = np.zeros(n)
    for i in range(n // 32):
        k = ks[i % len(ks)]
        sub[32 * i : 32 * i + 32] = rng.integers(0, k + 1, 32) * rng.choice([-1.0, 1.0], 32) * 2.0**-149
        sub[32 * i] = k * 2.0**-149
    rows.append(sub)
    tiny_normal = wide_rows(rng, 1, n, 32, -140, -110)
    rows.append(tiny_normal)
    neg0 = -np.abs(rng.standard_normal(n)) * 1e-3
    neg0[: n // 2] = -0.0
    neg0[n // 2 + 3] = np.nan
    neg0[n // 2 + 40] = -np.nan
    rows.append(neg0)
    rows += tie_rows(rng, n, group, fmax, mids, (-30, 30))
    rows.append(wide_rows(rng, 8, n, 32, lo, hi))
    return np.concatenate([np.reshape(r, (-1, n)) for r in rows]).astype(F32)


@HYP
@given(seed=st.integers(0, 2**32 - 1), lo=st.integers(-60, 10), span=st.integers(0, 60))
def test_requant_mxfp4_exact(seed, lo, span):
    rng = np.random.default_rng(seed)
    a = requant_input(rng, H, 32, 6.0, E2M1_TIE_MIDS, lo, lo + span)
    v, _, e = o_requant_ue8m0(a, INV6)
    assert_ties_present(v, E2M1_MID, "requant mxfp4")
    assert (e == -127).any() and (e == -126).any(), "underflow exponents not exercised"
    codes, sfb = jq["requant_mxfp4"](jnp.asarray(a))
    w_codes, w_sf = o_requant_mxfp4(a)
    assert codes.shape == (a.shape[0], H // 2) and sfb.dtype == jnp.uint8 and sfb.shape == (a.shape[0], H // 32)
    assert_same(np.asarray(sfb), w_sf, "requant mxfp4 sf bytes", seed)
    assert_same(np.asarray(codes), w_codes, "requant mxfp4 codes", seed)
    assert (np.asarray(sfb)[0] == 0).all() and (np.asarray(codes)[0] == 0).all()  # amax == 0 row


@HYP
@given(seed=st.integers(0, 2**32 - 1), lo=st.integers(-60, 10), span=st.integers(0, 60))
def test_requant_fp8_ue8m0_exact(seed, lo, span):
    rng = np.random.default_rng(seed)
    a = requant_input(rng, H, 32, 448.0, E4M3_TIE_MIDS, lo, lo + span)
    v, _, e = o_requant_ue8m0(a, INV448)
    assert_ties_present(v, E4M3_MID, "requant fp8")
    assert (e == -127).any() and (e == -126).any(), "underflow exponents not exercised"
    q, sfb = jq["requant_fp8_ue8m0"](jnp.asarray(a))
    w_q, w_sf = o_requant_fp8_ue8m0(a)
    assert_same(np.asarray(sfb), w_sf, "requant fp8 sf bytes", seed)
    assert_same(np.asarray(q).view(np.uint8), w_q, "requant fp8 bytes", seed)


@HYP
@given(seed=st.integers(0, 2**32 - 1), lo=st.integers(-60, 10), span=st.integers(0, 60))
def test_requant_fp8_per128_exact(seed, lo, span):
    rng = np.random.default_rng(seed)
    a = requant_input(rng, H, 128, 448.0, E4M3_TIE_MIDS, lo, lo + span)
    q, sf = jq["requant_fp8_per128"](jnp.asarray(a))
    w_q, w_sf = o_requant_fp8_per128(a)
    assert sf.dtype == jnp.float32 and sf.shape == (a.shape[0], H // 128)
    assert_same(np.asarray(sf).view(np.uint32), w_sf.view(np.uint32), "requant per128 sf", seed)
    assert_same(np.asarray(q).view(np.uint8), w_q, "requant per128 bytes", seed)


def test_requant_hand_checked():
    a = np.zeros((1, 128), F32)
    a[0, :5] = [3.0, -1.25, -0.1, 0.125, 0.375]  # amax 3: fl(3 * fl(1/6)) = 0.5 -> e = -1, scale 0.5
    a[0, 32] = 2.0**-149  # amax*fl(1/6) rounds to 0 -> byte 0, scale 2^127
    a[0, 33] = -(2.0**-149)
    a[0, 64:66] = [np.inf, 1.0]  # amax inf -> e = 128 -> byte 255
    codes, sfb = Q.requant_mxfp4(a)
    sfb = list(np.asarray(sfb)[0])
    assert sfb == [126, 0, 255, 0]
    c = np.asarray(Q.unpack_nibbles(codes))[0]
    # 6 -> 7; -2.5 -> -2 (tie to even code 4); -0.2 -> -0 (0x8); 0.25 -> 0 and 0.75 -> 1.0 (ties to even)
    assert list(c[:5]) == [7, 8 | 4, 8, 0, 2]
    assert list(c[32:34]) == [0, 8]  # 2^-22 -> +0, -2^-22 -> -0
    assert list(c[36:38]) == [0, 0]  # all-zero group
    assert list(c[64:67]) == [15, 15, 7]  # * fast_pow2(-128) = -inf: inf -> -inf -> -6, 0 -> NaN -> +6
    assert list(c[96:98]) == [0, 0]


# --------------------------------------------------------------------------------------------------
# dequantisation (exact) and round trips (bounded error)
# --------------------------------------------------------------------------------------------------


def test_dequantize_exact_all_paths():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (6, 64), dtype=np.uint8)  # H = 128
    sfb = rng.choice(np.r_[0:6, 100:140, 250:256], (6, 4)).astype(np.uint8)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(6, 128)
    want = o_e2m1_value(codes) * np.repeat(o_ue8m0(sfb), 32, axis=-1)
    got_w = Q.dequantize_mxfp4(packed, o_pack_words(sfb))
    got_b = Q.dequantize_mxfp4(packed, sfb)
    assert got_w.dtype == jnp.float32
    assert_f32_bits(np.asarray(got_w), want, "dequantize_mxfp4 (int32 sf)", seed)
    assert_f32_bits(np.asarray(got_b), want, "dequantize_mxfp4 (uint8 sf)", seed)

    qb = rng.integers(0, 256, (6, 256), dtype=np.uint8)
    for group in (32, 64, 128):
        sfb = rng.choice(np.r_[0:6, 100:140, 250:256], (6, 256 // group)).astype(np.uint8)
        want = o_e4m3_value(qb) * np.repeat(o_ue8m0(sfb), group, axis=-1)
        q = jnp.asarray(qb.view(E4M3))
        if (256 // group) % 4 == 0:
            got = Q.dequantize_fp8_ue8m0(q, o_pack_words(sfb), group=group)
            assert_f32_bits(np.asarray(got), want, f"dequantize_fp8_ue8m0 words g{group}", seed)
        got = Q.dequantize_fp8_ue8m0(q, sfb, group=group)
        assert_f32_bits(np.asarray(got), want, f"dequantize_fp8_ue8m0 bytes g{group}", seed)

    sf = (rng.uniform(0.5, 2, (6, 2)) * 2.0 ** rng.integers(-40, 40, (6, 2))).astype(F32)
    got = Q.dequantize_fp8_per128(jnp.asarray(qb.view(E4M3)), sf)
    want = o_f32(o_e4m3_value(qb) * np.repeat(sf.astype(F64), 128, axis=-1))
    assert_f32_bits(np.asarray(got), want, "dequantize_fp8_per128", seed)


@pytest.mark.parametrize("mode", ["mxf4xmxf4", "fp8xfp4", "fp8"])
def test_round_trip_bounds(mode):
    """Stated bounds, per element, with s the group's scale (2^(b-127) or the f32 sf):
    mxfp4:  |x - x'| <= s/4 where |x| < s, and <= |x|/5 where |x| >= s (half gap of E2M1 / value).
    fp8 ue8m0: |x - x'| <= |x|/16 where |x| >= s*2^-6 (e4m3 normal), else <= s*2^-10.
    fp8 per128: |x - x'| <= (1/16 + 2^-20)|x| + s*2^-10 (plus the non-power-of-two scale's rounding).
    The same bounds hold for the kernel requantisation (fake_requant)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x = wide_rows(rng, 32, H, 32, -20, 20).astype(F32).astype(BF16)
    xf = x.astype(F32).astype(F64)
    for what, fn in (("fake_quantize", Q.fake_quantize), ("fake_requant", Q.fake_requant)):
        arg = jnp.asarray(x) if what == "fake_quantize" else jnp.asarray(x.astype(F32))
        xd = np.asarray(fn(arg, mode)).astype(F64)
        err = np.abs(xd - xf)
        if mode == "fp8":
            if what == "fake_quantize":
                s = np.asarray(Q.quantize_fp8_per128(jnp.asarray(x))[1]).astype(F64)
            else:
                s = np.asarray(Q.requant_fp8_per128(jnp.asarray(x.astype(F32)))[1]).astype(F64)
            s = np.repeat(s, 128, axis=-1)
            bound = (1 / 16 + 2.0**-20) * np.abs(xf) + s * 2.0**-10
        else:
            if what == "fake_quantize":
                sfb = Q.unpack_ue8m0(
                    Q.quantize_mxfp4(jnp.asarray(x))[1]
                    if mode == "mxf4xmxf4"
                    else Q.quantize_fp8_ue8m0(jnp.asarray(x))[1]
                )
            else:
                sfb = (Q.requant_mxfp4 if mode == "mxf4xmxf4" else Q.requant_fp8_ue8m0)(jnp.asarray(x.astype(F32)))[1]
            s = np.repeat(o_ue8m0(np.asarray(sfb)), 32, axis=-1)
            if mode == "mxf4xmxf4":
                bound = np.where(np.abs(xf) < s, s / 4, np.abs(xf) / 5)
            else:
                bound = np.where(np.abs(xf) >= s * 2.0**-6, np.abs(xf) / 16, s * 2.0**-10)
        worst = np.max(err - bound)
        assert worst <= 0, f"{mode} {what}: error exceeds the stated bound by {worst} (seed {seed})"
        # and the bound is not vacuous: typical relative errors are well above zero
        assert np.median(err[xf != 0] / np.abs(xf[xf != 0])) > 1e-4


def test_fake_paths_equal_explicit_calls():
    seed = fresh_seed()
    a = wide_rows(np.random.default_rng(seed), 4, 256, 32, -5, 5).astype(F32)
    pairs = [
        (Q.fake_requant(a, "mxf4xmxf4"), Q.dequantize_mxfp4(*Q.requant_mxfp4(a))),
        (Q.fake_requant(a, "fp8xfp4"), Q.dequantize_fp8_ue8m0(*Q.requant_fp8_ue8m0(a))),
        (Q.fake_requant(a, "fp8"), Q.dequantize_fp8_per128(*Q.requant_fp8_per128(a))),
    ]
    xb = jnp.asarray(a.astype(BF16))
    pairs += [
        (Q.fake_quantize(xb, "mxf4xmxf4"), Q.dequantize_mxfp4(*Q.quantize_mxfp4(xb))),
        (Q.fake_quantize(xb, "fp8xfp4"), Q.dequantize_fp8_ue8m0(*Q.quantize_fp8_ue8m0(xb))),
        (Q.fake_quantize(xb, "fp8"), Q.dequantize_fp8_per128(*Q.quantize_fp8_per128(xb))),
    ]
    for i, (fake, explicit) in enumerate(pairs):
        assert_f32_bits(np.asarray(fake), np.asarray(explicit), f"fake path {i}", seed)
    # the fake requant of an exactly representable row is the identity
    row = np.zeros((1, 32), F32)
    row[0, :8] = [6, -4, 3, -2, 1.5, 1, -0.5, 0]
    row *= 2.0**-70
    assert_f32_bits(np.asarray(Q.fake_requant(row, "mxf4xmxf4")), row, "identity on representable values")


# --------------------------------------------------------------------------------------------------
# checkpoint weights
# --------------------------------------------------------------------------------------------------


def test_dequantize_mxfp4_weight_exact():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (2, 8, 64), dtype=np.uint8)  # [E, N, K//2], K = 128
    scale = rng.choice(np.r_[0:4, 110:135], (2, 8, 4)).astype(np.uint8)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(2, 8, 128)
    want = o_e2m1_value(codes) * np.repeat(o_ue8m0(scale), 32, axis=-1)
    got = Q.dequantize_mxfp4_weight(packed, scale)
    assert got.shape == (2, 8, 128) and got.dtype == jnp.float32
    assert_f32_bits(np.asarray(got), want, "dequantize_mxfp4_weight", seed)
    got = Q.dequantize_mxfp4_weight(packed, jnp.asarray(scale.view(ml_dtypes.float8_e8m0fnu)))
    assert_f32_bits(np.asarray(got), want, "dequantize_mxfp4_weight (e8m0fnu scale)", seed)


def test_dequantize_fp8_block128_exact():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    for n, k in ((256, 384), (200, 130)):
        qb = rng.integers(0, 256, (2, n, k), dtype=np.uint8)
        qb[(qb & 0x7F) == 0x7F] = 0x01
        nb, kb = -(-n // 128), -(-k // 128)
        scale = (2.0 ** rng.integers(-20, 20, (2, nb, kb)) * rng.uniform(1, 2, (2, nb, kb))).astype(F32)
        s_full = np.repeat(np.repeat(scale.astype(F64), 128, -2), 128, -1)[:, :n, :k]
        want = o_f32(o_e4m3_value(qb) * s_full)
        got = Q.dequantize_fp8_block128(jnp.asarray(qb.view(E4M3)), scale)
        assert got.shape == (2, n, k)
        assert_f32_bits(np.asarray(got), want, f"dequantize_fp8_block128 {n}x{k}", seed)
    e8 = rng.integers(110, 140, (2, 2, 3), dtype=np.uint8)
    qb = rng.integers(0, 0x7E, (2, 256, 384), dtype=np.uint8)
    want = o_e4m3_value(qb) * np.repeat(np.repeat(o_ue8m0(e8), 128, -2), 128, -1)
    got = Q.dequantize_fp8_block128(jnp.asarray(qb.view(E4M3)), jnp.asarray(e8.view(ml_dtypes.float8_e8m0fnu)))
    assert_f32_bits(np.asarray(got), want, "dequantize_fp8_block128 (e8m0 scales)", seed)


# --------------------------------------------------------------------------------------------------
# jit / vmap
# --------------------------------------------------------------------------------------------------


def test_jit_and_vmap_agree_with_eager():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x = wide_rows(rng, 6, 256, 32, -10, 10).astype(F32)
    xb = jnp.asarray(x.astype(BF16)).reshape(2, 3, 256)
    c, s = Q.quantize_mxfp4(xb)
    assert c.shape == (2, 3, 128) and s.shape == (2, 3, 2)
    cv, sv = jax.vmap(jax.jit(Q.quantize_mxfp4))(xb)
    assert_same(np.asarray(cv), np.asarray(c), "vmap codes", seed)
    assert_same(np.asarray(sv), np.asarray(s), "vmap sf", seed)
    w_c, w_s = o_quantize_mxfp4(np.asarray(xb).reshape(6, 256))
    assert_same(np.asarray(c).reshape(6, 128), w_c, "batched codes", seed)
    for name in ("requant_mxfp4", "requant_fp8_ue8m0", "requant_fp8_per128"):
        fn = getattr(Q, name)
        eager = fn(x)
        batched = jax.vmap(jax.jit(fn))(jnp.asarray(x).reshape(2, 3, 256))
        for e_arr, b_arr in zip(eager, batched):
            assert_same(u8(np.asarray(b_arr).reshape(e_arr.shape)), u8(np.asarray(e_arr)), f"{name} vmap", seed)
    fq = jax.jit(Q.fake_requant, static_argnames="mode")
    assert_f32_bits(np.asarray(fq(x, mode="fp8")), np.asarray(Q.fake_requant(x, "fp8")), "jit fake_requant")


# --------------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------------

bf = lambda *s: jnp.zeros(s, jnp.bfloat16)  # noqa: E731
f32 = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
u8z = lambda *s: jnp.zeros(s, jnp.uint8)  # noqa: E731
i32 = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
e4 = lambda *s: jnp.zeros(s, jnp.float8_e4m3fn)  # noqa: E731

ERROR_CASES = [
    ("encode_e2m1", lambda: Q.encode_e2m1(i32(4)), TypeError, "v"),
    ("encode_e2m1_cvt", lambda: Q.encode_e2m1_cvt(jnp.zeros(4, jnp.float16)), TypeError, "v"),
    ("encode_e4m3", lambda: Q.encode_e4m3(np.zeros(4, np.float64)), TypeError, "v"),
    ("decode_e2m1", lambda: Q.decode_e2m1(i32(4)), TypeError, "codes"),
    ("pack_nibbles dtype", lambda: Q.pack_nibbles(f32(4)), TypeError, "codes"),
    ("pack_nibbles odd", lambda: Q.pack_nibbles(u8z(3, 5)), ValueError, "codes"),
    ("unpack_nibbles", lambda: Q.unpack_nibbles(jnp.zeros(4, jnp.int8)), TypeError, "packed"),
    ("pack_ue8m0", lambda: Q.pack_ue8m0(u8z(2, 6)), ValueError, "sf_bytes"),
    ("unpack_ue8m0", lambda: Q.unpack_ue8m0(jnp.zeros(4, jnp.uint32)), TypeError, "words"),
    ("ue8m0_to_float", lambda: Q.ue8m0_to_float(i32(4)), TypeError, "sf_bytes"),
    ("quantize_mxfp4 dtype", lambda: Q.quantize_mxfp4(jnp.zeros((2, 128), jnp.float16)), TypeError, "x"),
    ("quantize_mxfp4 hidden", lambda: Q.quantize_mxfp4(bf(2, 96)), ValueError, "x"),
    ("quantize_mxfp4 scalar", lambda: Q.quantize_mxfp4(jnp.zeros((), jnp.bfloat16)), ValueError, "x"),
    ("dequantize_mxfp4 codes dtype", lambda: Q.dequantize_mxfp4(f32(2, 64), i32(2, 1)), TypeError, "codes"),
    ("dequantize_mxfp4 codes odd", lambda: Q.dequantize_mxfp4(u8z(2, 63), i32(2, 1)), ValueError, "codes"),
    ("dequantize_mxfp4 sf shape", lambda: Q.dequantize_mxfp4(u8z(2, 64), i32(2, 2)), ValueError, "sf"),
    ("dequantize_mxfp4 sf lead", lambda: Q.dequantize_mxfp4(u8z(2, 64), i32(3, 1)), ValueError, "sf"),
    ("dequantize_mxfp4 sf dtype", lambda: Q.dequantize_mxfp4(u8z(2, 64), f32(2, 1)), TypeError, "sf"),
    ("quantize_fp8_ue8m0 group", lambda: Q.quantize_fp8_ue8m0(bf(2, 512), group=16), ValueError, "group"),
    ("quantize_fp8_ue8m0 group 48", lambda: Q.quantize_fp8_ue8m0(bf(2, 512), group=48), ValueError, "group"),
    ("quantize_fp8_ue8m0 group str", lambda: Q.quantize_fp8_ue8m0(bf(2, 512), group="32"), ValueError, "group"),
    ("quantize_fp8_ue8m0 hidden", lambda: Q.quantize_fp8_ue8m0(bf(2, 256), group=128), ValueError, "x"),
    ("quantize_fp8_ue8m0 dtype", lambda: Q.quantize_fp8_ue8m0(i32(2, 128)), TypeError, "x"),
    ("dequantize_fp8_ue8m0 q", lambda: Q.dequantize_fp8_ue8m0(u8z(2, 128), i32(2, 1)), TypeError, "q"),
    ("dequantize_fp8_ue8m0 sf", lambda: Q.dequantize_fp8_ue8m0(e4(2, 128), i32(2, 2)), ValueError, "sf"),
    (
        "dequantize_fp8_ue8m0 group",
        lambda: Q.dequantize_fp8_ue8m0(e4(2, 128), i32(2, 1), group=256),
        ValueError,
        "group",
    ),
    ("dequantize_fp8_ue8m0 hidden", lambda: Q.dequantize_fp8_ue8m0(e4(2, 96), i32(2, 1)), ValueError, "q"),
    ("quantize_fp8_per128 hidden", lambda: Q.quantize_fp8_per128(bf(2, 64)), ValueError, "x"),
    ("quantize_fp8_per128 dtype", lambda: Q.quantize_fp8_per128(u8z(2, 128)), TypeError, "x"),
    ("dequantize_fp8_per128 sf dtype", lambda: Q.dequantize_fp8_per128(e4(2, 128), i32(2, 1)), TypeError, "sf"),
    ("dequantize_fp8_per128 sf shape", lambda: Q.dequantize_fp8_per128(e4(2, 256), f32(2, 1)), ValueError, "sf"),
    ("dequantize_fp8_per128 q hidden", lambda: Q.dequantize_fp8_per128(e4(2, 100), f32(2, 1)), ValueError, "q"),
    ("requant_mxfp4 cols", lambda: Q.requant_mxfp4(f32(2, 48)), ValueError, "a"),
    ("requant_mxfp4 dtype", lambda: Q.requant_mxfp4(i32(2, 64)), TypeError, "a"),
    ("requant_fp8_ue8m0 cols", lambda: Q.requant_fp8_ue8m0(f32(2, 16)), ValueError, "a"),
    ("requant_fp8_per128 cols", lambda: Q.requant_fp8_per128(f32(2, 96)), ValueError, "a"),
    ("fake_requant mode", lambda: Q.fake_requant(f32(2, 128), "bf16"), ValueError, "mode"),
    ("fake_quantize mode", lambda: Q.fake_quantize(bf(2, 128), "fp4"), ValueError, "mode"),
    ("weight packed rank", lambda: Q.dequantize_mxfp4_weight(u8z(64), u8z(4)), ValueError, "packed"),
    ("weight packed K", lambda: Q.dequantize_mxfp4_weight(u8z(4, 15), u8z(4, 1)), ValueError, "packed"),
    ("weight scale shape", lambda: Q.dequantize_mxfp4_weight(u8z(4, 64), u8z(4, 2)), ValueError, "scale"),
    ("weight scale lead", lambda: Q.dequantize_mxfp4_weight(u8z(4, 64), u8z(5, 4)), ValueError, "scale"),
    ("weight scale dtype", lambda: Q.dequantize_mxfp4_weight(u8z(4, 64), f32(4, 4)), TypeError, "scale"),
    ("block128 q dtype", lambda: Q.dequantize_fp8_block128(u8z(128, 128), f32(1, 1)), TypeError, "q"),
    ("block128 scale shape", lambda: Q.dequantize_fp8_block128(e4(256, 128), f32(1, 1)), ValueError, "scale"),
    (
        "block128 scale dtype",
        lambda: Q.dequantize_fp8_block128(e4(128, 128), jnp.zeros((1, 1), jnp.float16)),
        TypeError,
        "scale",
    ),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_argument_errors(case):
    _, call, exc, name = case
    with pytest.raises(exc, match=rf"^{name}:"):
        call()


def test_errors_raise_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"^x:"):
        jax.jit(Q.quantize_mxfp4)(bf(2, 96))
    with pytest.raises(ValueError, match=r"^group:"):
        jax.jit(Q.quantize_fp8_ue8m0, static_argnames="group")(bf(2, 512), group=100)
