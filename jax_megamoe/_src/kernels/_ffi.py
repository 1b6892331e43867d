"""Load ``libjax_megamoe_ffi.so``, register the XLA FFI types and targets.

Nothing here reads the environment: the process policy (:func:`jax_megamoe.policy.current`, read
once) holds every setting and location, and is read first by ``register()``.

The library is found, in order, at ``$JAX_MEGAMOE_FFI_LIB`` (a file path; ``policy.locations.ffi_lib``), then next to
the package's modules: every folder of ``jax_megamoe.__path__`` (an editable install of
scikit-build-core in "redirect" mode lists both the source folder and the CMake install
folder in site-packages there) and the folder of this file. It is loaded with ``ctypes``
only; it needs no GPU or driver to load (the CUDA driver is opened lazily by the
handlers).

``register()`` (idempotent, thread-safe) always reads the process policy first (which forwards
the sm_100 flags to DG_*, once), then, when the library loads: looks up nvcc and the
DeepGEMM headers (``_toolchain``, at the policy's locations), hands them and the policy's
JIT settings to the C++ JIT (``configure_jit``), and
registers for platform "CUDA" the FFI state type ``jax_megamoe.PreDispatchState`` and
the targets below with the stage dict {"instantiate", "initialize", "execute"}. Failures
never raise from ``register()``: they are recorded (``status()``) and ``require()``
raises them as ``FfiUnavailableError`` when the FFI backend is requested.

Targets (see ``ffi/handlers/pre_dispatch.h`` for the full contract):
  jax_megamoe_pre_dispatch_sm90, jax_megamoe_pre_dispatch_sm100   plain (not traced into CUDA graphs)
  jax_megamoe_pre_dispatch_sm90_graph, ..._sm100_graph            declare kCmdBufferCompatible
  jax_megamoe_mega_moe_sm90, jax_megamoe_mega_moe_sm100 (ffi/handlers/mega_moe_sm*.h)
  jax_megamoe_mega_moe_sm90_graph                                 declares kCmdBufferCompatible
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import jaxlib

from jax_megamoe._src.kernels import _toolchain
from jax_megamoe._src.numerics import policy
from jax_megamoe._src.numerics.policy import Locations
from jax_megamoe._version import __version__

LIB_NAME = "libjax_megamoe_ffi.so"
ENV_LIB = policy.ENV_FFI_LIB
PLATFORM = "CUDA"
NOT_BUILT = "FFI library not built: reference backend only"

STATE_TYPE_NAME = "jax_megamoe.PreDispatchState"
MEGA_SM90_STATE_TYPE_NAME = "jax_megamoe.MegaMoeSm90State"
MEGA_SM100_STATE_TYPE_NAME = "jax_megamoe.MegaMoeSm100State"
DECODE_STATE_TYPE_NAME = "jax_megamoe.DecodeMoeState"
TARGET_PRE_DISPATCH_SM90 = "jax_megamoe_pre_dispatch_sm90"
TARGET_PRE_DISPATCH_SM100 = "jax_megamoe_pre_dispatch_sm100"
TARGET_MEGA_MOE_SM90 = "jax_megamoe_mega_moe_sm90"  # contract: ffi/handlers/mega_moe_sm90.h
# contract: ffi/handlers/mega_moe_sm100.h (compile-checked only: never run on a B200)
TARGET_MEGA_MOE_SM100 = "jax_megamoe_mega_moe_sm100"
GRAPH_SUFFIX = "_graph"
STAGES = ("instantiate", "initialize", "execute")


def _with_graph_twins(prefixes: dict[str, str], *, twins: tuple[str, ...]) -> dict[str, str]:
    """``target -> C symbol prefix`` (stage symbols are f"{prefix}_{stage}"), plus the
    command-buffer compatible ``_graph`` twin of each target in ``twins``."""
    return {**prefixes, **{t + GRAPH_SUFFIX: prefixes[t] + GRAPH_SUFFIX for t in twins}}


# The pre-dispatch targets (status().targets lists these).
TARGETS: dict[str, str] = _with_graph_twins(
    {TARGET_PRE_DISPATCH_SM90: "jmm_pre_dispatch_sm90", TARGET_PRE_DISPATCH_SM100: "jmm_pre_dispatch_sm100"},
    twins=(TARGET_PRE_DISPATCH_SM90, TARGET_PRE_DISPATCH_SM100),
)
# Targets whose handlers keep a MegaMoeSm90State / MegaMoeSm100State (MEGA_SM90_STATE_TYPE_NAME,
# MEGA_SM100_STATE_TYPE_NAME); registered together with TARGETS.
MEGA_TARGETS: dict[str, str] = _with_graph_twins(
    {TARGET_MEGA_MOE_SM90: "jmm_mega_moe_sm90", TARGET_MEGA_MOE_SM100: "jmm_mega_moe_sm100"},
    twins=(TARGET_MEGA_MOE_SM90,),
)
# The low-latency decode passes (ours, ffi/handlers/decode_moe_sm90.cc); state DECODE_STATE_TYPE_NAME.
TARGET_DECODE_L1_SM90 = "jax_megamoe_decode_l1_sm90"
TARGET_DECODE_L2_SM90 = "jax_megamoe_decode_l2_sm90"
DECODE_TARGETS: dict[str, str] = _with_graph_twins(
    {TARGET_DECODE_L1_SM90: "jmm_decode_l1_sm90", TARGET_DECODE_L2_SM90: "jmm_decode_l2_sm90"},
    twins=(TARGET_DECODE_L1_SM90, TARGET_DECODE_L2_SM90),
)

# FFI state types: type name -> C symbol prefix of its `{prefix}_type_id` / `{prefix}_type_info` exports.
STATE_TYPES: dict[str, str] = {
    STATE_TYPE_NAME: "jmm_pre_dispatch_state",
    MEGA_SM90_STATE_TYPE_NAME: "jmm_mega_moe_sm90_state",
    MEGA_SM100_STATE_TYPE_NAME: "jmm_mega_moe_sm100_state",
    DECODE_STATE_TYPE_NAME: "jmm_decode_state",
}

# C API of the library (besides the handler symbols): name -> (restype, argtypes).
_C_API: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "jmm_configure": (ctypes.c_int, (ctypes.c_char_p,) * 5 + (ctypes.c_int, ctypes.c_int)),
    "jmm_last_error": (ctypes.c_char_p, ()),
    "jmm_render_pre_dispatch": (ctypes.c_int, (ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)),
    "jmm_compile_pre_dispatch": (
        ctypes.c_int,
        (ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t),
    ),
    "jmm_jit_stats": (ctypes.c_int, (ctypes.POINTER(ctypes.c_uint64), ctypes.c_int)),
    "jmm_jit_clear_memory_cache": (None, ()),
    "jmm_execute_stats": (ctypes.c_int, (ctypes.POINTER(ctypes.c_uint64), ctypes.c_int)),
    "jmm_jit_cache_roots": (ctypes.c_int, (ctypes.c_char_p, ctypes.c_size_t)),
    "jmm_cubin_kernel_symbols": (ctypes.c_int, (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)),
    "jmm_sha256_hex": (ctypes.c_int, (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)),
    "jmm_driver_status": (ctypes.c_int, (ctypes.c_char_p, ctypes.c_size_t)),
    "jmm_build_info": (ctypes.c_char_p, ()),
    "jmm_pre_dispatch_state_type_id": (ctypes.c_void_p, ()),
    "jmm_pre_dispatch_state_type_info": (ctypes.c_void_p, ()),
    "jmm_mega_moe_sm90_state_type_id": (ctypes.c_void_p, ()),
    "jmm_mega_moe_sm90_state_type_info": (ctypes.c_void_p, ()),
    "jmm_mega_moe_sm100_state_type_id": (ctypes.c_void_p, ()),
    "jmm_mega_moe_sm100_state_type_info": (ctypes.c_void_p, ()),
    "jmm_decode_state_type_id": (ctypes.c_void_p, ()),
    "jmm_decode_state_type_info": (ctypes.c_void_p, ()),
    "jmm_decode_render": (ctypes.c_int, (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)),
    "jmm_decode_compile": (
        ctypes.c_int,
        (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t),
    ),
}

log = logging.getLogger("jax_megamoe")


class FfiUnavailableError(RuntimeError):
    """The FFI backend was requested but cannot run here; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class FfiStatus:
    library: str | None  # path of the loaded .so, or None
    reason: str | None  # why the FFI backend is unavailable (None when registered)
    registered: bool  # FFI type and targets handed to JAX for platform CUDA
    targets: tuple[str, ...]  # registered target names
    toolchain: _toolchain.Toolchain | None
    toolchain_error: str | None
    headers: _toolchain.DeepGemmHeaders | None
    headers_error: str | None
    build_info: str | None  # jmm_build_info() of the library


