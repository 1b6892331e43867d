"""Helpers the CPU tests of the FFI library share (imported by test modules, not collected)."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from typing import Any

import pytest

from jax_megamoe._src.kernels import _ffi, _toolchain


def library() -> ctypes.CDLL:
    """The FFI library (jax_megamoe._src.kernels._ffi.load_library), or a pytest skip saying why it is missing."""
    lib = _ffi.load_library()
    if lib is None:
        pytest.skip(_ffi.library_reason() or "FFI library not built")
    return lib


def has_cuda_driver() -> bool:
    """Whether ``libcuda.so.1`` loads here (then the CPU-only "reaches the driver" checks skip)."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def jit_sandbox(tmp_path_factory: Any, name: str) -> Iterator[tuple[Any, Any, Any, Any]]:
    """``(lib, toolchain, headers, cache root)`` with the library registered and its JIT writing
    into a fresh temporary cache; skips without the library, nvcc or the DeepGEMM headers. Restores
    the normal cache configuration and clears the in-memory cache on exit."""
    lib = _ffi.load_library()
    if lib is None:
        pytest.skip(_ffi.library_reason() or "FFI library not built")
    try:
        tc = _toolchain.find_nvcc()
        hd = _toolchain.find_deepgemm_headers()
    except _toolchain.ToolchainError as e:
        pytest.skip(str(e))
    _ffi.register()  # the normal configuration, restored at the end
    root = tmp_path_factory.mktemp(name)
    _ffi.configure_jit(tc, hd, cache_dirs=str(root))
    try:
        yield lib, tc, hd, root
    finally:
        _ffi.configure_jit(tc, hd, cache_dirs="")
        lib.jmm_jit_clear_memory_cache()


# --------------------------------------------------------------------------------------
# The typed C test API (ffi/common/c_api_testing.h): ctypes structs built from the library's own
# description of each struct (jmm_c_struct_fields), so the field order lives in the C header only.
# Shared by the tests and tools/ (tools put this folder on sys.path).
# --------------------------------------------------------------------------------------

_CTYPES = {"i64": ctypes.c_int64, "f64": ctypes.c_double}


def _registry(lib: ctypes.CDLL) -> dict:
    """Struct classes and declared functions, kept on the library object itself: this module may be
    imported twice (``ffi_testing`` by the tests, ``tests.ffi_testing`` by tools/), and both copies
    must hand ctypes the same Structure classes the functions' argtypes name."""
    return lib.__dict__.setdefault("_jmm_test_registry", {"structs": {}, "declared": False})


def c_struct(lib: ctypes.CDLL, name: str) -> type[ctypes.Structure]:
    """The ctypes.Structure of C struct ``<name>_t`` (e.g. ``"jmm_sm90_mega_config"``)."""
    structs = _registry(lib)["structs"]
    if name not in structs:
        fn = lib.jmm_c_struct_fields
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        fn.restype = ctypes.c_int
        n = fn(name.encode(), None, 0)
        if n < 0:
            raise ValueError(_ffi.last_error(lib))
        buf = ctypes.create_string_buffer(n + 1)
        fn(name.encode(), buf, n + 1)
        size, *fields = [f for f in buf.value.decode().split(";") if f]
        decl = []
        for f in fields:
            kind, fname = f.split(" ")
            base, _, count = kind.partition("[")
            t = _CTYPES[base]
            decl.append((fname, t * int(count[:-1]) if count else t))
        cls = type(name + "_t", (ctypes.Structure,), {"_fields_": decl})
        if ctypes.sizeof(cls) != int(size):
            raise RuntimeError(f"{name}_t: ctypes lays out {ctypes.sizeof(cls)} bytes, the library {size}")
        structs[name] = cls
    return structs[name]


def as_dict(s: ctypes.Structure) -> dict[str, Any]:
    """Field name -> value (arrays as lists)."""
    out = {}
    for name, _ in s._fields_:
        v = getattr(s, name)
        out[name] = list(v) if isinstance(v, ctypes.Array) else v
    return out


def _declare(lib: ctypes.CDLL) -> None:
    if _registry(lib)["declared"]:
        return
    P = ctypes.POINTER
    shape, call = P(c_struct(lib, "jmm_mega_shape")), P(c_struct(lib, "jmm_mega_call"))
    tmap = P(c_struct(lib, "jmm_tensor_map"))
    sig = {
        "jmm_sm90_mega_layout": [shape, P(c_struct(lib, "jmm_sm90_mega_layout")), ctypes.c_size_t],
        "jmm_sm100_mega_layout": [shape, ctypes.c_int64, P(c_struct(lib, "jmm_sm100_mega_layout")), ctypes.c_size_t],
        "jmm_sm90_mega_config": [shape, call, P(c_struct(lib, "jmm_sm90_mega_config")), ctypes.c_size_t],
        "jmm_sm100_mega_config": [shape, call, P(c_struct(lib, "jmm_sm100_mega_config")), ctypes.c_size_t],
        "jmm_sm90_mega_tensor_maps": [shape, call, tmap, ctypes.c_int, ctypes.c_size_t],
        "jmm_sm100_mega_tensor_maps": [shape, call, tmap, ctypes.c_int, ctypes.c_size_t],
        "jmm_sm90_mega_render": [shape, call, ctypes.c_char_p, ctypes.c_size_t],
        "jmm_sm100_mega_render": [shape, call, ctypes.c_char_p, ctypes.c_size_t],
        "jmm_sm90_mega_compile": [shape, call] + [ctypes.c_char_p, ctypes.c_size_t] * 2,
        "jmm_sm100_mega_compile": [shape, call] + [ctypes.c_char_p, ctypes.c_size_t] * 2,
        "jmm_pre_dispatch_launch_plan": [ctypes.c_int, ctypes.c_int]
        + [ctypes.c_int64] * 4
        + [P(c_struct(lib, "jmm_pre_dispatch_launch")), ctypes.c_size_t],
        "jmm_sm100_locality_table": [ctypes.c_int64, P(ctypes.c_uint8), ctypes.c_int],
    }
    for name, args in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    _registry(lib)["declared"] = True


