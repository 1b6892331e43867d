"""Helpers the CPU tests of the FFI library share (imported by test modules, not collected)."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from typing import Any

import pytest

from jax_megamoe import _ffi, _toolchain


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
