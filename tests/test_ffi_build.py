"""libjax_megamoe_ffi.so: build, ctypes loading without a GPU, exports, registration, describe().

The library is looked up like users do (jax_megamoe._src.kernels._ffi.load_library(): $JAX_MEGAMOE_FFI_LIB,
then next to the package). When it is not built these tests skip, unless
JAX_MEGAMOE_REQUIRE_FFI=1 (CI with the CUDA headers sets it) turns that into a failure.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from ffi_testing import has_cuda_driver

from jax_megamoe._src.kernels import _calls, _ffi, _toolchain, ops
from jax_megamoe._src.numerics import config
from jax_megamoe._src.numerics import policy as policy_mod

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lib():
    lib = _ffi.load_library()
    if lib is None:
        if os.environ.get("JAX_MEGAMOE_REQUIRE_FFI", "") not in ("", "0"):
            pytest.fail(f"FFI library required but not loadable: {_ffi.library_reason()}")
        pytest.skip(_ffi.library_reason() or "FFI library not built")
    return lib


def _readelf():
    return shutil.which("readelf")


# --- the shared library ------------------------------------------------------------------


def test_library_found_next_to_package_or_env(lib):
    path = Path(_ffi.library_path())
    assert path.name == _ffi.LIB_NAME and path.is_file()
    cands = _ffi.library_candidates()
    env = os.environ.get(_ffi.ENV_LIB)
    if env:
        assert cands[0] == Path(env)
    import jax_megamoe

    for folder in jax_megamoe.__path__:
        assert Path(folder) / _ffi.LIB_NAME in cands


def test_loads_without_gpu_or_driver(lib):
    buf = ctypes.create_string_buffer(1024)
    rc = lib.jmm_driver_status(buf, len(buf))
    if has_cuda_driver():
        pytest.skip(f"a CUDA driver is present here ({buf.value.decode()})")
    assert rc == 1
    assert "libcuda.so.1" in buf.value.decode()


def test_exported_symbols(lib):
    for name in _ffi._C_API:
        assert hasattr(lib, name), name
    for prefix in _ffi.TARGETS.values():
        for stage in _ffi.STAGES:
            assert hasattr(lib, f"{prefix}_{stage}"), f"{prefix}_{stage}"
    assert lib.jmm_pre_dispatch_state_type_id() and lib.jmm_pre_dispatch_state_type_info()
    info = lib.jmm_build_info().decode()
    assert "XLA FFI API 0." in info and "cuda.h" in info


def _declared(header: str) -> dict[str, int]:
    """name -> parameter count of every function a C API header declares (``JMM_*API <ret> name(...)``)."""
    text = re.sub(r"/\*.*?\*/", "", (REPO / "ffi" / "common" / header).read_text(), flags=re.DOTALL)
    out = {}
    for ret_name, params in re.findall(r"JMM_(?:TESTING_)?API\s+([^;(]+?)\s*\(([^)]*)\)\s*;", text):
        params = params.strip()
        out[ret_name.split()[-1].lstrip("*")] = 0 if params in ("", "void") else params.count(",") + 1
    return out


def test_c_api_table_matches_the_production_header():
    """_ffi._C_API declares exactly what ffi/common/c_api.h does, in its order and with its parameter
    counts; no test-only export (c_api_testing.h) is in either."""
    declared = _declared("c_api.h")
    assert list(declared) == list(_ffi._C_API)
    assert {n: len(a) for n, (_, a) in _ffi._C_API.items()} == declared
    testing = _declared("c_api_testing.h")
    assert "jmm_c_struct_fields" in testing and not set(testing) & set(declared)


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm not installed")
def test_only_jmm_symbols_exported(lib):
    out = subprocess.run(
        ["nm", "-D", "--defined-only", _ffi.library_path()], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert names and all(n.startswith("jmm_") for n in names), [n for n in names if not n.startswith("jmm_")]


@pytest.mark.skipif(_readelf() is None, reason="readelf not installed")
def test_links_no_cuda_library(lib):
    out = subprocess.run([_readelf(), "-d", _ffi.library_path()], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert needed
    assert not [n for n in needed if "cuda" in n.lower()], needed


def test_sha256_matches_hashlib(lib):
    for data in (b"", b"abc", b"x" * 55, b"y" * 56, b"z" * 64, bytes(range(256)) * 9):
        buf = ctypes.create_string_buffer(65)
        assert lib.jmm_sha256_hex(data, len(data), buf, 65) == 64
        assert buf.value.decode() == hashlib.sha256(data).hexdigest()


def test_render_rejects_bad_arguments(lib):
    for arch, kind in ((80, 0), (90, 1), (100, 0), (100, 3)):
        with pytest.raises(ValueError):
            _ffi.render_pre_dispatch(arch, kind)
    with pytest.raises(ValueError, match="mma_kind=3 must be 1 .* or 2"):
        _ffi.render_pre_dispatch(100, 3)


def test_render_sources(lib):
    s90 = _ffi.render_pre_dispatch(90, 0)
    assert "#include <deep_gemm/impls/sm90_mega_moe_pre_dispatch.cuh>" in s90
    assert "template __global__ void deep_gemm::sm90_mega_moe_pre_dispatch_kernel<128u, false>(" in s90
    assert "static_assert(std::is_same_v<decltype(&deep_gemm::sm90_mega_moe_pre_dispatch_kernel<128u, false>)" in s90
    for kind, name in ((1, "MXFP8FP4"), (2, "MXFP4")):
        s = _ffi.render_pre_dispatch(100, kind)
        assert "#include <deep_gemm/impls/sm100_mega_moe_pre_dispatch.cuh>" in s
        assert (
            f"template __global__ void deep_gemm::mega_moe_pre_dispatch_kernel<32u, deep_gemm::MmaKind::{name}, false>("
            in s
        )
    # Exactly one explicit instantiation per source (one kernel per cubin).
    assert s90.count("template __global__") == 1


# --- registration ----------------------------------------------------------------------


def test_register_idempotent_and_thread_safe():
    results, errors = [], []

    def worker():
        try:
            results.append(_ffi.register())
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 8
    assert _ffi.register() == results[0]
    import jax_megamoe

    assert jax_megamoe.register() == results[0]
    # The environment was forwarded (once; the snapshot is shared).
    assert policy_mod.forward_env() is policy_mod.forward_env()
    st = _ffi.status()
    if st.library is not None and st.toolchain is not None and st.headers is not None:
        assert st.registered, st.reason
        assert st.targets == tuple(_ffi.TARGETS)
    else:
        assert not st.registered and st.reason


def test_cuda_registration_is_queued_once_on_cpu_jaxlib():
    """On a CPU-only jaxlib, CUDA targets wait in xla_client's queue: harmless, and only once."""
    if not _ffi.register():
        pytest.skip(f"not registered here: {_ffi.status().reason}")
    from jaxlib import xla_client

    pending = getattr(xla_client, "_custom_callback", {}).get("CUDA")
    if pending is None:
        pytest.skip("a CUDA plugin consumed the registrations (GPU jaxlib)")
    names = [entry[0] for entry in pending]
    for target in _ffi.TARGETS:
        assert names.count(target) == 1, (target, names)
    types = [entry[0] for entry in getattr(xla_client, "_custom_type_id", {}).get("CUDA", [])]
    assert types.count(_ffi.STATE_TYPE_NAME) == 1
    # CPU computations keep working.
    assert float(jax.jit(lambda a: a * 2)(jnp.float32(3))) == 6.0


