"""The rendered sm_90a Mega MoE instantiation compiles with nvcc (no GPU).

One configuration (the small shape: H=512, I=256, E=16, K=4, capacity 128, T=16, 132 SMs) is
rendered, compiled once into a session-temporary JIT cache and inspected: the kernel's
static_asserts (template consistency, shared-memory budget, the signature / SymBuffer /
TmaDescriptor checks the renderer adds) all hold, the cubin has exactly one GLOBAL CUDA entry,
the cache then serves it from memory. Skipped without nvcc >= 12.9, the sgl-deep-gemm headers or
the FFI library.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import ffi_testing as ft
import pytest
from ffi_testing import has_cuda_driver, jit_sandbox

from jax_megamoe._src.kernels import _ffi

pytestmark = pytest.mark.nvcc

SMALL = (16, 128, 4, 512, 256, 1)  # E, P, K, H, I, ranks
T, NUM_SMS = 16, 132


def _structs(lib, E, P, K, H, I, ranks, T, num_sms, clamp, fast_math):
    """(shape, call) of the typed C API (tests/ffi_testing.py) from the tests' positional tuples."""
    return (
        ft.mega_shape(lib, E=E, P=P, K=K, H=H, I=I, ranks=ranks),
        ft.mega_call(lib, T=T, num_sms=num_sms, clamp=clamp, fast_math=bool(fast_math)),
    )


def render(lib, *args) -> str:
    return ft.mega_render(lib, 90, *_structs(lib, *args))


def compile_(lib, *args) -> str:
    return ft.mega_compile(lib, 90, *_structs(lib, *args))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(lib, cache root, args, cubin path, compile seconds); restores the JIT configuration afterwards."""
    with jit_sandbox(tmp_path_factory, "megajit") as (lib, _, _, root):
        args = (*SMALL, T, NUM_SMS, math.inf, 1)
        before = _ffi.jit_stats()
        t0 = time.perf_counter()
        cubin = compile_(lib, *args)
        seconds = time.perf_counter() - t0
        assert _ffi.jit_stats().compiles - before.compiles == 1
        print(f"sm90 mega MoE compile: {seconds:.1f} s ({cubin})")
        yield lib, root, args, cubin, seconds


def test_rendered_source(compiled):
    lib, _, args, _, _ = compiled
    src = render(lib, *args)
    assert "#include <deep_gemm/impls/sm90_fp8_mega_moe.cuh>" in src
    assert "#define CUTLASS_GLOBAL __global__\n" in src  # external linkage for the entry symbol
    # all 36 leading template arguments, in order (H=512 I=256 E=16 K=4, wave 16, 64x256x128 tile,
    # pool 2560, SF pool 5120, ring 2560, 4 stages, 64/64/256 threads, 132 SMs, 1 rank, no clamp,
    # fast math, default registers, L2 arrival counter, no cluster, eager pull publish)
    want = (
        "deep_gemm::sm90_fp8_mega_moe_impl<128u, 512u, 256u, 16u, 4u, 16u, 64u, 256u, 128u, 2560u, 5120u, "
        "2560u, 4u, 64u, 64u, 256u, 132u, 1u, cute::numeric_limits<float>::infinity(), true, 0u, false, "
        "true, false, false, 1u, false, 0u, 0u, false, false, 0u, false, 0u, 1u, true>"
    )
    assert want in src
    assert "static_assert(std::is_same_v<decltype(&" + want + "), launch_signature_t>" in src
    assert "template __global__ void " + want + "(" in src
    assert src.count("template __global__") == 1
    # a finite clamp is an exact hex float literal
    assert "0x1.4p+3f" in render(lib, *SMALL, T, NUM_SMS, 10.0, 1)


def test_cubin(compiled):
    lib, root, args, cubin, seconds = compiled
    path = Path(cubin)
    assert path.is_file() and path.read_bytes()[:4] == b"\x7fELF"
    assert path.parent.parent == root / "cache" and path.parent.name.startswith("sm90_mega_moe.")
    syms = _ffi.cubin_kernel_symbols(cubin)
    assert len(syms) == 1 and "sm90_fp8_mega_moe_impl" in syms[0], syms
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["kernel_symbol"] == syms[0]
    assert meta["gpu_arch"] == "sm_90a" and "--gpu-architecture=sm_90a" in meta["command"]
    assert (path.parent / "kernel.cu").read_text() == render(lib, *args)
    assert seconds < 600


def test_cached_and_errors(compiled):
    lib, _, args, cubin, _ = compiled
    before = _ffi.jit_stats()
    assert compile_(lib, *args) == cubin
    after = _ffi.jit_stats()
    assert after.compiles == before.compiles and after.memory_hits == before.memory_hits + 1
    with pytest.raises(RuntimeError, match="hidden"):
        compile_(lib, 16, 128, 4, 384, 256, 1, T, NUM_SMS, math.inf, 1)
    with pytest.raises(ValueError, match="num_tokens"):
        render(lib, *SMALL, 129, NUM_SMS, math.inf, 1)


def test_multi_rank_instantiation_compiles(compiled):
    """The fused expert-parallel kernel (kNumRanks = 4): the launch signature the handler marshals
    (SymBuffer<4> by value) matches DeepGEMM's, and the instantiation compiles."""
    lib = compiled[0]
    args = (16, 128, 4, 512, 256, 4, T, NUM_SMS, 10.0, 1)
    src = render(lib, *args)
    assert "deep_gemm::layout::SymBuffer<4u>, cute::TmaDescriptor" in src
    assert "const __grid_constant__ deep_gemm::layout::SymBuffer<4u>" in src
    assert "sizeof(deep_gemm::layout::SymBuffer<4u>) == 592" in src
    assert "SymBuffer<1u>" not in src
    cubin = compile_(lib, *args)
    syms = _ffi.cubin_kernel_symbols(cubin)
    assert len(syms) == 1 and "ELj132ELj4E" in syms[0], syms  # ... kNumSMs = 132, kNumRanks = 4 ...
    assert cubin != compiled[3]


