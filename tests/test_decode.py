"""The low-latency decode kernels on the CPU: kernel choice, validation, rendering and an nvcc compile.

The kernels themselves run in tests/gpu/test_decode_gpu.py (H100/H200).
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ffi_testing import jit_sandbox

from jax_megamoe import ops, reference
from jax_megamoe._src.kernels import _decode, _ffi
from jax_megamoe._src.numerics.layout import MoEWeights
from jax_megamoe.ops import MoEOptions


def _weights(seed: int, h=512, i=256, e=8) -> MoEWeights:
    rng = np.random.default_rng(seed)

    def q(shape):
        w = rng.standard_normal(shape).astype(np.float32) * 0.05
        n, r, c = shape
        b = w.reshape(n, r // 128, 128, c // 128, 128)
        s = np.abs(b).max(axis=(2, 4)) / 448
        return jnp.asarray((b / s[:, :, None, :, None]).reshape(shape), jnp.float8_e4m3fn), jnp.asarray(s, jnp.float32)

    w13, s13 = q((e, 2 * i, h))
    w2, s2 = q((e, h, i))
    return MoEWeights.from_fp8(w13, s13, w2, s2)


FLASH = dict(hidden=4096, intermediate=2048)
PRO = dict(hidden=7168, intermediate=3072)


@pytest.mark.parametrize(
    "kernel,mode,t,k,shape,want",
    [
        ("auto", "fp8", 1, 6, FLASH, "decode"),
        ("auto", "fp8", 8, 6, FLASH, "decode"),
        ("auto", "fp8", 9, 6, FLASH, "fused"),
        ("auto", "fp8", 1, 6, PRO, "decode"),
        ("auto", "fp8", 2, 6, PRO, "fused"),
        ("auto", "fp8", 1024, 6, FLASH, "fused"),
        ("auto", "mxf4xmxf4", 1, 6, FLASH, "fused"),
        ("fused", "fp8", 1, 6, FLASH, "fused"),
        ("decode", "fp8", 4096, 6, PRO, "decode"),
    ],
)
def test_choose_kernel(kernel, mode, t, k, shape, want):
    assert _decode.choose_kernel(kernel, mode, t, k, **shape) == want


@pytest.mark.parametrize(
    "hidden,intermediate,want",
    [
        (4096, 2048, 48),  # measured: V4-Flash
        (7168, 3072, 6),  # measured: V4-Pro
        (512, 256, 48),  # smaller than every measured shape: the smallest's
        (4096, 4096, 6),  # between the two: the larger's (never decode where a larger shape was not)
        (8192, 4096, 6),  # larger than every measured shape: the largest's
    ],
)
def test_decode_max_pairs_follows_the_measured_table(hidden, intermediate, want):
    assert _decode.decode_max_pairs(hidden, intermediate) == want
    # and the crossover never rises with the expert size
    sizes = sorted(_decode.DECODE_MAX_PAIRS_BY_SHAPE, key=lambda s: s[0] * s[1])
    pairs = [_decode.DECODE_MAX_PAIRS_BY_SHAPE[s] for s in sizes]
    assert pairs == sorted(pairs, reverse=True)


def test_choose_kernel_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"kernel: 'gemv' is not one of auto, fused, decode"):
        _decode.choose_kernel("gemv", "fp8", 1, 6, **FLASH)
    with pytest.raises(ValueError, match=r"kernel='decode'.*'fp8'.*'mxf4xmxf4'"):
        _decode.choose_kernel("decode", "mxf4xmxf4", 1, 6, **FLASH)


def test_mega_moe_validates_kernel_on_every_backend():
    wt = _weights(0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 512)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(0, 8, (2, 4)), jnp.int32)
    w = jnp.asarray(rng.random((2, 4)), jnp.float32)
    with pytest.raises(ValueError, match="kernel: 'x'"):
        ops.mega_moe(x, idx, w, wt, backend="reference", options=MoEOptions(kernel="x"))
    # Off the GPU every kernel choice is the reference, bit for bit.
    want = np.asarray(reference.mega_moe(x, idx, w, wt, mode="fp8"))
    for kernel in ("auto", "fused", "decode"):
        np.testing.assert_array_equal(np.asarray(ops.mega_moe(x, idx, w, wt, options=MoEOptions(kernel=kernel))), want)


def _lowered_for_cuda(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "t,kernel,targets",
    [
        (1, "auto", ("decode_l1_sm90", "decode_l2_sm90")),
        (_decode.decode_max_pairs(512, 256) // 4, "auto", ("decode_l1_sm90", "decode_l2_sm90")),
        (2, "decode", ("decode_l1_sm90", "decode_l2_sm90")),
        (_decode.decode_max_pairs(512, 256) // 4 + 1, "auto", ("mega_moe_sm90",)),
        (64, "auto", ("mega_moe_sm90",)),
    ],
)
def test_lowering_picks_the_kernels(t, kernel, targets):
    """Lowered for CUDA on this CPU-only machine: the custom calls of the chosen kernel appear, and
    the decode calls carry the shape attributes the handler validates."""
    if _ffi.load_library() is None:
        pytest.skip("FFI library not built")
    wt = _weights(2)
    x = jnp.zeros((t, 512), jnp.bfloat16)
    idx = jnp.zeros((t, 4), jnp.int32)
    w = jnp.zeros((t, 4), jnp.float32)
    txt = _lowered_for_cuda(
        lambda x, i, w, wt: ops.mega_moe(x, i, w, wt, backend="ffi", options=MoEOptions(kernel=kernel)), x, idx, w, wt
    )
    for name in targets:
        assert f"jax_megamoe_{name}" in txt
    other = {"decode_l1_sm90", "mega_moe_sm90"} - {n for n in targets}
    for name in other:
        assert f'jax_megamoe_{name}"' not in txt
    if "decode_l1_sm90" in targets:
        assert "intermediate = 256" in txt and "num_experts = 8" in txt and "top_k = 4" in txt


# SHA-256 of the two rendered decode sources, so that no edit of ffi/kernels/decode_moe_sm90.cuh goes
# unnoticed: each changes the kernels the JIT compiles (and caches), so it comes with a GPU run of
# tests/gpu/test_decode_gpu.py and a new pair of hashes here. Last change: the two-row dot product of
# both passes became one helper (row_pair_dot; the same f32 operations in the same order).
DECODE_RENDER_SHA256 = {
    1: "ef78576ce8a7f15c37726adebcea589781b960045857f3da40d3a9eaff63ede8",
    2: "732b3e425646e22b2fda4c059e2751f0b9708f1bcef10e0d1c0dd7a278f7c6e5",
}


def test_decode_render_is_the_embedded_cuh_file():
    """The rendered kernel.cu is a two-line prefix, a blank line and ffi/kernels/decode_moe_sm90.cuh
    byte for byte (the library embeds the file when it is built), with the hashes above."""
    lib = _ffi.load_library()
    if lib is None:
        pytest.skip(_ffi.library_reason() or "FFI library not built")
    cuh = (Path(__file__).resolve().parents[1] / "ffi" / "kernels" / "decode_moe_sm90.cuh").read_text()
    for p in (1, 2):
        src = _ffi.call_render(lib, lib.jmm_decode_render, p)
        head = f"// Generated by jax_megamoe (ffi/jit/decode_kernels.cc); do not edit.\n#define JMM_DECODE_PASS {p}\n\n"
        assert src == head + cuh
        assert hashlib.sha256(src.encode()).hexdigest() == DECODE_RENDER_SHA256[p]


@pytest.mark.nvcc
def test_decode_kernels_compile(tmp_path_factory):
    """Both passes render and compile with nvcc for sm_90a, each cubin with exactly one entry."""
    with jit_sandbox(tmp_path_factory, "decodejit") as (lib, _, _, _):
        for p, sym in ((1, "jmm_decode_l1_sm90"), (2, "jmm_decode_l2_sm90")):
            src = _ffi.call_render(lib, lib.jmm_decode_render, p)
            assert f"#define JMM_DECODE_PASS {p}" in src and sym in src
            cubin = _ffi.call_compile(lib.jmm_decode_compile, p)
            n = lib.jmm_cubin_kernel_symbols(cubin.encode(), None, 0)
            buf = ctypes.create_string_buffer(n + 1)
            lib.jmm_cubin_kernel_symbols(cubin.encode(), buf, n + 1)
            assert buf.value.decode().split() == [sym]
        with pytest.raises(ValueError, match="pass must be 1 or 2"):
            _ffi.call_render(lib, lib.jmm_decode_render, 3)
