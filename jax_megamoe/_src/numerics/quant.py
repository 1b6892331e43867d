"""MXFP4 / FP8 quantisation, E2M1 packing and UE8M0 scales, bit-exact with DeepGEMM's Mega MoE kernels.

Everything here is pure ``jax.numpy``/``lax``: jit-able (all options are static Python values),
vmappable, shape-static, with no Python loops over data. Each public function checks its arguments'
dtypes and shapes (also numpy inputs, and tracers inside an outer jit: at trace time) and raises
``TypeError``/``ValueError`` naming the argument, then runs a jitted body (one compiled computation
when called eagerly; inlined under an outer jit/vmap). Leading batch dimensions ``[...]`` are allowed.

Formats (what the kernels read and write; sgl-deep-gemm 0.2.5 headers)
-----------------------------------------------------------------------
* **E2M1 code** (4 bits): bit 3 = sign, bits 0-2 index ``{0, .5, 1, 1.5, 2, 3, 4, 6}``.
  Packed two per byte, **low nibble = even column** (``pack_nibbles``).
* **UE8M0 scale byte** ``b``: the power of two ``2^(b-127)``; ``b = 0`` is ``2^-127``, ``b = 255`` NaN.
  Packed four per int32, byte ``j`` of word ``c`` = group ``4c + j`` (little-endian, ``pack_ue8m0``).
* **E4M3** (``float8_e4m3fn``): round-to-nearest-even, saturating to +-448 (``__NV_SATFINITE``).

Which function is which kernel step
-----------------------------------
* ``quantize_mxfp4``      sm_100 pre-dispatch, ``mxf4xmxf4`` (group 32, amax floor 1e-4, ``amax / 6``).
* ``quantize_fp8_ue8m0``  sm_100 pre-dispatch, ``fp8xfp4`` (group 32/64/128, floor 1e-4, ``amax / 448``).
* ``quantize_fp8_per128`` sm_90 pre-dispatch, ``fp8`` (group 128, floor 1e-10, f32 scale ``amax / 448``).
* ``requant_mxfp4`` / ``requant_fp8_ue8m0``: the sm_100 L1 epilogue's requantisation of the SwiGLU
  output (group 32, **no** floor, ``amax * fl32(1/FMAX)``, ``fast_log2_ceil``/``fast_pow2``).
* ``requant_fp8_per128``: the sm_90 L1 epilogue (``fl(max(amax, 1e-10) * fl32(1/448))``, ``1/sf``).
* ``fake_quantize(x, mode)`` / ``fake_requant(a, mode)``: quantise then dequantise, f32 out, keyed by
  the kernel mode (``"mxf4xmxf4"``, ``"fp8xfp4"``, ``"fp8"``); what the reference oracle uses.

Exactness notes
---------------
* Encoders work on the f32 **bits** (integer arithmetic), never through XLA's f32 -> f8/f4 converts.
* XLA:CPU flushes f32 subnormals (FTZ/DAZ) in float arithmetic. Where a subnormal can change a byte
  (the requantisation has no amax floor, so its scales reach ``2^127``), the group max, the exponent
  ``fast_log2_ceil(fl(amax * c))`` and the power-of-two scaling are computed with integer arithmetic,
  so the bytes are those of the GPU kernels (compiled without ``-ftz``) on every backend. The pre-dispatch
  paths have an amax floor; there a flushed subnormal can only turn a code-0 value into a signed zero
  of the same sign, which encodes to the same byte.
* Dequantisation by a UE8M0 scale is an exact ``ldexp`` (subnormal results included).
* XLA rewrites ``x / c`` (c a broadcast scalar) into ``x * (1/c)`` on CPU and GPU (about half of all
  quotients change), and XLA:GPU's f32 division is not correctly rounded at all (13% of ``1/s`` differ
  on an H200, jax 0.11.2). The kernels' IEEE divisions ``amax / 6.0f``, ``amax / 448.0f`` and
  ``1.0f / sf`` are therefore computed with integer arithmetic (``_div_exact``, ``_recip_exact``); no
  float division is left in this module. (For the UE8M0 bytes the rewrite would not matter, since the
  quotient's rounding cannot cross a power of two; for the sm_90 f32 scale and its inverse it does.)
* Float multiplies (``x * inv``, ``amax * fl(1/448)``) are IEEE on both backends (checked on GPU).
* NaN: pre-dispatch E2M1 encodes NaN as +0 (the kernel's threshold rule); E4M3 encodes every NaN as
  ``0x7F``: the hardware ``cvt.rn.satfinite.e4m3x2.f32`` drops the sign of a NaN (measured on sm_90,
  H100 and H200, over all 2^32 f32 inputs, where it agrees with ``encode_e4m3`` -- run by JAX on the
  GPU -- on every input; CUDA's host
  emulation in ``cuda_fp8.hpp`` would give ``0xFF`` for a negative NaN, and so does ml_dtypes). The
  requantisation's E2M1 uses the PTX ``cvt.rn.satfinite.e2m1x2.f32`` semantics of ``encode_e2m1_cvt``
  (signed zero ``0x8`` for negative values that round to zero, NaN -> ``0x7`` = +6), taken from CUDA 13's
  host emulation in ``cuda_fp4.hpp`` (not checked on sm_100 hardware).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_megamoe._src.numerics._validate import ArrayIn, check_dtype, check_multiple
from jax_megamoe._src.numerics.config import check_mode

#: The 16 E2M1 code values (index = code; bit 3 = sign). Code 8 is -0.0.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
E2M1_VALUES.setflags(write=False)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
#: Group sizes the sm_100 FP8 pre-dispatch kernel instantiates for UE8M0 scales.
FP8_UE8M0_GROUPS = (32, 64, 128)

# fp32 constants exactly as the kernels spell them.
_AMAX_FLOOR_SM100 = np.float32(1e-4)  # fmaxf(local_max, 1e-4f)
_AMAX_FLOOR_SM90 = np.float32(1e-10)  # fmaxf(local_max, 1e-10f)
_INV6 = np.float32(1.0) / np.float32(6.0)  # 1.0f / 6.0f = 0x3E2AAAAB
_INV448 = np.float32(1.0) / np.float32(448.0)  # 1.0f / 448.0f
# get_e4m3_sf_and_sf_inv writes {1.0 / 448.0} (double, then narrowed): the same float.
assert _INV448 == np.float32(1.0 / 448.0) and _INV6.view(np.uint32) == 0x3E2AAAAB

_U32 = jnp.uint32
_F32_SIGN = 0x80000000
_F32_ABS = 0x7FFFFFFF
_F32_INF = 0x7F800000

_E2M1_THRESHOLDS = (  # (bits of t, strict): code += [a > t] if strict else [a >= t]
    (np.float32(0.25), True),
    (np.float32(0.75), False),
    (np.float32(1.25), True),
    (np.float32(1.75), False),
    (np.float32(2.5), True),
    (np.float32(3.5), False),
    (np.float32(5.0), True),
)


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------


def _arr(x):
    return x if hasattr(x, "dtype") and hasattr(x, "shape") else jnp.asarray(x)


def _operand(name, x, dtype):
    """``x`` as an array of ``dtype`` with at least one dimension (errors name ``name``)."""
    x = _arr(x)
    check_dtype(name, x, dtype)
    _check_rank_ge1(name, x)
    return x


def _check_rank_ge1(name, x):
    if len(x.shape) < 1:
        raise ValueError(f"{name}: expected an array of rank >= 1, got a scalar")


def _check_same_lead(name, x, ref_name, ref):
    if tuple(x.shape[:-1]) != tuple(ref.shape[:-1]):
        raise ValueError(
            f"{name}: leading dimensions {list(x.shape[:-1])} do not match {ref_name}'s {list(ref.shape[:-1])}"
        )


def _check_last(name, x, want, what):
    if x.shape[-1] != want:
        want_shape = "[" + ", ".join([*(str(d) for d in x.shape[:-1]), str(want)]) + "]"
        raise ValueError(f"{name}: expected shape {want_shape} ({what}), got {list(x.shape)}")


def _check_group(group):
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or int(group) not in FP8_UE8M0_GROUPS:
        raise ValueError(f"group: {group!r} is not supported; expected one of {', '.join(map(str, FP8_UE8M0_GROUPS))}")
    return int(group)


def _check_float(name, x):
    x = _arr(x)
    check_dtype(name, x, (jnp.float32, jnp.bfloat16))
    return x


def _check_hidden(name, x, multiple, what="hidden size"):
    _check_rank_ge1(name, x)
    check_multiple(name, x.shape[-1], multiple, what)


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)  # bf16 -> f32 is exact


# --------------------------------------------------------------------------------------------------
# bit helpers (all integer arithmetic on f32 bit patterns; immune to FTZ/DAZ)
# --------------------------------------------------------------------------------------------------


def _bits(x):
    return lax.bitcast_convert_type(x, _U32)


def _from_bits(b):
    return lax.bitcast_convert_type(b.astype(_U32), jnp.float32)


def _fbits(v) -> int:
    return int(np.float32(v).view(np.uint32))


def _rne_shift_right(m, s):
    """round-to-nearest-even of ``m / 2^s`` for uint32 ``m`` and shift ``1 <= s <= 31``."""
    s = s.astype(_U32)
    q = m >> s
    rem = m & ((_U32(1) << s) - _U32(1))
    half = _U32(1) << (s - _U32(1))
    up = (rem > half) | ((rem == half) & ((q & _U32(1)) == _U32(1)))
    return q + up.astype(_U32)


def _mul_pow2_exact(x, k):
    """``x * 2^k`` exactly rounded (IEEE ldexp, round-to-nearest-even on underflow), with integer ops.

    ``x`` f32 (any value, subnormals included), ``k`` int32 broadcastable to it. Zeros, infinities and
    NaNs pass through; overflow gives infinity. XLA:CPU's FTZ/DAZ cannot touch it.
    """
    b = _bits(x)
    sign = b & _U32(_F32_SIGN)
    ab = b & _U32(_F32_ABS)
    e = (ab >> 23).astype(jnp.int32)
    m = ab & _U32(0x7FFFFF)
    sig = jnp.where(e == 0, m, m | _U32(0x800000))
    # exponent of the significand's unit, value = sig * 2^(unit): unit = e - 150 (e >= 1), -149 (e == 0)
    unit = jnp.where(e == 0, jnp.int32(-149), e - 150)
    # normalise so bit 23 of sig is set (only subnormal inputs need it)
    lz = lax.clz(jnp.where(sig == 0, _U32(1), sig)).astype(jnp.int32) - 8
    lz = jnp.maximum(lz, 0)
    sig = sig << lz.astype(_U32)
    unit = unit - lz
    r = unit + jnp.asarray(k, jnp.int32) + 150  # biased exponent of the result
    normal = sign | (jnp.clip(r, 1, 254).astype(_U32) << 23) | (sig & _U32(0x7FFFFF))
    shift = jnp.clip(1 - r, 1, 31)
    sub = sign | _rne_shift_right(sig, shift)  # a carry into bit 23 gives the smallest normal: correct
    res = jnp.where(r >= 255, sign | _U32(_F32_INF), jnp.where(r >= 1, normal, sub))
    passthrough = (ab == 0) | (e == 255)
    return _from_bits(jnp.where(passthrough, b, res))


def _log2_ceil_of_bits(b):
    """``math::fast_log2_ceil`` on f32 bits of a non-negative number."""
    return (b >> 23).astype(jnp.int32) - 127 + ((b & _U32(0x7FFFFF)) != 0).astype(jnp.int32)


def _group_amax(x, group):
    """Per-group ``max |x|`` with ``fmaxf`` semantics (NaN ignored; starts from +0), exact on subnormals.

    Non-negative floats order like their bit patterns, so the maximum is taken on the bits.
    """
    ab = _bits(x) & _U32(_F32_ABS)
    ab = jnp.where(ab > _U32(_F32_INF), _U32(0), ab)
    ab = ab.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    return _from_bits(jnp.max(ab, axis=-1))


def _k0(c: np.float32) -> int:
    """Largest integer k with k * c <= 1/2, i.e. fl32(k * 2^-149 * c) == 0."""
    return int(Fraction(1, 2) / Fraction(float(c)))


def _requant_exponent(amax, c: np.float32):
    """``fast_log2_ceil(fl32(amax * c))`` exactly as the GPU computes it, subnormals included.

    ``amax`` is f32 >= 0 (may be +inf or subnormal), ``c`` = fl32(1/6) or fl32(1/448). Large amax: the
    plain f32 product is normal and exact-rounded everywhere. Small amax: the product is formed on
    ``amax * 2^32`` (built from the bits) so it stays normal, then mapped back; a product that is
    subnormal on the GPU gives -126, one that rounds to zero gives -127.
    """
    ab = _bits(amax)
    big = ab >= _U32(_fbits(2.0**-100))
    e_big = _log2_ceil_of_bits(_bits(amax * jnp.float32(c)))
    ex = (ab >> 23).astype(jnp.int32)
    m = ab & _U32(0x7FFFFF)
    scaled = jnp.where(
        ex == 0,
        m.astype(jnp.float32) * jnp.float32(2.0**-117),  # m < 2^23 exact; result >= 2^-117, normal
        _from_bits(ab + _U32(32 << 23)),
    )
    e_small = _log2_ceil_of_bits(_bits(scaled * jnp.float32(c))) - 32
    to_zero = (ex == 0) & (m <= _U32(_k0(c)))
    e_small = jnp.where(to_zero, jnp.int32(-127), jnp.maximum(e_small, -126))
    return jnp.where(big, e_big, e_small)


def _repeat_last(s, group):
    """[..., G] -> [..., G * group], each entry repeated ``group`` times."""
    return jnp.broadcast_to(s[..., None], (*s.shape, group)).reshape(*s.shape[:-1], s.shape[-1] * group)


def _div_exact(x, odd: int, pow2: int):
    """Correctly rounded ``fl32(x / (odd * 2^pow2))`` for f32 ``x`` > 0 normal (or +inf), ``odd`` in {3, 7}.

    The kernels divide ``amax / 6.0f`` and ``amax / 448.0f`` with IEEE division. XLA's algebraic
    simplifier rewrites a division by a broadcast scalar into a multiplication by its reciprocal (seen
    on CPU, jax 0.10.2; different bits for about half of all inputs), so the quotient is formed here
    with integer arithmetic: the 24-bit significand, shifted left 6, is divided by ``odd``, then
    rounded to 24 bits to nearest-even with the remainder as sticky bit. Results must be normal
    (true for the callers: amax >= 1e-10).
    """
    b = _bits(x)
    e = (b >> 23).astype(jnp.int32)
    n = ((b & _U32(0x7FFFFF)) | _U32(0x800000)) << 6  # 2^29 <= n < 2^30
    q = n // _U32(odd)
    sticky = (n % _U32(odd)) != 0
    sh = (32 - lax.clz(q).astype(jnp.int32)) - 24  # q has 27..29 bits
    shu = sh.astype(_U32)
    top = q >> shu
    rem = q & ((_U32(1) << shu) - _U32(1))
    half = _U32(1) << (shu - _U32(1))
    up = (rem > half) | ((rem == half) & (sticky | ((top & _U32(1)) == _U32(1))))
    top = top + up.astype(_U32)
    carry = top >> 24  # rounding overflowed to 2^24
    top = top >> carry
    biased = e - 6 + sh + carry.astype(jnp.int32) - pow2
    out = (biased.astype(_U32) << 23) | (top & _U32(0x7FFFFF))
    return _from_bits(jnp.where(b >= _U32(_F32_INF), b, out))


def _recip_exact(s):
    """Correctly rounded ``fl32(1.0f / s)`` for f32 ``s`` > 0 normal with a normal reciprocal, or +inf (-> +0).

    XLA:GPU's f32 division is not correctly rounded (measured with jax 0.11.2 on an H200: 13% of
    ``1/s`` differ from IEEE), while the sm_90 kernels use IEEE ``1.0f / sf``. So the reciprocal is a
    long division of 2^48 by the 24-bit significand (24 unrolled shift-subtract steps over bit
    positions, uint32 only), rounded to nearest-even with the remainder as sticky bit.
    """
    b = _bits(s)
    e = (b >> 23).astype(jnp.int32)
    frac = b & _U32(0x7FFFFF)
    m = frac | _U32(0x800000)
    r = _U32(1 << 24) - m  # 2^24 // m == 1 for m > 2^23 (m == 2^23 is handled below)
    q = jnp.ones_like(m)
    for _ in range(24):  # unrolled over the 24 quotient bits, not over data
        r = r << 1
        bit = r >= m
        r = jnp.where(bit, r - m, r)
        q = (q << 1) | bit.astype(_U32)
    top = q >> 1  # q = floor(2^48 / m) has 25 bits; keep 24
    up = ((q & _U32(1)) == _U32(1)) & ((r != 0) | ((top & _U32(1)) == _U32(1)))
    top = top + up.astype(_U32)
    carry = top >> 24
    top = top >> carry
    biased = 253 - e + carry.astype(jnp.int32)
    out = (biased.astype(_U32) << 23) | (top & _U32(0x7FFFFF))
    out = jnp.where(frac == 0, (254 - e).astype(_U32) << 23, out)  # s a power of two: exact
    return _from_bits(jnp.where(b >= _U32(_F32_INF), _U32(0), out))


# --------------------------------------------------------------------------------------------------
# E2M1
# --------------------------------------------------------------------------------------------------
# Public functions validate their arguments (on dtype/shape, so also on numpy inputs and on tracers
# inside an outer jit), then call a jitted body: one compiled computation per call even when used
# eagerly; under an outer jit or vmap the inner jit is simply inlined.


def _e2m1_magnitude_code(ab):
    """Threshold rule on |v| bits (|v| clamped at 6 is implied: every threshold is below 6)."""
    code = jnp.zeros(ab.shape, _U32)
    for t, strict in _E2M1_THRESHOLDS:
        tb = _U32(_fbits(t))
        code = code + ((ab > tb) if strict else (ab >= tb)).astype(_U32)
    return code


def _encode_e2m1_u8(v):
    b = _bits(v)
    ab = b & _U32(_F32_ABS)
    code = _e2m1_magnitude_code(ab)
    code = jnp.where(ab > _U32(_F32_INF), _U32(0), code)
    neg = (b >> 31) == _U32(1)
    return (code | jnp.where(neg & (code != 0), _U32(8), _U32(0))).astype(jnp.uint8)


def _encode_e2m1_cvt_u8(v):
    b = _bits(v)
    ab = b & _U32(_F32_ABS)
    code = _e2m1_magnitude_code(ab) | ((b >> 31) << 3)
    return jnp.where(ab > _U32(_F32_INF), _U32(7), code).astype(jnp.uint8)


def encode_e2m1(v: ArrayIn) -> jax.Array:
    """E2M1 codes (uint8 0..15) of ``v`` (f32 or bf16), the pre-dispatch kernel's rule.

    ``a = min(|v|, 6)``; ``code = [a>0.25] + [a>=0.75] + [a>1.25] + [a>=1.75] + [a>2.5] + [a>=3.5] + [a>5]``
    (round-half-even, saturating); sign bit 0x8 only when ``v < 0`` and the code is non-zero (no negative
    zero); NaN encodes as 0.
    """
    return _jit_encode_e2m1(_check_float("v", v))


def encode_e2m1_cvt(v: ArrayIn) -> jax.Array:
    """E2M1 codes with PTX ``cvt.rn.satfinite.e2m1x2.f32`` semantics (the requantisation's encoder).

    Same magnitude as ``encode_e2m1``; the sign bit is the sign bit of ``v`` (so ``-0.0`` and negative
    values that round to zero give ``0x8``) and NaN gives ``0x7`` (+6), per CUDA's ``cuda_fp4.hpp``.
    """
    return _jit_encode_e2m1_cvt(_check_float("v", v))


_jit_encode_e2m1 = jax.jit(lambda v: _encode_e2m1_u8(_f32(v)))
_jit_encode_e2m1_cvt = jax.jit(lambda v: _encode_e2m1_cvt_u8(_f32(v)))


def _decode_e2m1(codes):
    return jnp.asarray(E2M1_VALUES)[(codes & jnp.uint8(15)).astype(jnp.int32)]


def decode_e2m1(codes: ArrayIn) -> jax.Array:
    """f32 values of E2M1 codes (uint8; only the low nibble is read)."""
    codes = _arr(codes)
    check_dtype("codes", codes, jnp.uint8)
    return _jit_decode_e2m1(codes)


_jit_decode_e2m1 = jax.jit(_decode_e2m1)


def _pack_nibbles(codes):
    lo = codes[..., 0::2] & jnp.uint8(15)
    hi = codes[..., 1::2] & jnp.uint8(15)
    return lo | (hi << jnp.uint8(4))


def _unpack_nibbles(packed):
    both = jnp.stack([packed & jnp.uint8(15), packed >> jnp.uint8(4)], axis=-1)
    return both.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_nibbles(codes: ArrayIn) -> jax.Array:
    """uint8 ``[..., 2n]`` codes -> uint8 ``[..., n]``: byte b = code(2b) | code(2b+1) << 4 (low nibble = even).

    Only the low nibble of each code is used.
    """
    return _checked_call(_pack_nibbles, "codes", codes, jnp.uint8, 2)


def unpack_nibbles(packed: ArrayIn) -> jax.Array:
    """uint8 ``[..., n]`` -> uint8 ``[..., 2n]`` codes (inverse of ``pack_nibbles``)."""
    return _checked_call(_unpack_nibbles, "packed", packed, jnp.uint8, 1)


# --------------------------------------------------------------------------------------------------
# UE8M0
# --------------------------------------------------------------------------------------------------


def _pack_ue8m0(sf_bytes):
    b = sf_bytes.reshape(*sf_bytes.shape[:-1], sf_bytes.shape[-1] // 4, 4).astype(_U32)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return lax.bitcast_convert_type(w, jnp.int32)


def _unpack_ue8m0(words):
    w = lax.bitcast_convert_type(words, _U32)
    b = jnp.stack([(w >> s) & _U32(0xFF) for s in (0, 8, 16, 24)], axis=-1).astype(jnp.uint8)
    return b.reshape(*words.shape[:-1], words.shape[-1] * 4)


def pack_ue8m0(sf_bytes: ArrayIn) -> jax.Array:
    """uint8 ``[..., 4m]`` -> int32 ``[..., m]``: byte j of word c is group 4c + j (little-endian)."""
    return _checked_call(_pack_ue8m0, "sf_bytes", sf_bytes, jnp.uint8, 4)


def unpack_ue8m0(words: ArrayIn) -> jax.Array:
    """int32 ``[..., m]`` -> uint8 ``[..., 4m]`` (inverse of ``pack_ue8m0``)."""
    return _checked_call(_unpack_ue8m0, "words", words, jnp.int32, 1)


#: The jitted byte (un)packers behind the public functions above (the private ones run inside jit).
_JITTED = {f: jax.jit(f) for f in (_pack_nibbles, _unpack_nibbles, _pack_ue8m0, _unpack_ue8m0)}


def _checked_call(fn: Callable[[jax.Array], jax.Array], name: str, x: ArrayIn, dtype: Any, group: int) -> jax.Array:
    """``fn`` jitted over ``x`` once it is a ``dtype`` array whose last dim is a multiple of ``group``
    (errors name the argument ``name``): the checks every public (un)packer shares."""
    x = _operand(name, x, dtype)
    if group > 1:
        check_multiple(name, x.shape[-1], group, "last dimension")
    return _JITTED[fn](x)


def _check_e8m0(name, s):
    s = _arr(s)
    check_dtype(name, s, (jnp.uint8, jnp.float8_e8m0fnu))
    return s


def _e8m0_bytes(s):
    if np.dtype(s.dtype) == np.dtype(jnp.float8_e8m0fnu):
        return lax.bitcast_convert_type(s, jnp.uint8)
    return s


def _ue8m0_to_float(b):
    b = _e8m0_bytes(b).astype(_U32)
    bits = jnp.where(b == 0, _U32(0x00400000), jnp.where(b == 255, _U32(0x7FC00000), b << 23))
    return _from_bits(bits)


def ue8m0_to_float(sf_bytes: ArrayIn) -> jax.Array:
    """``2^(b - 127)`` as f32, built from bits: b = 0 gives the subnormal 2^-127, b = 255 NaN.

    Accepts uint8 or ``float8_e8m0fnu`` (reinterpreted).
    """
    return _jit_ue8m0_to_float(_check_e8m0("sf_bytes", sf_bytes))


_jit_ue8m0_to_float = jax.jit(_ue8m0_to_float)


def _scale_by_ue8m0(values, sf_bytes_expanded):
    """Exact ``values * 2^(b-127)``; b = 255 gives NaN."""
    b = sf_bytes_expanded.astype(jnp.int32)
    out = _mul_pow2_exact(values, b - 127)
    return jnp.where(b == 255, jnp.float32(np.nan), out)


def _ue8m0_ceil_byte(raw):
    """``pre_dispatch_cast_to_ue8m0``: exponent bits + (mantissa != 0), clamped to [1, 254]."""
    b = _bits(raw)
    e = ((b >> 23) & _U32(0xFF)).astype(jnp.int32) + ((b & _U32(0x7FFFFF)) != 0).astype(jnp.int32)
    return jnp.clip(e, 1, 254)


# --------------------------------------------------------------------------------------------------
# E4M3
# --------------------------------------------------------------------------------------------------

_E4M3_MIN_NORMAL_BITS = _fbits(2.0**-6)  # 0x3C800000
_E4M3_OVERFLOW_BITS = _fbits(464.0)  # 448 + half ulp; above it SATFINITE gives 448


def _encode_e4m3_u8(v):
    """f32 -> e4m3fn byte (uint8) by integer arithmetic: RNE, SATFINITE, every NaN -> 0x7F."""
    b = _bits(v)
    sign = (b >> 24) & _U32(0x80)
    ab = b & _U32(_F32_ABS)
    # normal range [2^-6, 464]: round the f32 mantissa to 3 bits, rebias the exponent (127 -> 7)
    r = (ab + _U32(0x7FFFF) + ((ab >> 20) & _U32(1))) >> 20
    normal = r - _U32(120 << 3)
    # subnormal range (|v| < 2^-6): k = RNE(|v| * 2^9) in 0..8 (8 carries into the smallest normal)
    e = (ab >> 23).astype(jnp.int32)
    sig = (ab & _U32(0x7FFFFF)) | _U32(0x800000)
    shift = jnp.clip(141 - e, 1, 31)
    sub = jnp.where(e == 0, _U32(0), _rne_shift_right(sig, shift))
    mag = jnp.where(ab >= _U32(_E4M3_MIN_NORMAL_BITS), normal, sub)
    mag = jnp.where(ab > _U32(_E4M3_OVERFLOW_BITS), _U32(0x7E), mag)  # finite overflow and inf -> 448
    out = mag | sign
    return jnp.where(ab > _U32(_F32_INF), _U32(0x7F), out).astype(jnp.uint8)  # NaN: positive, as the hardware


def _encode_e4m3(v):
    return lax.bitcast_convert_type(_encode_e4m3_u8(v), jnp.float8_e4m3fn)


def encode_e4m3(v: ArrayIn) -> jax.Array:
    """f32 (or bf16) -> ``float8_e4m3fn``: round-to-nearest-even, saturating to +-448 (``__NV_SATFINITE``).

    Finite values and infinities above 464 in magnitude become +-448 (464 itself rounds to 448, even);
    every NaN gives 0x7F (the hardware convert drops a NaN's sign); -0.0 gives 0x80; e4m3 subnormals
    are rounded exactly. Computed on the f32 bits (no XLA f32 -> f8 convert); equal to the sm_90
    hardware's ``cvt.rn.satfinite.e4m3x2.f32`` on all 2^32 f32 inputs (measured on H100/H200).
    """
    return _jit_encode_e4m3(_check_float("v", v))


_jit_encode_e4m3 = jax.jit(lambda v: _encode_e4m3(_f32(v)))


def _decode_e4m3(q):
    return q.astype(jnp.float32)  # f8 -> f32 is exact (checked over all 256 codes in the tests)


# --------------------------------------------------------------------------------------------------
# pre-dispatch quantisers
# --------------------------------------------------------------------------------------------------


def _pre_dispatch_ue8m0(x, group, fmax_odd, fmax_pow2):
    """Shared body of the sm_100 pre-dispatch UE8M0 paths: returns (x*inv as f32, sf bytes uint8)."""
    amax = jnp.maximum(_group_amax(x, group), jnp.float32(_AMAX_FLOOR_SM100))
    raw = _div_exact(amax, fmax_odd, fmax_pow2)  # amax / FMAX, IEEE f32 division as the kernel
    e = _ue8m0_ceil_byte(raw)
    inv = _from_bits(((254 - e) << 23).astype(_U32))  # 2^(127-e); e = 254 (inf amax) gives 0.0 like the kernel
    scaled = x * _repeat_last(inv, group)
    return scaled, e.astype(jnp.uint8)


@jax.jit
def _quantize_mxfp4(x):
    scaled, sf = _pre_dispatch_ue8m0(_f32(x), 32, 3, 1)  # 6 = 3 * 2
    return _pack_nibbles(_encode_e2m1_u8(scaled)), _pack_ue8m0(sf)


def quantize_mxfp4(x: ArrayIn) -> tuple[jax.Array, jax.Array]:
    """sm_100 pre-dispatch MXFP4 (``mxf4xmxf4``): ``x`` bf16 (kernel contract) or f32 ``[..., H]``, H % 128 == 0.

    Per 32 columns: ``amax = max(max|x|, 1e-4f)`` (NaN ignored), ``raw = amax / 6.0f``, UE8M0 byte
    ``e = exponent_bits(raw) + (mantissa != 0)`` clamped to [1, 254], ``inv = 2^(127-e)`` from bits,
    ``code = encode_e2m1(x * inv)``. Returns ``(codes uint8[..., H//2], sf int32[..., H//128])``; f32
    input is used as is (bf16 widens exactly, so a bf16 array and its f32 copy give the same bytes).
    """
    x = _check_float("x", x)
    _check_hidden("x", x, 128)
    return _quantize_mxfp4(x)


def _check_sf_arg(name, sf, groups, lead_name, lead):
    """``sf`` as packed int32 words [..., groups/4] or uint8 bytes [..., groups]."""
    _check_rank_ge1(name, sf)
    _check_same_lead(name, sf, lead_name, lead)
    if np.dtype(sf.dtype) == np.dtype(jnp.int32):
        _check_last(name, sf, groups // 4, "packed int32 UE8M0 words, 4 groups each")
    else:
        _check_last(name, sf, groups, "one UE8M0 byte per group")


def _sf_bytes(sf):
    return _unpack_ue8m0(sf) if np.dtype(sf.dtype) == np.dtype(jnp.int32) else sf


@jax.jit
def _dequantize_mxfp4(codes, sf):
    vals = _decode_e2m1(_unpack_nibbles(codes))
    return _scale_by_ue8m0(vals, _repeat_last(_sf_bytes(sf), 32))


def dequantize_mxfp4(codes: ArrayIn, sf: ArrayIn) -> jax.Array:
    """Packed E2M1 ``codes`` uint8 ``[..., H//2]`` and UE8M0 scales -> f32 ``[..., H]`` (exact).

    ``sf``: int32 ``[..., H//128]`` (four bytes per word, as ``quantize_mxfp4`` returns) or uint8 bytes
    ``[..., H//32]`` (as ``requant_mxfp4`` returns).
    """
    codes, sf = _arr(codes), _arr(sf)
    check_dtype("codes", codes, jnp.uint8)
    _check_rank_ge1("codes", codes)
    check_dtype("sf", sf, (jnp.int32, jnp.uint8))
    words = np.dtype(sf.dtype) == np.dtype(jnp.int32)
    check_multiple("codes", codes.shape[-1], 64 if words else 16, "packed bytes; 32 values per scale group, 4 per word")
    _check_sf_arg("sf", sf, codes.shape[-1] // 16, "codes", codes)
    return _dequantize_mxfp4(codes, sf)


@partial(jax.jit, static_argnames="group")
def _quantize_fp8_ue8m0(x, group):
    scaled, sf = _pre_dispatch_ue8m0(_f32(x), group, 7, 6)  # 448 = 7 * 2^6
    return _encode_e4m3(scaled), _pack_ue8m0(sf)


def quantize_fp8_ue8m0(x: ArrayIn, group: int = 32) -> tuple[jax.Array, jax.Array]:
    """sm_100 pre-dispatch FP8 with UE8M0 scales (``fp8xfp4``): ``x`` bf16/f32 ``[..., H]``.

    As ``quantize_mxfp4`` with FMAX = 448 and ``e4m3`` RNE/SATFINITE; ``group`` in {32, 64, 128} and
    H % (4 * group) == 0. Returns ``(float8_e4m3fn[..., H], sf int32[..., H//group//4])``.
    """
    group = _check_group(group)
    x = _check_float("x", x)
    _check_hidden("x", x, 4 * group, f"hidden size; 4 scale groups of {group} per int32 word")
    return _quantize_fp8_ue8m0(x, group=group)


@partial(jax.jit, static_argnames="group")
def _dequantize_fp8_ue8m0(q, sf, group):
    return _scale_by_ue8m0(_decode_e4m3(q), _repeat_last(_sf_bytes(sf), group))


def dequantize_fp8_ue8m0(q: ArrayIn, sf: ArrayIn, group: int = 32) -> jax.Array:
    """``q`` float8_e4m3fn ``[..., H]`` times ``2^(b-127)`` per ``group`` columns -> f32 (exact).

    ``sf``: int32 ``[..., H//group//4]`` or uint8 bytes ``[..., H//group]``.
    """
    group = _check_group(group)
    q, sf = _arr(q), _arr(sf)
    check_dtype("q", q, jnp.float8_e4m3fn)
    _check_rank_ge1("q", q)
    check_dtype("sf", sf, (jnp.int32, jnp.uint8))
    words = np.dtype(sf.dtype) == np.dtype(jnp.int32)
    check_multiple("q", q.shape[-1], 4 * group if words else group, f"hidden size; groups of {group}, 4 per word")
    _check_sf_arg("sf", sf, q.shape[-1] // group, "q", q)
    return _dequantize_fp8_ue8m0(q, sf, group=group)


@jax.jit
def _quantize_fp8_per128(x):
    x = _f32(x)
    amax = jnp.maximum(_group_amax(x, 128), jnp.float32(_AMAX_FLOOR_SM90))
    scale = _div_exact(amax, 7, 6)  # amax / 448.0f
    inv = _recip_exact(scale)  # 1.0f / scale
    q = _encode_e4m3(x * _repeat_last(inv, 128))
    return q, scale


def quantize_fp8_per128(x: ArrayIn) -> tuple[jax.Array, jax.Array]:
    """sm_90 pre-dispatch FP8 (``fp8``): ``x`` bf16/f32 ``[..., H]``, H % 128 == 0.

    Per 128 columns: ``amax = max(max|x|, 1e-10f)``, ``scale = amax / 448.0f`` (IEEE f32, not a power of
    two), ``inv = 1.0f / scale``, ``q = e4m3_rne_satfinite(x * inv)``.
    Returns ``(float8_e4m3fn[..., H], sf f32[..., H//128])`` with ``sf = scale``.

    Non-finite input follows the kernel exactly (checked byte for byte on an H100/H200 by
    ``tests/gpu/test_pre_dispatch_gpu.py``): the amax uses ``fmaxf`` semantics, so a NaN is ignored
    by it and encodes as NaN; an inf makes its group's scale inf, its own code NaN and the other
    codes 0, so all 128 values of that group dequantize to NaN. The poison stays in that token's
    group (and so in that token's output row): no other token or group changes. It is not
    "contained" on purpose: a clamp here would make the reference disagree with the kernel and
    hide an upstream overflow behind plausible numbers.
    """
    x = _check_float("x", x)
    _check_hidden("x", x, 128)
    return _quantize_fp8_per128(x)


@jax.jit
def _dequantize_fp8_per128(q, sf):
    return _decode_e4m3(q) * _repeat_last(sf, 128)


def dequantize_fp8_per128(q: ArrayIn, sf: ArrayIn) -> jax.Array:
    """``q`` float8_e4m3fn ``[..., H]`` times f32 ``sf`` ``[..., H//128]`` (one f32 multiply each)."""
    q, sf = _arr(q), _arr(sf)
    check_dtype("q", q, jnp.float8_e4m3fn)
    _check_rank_ge1("q", q)
    check_multiple("q", q.shape[-1], 128, "hidden size")
    check_dtype("sf", sf, jnp.float32)
    _check_rank_ge1("sf", sf)
    _check_same_lead("sf", sf, "q", q)
    _check_last("sf", sf, q.shape[-1] // 128, "one f32 scale per 128 columns")
    return _dequantize_fp8_per128(q, sf)


# --------------------------------------------------------------------------------------------------
# the mega kernels' requantisation of the SwiGLU output (L1 epilogue)
# --------------------------------------------------------------------------------------------------


def _requant_ue8m0(a, c):
    """sm_100 L1-epilogue scale: returns (a * sf_inv exactly, sf bytes uint8[..., N//32])."""
    amax = _group_amax(a, 32)
    e = _requant_exponent(amax, c)  # in [-127, 128]
    sf_byte = ((e + 127) & 0xFF).astype(jnp.uint8)  # bits(fast_pow2(e)) >> 23, as a byte
    e_full = _repeat_last(e, 32)
    # a * fast_pow2(-e): exact power-of-two scaling, except e = 128 (amax = inf) where
    # fast_pow2(-128) has bits 0xFF800000 = -inf, reproduced by a real multiply.
    scaled = jnp.where(e_full == 128, a * jnp.float32(-np.inf), _mul_pow2_exact(a, -e_full))
    return scaled, sf_byte


@jax.jit
def _requant_mxfp4(a):
    scaled, sf = _requant_ue8m0(_f32(a), _INV6)
    return _pack_nibbles(_encode_e2m1_cvt_u8(scaled)), sf


def requant_mxfp4(a: ArrayIn) -> tuple[jax.Array, jax.Array]:
    """sm_100 ``mxf4xmxf4`` requantisation of the (weighted) SwiGLU output ``a`` f32 ``[..., N]``, N % 32 == 0.

    Per 32 columns: ``amax`` (fmaxf, NaN ignored; no floor), ``e = fast_log2_ceil(fl32(amax * fl32(1/6)))``,
    SF byte ``e + 127`` (amax == 0 gives byte 0), ``q = cvt.rn.satfinite.e2m1x2(a * fast_pow2(-e))``.
    Returns ``(codes uint8[..., N//2] packed low-nibble-even, sf_bytes uint8[..., N//32])``.
    Codes follow ``encode_e2m1_cvt`` (negative values that round to zero give 0x8). bf16 input is
    widened exactly.
    """
    a = _check_float("a", a)
    _check_hidden("a", a, 32, "columns; groups of 32")
    return _requant_mxfp4(a)


@jax.jit
def _requant_fp8_ue8m0(a):
    scaled, sf = _requant_ue8m0(_f32(a), _INV448)
    return _encode_e4m3(scaled), sf


def requant_fp8_ue8m0(a: ArrayIn) -> tuple[jax.Array, jax.Array]:
    """sm_100 ``fp8xfp4`` requantisation: as ``requant_mxfp4`` with ``fl32(1/448)`` and e4m3 SATFINITE.

    Returns ``(float8_e4m3fn[..., N], sf_bytes uint8[..., N//32])``.
    """
    a = _check_float("a", a)
    _check_hidden("a", a, 32, "columns; groups of 32")
    return _requant_fp8_ue8m0(a)


@jax.jit
def _requant_fp8_per128(a):
    a = _f32(a)
    amax = jnp.maximum(_group_amax(a, 128), jnp.float32(_AMAX_FLOOR_SM90))
    sf = amax * jnp.float32(_INV448)
    inv = _recip_exact(sf)  # 1.0f / sf
    return _encode_e4m3(a * _repeat_last(inv, 128)), sf


def requant_fp8_per128(a: ArrayIn) -> tuple[jax.Array, jax.Array]:
    """sm_90 ``fp8`` requantisation of the (weighted) SwiGLU output ``a`` f32 ``[..., N]``, N % 128 == 0.

    Per 128 columns: ``sf = fl32(max(amax, 1e-10f) * fl32(1/448))``, ``inv = 1.0f / sf`` (IEEE),
    ``q = e4m3_rn_satfinite(a * inv)``. Returns ``(float8_e4m3fn[..., N], sf f32[..., N//128])``.
    (The kernel takes amax before multiplying by the top-k weight w and then scales it by |w|; since
    fl32 rounding is monotone and sign-symmetric that equals the amax of the weighted values.)
    """
    a = _check_float("a", a)
    _check_hidden("a", a, 128, "columns; groups of 128")
    return _requant_fp8_per128(a)


def fake_quantize(x: ArrayIn, mode: str) -> jax.Array:
    """Pre-dispatch quantisation of ``x`` for kernel ``mode``, dequantised back to f32 ``[..., H]``.

    ``"mxf4xmxf4"``: ``quantize_mxfp4``; ``"fp8xfp4"``: ``quantize_fp8_ue8m0(group=32)``;
    ``"fp8"``: ``quantize_fp8_per128``.
    """
    mode = check_mode(mode)
    if mode == "mxf4xmxf4":
        return dequantize_mxfp4(*quantize_mxfp4(x))
    if mode == "fp8xfp4":
        return dequantize_fp8_ue8m0(*quantize_fp8_ue8m0(x, 32), 32)
    return dequantize_fp8_per128(*quantize_fp8_per128(x))


def fake_requant(a: ArrayIn, mode: str) -> jax.Array:
    """The mega kernel's requantisation of ``a`` for ``mode``, dequantised back to f32 ``[..., N]``.

    ``"mxf4xmxf4"``: ``requant_mxfp4``; ``"fp8xfp4"``: ``requant_fp8_ue8m0``; ``"fp8"``:
    ``requant_fp8_per128``. This is the L2 GEMM's activation operand in exact arithmetic.
    """
    mode = check_mode(mode)
    if mode == "mxf4xmxf4":
        return dequantize_mxfp4(*requant_mxfp4(a))
    if mode == "fp8xfp4":
        return dequantize_fp8_ue8m0(*requant_fp8_ue8m0(a), 32)
    return dequantize_fp8_per128(*requant_fp8_per128(a))


# --------------------------------------------------------------------------------------------------
# checkpoint weights
# --------------------------------------------------------------------------------------------------


@jax.jit
def _dequantize_mxfp4_weight(packed, scale):
    vals = _decode_e2m1(_unpack_nibbles(packed))
    return _scale_by_ue8m0(vals, _repeat_last(_e8m0_bytes(scale), 32))


def dequantize_mxfp4_weight(packed: ArrayIn, scale: ArrayIn) -> jax.Array:
    """Checkpoint MXFP4 weights -> f32 ``[..., N, K]`` (exact).

    ``packed`` uint8 ``[..., N, K//2]`` (low nibble = even K), ``scale`` UE8M0 ``[..., N, K//32]`` as
    uint8 bytes or ``float8_e8m0fnu`` (reinterpreted).
    """
    packed = _arr(packed)
    check_dtype("packed", packed, jnp.uint8)
    if len(packed.shape) < 2:
        raise ValueError(f"packed: expected shape [..., N, K//2], got {list(packed.shape)}")
    check_multiple("packed", packed.shape[-1], 16, "K//2; 32 values per scale group")
    scale = _check_e8m0("scale", scale)
    if len(scale.shape) != len(packed.shape):
        raise ValueError(f"scale: expected shape [..., N, K//32] of rank {len(packed.shape)}, got {list(scale.shape)}")
    _check_same_lead("scale", scale, "packed", packed)
    _check_last("scale", scale, packed.shape[-1] // 16, "one UE8M0 byte per 32 K values")
    return _dequantize_mxfp4_weight(packed, scale)


@jax.jit
def _dequantize_fp8_block128(q, scale):
    if np.dtype(scale.dtype) == np.dtype(jnp.float8_e8m0fnu):
        scale = _ue8m0_to_float(scale)
    n, k = q.shape[-2], q.shape[-1]
    s = jnp.repeat(jnp.repeat(scale, 128, axis=-2), 128, axis=-1)[..., :n, :k]
    return _decode_e4m3(q) * s


def dequantize_fp8_block128(q: ArrayIn, scale: ArrayIn) -> jax.Array:
    """FP8 weights with 128x128 block scales -> f32 ``[..., N, K]``.

    ``q`` float8_e4m3fn ``[..., N, K]``; ``scale`` f32 ``[..., ceil(N/128), ceil(K/128)]`` (or
    ``float8_e8m0fnu`` power-of-two scales). One f32 multiply per element (exact for power-of-two
    scales unless the product is subnormal, which XLA:CPU flushes to zero).
    """
    q, scale = _arr(q), _arr(scale)
    check_dtype("q", q, jnp.float8_e4m3fn)
    if len(q.shape) < 2:
        raise ValueError(f"q: expected shape [..., N, K], got {list(q.shape)}")
    check_dtype("scale", scale, (jnp.float32, jnp.float8_e8m0fnu))
    n, k = q.shape[-2], q.shape[-1]
    want = (*q.shape[:-2], -(-n // 128), -(-k // 128))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale: expected shape {list(want)} (one scale per 128x128 block of q), got {list(scale.shape)}"
        )
    return _dequantize_fp8_block128(q, scale)
