"""The typed C test API (ffi/common/c_api_testing.h, tests/ffi_testing.py): structs described by the library
itself, size-checked on every call, errors named. CPU only."""

from __future__ import annotations

import ctypes
import math

import ffi_testing as ft
import pytest

from jax_megamoe._src.kernels import _ffi

STRUCTS = (
    "jmm_mega_shape",
    "jmm_mega_call",
    "jmm_sm90_mega_layout",
    "jmm_sm90_mega_config",
    "jmm_sm100_mega_layout",
    "jmm_sm100_mega_config",
    "jmm_tensor_map",
    "jmm_pre_dispatch_launch",
)


@pytest.fixture(scope="module")
def lib():
    return ft.library()


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_descriptions_lay_out_like_c(lib, name):
    cls = ft.c_struct(lib, name)  # raises if ctypes' size differs from the library's sizeof
    names = [f for f, _ in cls._fields_]
    assert len(names) == len(set(names)) >= 4
    assert all(isinstance(f, str) and f.isidentifier() for f in names)


def test_config_fields_name_the_cpp_members(lib):
    # both configurations start with the shared fields, and the arch-specific ones stay apart
    c90 = [f for f, _ in ft.c_struct(lib, "jmm_sm90_mega_config")._fields_]
    c100 = [f for f, _ in ft.c_struct(lib, "jmm_sm100_mega_config")._fields_]
    assert c90[:5] == c100[:5] == ["num_max_tokens_per_rank", "hidden", "intermediate", "num_experts", "top_k"]
    assert "num_experts_per_wave" in c90 and "num_experts_per_wave" not in c100
    assert "mma_kind" in c100 and "mma_kind" not in c90
    # dead knobs are gone from the sm_90 configuration
    assert not {"num_ring_tokens", "l2_lag_units"} & set(c90)


def test_unknown_struct_is_an_error(lib):
    with pytest.raises(ValueError, match="unknown struct 'jmm_nope'"):
        ft.c_struct(lib, "jmm_nope")


def test_size_mismatch_is_refused(lib):
    ft._declare(lib)
    shape = ft.mega_shape(lib, E=16, P=128, K=4, H=512, I=256)
    call = ft.mega_call(lib, T=16, num_sms=132)
    out = ft.c_struct(lib, "jmm_sm90_mega_config")()
    rc = lib.jmm_sm90_mega_config(ctypes.byref(shape), ctypes.byref(call), ctypes.byref(out), ctypes.sizeof(out) - 8)
    assert rc == -1
    assert "the caller's struct is" in _ffi.last_error(lib) and str(ctypes.sizeof(out)) in _ffi.last_error(lib)
    assert lib.jmm_sm90_mega_config(ctypes.byref(shape), ctypes.byref(call), ctypes.byref(out), ctypes.sizeof(out)) == 0
    assert (out.block_m, out.num_sms, out.activation_clamp) == (64, 132, math.inf)


@pytest.mark.parametrize(
    "arch,kind,expect",
    [
        (90, 1, "attribute mma_kind=1 must be 0 on sm_90"),
        (100, 0, "attribute mma_kind=0 must be 1 (MXFP8FP4, fp8xfp4) or 2 (MXFP4, mxf4xmxf4)"),
        (100, 7, "attribute mma_kind=7 must be 1"),
    ],
)
def test_mma_kind_is_checked_in_one_place(lib, arch, kind, expect):
    P = 128 if arch == 90 else 1920
    shape = ft.mega_shape(lib, E=16, P=P, K=4, H=512, I=256, kind=kind)
    with pytest.raises(ValueError) as e:
        ft.mega_config(lib, arch, shape, ft.mega_call(lib, T=16, num_sms=132))
    assert expect in str(e.value)
    assert ft.pre_dispatch_launch_plan(lib, arch, kind, 1, P, 512, 4) is None


def test_call_fields_reach_the_configuration(lib):
    shape = ft.mega_shape(lib, E=256, P=1920, K=6, H=4096, I=2048, kind=2, ranks=2)
    c = ft.mega_config(lib, 100, shape, ft.mega_call(lib, T=700, num_sms=132, clamp=10.0, fast_math=False))
    assert (c["num_sms"], c["num_ranks"], c["activation_clamp"], c["fast_math"], c["mma_kind"]) == (132, 2, 10.0, 0, 2)
    assert c["expected_tokens_per_expert"] == pytest.approx(700 * 2 * 6 / 256)


def test_wide_tile_is_a_field_of_the_call_not_the_environment(lib, monkeypatch):
    """jmm_mega_call.sm90_wide_tile (the sm_90 target's attribute) picks the 128-row tile at 64
    expected tokens per expert; the library reads no environment variable for it; sm_100 refuses it."""
    shape = ft.mega_shape(lib, E=16, P=256, K=4, H=512, I=256)
    monkeypatch.setenv("JAX_MEGAMOE_SM90_WIDE_TILE", "1")
    narrow = ft.mega_config(lib, 90, shape, ft.mega_call(lib, T=256, num_sms=132))
    monkeypatch.delenv("JAX_MEGAMOE_SM90_WIDE_TILE")
    wide = ft.mega_config(lib, 90, shape, ft.mega_call(lib, T=256, num_sms=132, sm90_wide_tile=True))
    assert (narrow["block_m"], narrow["cluster_size"]) == (64, 1)
    assert (wide["block_m"], wide["cluster_size"]) == (128, 2)
    # below 64 expected tokens per expert the switch changes nothing
    few = [ft.mega_config(lib, 90, shape, ft.mega_call(lib, T=200, num_sms=132, sm90_wide_tile=w)) for w in (0, 1)]
    assert few[0] == few[1] and few[0]["block_m"] == 64
    s100 = ft.mega_shape(lib, E=16, P=1920, K=4, H=512, I=256, kind=1)
    with pytest.raises(ValueError, match="sm90_wide_tile=1 must be 0 on sm_100"):
        ft.mega_config(lib, 100, s100, ft.mega_call(lib, T=16, num_sms=132, sm90_wide_tile=True))