def _arch(arch: int) -> str:
    if arch not in (90, 100):
        raise ValueError(f"arch: {arch!r}, expected 90 or 100")
    return f"sm{arch}"


def mega_shape(
    lib: ctypes.CDLL, *, E: int, P: int, K: int, H: int, I: int, ranks: int = 1, kind: int = 0
) -> ctypes.Structure:
    """A ``jmm_mega_shape_t`` (kind = mma_kind: 0 on sm_90, 1 or 2 on sm_100)."""
    return c_struct(lib, "jmm_mega_shape")(
        num_ranks=ranks, num_experts=E, capacity=P, top_k=K, hidden=H, intermediate=I, mma_kind=kind
    )


def mega_call(
    lib: ctypes.CDLL,
    *,
    T: int,
    num_sms: int,
    clamp: float = float("inf"),
    fast_math: bool = True,
    sm90_wide_tile: bool = False,
) -> ctypes.Structure:
    """A ``jmm_mega_call_t`` (``sm90_wide_tile``: the sm_90 target's attribute of that name, the
    policy's ``sm90_wide_tile``; must stay False for sm_100)."""
    return c_struct(lib, "jmm_mega_call")(
        num_tokens=T,
        num_sms=num_sms,
        activation_clamp=clamp,
        fast_math=int(fast_math),
        sm90_wide_tile=int(sm90_wide_tile),
    )


def mega_layout(lib: ctypes.CDLL, arch: int, shape: ctypes.Structure, num_sms: int | None = None) -> dict[str, Any]:
    """The symmetric-buffer layout (sm_100: sized for ``num_sms``); ValueError with the library's message."""
    _declare(lib)
    a = _arch(arch)
    out = c_struct(lib, f"jmm_{a}_mega_layout")()
    fn = getattr(lib, f"jmm_{a}_mega_layout")
    args = (ctypes.byref(shape),) + ((num_sms,) if arch == 100 else ())
    if fn(*args, ctypes.byref(out), ctypes.sizeof(out)) != 0:
        raise ValueError(_ffi.last_error(lib))
    return as_dict(out)


def mega_config(lib: ctypes.CDLL, arch: int, shape: ctypes.Structure, call: ctypes.Structure) -> dict[str, Any]:
    """The kernel configuration of one call; ValueError with the library's message."""
    _declare(lib)
    a = _arch(arch)
    out = c_struct(lib, f"jmm_{a}_mega_config")()
    if (
        getattr(lib, f"jmm_{a}_mega_config")(
            ctypes.byref(shape), ctypes.byref(call), ctypes.byref(out), ctypes.sizeof(out)
        )
        != 0
    ):
        raise ValueError(_ffi.last_error(lib))
    return as_dict(out)


def mega_tensor_maps(
    lib: ctypes.CDLL, arch: int, shape: ctypes.Structure, call: ctypes.Structure
) -> list[dict[str, Any]]:
    """The TMA descriptor plans of one call, in kernel parameter order."""
    _declare(lib)
    t = c_struct(lib, "jmm_tensor_map")
    out = (t * 16)()
    n = getattr(lib, f"jmm_{_arch(arch)}_mega_tensor_maps")(
        ctypes.byref(shape), ctypes.byref(call), out, len(out), ctypes.sizeof(t)
    )
    if n < 0:
        raise ValueError(_ffi.last_error(lib))
    return [as_dict(out[i]) for i in range(n)]


def mega_render(lib: ctypes.CDLL, arch: int, shape: ctypes.Structure, call: ctypes.Structure) -> str:
    """kernel.cu of the mega kernel of one call; ValueError with the library's message."""
    _declare(lib)
    return _ffi.call_render(
        lib, getattr(lib, f"jmm_{_arch(arch)}_mega_render"), ctypes.byref(shape), ctypes.byref(call)
    )


def mega_compile(lib: ctypes.CDLL, arch: int, shape: ctypes.Structure, call: ctypes.Structure) -> str:
    """Compile (or find in the JIT caches) that kernel; the cubin path. RuntimeError with nvcc's output."""
    _declare(lib)
    return _ffi.call_compile(getattr(lib, f"jmm_{_arch(arch)}_mega_compile"), ctypes.byref(shape), ctypes.byref(call))


def pre_dispatch_launch_plan(
    lib: ctypes.CDLL, arch: int, kind: int, T: int, P: int, H: int, K: int
) -> dict[str, int] | None:
    """The pre-dispatch launch geometry, or None for arguments no handler accepts."""
    _declare(lib)
    out = c_struct(lib, "jmm_pre_dispatch_launch")()
    if lib.jmm_pre_dispatch_launch_plan(arch, kind, T, P, H, K, ctypes.byref(out), ctypes.sizeof(out)) != 0:
        return None
    return as_dict(out)


def locality_table(lib: ctypes.CDLL, sm_count: int, n: int) -> tuple[int, list[int]]:
    """(entry count, the first min(n, entries) entries) of the sm_100 locality table."""
    _declare(lib)
    buf = (ctypes.c_uint8 * max(n, 1))()
    rc = lib.jmm_sm100_locality_table(sm_count, buf if n else None, n)
    if rc < 0:
        raise ValueError(_ffi.last_error(lib))
    return rc, list(buf)[: min(n, rc)]
