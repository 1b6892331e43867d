"""The C++ JIT: render, nvcc compile for sm_90a / sm_100f, disk + memory cache, errors.

Each kernel is compiled once per session (session fixture, temporary cache root); the
other tests reuse those cubins through the caches. Needs nvcc >= 12.9, the sgl-deep-gemm
headers and the FFI library; skipped cleanly otherwise. No GPU involved.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ffi_testing import has_cuda_driver, jit_sandbox

from jax_megamoe._src.kernels import _calls, _ffi
from jax_megamoe._src.numerics.policy import Policy

pytestmark = pytest.mark.nvcc

KERNELS = {
    "sm90": (90, 0, "sm90_mega_moe_pre_dispatch_kernel", "sm_90a"),
    "sm100_mxfp8fp4": (100, 1, "mega_moe_pre_dispatch_kernelILj32ELNS_7MmaKindE1E", "sm_100f"),
    "sm100_mxfp4": (100, 2, "mega_moe_pre_dispatch_kernelILj32ELNS_7MmaKindE2E", "sm_100f"),
}


@pytest.fixture(scope="module")
def jit(tmp_path_factory):
    """(lib, toolchain, headers, cache root, {kernel: cubin path}); restores the JIT config afterwards."""
    with jit_sandbox(tmp_path_factory, "jitcache") as (lib, tc, hd, root):
        before = _ffi.jit_stats()
        cubins = {name: _ffi.compile_pre_dispatch(arch, kind) for name, (arch, kind, _, _) in KERNELS.items()}
        after = _ffi.jit_stats()
        assert after.compiles - before.compiles == len(KERNELS)
        yield lib, tc, hd, root, cubins


def _meta(cubin: str) -> dict:
    return json.loads((Path(cubin).parent / "meta.json").read_text())


@pytest.mark.parametrize("name", list(KERNELS))
def test_cubin_produced(jit, name):
    _, tc, hd, root, cubins = jit
    arch, kind, symbol_part, gpu_arch = KERNELS[name]
    cubin = Path(cubins[name])
    assert cubin.is_file() and cubin.stat().st_size > 1000
    assert cubin.read_bytes()[:4] == b"\x7fELF"
    entry = cubin.parent
    assert entry.parent == root / "cache"
    assert {p.name for p in entry.iterdir()} >= {"kernel.cu", "kernel.cubin", "meta.json"}
    assert entry.name.startswith(
        {
            "sm90": "sm90_pre_dispatch.",
            "sm100_mxfp8fp4": "sm100_pre_dispatch_mxfp8fp4.",
            "sm100_mxfp4": "sm100_pre_dispatch_mxfp4.",
        }[name]
    )
    assert (entry / "kernel.cu").read_text() == _ffi.render_pre_dispatch(arch, kind)
    syms = _ffi.cubin_kernel_symbols(str(cubin))
    assert len(syms) == 1 and symbol_part in syms[0], syms
    meta = _meta(str(cubin))
    assert meta["kernel_symbol"] == syms[0]
    assert meta["gpu_arch"] == gpu_arch
    assert f"--gpu-architecture={gpu_arch}" in meta["command"]
    assert meta["header_version"] == hd.header_version
    assert meta["nvcc_release"] == f"{tc.version[0]}.{tc.version[1]}"
    assert entry.name.endswith(meta["digest"][:32])
    assert meta["deepgemm_headers_hashed"] > 3


@pytest.mark.parametrize("name", list(KERNELS))
def test_cuobjdump_lists_the_kernel(jit, name):
    exe = shutil.which("cuobjdump") or (Path(jit[1].nvcc).parent / "cuobjdump")
    if not Path(exe).is_file():
        pytest.skip("cuobjdump not installed (the ELF check in test_cubin_produced covers the symbol)")
    out = subprocess.run([str(exe), "-symbols", jit[4][name]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert KERNELS[name][2] in out.stdout


def test_second_compile_hits_memory_then_disk(jit):
    lib, _, _, _, cubins = jit
    cubin = Path(cubins["sm90"])
    mtime = cubin.stat().st_mtime_ns
    s0 = _ffi.jit_stats()
    assert _ffi.compile_pre_dispatch(90, 0) == str(cubin)
    s1 = _ffi.jit_stats()
    assert (s1.memory_hits, s1.compiles) == (s0.memory_hits + 1, s0.compiles)
    lib.jmm_jit_clear_memory_cache()
    assert _ffi.compile_pre_dispatch(90, 0) == str(cubin)
    s2 = _ffi.jit_stats()
    assert (s2.disk_hits, s2.compiles) == (s1.disk_hits + 1, s1.compiles)
    assert cubin.stat().st_mtime_ns == mtime
    assert not list((cubin.parents[1].parent / "tmp").iterdir())  # no leftover build folders


def test_cache_roots_with_read_only_second_root(jit, tmp_path, monkeypatch):
    """The roots configure_jit hands over, in order: the first written, the others read-only
    lookups. The library reads no environment variable: DG_JIT_CACHE_DIR set afterwards changes
    nothing until the next configure (the policy reads it, once)."""
    _, tc, hd, root, cubins = jit
    first = tmp_path / "first"
    _ffi.configure_jit(tc, hd, cache_dirs=f"{first}:{root}")
    try:
        monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path / "ignored"))
        assert _ffi.jit_cache_roots() == [str(first), str(root)]
        os.chmod(root / "cache", stat.S_IRUSR | stat.S_IXUSR)  # read-only lookup root
        try:
            s0 = _ffi.jit_stats()
            for name, (arch, kind, _, _) in KERNELS.items():
                assert _ffi.compile_pre_dispatch(arch, kind) == cubins[name]
            s1 = _ffi.jit_stats()
        finally:
            os.chmod(root / "cache", stat.S_IRWXU)
        assert s1.disk_hits - s0.disk_hits == len(KERNELS) and s1.compiles == s0.compiles
        assert not (first / "cache").exists() or not list((first / "cache").iterdir())
        assert not (tmp_path / "ignored").exists()
    finally:
        _ffi.configure_jit(tc, hd, cache_dirs=str(root))


def test_policy_resolves_the_cache_roots_and_nvcc_switches():
    """What configure_jit passes when no cache_dirs is given: DG_JIT_CACHE_DIR (then
    DJ_JIT_CACHE_DIR; empty is unset), else $XDG_CACHE_HOME/jax_megamoe/jit, else
    ~/.cache/jax_megamoe/jit; the DG_JIT_* switches read as DeepGEMM reads them."""
    p = Policy.from_environ({"DG_JIT_CACHE_DIR": "", "DJ_JIT_CACHE_DIR": "/a:/b", "HOME": "/h"})
    assert (p.jit_cache_dirs, p.source("jit_cache_dirs")) == ("/a:/b", "DJ_JIT_CACHE_DIR")
    assert Policy.from_environ({"HOME": "/h", "XDG_CACHE_HOME": "/x"}).jit_cache_dirs == "/x/jax_megamoe/jit"
    assert Policy.from_environ({"HOME": "/h"}).jit_cache_dirs == "/h/.cache/jax_megamoe/jit"
    q = Policy.from_environ({"DG_JIT_WITH_LINEINFO": "2", "DG_JIT_PRINT_COMPILER_COMMAND": "0", "DG_JIT_DEBUG": "1"})
    assert (q.jit_lineinfo, q.jit_print_commands) == (True, True)
    r = Policy.from_environ({"DG_JIT_WITH_LINEINFO": "off", "DG_JIT_DEBUG": "false"})
    assert (r.jit_lineinfo, r.jit_print_commands) == (False, False)
    assert p == Policy() and hash(p) == hash(Policy())  # JIT settings change no result


def test_bad_include_dir_is_a_readable_error(jit, tmp_path):
    lib, tc, hd, root, _ = jit
    bad = dataclass_replace(hd, include_dir=str(tmp_path / "no_such_include"))
    _ffi.configure_jit(tc, bad, cache_dirs=str(root))
    try:
        s0 = _ffi.jit_stats()
        with pytest.raises(RuntimeError) as e:
            _ffi.compile_pre_dispatch(90, 0)
        msg = str(e.value)
        assert "deep_gemm/impls/sm90_mega_moe_pre_dispatch.cuh" in msg and "not found under" in msg
        assert "pip install sgl-deep-gemm==0.2.5" in msg
        assert _ffi.last_error() == msg
        assert _ffi.jit_stats().failures == s0.failures + 1
    finally:
        _ffi.configure_jit(tc, hd, cache_dirs=str(root))


def test_broken_header_reports_nvcc_output(jit, tmp_path):
    lib, tc, hd, root, _ = jit
    inc = tmp_path / "inc"
    header = inc / "deep_gemm" / "impls" / "sm90_mega_moe_pre_dispatch.cuh"
    header.parent.mkdir(parents=True)
    header.write_text("#pragma once\nthis is not C++;\n")
    _ffi.configure_jit(tc, dataclass_replace(hd, include_dir=str(inc)), cache_dirs=str(tmp_path / "cache"))
    try:
        with pytest.raises(RuntimeError) as e:
            _ffi.compile_pre_dispatch(90, 0)
        msg = str(e.value)
        assert "nvcc failed with exit status" in msg and "--- nvcc output ---" in msg
        assert "sm90_mega_moe_pre_dispatch.cuh" in msg and "error" in msg
        assert not list((tmp_path / "cache" / "cache").iterdir())  # nothing published
        assert not list((tmp_path / "cache" / "tmp").iterdir())  # build folder removed
    finally:
        _ffi.configure_jit(tc, hd, cache_dirs=str(root))


def test_old_nvcc_is_rejected_by_the_jit(jit, tmp_path):
    lib, tc, hd, root, _ = jit
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    fake.chmod(0o755)
    _ffi.configure_jit(dataclass_replace(tc, nvcc=str(fake)), hd, cache_dirs=str(tmp_path / "cache"))
    try:
        with pytest.raises(RuntimeError, match=r"nvcc 12\.8 .* too old: .* >= 12\.9"):
            _ffi.compile_pre_dispatch(100, 2)
    finally:
        _ffi.configure_jit(tc, hd, cache_dirs=str(root))


def test_nvcc_switches_come_from_jmm_configure(jit, tmp_path, capfd):
    """with_lineinfo adds -lineinfo, print_commands prints the command line (a fake nvcc that
    reports 13.0 and builds nothing: the compile fails after the command ran)."""
    lib, tc, hd, root, _ = jit
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    fake.chmod(0o755)
    for lineinfo, printed in ((1, 1), (0, 1), (1, 0)):
        rc = lib.jmm_configure(
            hd.include_dir.encode(),
            str(fake).encode(),
            b"",
            str(tmp_path / "cache").encode(),
            hd.header_version.encode(),
            lineinfo,
            printed,
        )
        assert rc == 0
        try:
            with pytest.raises(RuntimeError, match="nvcc failed with exit status 0") as e:
                _ffi.compile_pre_dispatch(90, 0)
        finally:
            _ffi.configure_jit(tc, hd, cache_dirs=str(root))
        err = capfd.readouterr().err
        assert ("[jax_megamoe JIT]" in err) == bool(printed)
        assert (" -lineinfo" in str(e.value)) == bool(lineinfo)


def test_concurrent_processes_publish_one_entry(jit, tmp_path):
    """Two processes compile the same kernel into a fresh root at once: both succeed, one entry."""
    lib, tc, hd, root, _ = jit
    fresh = tmp_path / "fresh"
    script = (
        "import sys\n"
        "from jax_megamoe._src.kernels import _ffi, _toolchain\n"
        "_ffi.configure_jit(_toolchain.find_nvcc(), _toolchain.find_deepgemm_headers(), cache_dirs=sys.argv[1])\n"
        "print(_ffi.compile_pre_dispatch(90, 0))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(fresh)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    entries = list((fresh / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / "kernel.cubin").is_file()
    assert not list((fresh / "tmp").iterdir())


def test_unconfigured_or_invalid_requests(jit):
    with pytest.raises(RuntimeError, match="mma_kind=2 must be 0"):
        _ffi.compile_pre_dispatch(90, 2)
    with pytest.raises(RuntimeError, match="arch must be 90"):
        _ffi.compile_pre_dispatch(89, 0)


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# --- the handlers' instantiate stage, exercised on the CPU backend ------------------------
#
# XLA CPU runs FFI instantiate handlers too. Registering the CUDA handlers' symbols for
# "cpu" under test names checks, without a GPU: the type registration through ctypes
# capsules, the attribute names/types ops.py sends (via _calls.PreDispatchCall), the
# attribute validation, the JIT running inside instantiate, and error propagation
# (instantiate then stops at the missing CUDA driver, with a readable message).

_CPU_TARGETS: dict[str, str] = {}


def _cpu_targets(lib):
    import ctypes

    import jax

    if any(d.platform != "cpu" for d in jax.devices()):
        pytest.skip("a GPU backend is present: the CPU registration of the state type would clash with it")
    if not _CPU_TARGETS:
        jax.devices("cpu")  # the CPU client must exist first (it flushes queued calls before types)
        tid = lib.jmm_pre_dispatch_state_type_id()
        jax.ffi.register_ffi_type(
            "jax_megamoe_test.PreDispatchState",
            {"type_id": jax.ffi.pycapsule(tid), "type_info": jax.ffi.pycapsule(lib.jmm_pre_dispatch_state_type_info())},
            platform="cpu",
        )
        assert ctypes.c_int64.from_address(tid).value > 0  # XLA assigned an id through the capsule
        for target, prefix in _ffi.TARGETS.items():
            name = f"jmm_test_cpu_{target}"
            jax.ffi.register_ffi_target(name, _ffi._capsules(lib, prefix), platform="cpu", api_version=1)
            _CPU_TARGETS[target] = name
    return _CPU_TARGETS


def _run_on_cpu(lib, mode, *, graph=False, **overrides):
    import jax
    import jax.numpy as jnp
    import numpy as np

    T, H, K, P = 3, 512, 6, 128
    names = _cpu_targets(lib)
    call = _calls.PreDispatchCall(
        mode, hidden=H, top_k=K, capacity=P, routed_scaling_factor=2.5 if mode == "fp8" else 1.0, graph=graph
    )
    attrs = call.attributes()
    attrs.update({k: (np.float32(v) if k == "routed_scaling_factor" else np.int64(v)) for k, v in overrides.items()})
    results = call.result_types()
    target = names[call.target]
    f = jax.jit(lambda x, i, w: jax.ffi.ffi_call(target, results, has_side_effect=True)(x, i, w, **attrs))
    with pytest.raises(Exception) as e:
        f(jnp.zeros((T, H), jnp.bfloat16), jnp.zeros((T, K), jnp.int32), jnp.ones((T, K), jnp.float32))
    return str(e.value)


@pytest.mark.parametrize("mode,graph", [("fp8", False), ("fp8xfp4", False), ("mxf4xmxf4", True)])
def test_instantiate_compiles_then_needs_the_driver(jit, mode, graph):
    lib = jit[0]
    if has_cuda_driver():
        pytest.skip("a CUDA driver is present")
    s0 = _ffi.jit_stats()
    msg = _run_on_cpu(lib, mode, graph=graph)
    arch = _calls.PreDispatchCall(mode, 512, 6, 128).arch * 10
    assert f"jax_megamoe_pre_dispatch_sm{arch}: the CUDA driver (libcuda.so.1) could not be loaded" in msg
    s1 = _ffi.jit_stats()
    assert s1.memory_hits + s1.disk_hits == s0.memory_hits + s0.disk_hits + 1  # the JIT ran, from the cache
    assert s1.compiles == s0.compiles


@pytest.mark.parametrize(
    "mode,override,expect",
    [
        ("fp8", {"group": 64}, "attribute group=64 must be 128"),
        ("fp8", {"mma_kind": 2}, "attribute mma_kind=2 must be 0 on sm_90"),
        ("fp8", {"top_k": 65}, "attribute top_k=65 must be in [1, hidden/8 = 64]"),
        ("fp8", {"routed_scaling_factor": float("inf")}, "must be finite"),
        ("mxf4xmxf4", {"routed_scaling_factor": 2.0}, "must be 1.0"),
        ("fp8xfp4", {"group": 128}, "attribute group=128 must be 32"),
        ("fp8xfp4", {"mma_kind": 3}, "attribute mma_kind=3 must be 1 (MXFP8FP4, fp8xfp4) or 2"),
        ("mxf4xmxf4", {"capacity": -1}, "attribute capacity=-1"),
    ],
)
def test_instantiate_validates_attributes(jit, mode, override, expect):
    msg = _run_on_cpu(jit[0], mode, **override)
    assert "INVALID_ARGUMENT" in msg and expect in msg, msg
