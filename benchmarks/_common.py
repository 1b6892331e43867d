"""Shared pieces of the benchmark scripts: timing, formatting, environment facts, JSON and
RESULTS.md sections.

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
RESULTS_DIR = REPO / "benchmarks" / "results"
GIB = 2**30


def log(msg: str) -> None:
    """A progress line (stdout, flushed, prefixed with the wall time since import)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


_T0 = time.perf_counter()


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


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


def first_line(e: BaseException, n: int = 300) -> str:
    """The first line of an exception's message (at most ``n`` characters), for one-line reasons."""
    s = str(e).strip().splitlines()
    s = s[0] if s else type(e).__name__
    return s[:n]


def fmt_bytes(n: float) -> str:
    """``1.5 GiB`` from a GiB on, else ``12 MiB``."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def fmt_rate(v: float | None, unit: str) -> str:
    """A rate with an SI prefix (``2.94 TB/s``, ``633 TFLOP/s``); ``-`` for none."""
    if not v:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if v >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def int_list(s: str) -> list[int]:
    """argparse type: ``"1,8,64"`` -> ``[1, 8, 64]`` (integers >= 1)."""
    import argparse

    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"{s!r}: need integers >= 1")
    return out


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
        out["ffi_registered"] = jax_megamoe.register()
        out["describe"] = jax_megamoe.describe()
    except Exception as e:  # noqa: BLE001
        out["ffi_registered"] = False
        out["describe"] = f"{type(e).__name__}: {e}"
    out["policy"] = policy_record()
    git = _git_head()
    if git:
        out["git_head"] = git
    if extra:
        out.update(extra)
    return out


def policy_record() -> dict[str, Any]:
    """The process policy (:func:`jax_megamoe.policy.current`) as JSON, with the fields that differ
    from the defaults under ``"non_default"`` (a run with any is a variant, not the headline)."""
    from jax_megamoe import policy

    cur, default = policy.current(), policy.Policy()
    # Settings that change results; where files live (Locations, the JIT cache) are machine facts.
    fields = [f.name for f in dataclasses.fields(cur) if f.name != "sources" and f.compare]
    rec: dict[str, Any] = {f: getattr(cur, f) for f in fields}
    rec["non_default"] = {
        f: f"{getattr(cur, f)} ({cur.source(f)})" for f in fields if getattr(cur, f) != getattr(default, f)
    }
    return rec


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

Sections filled by the benchmark scripts' ``--write-results FILE`` (each replaces only its own
section between the markers). The repository's benchmarks/RESULTS.md is instead rebuilt from the
JSON files by ``python -m benchmarks.report``.

<!-- BEGIN moe_layer -->
*Not run yet.* `python -m benchmarks.moe_layer --write-results FILE` fills this section.
<!-- END moe_layer -->

<!-- BEGIN ffi_overhead -->
*Not run yet.* `python -m benchmarks.ffi_overhead --write-results FILE` fills this section.
<!-- END ffi_overhead -->
"""


def replace_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``path``
    (creating the file from the template, or appending the markers, when they are missing)."""
    path = Path(path)
    text = path.read_text() if path.is_file() else RESULTS_TEMPLATE
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pat.search(text):
        text = pat.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