_lock = threading.RLock()
_lib: ctypes.CDLL | None = None
_lib_path: str | None = None
_lib_reason: str | None = None
_lib_tried = False
_status: FfiStatus | None = None
_warned_not_built = False


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def library_candidates(locations: Locations | None = None) -> list[Path]:
    """Where the loader looks for the .so, in order (``locations.ffi_lib``, the env override, first;
    default: the process policy's locations)."""
    out: list[Path] = []
    env = (policy.current().locations if locations is None else locations).ffi_lib
    if env:
        out.append(Path(env))
    # The root package's folders: with an editable install the built library sits in site-packages.
    root = sys.modules.get(__name__.split(".")[0])
    folders = [Path(p) for p in getattr(root, "__path__", [])]
    folders.append(Path(__file__).resolve().parent)
    for f in folders:
        p = f / LIB_NAME
        if p not in out:
            out.append(p)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in _C_API.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = list(argtypes)


def load_library() -> ctypes.CDLL | None:
    """The loaded library (cached), or None; ``status().reason`` / ``library_reason()`` say why."""
    global _lib, _lib_path, _lib_reason, _lib_tried
    with _lock:
        if _lib_tried:
            return _lib
        _lib_tried = True
        loc = policy.current().locations
        env = loc.ffi_lib
        errors: list[str] = []
        for path in library_candidates(loc):
            if not path.is_file():
                if env and str(path) == env:
                    errors.append(f"{ENV_LIB}={env} does not exist")
                    break  # an explicit override that is wrong is not silently ignored
                continue
            try:
                lib = ctypes.CDLL(str(path))
                _declare(lib)
            except (OSError, AttributeError) as e:
                errors.append(f"{path}: {e}")
                if env and str(path) == env:
                    break
                continue
            _lib, _lib_path = lib, str(path.resolve())
            return _lib
        where = ", ".join(str(p.parent) for p in library_candidates(loc)) or "(nowhere)"
        _lib_reason = (
            f"{NOT_BUILT} ({'; '.join(errors)})"
            if errors
            else f"{NOT_BUILT} ({LIB_NAME} not found in {where}; build it with "
            "`pip install --no-build-isolation -e .` on a machine with the CUDA toolkit headers, or set "
            f"{ENV_LIB})"
        )
        return None


