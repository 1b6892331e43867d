"""Shared pieces of the benchmark scripts: timing, environment facts, JSON and RESULTS.md output.

Timing method (both scripts): the function is jitted and called once per input set first (compile,
module load, kernel JIT and first-touch stay out of the numbers); then each *sample* dispatches
``n`` calls back to back, cycling through several pre-generated input sets, and blocks on the last
result; a sample's time divided by ``n`` is one per-call time. ``n`` is picked so that one sample
lasts about ``sample_s`` (a few ms on a GPU), which hides the host's dispatch cost behind the
device's work whenever the device is the slower of the two, as in a real decode loop. We report the
median and the 10th/90th percentiles over the samples.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    """A progress line (stdout, flushed, prefixed with the wall time since import)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


_T0 = time.perf_counter()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    calls_per_sample: int
    first_call_s: float  # compile + first run (jit trace, XLA compile, kernel JIT, autotuning)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _block(out: Any) -> None:
    import jax

    jax.block_until_ready(out)


def measure(
    fn: Callable[..., Any],
    arg_sets: Sequence[tuple[Any, ...]],
    *,
    budget_s: float,
    sample_s: float,
    min_samples: int = 5,
    max_samples: int = 200,
    first_call_s: float | None = None,
) -> Timing:
    """Time ``fn(*args)`` rotating over ``arg_sets`` (see the module docstring).

    ``budget_s`` bounds the timed part (at least ``min_samples`` samples of one call each run
    regardless). ``first_call_s``: pass it when the caller already made the first call.
    """
    r = len(arg_sets)
    if first_call_s is None:
        t0 = time.perf_counter()
        _block(fn(*arg_sets[0]))
        first_call_s = time.perf_counter() - t0
    # One pipelined pass over every input set: warms each set's buffers and estimates a call.
    t0 = time.perf_counter()
    out = None
    for a in arg_sets:
        out = fn(*a)
    _block(out)
    est = max((time.perf_counter() - t0) / r, 1e-7)
    n = int(min(1000, max(1, round(sample_s / est))))
    if est > 0.05:  # a slow path: fewer samples than asked rather than blowing the budget
        min_samples = min(min_samples, 3)
    samples = int(min(max_samples, max(min_samples, budget_s / (n * est))))
    times = []
    i = 0
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*arg_sets[i % r])
            i += 1
        _block(out)
        times.append((time.perf_counter() - t0) / n)
    t = np.asarray(times)
    return Timing(
        median_s=float(np.median(t)),
        p10_s=float(np.percentile(t, 10)),
        p90_s=float(np.percentile(t, 90)),
        samples=samples,
        calls_per_sample=n,
        first_call_s=float(first_call_s),
    )


def rel_l2(y: Any, ref: Any) -> float:
    """``||y - ref|| / ||ref||`` in float64 (NaN anywhere gives NaN, which never passes a check)."""
    a = np.asarray(y, dtype=np.float64) if not hasattr(y, "dtype") else np.asarray(y).astype(np.float64)
    b = np.asarray(ref).astype(np.float64)
    den = float(np.linalg.norm(b))
    num = float(np.linalg.norm(a - b))
    if not math.isfinite(num) or not math.isfinite(den):
        return float("nan")
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


# ---------------------------------------------------------------------------------------------
# Environment facts
# ---------------------------------------------------------------------------------------------


def set_gpu_memory_fraction(default: str = "0.85") -> None:
    """Let XLA's pool take more than its default 75% of the GPU (the FFI's own buffers live outside
    it, so not all of it). Must run before JAX initialises a backend; a value already set wins."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", default)


def device_info() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    info: dict[str, Any] = {
        "platform": dev.platform,
        "kind": dev.device_kind,
        "count": jax.device_count(),
        "compute_capability": str(getattr(dev, "compute_capability", "")) or None,
        "memory_bytes_limit": None,
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
    }
    try:
        stats = dev.memory_stats() or {}
        info["memory_bytes_limit"] = stats.get("bytes_limit")
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        pass
    if dev.platform == "gpu":
        info["num_sms"] = getattr(dev, "core_count", None)
    return info


def memory_limit() -> int | None:
    return device_info()["memory_bytes_limit"]


def versions(extra: dict[str, str | None] | None = None) -> dict[str, Any]:
    import jax
    import jaxlib

    import jax_megamoe

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "jax_megamoe": jax_megamoe.__version__,
    }
    try:
        import flax

        out["flax"] = flax.__version__
    except ImportError:
        out["flax"] = None
    try:
        import jax.extend as je

        out["platform_version"] = je.backend.get_backend().platform_version
    except Exception:  # noqa: BLE001
        out["platform_version"] = None
    try:
        from jax_megamoe._src.kernels import _ffi

        st = _ffi.status()
        out["ffi_library"] = st.library
        out["ffi_build"] = st.build_info
        out["ffi_registered"] = st.registered
        out["ffi_reason"] = st.reason
        if st.headers is not None:
            out["deepgemm_headers"] = st.headers.version
        if st.toolchain is not None:
            out["nvcc"] = ".".join(str(v) for v in st.toolchain.version)
    except Exception as e:  # noqa: BLE001
        out["ffi_reason"] = f"{type(e).__name__}: {e}"
    git = _git_head()
    if git:
        out["git_head"] = git
    if extra:
        out.update(extra)
    return out


def _git_head() -> str | None:
    head = REPO / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            p = REPO / ".git" / ref[5:]
            if p.is_file():
                return p.read_text().strip()[:12]
            packed = REPO / ".git" / "packed-refs"
            for line in packed.read_text().splitlines() if packed.is_file() else []:
                if line.endswith(ref[5:]):
                    return line.split()[0][:12]
            return None
        return ref[:12]
    except OSError:
        return None


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


# ---------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """NaN / inf -> None (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a partial run leaves the previous complete file, then the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=1, default=_json_default, allow_nan=False) + "\n")
    os.replace(tmp, path)


RESULTS_TEMPLATE = """# Benchmark results

Filled by the benchmark scripts (`--write-results benchmarks/RESULTS.md`, or later from their JSON
with `--from-json benchmarks/results/<name>.json --write-results benchmarks/RESULTS.md`). Each script
replaces only its own section between the markers below. How to run them, what each path is and how
the roofline is computed: [README.md](README.md). Raw numbers: `results/*.json`.

<!-- BEGIN moe_layer -->
*Not run yet.* `python benchmarks/moe_layer.py --write-results benchmarks/RESULTS.md` fills this section.
<!-- END moe_layer -->

<!-- BEGIN ffi_overhead -->
*Not run yet.* `python benchmarks/ffi_overhead.py --write-results benchmarks/RESULTS.md` fills this section.
<!-- END ffi_overhead -->
"""


def replace_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``path``
    (creating the file from the template, or appending the markers, when they are missing)."""
    path = Path(path)
    text = path.read_text() if path.is_file() else RESULTS_TEMPLATE
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pat.search(text):
        text = pat.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