# --------------------------------------------------------------------------------------
# The FFI target's instantiate stage on XLA:CPU (no GPU): attribute names and types as the
# contract sends them, validation, the pre-dispatch JIT inside instantiate, then the stop at the
# missing CUDA driver. (Same technique as tests/test_jit_compile.py for the pre-dispatch targets.)
# --------------------------------------------------------------------------------------

_CPU_TARGET: list[str] = []


def _cpu_target(lib) -> str:
    import jax

    if any(d.platform != "cpu" for d in jax.devices()):
        pytest.skip("a GPU backend is present: the CPU registration of the state type would clash with it")
    if not _CPU_TARGET:
        jax.devices("cpu")
        tid = lib.jmm_mega_moe_sm90_state_type_id()
        jax.ffi.register_ffi_type(
            "jax_megamoe_test.MegaMoeSm90State",
            {
                "type_id": jax.ffi.pycapsule(tid),
                "type_info": jax.ffi.pycapsule(lib.jmm_mega_moe_sm90_state_type_info()),
            },
            platform="cpu",
        )
        name = "jmm_test_cpu_" + _ffi.TARGET_MEGA_MOE_SM90
        jax.ffi.register_ffi_target(
            name, _ffi._capsules(lib, _ffi.MEGA_TARGETS[_ffi.TARGET_MEGA_MOE_SM90]), platform="cpu", api_version=1
        )
        _CPU_TARGET.append(name)
    return _CPU_TARGET[0]