def _fresh_ffi_state(monkeypatch):
    for name, value in (
        ("_status", None),
        ("_lib", None),
        ("_lib_path", None),
        ("_lib_reason", None),
        ("_lib_tried", False),
        ("_warned_not_built", False),
    ):
        monkeypatch.setattr(_ffi, name, value)


def test_missing_library_reports_reference_only(monkeypatch, tmp_path, caplog):
    _fresh_ffi_state(monkeypatch)
    # the policy holds the location (read once): a process whose JAX_MEGAMOE_FFI_LIB names no file
    wrong = policy_mod.Locations(ffi_lib=str(tmp_path / "nope" / _ffi.LIB_NAME))
    monkeypatch.setattr(policy_mod, "_current", policy_mod.current().replace(locations=wrong))
    with caplog.at_level("WARNING", logger="jax_megamoe"):
        assert _ffi.register() is False
        assert _ffi.register() is False
    assert _ffi.load_library() is None
    st = _ffi.status()
    assert st.library is None and not st.registered
    assert st.reason.startswith(_ffi.NOT_BUILT)
    assert [r.getMessage() for r in caplog.records].count(st.reason) == 1  # reported once
    with pytest.raises(_ffi.FfiUnavailableError, match="reference backend only"):
        _ffi.require()
    text = _ffi.describe()
    assert "FFI library: none: FFI library not built: reference backend only" in text


