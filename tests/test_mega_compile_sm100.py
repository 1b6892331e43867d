"""The rendered sm_100f Mega MoE instantiations compile with nvcc (no GPU; no B200 has run them).

ONE configuration per mode -- V4-Flash (H=4096, I=2048, E=256, K=6), capacity 1920, T=128 tokens,
148 SMs (B200), i.e. BLOCK_M 16 -- is rendered, compiled once into a session-temporary JIT cache
and inspected: the kernel's static_asserts (template consistency, shared-memory and register
budgets, the combine staging) and the renderer's own checks (function type, SymBuffer and
TmaDescriptor sizes, sizeof(MegaMoESignals), the 1920 token alignment) all hold, the cubin has
exactly one GLOBAL CUDA entry, the cache then serves it from memory. On this project's 2-core CI
machine one compile takes about 5 s, so both modes are compiled here;
tools/compile_sm100_matrix.py compiles the full matrix (modes x V4-Flash/V4-Pro x token caps).
Skipped without nvcc >= 12.9, the sgl-deep-gemm headers or the FFI library.
"""

from __future__ import annotations

import ctypes
import json
import math
import time
from pathlib import Path

import ffi_testing as ft
import pytest
from ffi_testing import has_cuda_driver, jit_sandbox

from jax_megamoe._src.kernels import _ffi

pytestmark = pytest.mark.nvcc

MXFP8FP4, MXFP4 = 1, 2
FLASH = (1, 256, 1920, 6, 4096, 2048)  # ranks, E, P, K, H, I
T, NUM_SMS = 128, 148
SMALL = (16, 1920, 4, 512, 256)  # E, P, K, H, I (the CPU-instantiate tests allocate these weights)


def _structs(lib, ranks, E, P, K, H, I, kind, T, num_sms, clamp, fast_math):
    """(shape, call) of the typed C API (tests/ffi_testing.py) from the tests' positional tuples."""
    return (
        ft.mega_shape(lib, E=E, P=P, K=K, H=H, I=I, ranks=ranks, kind=kind),
        ft.mega_call(lib, T=T, num_sms=num_sms, clamp=clamp, fast_math=bool(fast_math)),
    )


def render(lib, *args) -> str:
    return ft.mega_render(lib, 100, *_structs(lib, *args))


def compile_(lib, *args) -> str:
    return ft.mega_compile(lib, 100, *_structs(lib, *args))