def library_path() -> str | None:
    load_library()
    return _lib_path


def library_reason() -> str | None:
    load_library()
    return _lib_reason


def _check_lib() -> ctypes.CDLL:
    lib = load_library()
    if lib is None:
        raise FfiUnavailableError(_lib_reason or NOT_BUILT)
    return lib


def last_error(lib: ctypes.CDLL | None = None) -> str:
    lib = lib or _check_lib()
    v = lib.jmm_last_error()
    return v.decode(errors="replace") if v else ""


# --------------------------------------------------------------------------------------
# JIT configuration and tooling (no GPU needed)
# --------------------------------------------------------------------------------------


def configure_jit(
    toolchain: _toolchain.Toolchain,
    headers: _toolchain.DeepGemmHeaders,
    cache_dirs: str = "",
    lib: ctypes.CDLL | None = None,
) -> None:
    """Hand the C++ JIT every setting it uses (it reads no environment variable itself): nvcc and
    the header paths, plus the process policy's ``jit_cache_dirs`` (``cache_dirs`` given: those
    roots instead, colon-separated, the first written), ``jit_lineinfo`` and ``jit_print_commands``."""
    lib = lib or _check_lib()
    p = policy.current()
    rc = lib.jmm_configure(
        headers.include_dir.encode(),
        toolchain.nvcc.encode(),
        ":".join(toolchain.include_dirs).encode(),
        (cache_dirs or p.jit_cache_dirs).encode(),
        headers.header_version.encode(),
        int(p.jit_lineinfo),
        int(p.jit_print_commands),
    )
    if rc != 0:
        raise FfiUnavailableError(f"jmm_configure failed: {last_error(lib)}")