def test_toolchain_failure_is_recorded_not_raised(monkeypatch, lib):
    _fresh_ffi_state(monkeypatch)
    monkeypatch.setattr(_ffi, "_lib", None)

    def no_nvcc(locations=None):
        raise _toolchain.ToolchainError("nvcc not found (looked in ...): install the CUDA toolkit >= 12.9")

    monkeypatch.setattr(_toolchain, "toolchain", no_nvcc)
    assert _ffi.register() is False
    st = _ffi.status()
    assert st.library is not None and not st.registered and st.targets == ()
    assert "nvcc not found" in st.toolchain_error and "nvcc not found" in st.reason
    with pytest.raises(_ffi.FfiUnavailableError, match="nvcc not found"):
        _ffi.require()
    assert "nvcc: not found: nvcc not found" in _ffi.describe()


def test_describe_mentions_key_lines():
    text = _ffi.describe()
    assert f"jax {jax.__version__}, jaxlib " in text
    for key in (
        "FFI library:",
        "FFI targets:",
        "DeepGEMM headers:",
        "nvcc:",
        "GPU",
        "default mode:",
        "setting DG_USE_FP4_ACTS=",
        "setting DG_USE_MXF4_KIND=",
        "forwarded to DG_*",
    ):
        assert key in text, (key, text)
    if not any(d.platform == "gpu" for d in jax.devices()):
        assert "GPU: none" in text
    import jax_megamoe

    assert jax_megamoe.describe() == text


def test_describe_shows_invalid_env_mode(monkeypatch):
    bad = policy_mod.EnvState(
        policy_mod.EnvSetting(True, "JAX_MEGAMOE_USE_FP4_ACTS"), policy_mod.EnvSetting(False, "default"), ()
    )
    monkeypatch.setattr(policy_mod, "_env_state", bad)
    monkeypatch.setattr(policy_mod, "_current", None)  # derived again from the (bad) forwarded flags
    text = _ffi.describe()
    assert "invalid environment" in text and "USE_FP4_ACTS=1 without USE_MXF4_KIND=1" in text


# --- lowering for CUDA on a CPU machine (no handler needed) ------------------------------