def flash_args(kind, clamp=math.inf, t=T):
    return (*FLASH, kind, t, NUM_SMS, clamp, 1)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(lib, cache root, {kind: (cubin path, seconds)}); restores the JIT configuration afterwards."""
    with jit_sandbox(tmp_path_factory, "megajit100") as (lib, _, _, root):
        results = {}
        for kind in (MXFP4, MXFP8FP4):
            before = _ffi.jit_stats()
            t0 = time.perf_counter()
            cubin = compile_(lib, *flash_args(kind))
            seconds = time.perf_counter() - t0
            assert _ffi.jit_stats().compiles - before.compiles == 1
            print(f"sm100 mega MoE compile ({'mxf4xmxf4' if kind == MXFP4 else 'fp8xfp4'}): {seconds:.1f} s ({cubin})")
            results[kind] = (cubin, seconds)
        yield lib, root, results


EXPECTED_ARGS = {
    # T=128: 3 tokens per expert -> BLOCK_M 16, STORE 8/8, SF_BLOCK_M 128; ring 3840 / SF ring 61440 at 148
    # SMs; 11 stages; pull = the token (2048 B packed FP4, 4096 B e4m3); 128 + 128 + 256 threads; 148 SMs,
    # 1 rank; no clamp, plain SwiGLU, fast math; FP4 weights in unpacked shared-memory containers; the
    # defaulted SiTU / post-norm / TRT-LLM arguments spelled out.
    MXFP4: (
        "deep_gemm::sm100_fp8_fp4_mega_moe_impl<1920u, 4096u, 2048u, 256u, 0u, 6u, 16u, 128u, 256u, 8u, 8u, "
        "128u, 128u, deep_gemm::MmaKind::MXFP4, 3840u, 61440u, 11u, 2048u, 128u, 128u, 256u, 148u, 1u, "
        "cute::numeric_limits<float>::infinity(), 0x0p+0f, false, true, false, false, false, false, false, "
        "cutlass::detail::float_e2m1_unpacksmem_t, 0x1p+2f, 0x1.9p+4f, false, false, false, 0x0p+0f, false>"
    ),
    MXFP8FP4: (
        "deep_gemm::sm100_fp8_fp4_mega_moe_impl<1920u, 4096u, 2048u, 256u, 0u, 6u, 16u, 128u, 128u, 8u, 8u, "
        "128u, 128u, deep_gemm::MmaKind::MXFP8FP4, 3840u, 61440u, 11u, 4096u, 128u, 128u, 256u, 148u, 1u, "
        "cute::numeric_limits<float>::infinity(), 0x0p+0f, false, true, false, false, false, false, false, "
        "cutlass::detail::float_e2m1_unpacksmem_t, 0x1p+2f, 0x1.9p+4f, false, false, false, 0x0p+0f, false>"
    ),
}


@pytest.mark.parametrize("kind", [MXFP4, MXFP8FP4])
def test_rendered_source(compiled, kind):
    lib = compiled[0]
    src = render(lib, *flash_args(kind))
    assert "#include <deep_gemm/impls/sm100_fp8_fp4_mega_moe.cuh>" in src
    assert "#define CUTLASS_GLOBAL __global__\n" in src  # external linkage for the entry symbol
    want = EXPECTED_ARGS[kind]
    assert want in src
    assert "static_assert(std::is_same_v<decltype(&" + want + "), launch_signature_t>" in src
    assert "template __global__ void " + want + "(" in src
    assert src.count("template __global__") == 1
    assert src.count("const __grid_constant__ cute::TmaDescriptor") == 18
    assert "sizeof(deep_gemm::layout::MegaMoESignals) == 21140864" in src
    assert "compile-checked only" in src
    # a finite clamp is an exact hex float literal
    assert "0x1.4p+3f" in render(lib, *flash_args(kind, clamp=10.0))


@pytest.mark.parametrize("kind", [MXFP4, MXFP8FP4])
def test_cubin(compiled, kind):
    lib, root, results = compiled
    cubin, seconds = results[kind]
    path = Path(cubin)
    assert path.is_file() and path.read_bytes()[:4] == b"\x7fELF"
    assert path.parent.parent == root / "cache" and path.parent.name.startswith("sm100_mega_moe.")
    syms = _ffi.cubin_kernel_symbols(cubin)
    assert len(syms) == 1 and "sm100_fp8_fp4_mega_moe_impl" in syms[0], syms
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["kernel_symbol"] == syms[0]
    assert meta["gpu_arch"] == "sm_100f" and "--gpu-architecture=sm_100f" in meta["command"]
    assert (path.parent / "kernel.cu").read_text() == render(lib, *flash_args(kind))
    assert seconds < 600


def test_cached_and_errors(compiled):
    lib, _, results = compiled
    before = _ffi.jit_stats()
    assert compile_(lib, *flash_args(MXFP4)) == results[MXFP4][0]
    after = _ffi.jit_stats()
    assert after.compiles == before.compiles and after.memory_hits == before.memory_hits + 1
    assert results[MXFP4][0] != results[MXFP8FP4][0]
    with pytest.raises(RuntimeError, match="hidden"):
        compile_(lib, 1, 16, 1920, 4, 384, 256, MXFP4, 16, NUM_SMS, math.inf, 1)
    with pytest.raises(ValueError, match="num_tokens"):
        render(lib, *flash_args(MXFP4, t=1921))
    with pytest.raises(ValueError, match="mma_kind"):
        render(lib, *FLASH, 3, T, NUM_SMS, math.inf, 1)


@pytest.mark.parametrize("kind", [MXFP4])
def test_multi_rank_instantiation_compiles(compiled, kind):
    """Fused expert parallelism on B200s (V4-Flash over 8 ranks, 32 experts each): the SymBuffer<8>
    the handler passes by value matches the kernel's signature, and it compiles. Never run."""
    lib = compiled[0]
    args = (8, *FLASH[1:], kind, T, NUM_SMS, 10.0, 1)
    src = render(lib, *args)
    assert "deep_gemm::layout::SymBuffer<8u>" in src and "SymBuffer<1u>" not in src
    assert ", 148u, 8u, 0x1.4p+3f," in src  # kNumSMs, kNumRanks, kActivationClamp
    cubin = compile_(lib, *args)
    syms = _ffi.cubin_kernel_symbols(cubin)
    assert len(syms) == 1 and "ELj148ELj8E" in syms[0], syms