def _run_on_cpu(lib, **overrides) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    E, P, K, H, I, _ = SMALL
    t = 3
    attrs = dict(
        hidden=np.int64(H),
        intermediate=np.int64(I),
        num_experts=np.int64(E),
        top_k=np.int64(K),
        capacity=np.int64(P),
        activation_clamp=np.float32(np.inf),
        fast_math=True,
        reserved_sms=np.int64(0),
        routed_scaling_factor=np.float32(1.0),
        num_ranks=np.int64(1),
        rank_devices=np.zeros((0,), np.int64),
        sm90_wide_tile=False,
    )
    attrs.update(overrides)
    attrs = {k: v for k, v in attrs.items() if v is not None}  # None: leave the attribute out
    target = _cpu_target(lib)
    f = jax.jit(
        lambda *a: jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((t, H), jnp.bfloat16), has_side_effect=True)(
            *a, **attrs
        )
    )
    args = (
        jnp.zeros((t, H), jnp.bfloat16),
        jnp.zeros((t, K), jnp.int32),
        jnp.ones((t, K), jnp.float32),
        jnp.zeros((E, 2 * I, H), jnp.float8_e4m3fn),
        jnp.ones((E, 2 * I // 128, H // 128), jnp.float32),
        jnp.zeros((E, H, I), jnp.float8_e4m3fn),
        jnp.ones((E, H // 128, I // 128), jnp.float32),
    )
    with pytest.raises(Exception) as e:
        f(*args)
    return str(e.value)


def test_instantiate_on_cpu_reaches_the_driver(compiled):
    if has_cuda_driver():
        pytest.skip("a CUDA driver is present")
    msg = _run_on_cpu(compiled[0])
    assert "jax_megamoe_mega_moe_sm90" in msg and "driver" in msg, msg


@pytest.mark.parametrize(
    "override,expect",
    [
        (dict(hidden=384), "hidden=384"),
        (dict(intermediate=128), "intermediate=128"),
        (dict(capacity=100), "capacity=100"),
        (dict(activation_clamp=-1.0), "activation_clamp"),
        (dict(reserved_sms=-2), "reserved_sms=-2"),
        (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor"),
    ],
)
def test_instantiate_validates_attributes(compiled, override, expect):
    import numpy as np

    typed = {k: (np.float32(v) if isinstance(v, float) else np.int64(v)) for k, v in override.items()}
    msg = _run_on_cpu(compiled[0], **typed)
    assert "INVALID_ARGUMENT" in msg and expect in msg, msg


@pytest.mark.parametrize(
    "ranks,table,expect",
    [
        (0, [], "num_ranks=0"),
        (33, list(range(33)), "num_ranks=33"),
        (2, [], "rank_devices has 0 entries"),
        (2, [0, 1, 2], "rank_devices has 3 entries"),
        (2, [0, 0], "lists CUDA device 0 twice"),
        (2, [0, -1], "rank_devices[1]=-1"),
        (3, [0, 1, 2], "num_ranks=3"),  # E=16 is not divisible by 3 ranks
    ],
)
def test_instantiate_validates_rank_table(compiled, ranks, table, expect):
    import numpy as np

    msg = _run_on_cpu(compiled[0], num_ranks=np.int64(ranks), rank_devices=np.asarray(table, np.int64))
    assert "INVALID_ARGUMENT" in msg and expect in msg, msg


def test_instantiate_refuses_unknown_attributes(compiled):
    """The attributes decode into one named struct: a stale or misspelt attribute (num_sms was
    removed: the kernel always runs on the device's SMs minus reserved_sms) is an error, not ignored."""
    import numpy as np

    msg = _run_on_cpu(compiled[0], num_sms=np.int64(0))
    assert "Wrong number of attributes" in msg, msg


@pytest.mark.parametrize(
    "override,expect",
    [
        (dict(sm90_wide_tile=None), "Wrong number of attributes"),  # required: the library reads no env var
        (dict(sm90_wide_tile=1), "expected PRED but got S64"),  # a bool, not an integer
    ],
)
def test_instantiate_needs_the_wide_tile_attribute(compiled, override, expect):
    import numpy as np

    typed = {k: (None if v is None else np.int64(v)) for k, v in override.items()}
    msg = _run_on_cpu(compiled[0], **typed)
    assert expect in msg, msg
    # with the bool attribute the same call gets past the attribute decoding (to the driver, or the device)
    assert "Wrong" not in _run_on_cpu(compiled[0], sm90_wide_tile=True)