def call_render(lib: ctypes.CDLL, fn: Any, *args: Any) -> str:
    """Call a ``jmm_*_render`` export (snprintf convention: ``(..., char* out, size_t cap)`` returns
    the full length, or < 0 with ``jmm_last_error`` set) and return the rendered source."""
    n = fn(*args, None, 0)
    if n < 0:
        raise ValueError(last_error(lib))
    buf = ctypes.create_string_buffer(n + 1)
    fn(*args, buf, n + 1)
    return buf.value.decode()


def call_compile(fn: Any, *args: Any) -> str:
    """Call a ``jmm_*_compile`` export (``(..., out, cap, err, err_cap)``, 0 on success) and return
    the cubin path; raises RuntimeError with nvcc's output otherwise."""
    out = ctypes.create_string_buffer(4096)
    err = ctypes.create_string_buffer(1 << 20)
    if fn(*args, out, len(out), err, len(err)) != 0:
        raise RuntimeError(err.value.decode(errors="replace"))
    return out.value.decode()


def render_pre_dispatch(arch: int, mma_kind: int) -> str:
    """The kernel.cu source the JIT compiles for (arch, mma_kind)."""
    lib = _check_lib()
    return call_render(lib, lib.jmm_render_pre_dispatch, arch, mma_kind)


def compile_pre_dispatch(arch: int, mma_kind: int) -> str:
    """Compile (or fetch from the cache) a pre-dispatch cubin; returns its path. Raises RuntimeError."""
    lib = _check_lib()
    return call_compile(lib.jmm_compile_pre_dispatch, arch, mma_kind)


@dataclasses.dataclass(frozen=True)
class JitStats:
    memory_hits: int
    disk_hits: int
    compiles: int
    failures: int


def jit_stats() -> JitStats:
    lib = _check_lib()
    arr = (ctypes.c_uint64 * 4)()
    lib.jmm_jit_stats(arr, 4)
    return JitStats(*(int(v) for v in arr))


def execute_stats() -> tuple[int, int]:
    """``(eager, captured)``: how many times the mega-kernel targets' execute stage ran on a stream
    that was not / was being captured into a CUDA graph. A replayed graph runs no handler, so a
    graph target that works shows one captured execute and then no growth while it replays."""
    lib = _check_lib()
    arr = (ctypes.c_uint64 * 2)()
    lib.jmm_execute_stats(arr, 2)
    return int(arr[0]), int(arr[1])


def jit_cache_roots() -> list[str]:
    lib = _check_lib()
    buf = ctypes.create_string_buffer(16384)
    lib.jmm_jit_cache_roots(buf, len(buf))
    return [p for p in buf.value.decode().split(":") if p]


def cubin_kernel_symbols(path: str) -> list[str]:
    lib = _check_lib()
    buf = ctypes.create_string_buffer(65536)
    if lib.jmm_cubin_kernel_symbols(str(path).encode(), buf, len(buf)) < 0:
        raise RuntimeError(last_error(lib))
    return [s for s in buf.value.decode().splitlines() if s]