def test_matrix_tool_smoke(compiled, capsys, tmp_path):
    """tools/compile_sm100_matrix.py on the configuration compiled above (served by the JIT cache)."""
    import importlib.util

    root = compiled[1]
    path = Path(__file__).resolve().parents[1] / "tools" / "compile_sm100_matrix.py"
    spec = importlib.util.spec_from_file_location("compile_sm100_matrix", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out_json = tmp_path / "rows.json"
    rc = tool.main(
        [
            "--caps",
            "1920",
            "--tokens",
            f"1,64,{T}",
            "--modes",
            "mxf4xmxf4",
            "--shapes",
            "V4-Flash",
            "--cache",
            str(root),
            "--no-spills",
            "--buckets",
            "--json",
            str(out_json),
        ]
    )
    assert rc == 0
    rows = json.loads(out_json.read_text())
    # T = 1, 64, 128 on one rank: 0.02 / 1.5 / 3 tokens per expert, all in the BLOCK_M 16 band, so one
    # bucket: the cubin the fixture compiled serves all three and nvcc never runs.
    assert [r["tokens"] for r in rows] == [1, 64, T]
    assert [r["per_expert"] for r in rows] == [round(6 / 256, 3), 1.5, 3.0]
    assert {r["block_m"] for r in rows} == {16} and {r["ring"] for r in rows} == {3840}
    assert len({r["cubin"] for r in rows}) == 1 and [r["new"] for r in rows] == [True, False, False]
    assert [r["nvcc"] for r in rows] == [0, 0, 0]
    assert rows[0]["regs"] == 128 and rows[0]["cubin_bytes"] > 0  # __launch_bounds__(512, 1): 128 registers
    out = capsys.readouterr().out
    assert "| mxf4xmxf4 | V4-Flash | 1920 | 1 | 128 | 3.0 | 16 |" in out
    assert f"| mxf4xmxf4 | V4-Flash | 1920 | 1 | 1-{T} | 16 | 8/8 |" in out  # the bucket table: one span
    assert "3/3 configurations compiled (1 distinct cubins)" in out


# --------------------------------------------------------------------------------------
# The FFI target's instantiate stage on XLA:CPU (no GPU): attribute names and types as the
# contract sends them, validation, the sm_100 pre-dispatch JIT inside instantiate, then the stop at
# the missing CUDA driver. (Same technique as tests/test_mega_compile_sm90.py.)
# --------------------------------------------------------------------------------------

_CPU_TARGET: list[str] = []


def _cpu_target(lib) -> str:
    import jax

    if any(d.platform != "cpu" for d in jax.devices()):
        pytest.skip("a GPU backend is present: the CPU registration of the state type would clash with it")
    if not _CPU_TARGET:
        jax.devices("cpu")
        lib.jmm_mega_moe_sm100_state_type_id.restype = ctypes.c_void_p
        lib.jmm_mega_moe_sm100_state_type_info.restype = ctypes.c_void_p
        jax.ffi.register_ffi_type(
            "jax_megamoe_test.MegaMoeSm100State",
            {
                "type_id": jax.ffi.pycapsule(lib.jmm_mega_moe_sm100_state_type_id()),
                "type_info": jax.ffi.pycapsule(lib.jmm_mega_moe_sm100_state_type_info()),
            },
            platform="cpu",
        )
        name = "jmm_test_cpu_" + _ffi.TARGET_MEGA_MOE_SM100
        jax.ffi.register_ffi_target(
            name, _ffi._capsules(lib, _ffi.MEGA_TARGETS[_ffi.TARGET_MEGA_MOE_SM100]), platform="cpu", api_version=1
        )
        _CPU_TARGET.append(name)
    return _CPU_TARGET[0]


def _run_on_cpu(lib, **overrides) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    E, P, K, H, I = SMALL
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
        mma_kind=np.int64(MXFP4),
        num_ranks=np.int64(1),
        rank_devices=np.zeros((0,), np.int64),
    )
    attrs.update(overrides)
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
        jnp.zeros((E, 2 * I, H // 2), jnp.uint8),
        jnp.zeros((E, H // 128, 2 * I), jnp.int32),
        jnp.zeros((E, H, I // 2), jnp.uint8),
        jnp.zeros((E, I // 128, H), jnp.int32),
    )
    with pytest.raises(Exception) as e:
        f(*args)
    return str(e.value)


@pytest.mark.parametrize("kind", [MXFP4, MXFP8FP4])
def test_instantiate_on_cpu_reaches_the_driver(compiled, kind):
    if has_cuda_driver():
        pytest.skip("a CUDA driver is present")
    import numpy as np

    msg = _run_on_cpu(compiled[0], mma_kind=np.int64(kind), routed_scaling_factor=np.float32(2.5))
    assert "jax_megamoe_mega_moe_sm100" in msg and "driver" in msg, msg


@pytest.mark.parametrize(
    "override,expect",
    [
        (dict(hidden=384), "hidden=384"),
        (dict(intermediate=128), "intermediate=128"),  # mxf4xmxf4: I % 256
        (dict(capacity=1000), "capacity=1000"),
        (dict(top_k=40), "top_k=40"),
        (dict(activation_clamp=-1.0), "activation_clamp"),
        (dict(reserved_sms=-2), "reserved_sms=-2"),
        (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor"),
        (dict(mma_kind=0), "mma_kind=0"),
        (dict(mma_kind=3), "mma_kind=3"),
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
        (2, [0], "rank_devices has 1 entries"),
        (2, [3, 3], "lists CUDA device 3 twice"),
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
