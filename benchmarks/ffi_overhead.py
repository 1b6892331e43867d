"""FFI overhead: the same pre-dispatch cubin launched by a minimal CuPy harness vs through XLA.

The pre-dispatch kernel (DeepGEMM's ``sm90_mega_moe_pre_dispatch_kernel``, compiled by our JIT with
``jmm_compile_pre_dispatch``) is loaded twice in one process:

* outside XLA: ``cupy.RawModule(path=cubin)``, launched with the argument block of
  ``ffi/jit/kernels.h`` (``Sm90PreDispatchArgs``) and the geometry of ``ffi/handlers/pre_dispatch.h``
  (grid ``T + ceil((P - T) * K / (H / 8))``, block ``H / 8``, plus the two pad-row memsets when P > T);
* through XLA: ``jax.jit(ops.pre_dispatch(..., backend="ffi"))``, the registered custom call.

Both write the same bytes (checked). Times per call, for several token counts T (= capacity P, so no
pad memsets, plus one T < P case):

  cupy graph      N launches captured in a CUDA graph, replayed, CUDA events: the kernel's device time
  cupy eager      N eager launches between CUDA events (host-bound when the kernel is shorter than
                  CuPy's ~5-10 us Python launch cost)
  cupy host       wall time per eager launch (no sync): the harness's own launch cost
  jax sync        one jitted call + block_until_ready, per call (what a lone call costs end to end)
  jax pipelined   N jitted calls dispatched back to back, one block at the end
  jax unrolled    N custom calls in ONE jitted function (``lax.scan(..., unroll=True)``, each call fed
                  the previous call's weights): XLA's per-custom-call cost on the device timeline,
                  without Python dispatch
  jax unrolled, graph target
                  the same through the ``_graph`` targets (``JAX_MEGAMOE_GRAPH_TARGETS=1``) with XLA
                  command buffers allowed to capture custom calls (compiler options of that jit)
  jax fori        the same in a rolled ``lax.fori_loop`` (adds XLA's while-loop iteration cost)
  xla trivial     the same fori_loop with a trivial XLA fusion instead of the custom call: XLA's cost
                  per loop iteration with its own kernel, for comparison

Reported differences: pipelined - cupy eager (per call from Python), unrolled - cupy graph (per
custom call inside a graph of XLA). Skips cleanly (exit 0, reason in the JSON) without a CUDA GPU,
without the FFI library, or without CuPy (then only the JAX side runs).

    python -m benchmarks.ffi_overhead [--quick] [--out DIR] [--write-results FILE.md]
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import _common as C

SCHEMA = "jax_megamoe.benchmarks.ffi_overhead/1"
HIDDEN, TOP_K, NUM_EXPERTS = 4096, 6, 256  # V4-Flash
CASES = ((1, 1), (128, 128), (4096, 4096), (1, 128))  # (T, P)
QUICK_CASES = ((1, 1), (128, 128), (1, 128))
#: Per-executable XLA options for the graph-target variant: command buffers may hold custom calls.
GRAPH_OPTIONS = {"xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL", "xla_gpu_graph_min_graph_size": 1}


def launch_geometry(t: int, p: int, h: int, k: int) -> tuple[int, int]:
    """(grid, block) of one pre-dispatch launch, as ``plan_pre_dispatch`` in ffi/handlers/pre_dispatch.cc."""
    block = h // 8
    return t + -(-((p - t) * k) // block), block


def make_host_inputs(t: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng([seed, t])
    x = rng.standard_normal((t, HIDDEN), dtype=np.float32).astype(ml_dtypes.bfloat16)
    idx = np.argsort(rng.random((t, NUM_EXPERTS)), axis=1)[:, :TOP_K].astype(np.int32)
    w = rng.random((t, TOP_K), dtype=np.float32)
    return x, idx, w


def _median(v: list[float]) -> float:
    return float(np.median(np.asarray(v)))


# ---------------------------------------------------------------------------------------------
# CuPy harness
# ---------------------------------------------------------------------------------------------


class CupyPreDispatch:
    def __init__(self, cubin: str, symbol: str):
        import cupy

        self.cp = cupy
        self.module = cupy.RawModule(path=cubin)
        self.kernel = self.module.get_function(symbol)

    def setup(self, x: np.ndarray, idx: np.ndarray, w: np.ndarray, p: int, rsf: float) -> None:
        cp = self.cp
        t = x.shape[0]
        self.t, self.p = t, p
        self.x = cp.asarray(x.view(np.uint16))
        self.idx = cp.asarray(idx)
        self.w = cp.asarray(w)
        self.bx = cp.empty((p, HIDDEN), cp.uint8)
        self.bsf = cp.empty((p, HIDDEN // 128), cp.float32)
        self.bidx = cp.empty((p, TOP_K), cp.int64)
        self.bw = cp.empty((p, TOP_K), cp.float32)
        self.grid, self.block = launch_geometry(t, p, HIDDEN, TOP_K)
        self.args = (
            self.x,
            self.idx,
            self.w,
            self.bx,
            self.bsf,
            self.bidx,
            self.bw,
            np.uint32(t),
            np.uint32(p),
            np.uint32(HIDDEN),
            np.uint32(HIDDEN // 128),
            np.uint32(TOP_K),
            np.float32(rsf),
        )

    def launch(self, stream) -> None:
        if self.p > self.t:  # the handler zeroes the pad rows of x_q and x_sf first
            rt = self.cp.cuda.runtime
            rt.memsetAsync(self.bx.data.ptr + self.t * HIDDEN, 0, (self.p - self.t) * HIDDEN, stream.ptr)
            rt.memsetAsync(self.bsf.data.ptr + self.t * HIDDEN // 32, 0, (self.p - self.t) * HIDDEN // 32, stream.ptr)
        self.kernel((self.grid,), (self.block,), self.args, stream=stream)

    def outputs(self) -> tuple[np.ndarray, ...]:
        self.cp.cuda.Device().synchronize()
        return tuple(a.get() for a in (self.bx, self.bsf, self.bidx, self.bw))

    def time(self, n: int, repeats: int) -> dict[str, float]:
        cp = self.cp
        s = cp.cuda.Stream(non_blocking=True)
        for _ in range(10):
            self.launch(s)
        s.synchronize()
        eager, host = [], []
        for _ in range(repeats):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            t0 = time.perf_counter()
            e0.record(s)
            for _ in range(n):
                self.launch(s)
            e1.record(s)
            host.append((time.perf_counter() - t0) / n)
            e1.synchronize()
            eager.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3 / n)
        out = {"cupy_eager_s": _median(eager), "cupy_host_launch_s": _median(host)}
        try:
            s.begin_capture()
            for _ in range(n):
                self.launch(s)
            g = s.end_capture()
            g.launch(s)
            s.synchronize()
            reps = []
            for _ in range(repeats):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record(s)
                g.launch(s)
                e1.record(s)
                e1.synchronize()
                reps.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3 / n)
            out["cupy_graph_s"] = _median(reps)
        except Exception as e:  # noqa: BLE001
            out["cupy_graph_s"] = None
            out["cupy_graph_error"] = f"{type(e).__name__}: {e}"
        return out


# ---------------------------------------------------------------------------------------------
# JAX side
# ---------------------------------------------------------------------------------------------


def jax_timings(x, idx, w, p: int, n: int, repeats: int, unroll: int) -> dict[str, Any]:
    from jax_megamoe import ops
    from jax_megamoe import policy as _policy

    pd = partial(ops.pre_dispatch, mode="fp8", num_max_tokens=p, backend="ffi")
    f = jax.jit(pd)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    jax.block_until_ready(f(x, idx, w))
    out["jax_first_call_s"] = time.perf_counter() - t0
    for _ in range(10):
        jax.block_until_ready(f(x, idx, w))
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, idx, w))
        lat.append(time.perf_counter() - t0)
    out["jax_sync_s"] = _median(lat)
    pipe = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = None
        for _ in range(n):
            r = f(x, idx, w)
        jax.block_until_ready(r)
        pipe.append((time.perf_counter() - t0) / n)
    out["jax_pipelined_s"] = _median(pipe)

    t = x.shape[0]
    if t == p:  # each call's weights output feeds the next call (rsf = 1: same values): nothing can be hoisted

        def body(x_, idx_, ww, call=pd):
            return call(x_, idx_, ww).topk_weights

        def unrolled(x_, idx_, w_, call=pd):
            return lax.scan(lambda c, _: (body(x_, idx_, c, call), None), w_, None, length=unroll, unroll=True)[0]

        def rolled(x_, idx_, w_):
            return lax.fori_loop(0, n, lambda _, c: body(x_, idx_, c), w_)

        def trivial(w_):
            return lax.fori_loop(0, n, lambda _, c: c * jnp.float32(1.0000001), w_)

        out["jax_unrolled_s"] = _time_whole(jax.jit(unrolled), (x, idx, w), unroll, repeats)
        out["jax_fori_s"] = _time_whole(jax.jit(rolled), (x, idx, w), n, repeats)
        out["xla_trivial_fori_s"] = _time_whole(jax.jit(trivial), (w,), n, repeats)
        # The same unrolled calls through the targets that declare CUDA-graph compatibility, with
        # XLA's command buffers allowed to capture custom calls (best effort: the reason if not).
        # (The process policy is read once: the twin is asked for through policy=, not the environment.)
        pd_graph = partial(pd, policy=_policy.current().replace(graph_targets=True))
        try:
            g = jax.jit(partial(unrolled, call=pd_graph), compiler_options=GRAPH_OPTIONS)
            out["jax_unrolled_graph_s"] = _time_whole(g, (x, idx, w), unroll, repeats)
        except Exception as e:  # noqa: BLE001
            out["jax_unrolled_graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    else:
        out["in_graph_note"] = "in-graph loops need T == P (the weights output feeds the next call)"
    return out


def _time_whole(fn, args, calls: int, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    v = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        v.append((time.perf_counter() - t0) / calls)
    return _median(v)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def skip_reason() -> str | None:
    """Why this benchmark cannot run here (None when it can)."""
    import jax_megamoe
    from jax_megamoe import ops

    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return f"no CUDA GPU (default JAX device: {dev.platform})"
    arch = ops.device_arch()
    if arch != 9:
        return f"the harness launches the sm_90 pre-dispatch kernel; this GPU is sm_{arch}x ({dev.device_kind})"
    if not jax_megamoe.register():
        return "FFI library not usable: " + "; ".join(jax_megamoe.describe().splitlines())
    return None


def pre_dispatch_cubin() -> tuple[str, list[str]]:
    """The sm_90 pre-dispatch cubin the custom call launches (compiled by the library's kernel JIT)
    and its pre-dispatch entry symbols. The one private access of the benchmarks: this script
    times that very cubin outside XLA, which no public function hands out."""
    from jax_megamoe._src.kernels import _ffi

    cubin = _ffi.compile_pre_dispatch(90, 0)
    return cubin, [s for s in _ffi.cubin_kernel_symbols(cubin) if "pre_dispatch" in s]


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "date": C.utc_now(),
        "command": C.command_line(),
        "device": C.device_info(),
        "shape": {"hidden": HIDDEN, "top_k": TOP_K},
        "cases": [],
    }
    reason = skip_reason()
    result["versions"] = C.versions()
    if reason:
        result["skipped"] = reason
        C.log(f"skipped: {reason}")
        return result
    t0 = time.perf_counter()
    cubin, syms = pre_dispatch_cubin()
    result["cubin"] = cubin
    result["symbol"] = syms[0] if syms else None
    C.log(f"cubin {cubin} ({time.perf_counter() - t0:.1f} s), entry {result['symbol']}")
    harness = None
    try:
        import cupy

        result["versions"]["cupy"] = cupy.__version__
        harness = CupyPreDispatch(cubin, syms[0])
    except Exception as e:  # noqa: BLE001
        result["cupy_skipped"] = f"CuPy harness unavailable: {type(e).__name__}: {e}"
        C.log(result["cupy_skipped"])
    cases = QUICK_CASES if args.quick else CASES
    n = args.iters
    for t, p in cases:
        x_h, idx_h, w_h = make_host_inputs(t, args.seed)
        x, idx, w = jnp.asarray(x_h), jnp.asarray(idx_h), jnp.asarray(w_h)
        case: dict[str, Any] = {"tokens": t, "capacity": p, "grid_block": launch_geometry(t, p, HIDDEN, TOP_K)}
        case.update(jax_timings(x, idx, w, p, n, args.repeats, args.unroll))
        if harness is not None:
            harness.setup(x_h, idx_h, w_h, p, 1.0)
            harness.launch(harness.cp.cuda.Stream.null)
            got = harness.outputs()
            from jax_megamoe import ops

            ref = jax.block_until_ready(ops.pre_dispatch(x, idx, w, mode="fp8", num_max_tokens=p, backend="ffi"))
            want = (
                np.asarray(ref.x).view(np.uint8),
                np.asarray(ref.x_sf),
                np.asarray(ref.topk_idx).astype(np.int64),
                np.asarray(ref.topk_weights),
            )
            case["bit_exact_vs_xla"] = all(
                np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))
                for a, b in zip(got, want)
            )
            case.update(harness.time(n, args.repeats))
            if case.get("cupy_eager_s") is not None:
                case["overhead_pipelined_vs_eager_s"] = case["jax_pipelined_s"] - case["cupy_eager_s"]
                case["overhead_sync_vs_eager_s"] = case["jax_sync_s"] - case["cupy_eager_s"]
            if case.get("cupy_graph_s") is not None and case.get("jax_unrolled_s") is not None:
                case["overhead_unrolled_vs_graph_s"] = case["jax_unrolled_s"] - case["cupy_graph_s"]
        result["cases"].append(case)
        C.log(
            f"T={t} P={p}: "
            + ", ".join(
                f"{k[:-2]} {C.fmt_time(v)}" for k, v in case.items() if k.endswith("_s") and isinstance(v, float)
            )
            + (f", bit-exact {case['bit_exact_vs_xla']}" if "bit_exact_vs_xla" in case else "")
        )
    return result


COLUMNS = (
    ("cupy_graph_s", "CuPy graph"),
    ("cupy_eager_s", "CuPy eager"),
    ("cupy_host_launch_s", "CuPy host launch"),
    ("jax_sync_s", "JAX sync"),
    ("jax_pipelined_s", "JAX pipelined"),
    ("jax_unrolled_s", "JAX unrolled"),
    ("jax_unrolled_graph_s", "JAX unrolled, graph target"),
    ("jax_fori_s", "JAX fori"),
    ("xla_trivial_fori_s", "XLA trivial fori"),
    ("overhead_pipelined_vs_eager_s", "**pipelined - eager**"),
    ("overhead_unrolled_vs_graph_s", "**unrolled - graph**"),
)


def results_markdown(result: dict[str, Any]) -> str:
    dev, ver = result["device"], result.get("versions", {})
    lines = [
        "## FFI overhead (`python -m benchmarks.ffi_overhead`)",
        "",
        f"- device: **{dev.get('kind')}** ({dev.get('platform')}), date {result.get('date')}; "
        f"jax {ver.get('jax')}, cupy {ver.get('cupy', '-')}",
        f"- command: `{result.get('command')}`",
    ]
    if result.get("skipped"):
        lines += [f"- **skipped**: {result['skipped']}", ""]
        return "\n".join(lines)
    if result.get("cupy_skipped"):
        lines.append(f"- {result['cupy_skipped']}")
    lines += [
        f"- kernel: `{result.get('symbol')}`, H={result['shape']['hidden']}, K={result['shape']['top_k']}; "
        "per-call times (medians); definitions in the script's docstring",
        "",
        "| T | P | " + " | ".join(c[1] for c in COLUMNS) + " | same bytes |",
        "|---:|---:|" + "---:|" * len(COLUMNS) + "---|",
    ]
    for c in result["cases"]:
        cells = []
        for key, _ in COLUMNS:
            v = c.get(key)
            cells.append(
                ("+" if key.startswith("overhead") and v is not None and v > 0 else "") + C.fmt_time(v)
                if v is not None
                else "-"
            )
        lines.append(
            f"| {c['tokens']} | {c['capacity']} | " + " | ".join(cells) + f" | {c.get('bit_exact_vs_xla', '-')} |"
        )
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ffi_overhead",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="fewer cases and iterations")
    p.add_argument("--iters", type=int, default=None, help="calls per timed batch (default 500; --quick 200)")
    p.add_argument("--repeats", type=int, default=None, help="timed batches (default 7; --quick 5)")
    p.add_argument("--unroll", type=int, default=64, help="custom calls in the unrolled jitted function")
    p.add_argument("--out", default=str(C.REPO / "benchmarks" / "results"))
    p.add_argument("--write-results", default=None, help="also fill this RESULTS.md (its ffi_overhead section)")
    p.add_argument("--from-json", default=None, help="no measuring: re-render RESULTS.md from this JSON")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.iters is None:
        a.iters = 200 if a.quick else 500
    if a.repeats is None:
        a.repeats = 5 if a.quick else 7
    return a


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.ffi_overhead``; exits 0 with the reason in the JSON where it cannot run."""
    args = parse_args(argv)
    if args.from_json:
        import json

        result = json.loads(Path(args.from_json).read_text())
    else:
        result = run(args)
        out = Path(args.out) / "ffi_overhead.json"
        C.write_json(out, result)
        C.log(f"wrote {out}")
    md = results_markdown(result)
    if args.write_results:
        C.replace_section(Path(args.write_results), "ffi_overhead", md)
        C.log(f"wrote the ffi_overhead section of {args.write_results}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