@pytest.mark.parametrize("mode", ["fp8", "fp8xfp4", "mxf4xmxf4"])
def test_lowering_contract(mode):
    T, H, K, P = 7, 512, 6, 128
    rsf = 2.5 if mode == "fp8" else 1.0
    call = _calls.PreDispatchCall(mode, hidden=H, top_k=K, capacity=P, routed_scaling_factor=rsf)
    target, attrs, results = call.target, call.attributes(), call.result_types()

    def f(x, idx, w):
        return jax.ffi.ffi_call(target, results, has_side_effect=True)(x, idx, w, **attrs)

    specs = (
        jax.ShapeDtypeStruct((T, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((T, K), jnp.int32),
        jax.ShapeDtypeStruct((T, K), jnp.float32),
    )
    text = jax.jit(f).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert f"@{target}" in text
    for key, value in (("hidden", H), ("top_k", K), ("capacity", P), ("group", config.ACT_GROUP[mode])):
        assert f"{key} = {value} : i64" in text
    assert re.search(r"routed_scaling_factor = [0-9.e+]+ : f32", text)
    assert f"mma_kind = {_calls.MMA_KIND[mode]} : i64" in text
    # the same spec is what ops.pre_dispatch emits (one definition of the contract)
    ops_text = jax.jit(lambda x, i, w: ops.pre_dispatch(x, i, w, mode=mode, num_max_tokens=P, routed_scaling_factor=rsf,
                                                        backend="ffi", policy=policy_mod.Policy())).trace(*specs).lower(
        lowering_platforms=("cuda",)).as_text()  # fmt: skip
    assert f"@{target}(" in ops_text and f"mma_kind = {_calls.MMA_KIND[mode]} : i64" in ops_text
    q = "tensor<128x256xui8>" if mode == "mxf4xmxf4" else "tensor<128x512xf8E4M3FN>"
    sf = "tensor<128x4xf32>" if mode == "fp8" else "tensor<128x4xi32>"
    for t in (q, sf, "tensor<128x6x2xi32>", "tensor<128x6xf32>"):
        assert t in text, (t, text)


# --- the CMake build itself --------------------------------------------------------------


def _cmake_ok() -> bool:
    return shutil.which("cmake") is not None


def _cmake_configure(build: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["cmake", "-S", str(REPO / "ffi"), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}", *extra]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not _cmake_ok(), reason="cmake not installed")
def test_cmake_skips_library_without_headers(tmp_path):
    res = _cmake_configure(tmp_path / "b", "-DXLA_FFI_INCLUDE_DIR=/nonexistent/include")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "NOT building libjax_megamoe_ffi.so" in res.stderr and "reference backend only" in res.stderr
    inst = subprocess.run(
        ["cmake", "--install", str(tmp_path / "b"), "--prefix", str(tmp_path / "inst")], capture_output=True, text=True
    )
    assert inst.returncode == 0, inst.stderr
    assert not list((tmp_path / "inst").rglob("*.so"))


@pytest.mark.slow
@pytest.mark.skipif(not _cmake_ok(), reason="cmake not installed")
def test_cmake_build_and_install(tmp_path, lib):
    build = tmp_path / "b"
    res = _cmake_configure(build)
    assert res.returncode == 0, res.stdout + res.stderr
    if "NOT building" in res.stderr:
        pytest.skip(res.stderr.strip().splitlines()[1] if res.stderr else "library skipped")
    res = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    res = subprocess.run(
        ["cmake", "--install", str(build), "--prefix", str(tmp_path / "inst")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    so = tmp_path / "inst" / "jax_megamoe" / _ffi.LIB_NAME
    assert so.is_file()
    probe = (
        "import ctypes,sys; l=ctypes.CDLL(sys.argv[1]); l.jmm_build_info.restype=ctypes.c_char_p; "
        "print(l.jmm_build_info().decode()); "
        + "; ".join(f"l.{p}_{s}" for p in _ffi.TARGETS.values() for s in _ffi.STAGES)
    )
    out = subprocess.run([sys.executable, "-c", probe, str(so)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "XLA FFI API" in out.stdout


def _cmake_sources() -> list[str]:
    text = (REPO / "ffi" / "CMakeLists.txt").read_text()
    block = re.search(r"set\(JMM_SOURCES\s+(.*?)\)", text, re.S).group(1)
    return ["ffi/" + s for s in block.split()]


def _bazel_sources() -> list[str]:
    text = (REPO / "BUILD").read_text()
    block = re.search(r"JMM_SOURCES = \[(.*?)\]", text, re.S).group(1)
    return re.findall(r'"([^"]+)"', block)


def test_cmake_and_bazel_build_the_same_sources():
    on_disk = sorted(str(p.relative_to(REPO)) for p in (REPO / "ffi").rglob("*.cc"))
    assert _cmake_sources() == _bazel_sources()
    assert sorted(_cmake_sources()) == on_disk


def test_ffi_sources_are_clang_formatted():
    """tools/check_format.sh passes: ffi/**/*.{cc,h,cuh} follow ffi/.clang-format. Skipped without
    clang-format 14 (Debian bookworm's `apt-get install clang-format`, the version that formatted
    them: other versions reflow some lines differently)."""
    cf = shutil.which("clang-format")
    if cf is None:
        pytest.skip("clang-format not installed (apt-get install -y clang-format)")
    version = subprocess.run([cf, "--version"], capture_output=True, text=True, check=True).stdout
    if not re.search(r"version 14\.", version):
        pytest.skip(f"ffi/ is formatted with clang-format 14, this is {version.strip()}")
    res = subprocess.run([str(REPO / "tools" / "check_format.sh")], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