# --------------------------------------------------------------------------------------
# Devices (the one parser of a compute capability; the call contracts live in _calls.py)
# --------------------------------------------------------------------------------------


def cc_major(device: Any) -> int | None:
    """Compute-capability major of ``device`` (9 for sm_90, 10 for sm_100), or None when it is not
    a CUDA GPU or does not say."""
    if getattr(device, "platform", None) != "gpu":
        return None
    cc = getattr(device, "compute_capability", None)
    try:
        return int(str(cc).split(".")[0]) if cc else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def _capsules(lib: ctypes.CDLL, prefix: str) -> dict[str, Any]:
    return {stage: jax.ffi.pycapsule(getattr(lib, f"{prefix}_{stage}")) for stage in STAGES}


def _register_locked(pol: policy.Policy) -> FfiStatus:
    lib = load_library()
    if lib is None:
        global _warned_not_built
        if not _warned_not_built:
            _warned_not_built = True
            log.warning("%s", _lib_reason)
        return FfiStatus(None, _lib_reason, False, (), None, None, None, None, None)
    build_info = lib.jmm_build_info().decode()
    tc = hd = None
    tc_err = hd_err = None
    try:
        tc = _toolchain.toolchain(pol.locations)
    except _toolchain.ToolchainError as e:
        tc_err = str(e)
    try:
        hd = _toolchain.headers(pol.locations)
    except _toolchain.ToolchainError as e:
        hd_err = str(e)
    if tc is None or hd is None:
        reason = "FFI backend unavailable: " + " / ".join(e for e in (tc_err, hd_err) if e)
        return FfiStatus(_lib_path, reason, False, (), tc, tc_err, hd, hd_err, build_info)
    try:
        configure_jit(tc, hd, lib=lib)
        for type_name, prefix in STATE_TYPES.items():
            jax.ffi.register_ffi_type(
                type_name,
                {
                    "type_id": jax.ffi.pycapsule(getattr(lib, f"{prefix}_type_id")()),
                    "type_info": jax.ffi.pycapsule(getattr(lib, f"{prefix}_type_info")()),
                },
                platform=PLATFORM,
            )
        for name, prefix in {**TARGETS, **MEGA_TARGETS, **DECODE_TARGETS}.items():
            jax.ffi.register_ffi_target(name, _capsules(lib, prefix), platform=PLATFORM, api_version=1)
    except Exception as e:  # noqa: BLE001 - recorded, raised by require()
        reason = f"FFI registration failed: {type(e).__name__}: {e}"
        return FfiStatus(_lib_path, reason, False, (), tc, None, hd, None, build_info)
    return FfiStatus(_lib_path, None, True, tuple(TARGETS), tc, None, hd, None, build_info)


def register() -> bool:
    """Read the process policy (once per process: every setting, the DG_* forwarding included),
    then register the FFI type and targets once.

    Idempotent and thread-safe; never raises for a missing library or toolchain (see status()).
    Returns True when the targets are registered.
    """
    global _status
    with _lock:
        if _status is None:
            # always first, whatever happens next: every setting, read once (DG_* forwarding too)
            _status = _register_locked(policy.current())
        return _status.registered


def status() -> FfiStatus:
    register()
    assert _status is not None
    return _status


def require() -> None:
    """Raise FfiUnavailableError with the recorded reason unless the FFI targets are registered."""
    st = status()
    if not st.registered:
        raise FfiUnavailableError(
            f"the jax_megamoe FFI backend was requested but is unavailable: {st.reason}. "
            "Use backend='reference' (or 'auto') to run the pure-JAX path."
        )


# --------------------------------------------------------------------------------------
# describe()
# --------------------------------------------------------------------------------------


def _gpu_lines() -> tuple[list[str], int | None]:
    """Lines about the local GPUs, and the compute-capability major of the first one (None: no GPU)."""
    try:
        devs = [d for d in jax.devices() if d.platform == "gpu"]
    except Exception as e:  # noqa: BLE001
        return [f"GPU: none ({type(e).__name__}: {e})"], None
    if not devs:
        return [f"GPU: none (default backend: {jax.default_backend()})"], None
    lines = []
    for d in devs:
        cc = getattr(d, "compute_capability", None)
        arch = f"sm_{str(cc).replace('.', '')}" if cc else "sm_?"
        lines.append(f"GPU {d.id}: {d.device_kind} ({arch})")
    return lines, next((m for m in map(cc_major, devs) if m is not None), None)


def describe() -> str:
    """A readable multi-line report: versions, library, headers, nvcc, device, mode, settings.

    Everything comes from the process policy (read once); an invalid environment is reported,
    not raised (nothing is registered then)."""
    env: policy.EnvState | None = None
    pol: policy.Policy | None = None
    try:
        env = policy.forward_env()
        pol = policy.current()
        sm100 = pol.sm100_mode
    except ValueError as e:
        sm100 = f"invalid environment: {e}"
    st = status() if pol is not None else FfiStatus(None, sm100, False, (), None, None, None, None, None)
    lines = [
        f"jax_megamoe {__version__}",
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}",
    ]
    if st.library:
        lines.append(f"FFI library: {st.library}")
        lines.append(f"FFI build: {st.build_info}")
    else:
        lines.append(f"FFI library: none: {st.reason}")
    lines.append(
        "FFI targets: registered for CUDA (" + ", ".join(st.targets) + ")"
        if st.registered
        else f"FFI targets: not registered ({st.reason})"
    )
    if st.headers:
        lines.append(
            f"DeepGEMM headers: {st.headers.include_dir} ({_toolchain.DEEPGEMM_DIST} {st.headers.version}, "
            f"from {st.headers.source})"
        )
    else:
        lines.append(f"DeepGEMM headers: not found: {st.headers_error or 'not looked up (no FFI library)'}")
    if st.toolchain:
        tc = st.toolchain
        extra = f", extra includes {':'.join(tc.include_dirs)}" if tc.include_dirs else ""
        lines.append(f"nvcc: {tc.nvcc} ({tc.version[0]}.{tc.version[1]}, from {tc.source}{extra})")
    else:
        lines.append(f"nvcc: not found: {st.toolchain_error or 'not looked up (no FFI library)'}")
    if st.library:
        try:
            lines.append(f"JIT cache: {':'.join(jit_cache_roots())} (first is written)")
        except Exception as e:  # noqa: BLE001
            lines.append(f"JIT cache: unknown ({e})")
    gpu_lines, major = _gpu_lines()
    lines.extend(gpu_lines)
    if major == 9:
        lines.append(f"default mode: fp8 (sm_90); sm_100 would use: {sm100}")
    elif major is not None and major >= 10:
        lines.append(f"default mode: {sm100} (sm_100); sm_90 would use: fp8")
    else:
        lines.append(f"default mode: sm_100 -> {sm100}; sm_90 -> fp8 (no GPU: reference backend)")
    if env is not None:
        lines.append(f"setting DG_USE_FP4_ACTS={int(env.fp4_acts.value)} (from {env.fp4_acts.source})")
        lines.append(f"setting DG_USE_MXF4_KIND={int(env.mxf4_kind.value)} (from {env.mxf4_kind.source})")
        fwd = ", ".join(f"{k}={v}" for k, v in env.forwarded) or "none"
        lines.append(f"forwarded to DG_* by this process: {fwd}")
    else:
        lines.append(f"setting DG_USE_*: {sm100}")
    if pol is not None:
        lines.append("policy (jax_megamoe.policy.current(), read once; explicit args and policy= win):")
        lines.append(pol.describe())
    else:
        lines.append(f"policy: {sm100}")
    return "\n".join(lines)
