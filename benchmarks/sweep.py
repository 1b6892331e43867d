"""Running the routed-expert layer sweep: inputs, checks, timing, roofline floors, the JSON record.

For each model (V4-Flash, V4-Pro) and token count T, every path of :mod:`benchmarks.baselines` runs
on the same weights and routing; its output is checked once on a fixed set of rows (64 rows spread
over T) against an oracle: the bf16-activation paths against a float32 evaluation of the same
function, the FP8-activation paths (``ffi``, ``fp8_*``) against the reference, which follows the
kernel's numerics. Then it is timed (``_common.measure``) and set against its roofline floor: the
weight bytes it must read (distinct experts hit x bytes per expert in its weight format) over the
measured HBM bandwidth, and the FLOPs ``2*T*K*(2I*H + H*I)`` over the measured matmul peak of its
MMA type; the floor is the larger. Everything goes into one JSON (``moe_layer.json``), saved after
every point; :mod:`benchmarks.report` draws the PNG and the tables from it.

The command line is ``python -m benchmarks.moe_layer`` (see ``--help`` and benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common as C
from benchmarks import baselines as B
from benchmarks import report
from benchmarks.baselines import (
    BF16,
    F8,
    F32,
    GIB,
    PATH_BY_NAME,
    PATHS,
    XLA_BF16,
    PathSpec,
    Shape,
    bytes_per_expert,
)
from jax_megamoe.layout import MoEWeights

SCHEMA = "jax_megamoe.benchmarks.moe_layer/1"
FULL_TOKENS = (1, 8, 64, 256, 1024, 4096)
QUICK_TOKENS = (1, 64, 1024)
SMOKE_TOKENS = (1, 16)
CHECK_ROWS = 64
USAGE = """One DeepSeek V4 routed-expert layer: FFI Mega MoE vs every pure-XLA MoE we know, swept over T.

    python -m benchmarks.moe_layer                        # full sweep, both models (GPU, ~9 min on an H100)
    python -m benchmarks.moe_layer --quick                # < 3 min on an H100
    python -m benchmarks.moe_layer --quick --cpu-smoke    # tiny shapes on CPU, < 60 s (CI)
    python -m benchmarks.moe_layer --from-json benchmarks/results/moe_layer.json   # re-draw the PNG

On a CPU device the layer shapes are always shrunk to tiny ones (as --cpu-smoke; the output says
so) unless --no-shrink is given. Writes moe_layer.json and moe_layer.png in --out; the paths are
listed in benchmarks/baselines.py, the method in benchmarks/README.md.
"""

#: Relative L2 tolerances of the per-point checks.
TOL = {
    # bf16 activations and weights, f32 accumulation, SwiGLU output rounded to bf16: vs the f32 oracle
    "bf16_vs_f32": 1e-2,
    # FP8 per-128 activations + FP8 requantised intermediate, as the kernel: vs the reference
    "fp8_vs_reference": 1e-2,
    # the reference itself vs the f32 oracle (differs by the FP8 activation quantisation only)
    "reference_vs_f32": 1e-1,
}


# =============================================================================================
# Floors
# =============================================================================================


def layer_flops(tokens: int, top_k: int, hidden: int, intermediate: int) -> int:
    """``2 * T * K * (2I*H + H*I)``: the two GEMMs of every routed (token, slot) pair."""
    return 2 * tokens * top_k * (2 * intermediate * hidden + hidden * intermediate)


def roofline(
    *,
    tokens: int,
    top_k: int,
    hidden: int,
    intermediate: int,
    distinct_experts: float,
    fmt: str,
    hbm_bytes_per_s: float,
    flops_per_s: float,
) -> dict[str, Any]:
    """The floor of one layer call: max(weight bytes / bandwidth, FLOPs / matmul peak)."""
    nbytes = distinct_experts * bytes_per_expert(fmt, hidden, intermediate)
    flops = layer_flops(tokens, top_k, hidden, intermediate)
    t_mem = nbytes / hbm_bytes_per_s
    t_math = flops / flops_per_s
    return {
        "weight_bytes": nbytes,
        "flops": flops,
        "t_memory_s": t_mem,
        "t_compute_s": t_math,
        "floor_s": max(t_mem, t_math),
        "bound": "memory" if t_mem >= t_math else "compute",
    }


def choose_experts(shape: Shape, limit_bytes: int | None, override: int | None, with_bf16: bool = True) -> Shape:
    """Reduce E when FP8 (+ bf16, when a bf16 path runs) copies of every expert would not fit in 60%
    of the device pool."""
    if override is not None:
        if override < shape.top_k:
            raise ValueError(f"--experts: {override} < top-k {shape.top_k}")
        note = "" if override == shape.full_experts else f"E reduced to {override} of {shape.full_experts} by --experts"
        return dataclasses.replace(shape, num_experts=override, e_note=note)
    if limit_bytes is None:
        return shape
    fp8 = bytes_per_expert("fp8", shape.hidden, shape.intermediate)
    bf16 = bytes_per_expert("bf16", shape.hidden, shape.intermediate) if with_bf16 else 0
    fit = int(0.6 * limit_bytes // (fp8 + bf16))
    if fit >= shape.num_experts:
        return shape
    e = max(shape.top_k, (fit // 32) * 32 or fit)
    what = f"FP8 ({fp8 * shape.full_experts / GIB:.1f} GiB)" + (
        f" + bf16 ({bf16 * shape.full_experts / GIB:.1f} GiB) copies" if with_bf16 else " copy"
    )
    note = (
        f"E reduced to {e} of {shape.full_experts}: the {what} of all {shape.full_experts} experts exceed 60% of the "
        f"{limit_bytes / GIB:.1f} GiB device pool; every path uses the same {e} experts and routing"
        + (" (the FP8-only paths fit more: --paths ffi,fp8w_capacity,fp8_capacity,fp8_ragged)" if with_bf16 else "")
    )
    return dataclasses.replace(shape, num_experts=e, e_note=note)


# =============================================================================================
# Ceilings
# =============================================================================================


def measure_ceilings(*, small: bool, time_budget: float) -> dict[str, Any]:
    """HBM bandwidth (jitted ``a + 1`` over a large f32 array: bytes read + written) and matmul
    peaks (square bf16 and FP8 matmuls on random data)."""
    out: dict[str, Any] = {}
    n_copy = (4 if small else 512) * 2**20  # f32 elements: 16 MiB or 2 GiB
    a = jax.random.normal(jax.random.key(0), (n_copy,), F32)
    add = jax.jit(lambda v: v + 1.0)
    t = C.measure(add, [(a,)], budget_s=time_budget, sample_s=0.02 if not small else 0.05, min_samples=5)
    out["hbm_bytes_per_s"] = 2 * a.nbytes / t.median_s
    out["hbm_method"] = f"jit(a + 1) on f32[{n_copy}] ({a.nbytes / 2**20:.0f} MiB), read + write, median of {t.samples}"
    del a
    m = 512 if small else 8192
    ka, kb = jax.random.split(jax.random.key(1))
    x = jax.random.normal(ka, (m, m), F32).astype(BF16)
    y = jax.random.normal(kb, (m, m), F32).astype(BF16)
    mm = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=F32).astype(BF16))
    t = C.measure(mm, [(x, y)], budget_s=time_budget, sample_s=0.02 if not small else 0.05, min_samples=5)
    out["bf16_flops_per_s"] = 2 * m**3 / t.median_s
    out["bf16_method"] = f"{m}x{m}x{m} bf16 matmul (f32 accumulate, bf16 out), median of {t.samples}"
    try:
        xq, yq = x.astype(F8), y.astype(F8)
        mm8 = jax.jit(lambda p, q: jnp.dot(p, q.T, preferred_element_type=BF16))
        t = C.measure(mm8, [(xq, yq)], budget_s=time_budget, sample_s=0.02 if not small else 0.05, min_samples=5)
        out["fp8_flops_per_s"] = 2 * m**3 / t.median_s
        out["fp8_method"] = f"{m}x{m}x{m} e4m3 matmul (A @ B^T, bf16 out), median of {t.samples}"
    except Exception as e:  # noqa: BLE001
        out["fp8_flops_per_s"] = None
        out["fp8_method"] = f"skipped: {type(e).__name__}: {C.first_line(e)}"
    return out


def compute_peaks(ceil: dict[str, Any]) -> dict[str, float]:
    """Matmul peak per MMA input type. An FP8 matmul slower than bf16 is not a native FP8 GEMM, so
    FP8-MMA floors then use the bf16 peak (never a floor above what bf16 MMAs reach)."""
    bf16 = ceil["bf16_flops_per_s"]
    return {"bf16": bf16, "fp8": max(bf16, ceil.get("fp8_flops_per_s") or 0.0)}


# =============================================================================================
# Input sets
# =============================================================================================


@dataclasses.dataclass
class InputSets:
    """One point's rotating input sets and what the floors and checks need to know about them."""

    sets: list[tuple[jax.Array, jax.Array, jax.Array]]  # (x bf16 [T,H], idx int32 [T,K], w f32 [T,K])
    idx_host: list[np.ndarray]
    capacity: int  # the largest expert load over the sets (no token is ever dropped)
    distinct: float  # mean distinct experts hit per set
    check_rows: np.ndarray


def make_inputs(shape: Shape, t: int, n_sets: int, seed: int) -> InputSets:
    """``n_sets`` random (x, uniform top-K routing) sets of ``t`` tokens, deterministic in the seed."""
    rng = np.random.default_rng([seed, t, shape.num_experts])
    sets, hosts, loads, distinct = [], [], [], []
    for _ in range(n_sets):
        x = rng.standard_normal((t, shape.hidden), dtype=np.float32)
        idx, w = B.make_routing(t, shape.num_experts, shape.top_k, shape.rho, rng)
        sets.append((jnp.asarray(x, BF16), jnp.asarray(idx), jnp.asarray(w)))
        hosts.append(idx)
        loads.append(np.bincount(idx.reshape(-1), minlength=shape.num_experts).max())
        distinct.append(len(np.unique(idx)))
    if t >= CHECK_ROWS:
        rows = np.unique(np.round(np.linspace(0, t - 1, CHECK_ROWS)).astype(np.int64))
    else:
        rows = np.arange(CHECK_ROWS) % t  # fixed size: one oracle compile per model
    return InputSets(sets, hosts, int(max(loads)), float(np.mean(distinct)), rows)


# =============================================================================================
# The sweep
# =============================================================================================


class PathState:
    """What one run learns about its paths as it goes, shared by the sweep and ``decode_step``:
    paths skipped from now on and why (``sticky``), failures so far, the tokamax configuration
    that runs here. ``include_reference``: time the reference on a GPU too; ``gather_max_gib``:
    the largest weight gather of a gather path (None: 8 GiB or a quarter of the free pool)."""

    def __init__(self, *, include_reference: bool = False, gather_max_gib: float | None = None):
        self.platform = jax.devices()[0].platform
        self.include_reference = include_reference
        self.gather_max_gib = gather_max_gib
        self.sticky: dict[str, str] = {}  # path -> reason it is skipped from now on
        self.fail_count: dict[str, int] = {}
        self.tokamax_choice: tuple[str | None, Any] | None = None
        self.tokamax_note = ""

    def static_skip(self, p: PathSpec) -> str | None:
        """Why ``p`` cannot run here at all (None when it may)."""
        if p.name in self.sticky:
            return self.sticky[p.name]
        if p.gpu_only and self.platform != "gpu":
            return f"no GPU ({self.platform}): {p.gpu_only}"
        if p.name == "reference" and self.platform == "gpu" and not self.include_reference:
            return "reference is timed on CPU only (pass --include-reference on a GPU)"
        if p.name == "tokamax_ragged":
            err = B.tokamax_import_error()
            if err:
                return err
        return None

    def gather_limit(self, resident_bytes: int) -> float:
        """The largest weight gather one call of a gather path may materialise, next to
        ``resident_bytes`` of weights already on the device."""
        if self.gather_max_gib is not None:
            return self.gather_max_gib * GIB
        lim = C.memory_limit()
        if lim is None:
            return 2 * GIB
        return min(8 * GIB, 0.25 * max(0, lim - resident_bytes))

    def classify(self, e: BaseException, name: str) -> tuple[str, str]:
        """``(status, reason)`` of a path that raised ``e``; unavailable / unsupported paths and
        paths that failed twice are skipped from then on."""
        from jax_megamoe import ops

        msg = f"{type(e).__name__}: {C.first_line(e)}"
        text = str(e)
        if isinstance(e, ops.BackendUnavailableError):
            self.sticky[name] = f"unavailable: {C.first_line(e)}"
            return "skipped", self.sticky[name]
        if isinstance(e, NotImplementedError) or any(
            s in text
            for s in (
                "UNIMPLEMENTED",
                "not implemented",
                "Not implemented",
                "not supported",
                "Unsupported",
                "unsupported",
                "MLIR translation rule",
                "No such compile option",
            )
        ):
            self.sticky[name] = f"not supported here: {msg}"
            return "skipped", self.sticky[name]
        if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
            return "skipped", f"out of memory: {msg}"
        self.fail_count[name] = self.fail_count.get(name, 0) + 1
        if self.fail_count[name] >= 2:
            self.sticky[name] = f"failed twice, not retried: {msg}"
        return "failed", msg

    def ok(self, name: str) -> None:
        """``name`` ran: its failure count starts again."""
        self.fail_count.pop(name, None)

    def pick_tokamax(self, clamp: float | None, inputs: tuple[Any, ...], w13t, w2t) -> tuple[str | None, Any]:
        """The first tokamax configuration that compiles and runs here on ``inputs`` (Mosaic GPU
        kernel first), remembered for the rest of the run."""
        if self.tokamax_choice is not None:
            return self.tokamax_choice
        notes = []
        for impl, dt in (("mosaic", F32), ("mosaic", BF16), (None, F32)):
            try:
                fn = jax.jit(partial(B.tokamax_ragged, clamp=clamp, implementation=impl, out_dtype=dt))
                jax.block_until_ready(fn(*inputs, w13t, w2t))
            except Exception as e:  # noqa: BLE001
                notes.append(
                    f"implementation={impl!r} out={jnp.dtype(dt).name}: {type(e).__name__}: {C.first_line(e, 160)}"
                )
                continue
            self.tokamax_choice = (impl, dt)
            self.tokamax_note = f"implementation={impl!r}, out={jnp.dtype(dt).name}" + (
                f" (tried first: {'; '.join(notes)})" if notes else ""
            )
            return self.tokamax_choice
        raise RuntimeError("no tokamax ragged_dot implementation ran: " + "; ".join(notes))


class Sweep:
    """One sweep: every model, T and path of the command line, into ``self.result`` (the JSON)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t_start = time.time()
        self.deadline = self.t_start + args.budget_s
        if args.deadline:
            self.deadline = min(self.deadline, args.deadline) if args.budget_given else args.deadline
        self.state = PathState(include_reference=args.include_reference, gather_max_gib=args.gather_max_gib)
        self.result: dict[str, Any] = {}
        self.ffi_warm: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.model_deadline = self.deadline

    # ---- helpers ------------------------------------------------------------------------

    def out_json(self) -> Path:
        return Path(self.args.out) / "moe_layer.json"

    def save(self) -> None:
        C.write_json(self.out_json(), self.result)

    def remaining(self) -> float:
        return min(self.deadline, self.model_deadline) - time.time()

    def share_time(self, models_left: int) -> None:
        """Give the next model an equal share of the time left (a slow model cannot starve the next)."""
        now = time.time()
        self.model_deadline = now + max(0.0, self.deadline - now) / max(1, models_left)

    def wanted(self) -> list[PathSpec]:
        names = self.args.paths
        return [p for p in PATHS if names is None or p.name in names]

    def wants_bf16(self) -> bool:
        """Whether any wanted path reads the bf16 copy (the FP8-only paths fit full V4-Pro on an H100)."""
        return any(p.weight_format == "bf16" for p in self.wanted())

    # ---- per model ------------------------------------------------------------------------

    def run_model(self, shape: Shape, tokens: list[int]) -> dict[str, Any]:
        a = self.args
        C.log(
            f"{shape.name}: H={shape.hidden} I={shape.intermediate} E={shape.num_experts} K={shape.top_k} "
            f"rho={shape.rho} clamp={shape.clamp}" + (f" [{shape.e_note}]" if shape.e_note else "")
        )
        t0 = time.perf_counter()
        weights = B.random_fp8_weights(shape, a.seed)
        w13t = w2t = None
        if self.wants_bf16():
            w13t, w2t = B.dequantize_all_bf16(weights)
        jax.block_until_ready((weights, w13t, w2t))
        setup_s = time.perf_counter() - t0
        fp8_b = bytes_per_expert("fp8", shape.hidden, shape.intermediate) * shape.num_experts
        bf16_b = bytes_per_expert("bf16", shape.hidden, shape.intermediate) * shape.num_experts
        C.log(
            f"{shape.name}: weights FP8 {fp8_b / GIB:.2f} GiB"
            + (f" + bf16 {bf16_b / GIB:.2f} GiB" if w13t is not None else " (no bf16 path asked for)")
            + f" ready in {setup_s:.1f} s"
        )
        model = {
            "name": shape.name,
            "hidden": shape.hidden,
            "intermediate": shape.intermediate,
            "num_experts": shape.num_experts,
            "full_experts": shape.full_experts,
            "top_k": shape.top_k,
            "routed_scaling_factor": shape.rho,
            "activation_clamp": shape.clamp,
            "e_note": shape.e_note,
            "weight_bytes": {"fp8": fp8_b, "bf16": bf16_b},
            "bytes_per_expert": {f: bytes_per_expert(f, shape.hidden, shape.intermediate) for f in ("fp8", "bf16")},
            "setup_s": setup_s,
            "points": [],
        }
        ctx = ModelCtx(shape, weights, w13t, w2t)
        self.result["models"].append(model)
        if "ffi" in [p.name for p in self.wanted()] and self.state.static_skip(PATH_BY_NAME["ffi"]) is None:
            self.prewarm_ffi(ctx, tokens)
        try:
            for t in tokens:
                if self.remaining() <= 0:
                    model["points"].append({"tokens": t, "skipped": "time budget exhausted (--budget-s / --deadline)"})
                    C.log(f"{shape.name} T={t}: skipped, time budget exhausted")
                    self.save()
                    continue
                try:
                    model["points"].append(self.run_point(ctx, t))
                except Exception as e:  # noqa: BLE001 - e.g. the oracle ran out of memory: next point
                    C.log(f"{shape.name} T={t}: failed: {type(e).__name__}: {C.first_line(e)}")
                    if a.verbose:
                        traceback.print_exc()
                    model["points"].append({"tokens": t, "skipped": f"failed: {type(e).__name__}: {C.first_line(e)}"})
                    gc.collect()
                self.save()
        finally:
            self.ffi_warm.clear()
            ctx.free()
            del weights, w13t, w2t
            gc.collect()
        return model

    def prewarm_ffi(self, ctx: ModelCtx, tokens: list[int]) -> None:
        """Detect the FFI path once (trace only), then compile + first-run it for every T in
        background threads: the mega kernel's nvcc JIT (per token count) overlaps the XLA paths."""
        shape = ctx.shape
        inp = make_inputs(shape, tokens[0], 1, self.args.seed + 99)
        fn = ctx.ffi_fn = self.ffi_jit(shape)
        try:
            fn.lower(*inp.sets[0], ctx.weights)
        except Exception as e:  # noqa: BLE001
            self.state.sticky["ffi"] = self.state.classify(e, "ffi")[1]
            C.log(f"ffi: skipped: {self.state.sticky['ffi']}")
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, self.args.ffi_prewarm))

        def warm(t: int) -> float:
            s = make_inputs(shape, t, 1, self.args.seed + 99).sets[0]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*s, ctx.weights))
            return time.perf_counter() - t0

        for t in tokens:
            self.ffi_warm[t] = self._pool.submit(warm, t)

    def ffi_jit(self, shape: Shape):
        a = self.args
        return jax.jit(
            partial(B.ffi_mega_moe, clamp=shape.clamp, cap=a.ffi_num_max_tokens, reserved_sms=a.ffi_reserved_sms)
        )

    # ---- per point ------------------------------------------------------------------------

    def run_point(self, ctx: ModelCtx, t: int) -> dict[str, Any]:
        a, shape = self.args, ctx.shape
        inp = make_inputs(shape, t, a.sets, a.seed)
        x0, i0, w0 = inp.sets[0]
        rows = jnp.asarray(inp.check_rows)
        xs, is_, ws = x0[rows], i0[rows], w0[rows]
        y_f32 = np.asarray(B.f32_oracle(xs, is_, ws, ctx.weights, clamp=shape.clamp))
        ref_cache: list[np.ndarray] = []

        def y_ref() -> np.ndarray:
            if not ref_cache:
                ref_cache.append(
                    np.asarray(B.reference_mega_moe(xs, is_, ws, ctx.weights, clamp=shape.clamp)).astype(np.float32)
                )
            return ref_cache[0]

        peaks = compute_peaks(self.result["ceilings"])
        ceil = self.result["ceilings"]
        floors = {}
        for fmt, mma in (("bf16", "bf16"), ("fp8", "fp8"), ("fp8", "bf16")):
            floors[f"{fmt}_weights_{mma}_mma"] = roofline(
                tokens=t,
                top_k=shape.top_k,
                hidden=shape.hidden,
                intermediate=shape.intermediate,
                distinct_experts=inp.distinct,
                fmt=fmt,
                hbm_bytes_per_s=ceil["hbm_bytes_per_s"],
                flops_per_s=peaks[mma],
            )
        point: dict[str, Any] = {
            "tokens": t,
            "distinct_experts": inp.distinct,
            "capacity": inp.capacity,
            "capacity_factor": inp.capacity * shape.num_experts / (t * shape.top_k),
            "flops": layer_flops(t, shape.top_k, shape.hidden, shape.intermediate),
            "floors": floors,
            "check_rows": len(inp.check_rows),
            "paths": {},
        }
        C.log(
            f"{shape.name} T={t}: {inp.distinct:.1f} distinct experts, capacity {inp.capacity}, floor "
            f"fp8 {C.fmt_time(floors['fp8_weights_fp8_mma']['floor_s'])} / bf16 {C.fmt_time(floors['bf16_weights_bf16_mma']['floor_s'])}"
        )
        for p in self.wanted():
            rec = self.run_path(ctx, p, t, inp, floors, y_f32, y_ref)
            point["paths"][p.name] = rec
            if rec["status"] == "ok":
                chk = rec["check"]
                C.log(
                    f"  {p.name:15s} {C.fmt_time(rec['median_s']):>10s} (p10 {C.fmt_time(rec['p10_s'])}, p90 "
                    f"{C.fmt_time(rec['p90_s'])}) {rec['time_over_floor']:7.1f}x floor  check {chk['oracle']} "
                    f"{chk['rel_l2']:.2e} {'ok' if chk['pass'] else 'FAIL'}"
                )
            else:
                C.log(f"  {p.name:15s} {rec['status']}: {rec['reason']}")
        point["best"] = best_of(point["paths"])
        del inp
        return point

    def path_args(self, ctx: ModelCtx, p: PathSpec, inp: InputSets):
        """(jitted function, path weights) or raises _Skip."""
        shape = ctx.shape
        clamp = shape.clamp
        if p.name == "ffi":
            if ctx.ffi_fn is None:
                ctx.ffi_fn = self.ffi_jit(shape)
            return ctx.ffi_fn, (ctx.weights,)
        if p.name == "reference":
            return jax.jit(partial(B.reference_mega_moe, clamp=clamp)), (ctx.weights,)
        if p.name in B.RAGGED_BACKENDS:
            return (
                jax.jit(partial(B.xla_ragged, clamp=clamp, out_dtype=BF16), compiler_options=B.RAGGED_BACKENDS[p.name]),
                (ctx.w13t, ctx.w2t),
            )
        if p.name in ("xla_gather", "xla_capacity", "xla_ragged", "tokamax_ragged"):
            wts = (ctx.w13t, ctx.w2t)
            if p.name == "xla_gather":
                return jax.jit(partial(B.xla_gather, clamp=clamp)), wts
            if p.name == "xla_capacity":
                return jax.jit(partial(B.xla_capacity, clamp=clamp, cap=inp.capacity)), wts
            if p.name == "xla_ragged":
                return jax.jit(partial(B.xla_ragged, clamp=clamp)), wts
            impl, dt = self.state.tokamax_choice or (None, F32)
            return jax.jit(partial(B.tokamax_ragged, clamp=clamp, implementation=impl, out_dtype=dt)), wts
        w = ctx.weights
        q = (w.l1, w.l1_sf, w.l2, w.l2_sf)
        if p.name == "fp8w_gather":
            return jax.jit(partial(B.fp8w_gather, clamp=clamp)), q
        if p.name == "fp8w_capacity":
            return jax.jit(
                partial(B.fp8w_capacity, clamp=clamp, cap=inp.capacity, group=ctx.expert_group(inp.capacity))
            ), q
        if p.name in ("fp8_gather", "fp8_capacity"):
            s1, s2 = ctx.scales()
            f = B.fp8_gather if p.name == "fp8_gather" else partial(B.fp8_capacity, cap=inp.capacity)
            return jax.jit(partial(f, clamp=clamp)), (w.l1, s1, w.l2, s2)
        if p.name == "fp8_ragged":
            need = bytes_per_expert("fp8", shape.hidden, shape.intermediate) * shape.num_experts
            lim = C.memory_limit()
            if ctx.blocked is None and lim is not None and ctx.resident_bytes() + need > 0.8 * lim:
                raise _Skip(
                    f"its K-blocked FP8 copy ({need / GIB:.1f} GiB) does not fit next to the other weights "
                    f"({ctx.resident_bytes() / GIB:.1f} GiB of a {lim / GIB:.1f} GiB pool); use --experts"
                )
            l1b, l2b = ctx.blocks()
            return jax.jit(partial(B.fp8_ragged, clamp=clamp)), (l1b, w.l1_sf, l2b, w.l2_sf)
        raise ValueError(p.name)

    def run_path(self, ctx: ModelCtx, p: PathSpec, t: int, inp: InputSets, floors, y_f32, y_ref) -> dict[str, Any]:
        shape = ctx.shape
        rec: dict[str, Any] = {"status": "skipped", "reason": None}
        reason = self.state.static_skip(p)
        if reason is None and p.gather:
            g = t * shape.top_k * bytes_per_expert(p.weight_format, shape.hidden, shape.intermediate)
            if p.weight_format == "fp8" and p.mma == "bf16":
                g += t * shape.top_k * bytes_per_expert("bf16", shape.hidden, shape.intermediate)  # + its bf16 copy
            if g > self.state.gather_limit(ctx.resident_bytes()):
                reason = (
                    f"gathering {t}x{shape.top_k} experts would materialise {C.fmt_bytes(g)} per call "
                    f"(limit {C.fmt_bytes(self.state.gather_limit(ctx.resident_bytes()))}, --gather-max-gib)"
                )
        if reason is None and p.name in ctx.oom and t >= ctx.oom[p.name]:
            reason = f"ran out of memory at T={ctx.oom[p.name]} (its memory grows with T)"
        if reason is None and self.remaining() <= 0:
            reason = "time budget exhausted (--budget-s / --deadline)"
        if reason is not None:
            rec["reason"] = reason
            return rec
        try:
            if p.name == "tokamax_ragged":
                self.state.pick_tokamax(shape.clamp, inp.sets[0], ctx.w13t, ctx.w2t)
            fn, wts = self.path_args(ctx, p, inp)
            call = _Bound(fn, wts)
            warm_s = None
            if p.name == "ffi" and t in self.ffi_warm:
                warm_s = self.ffi_warm[t].result()
            t0 = time.perf_counter()
            y0 = call(*inp.sets[0])
            jax.block_until_ready(y0)
            first = time.perf_counter() - t0
            y0 = np.asarray(y0).astype(np.float32)[inp.check_rows]
            check = self.check(p, y0, y_f32, y_ref)
            budget = min(self.args.time_per_path, max(0.0, self.remaining()))
            timing = C.measure(
                call,
                inp.sets,
                budget_s=budget,
                sample_s=self.args.sample_s,
                first_call_s=first,
                min_samples=self.args.min_samples,
            )
        except _Skip as e:
            rec["reason"] = str(e)
            return rec
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
            status, reason = self.state.classify(e, p.name)
            rec["status"], rec["reason"] = status, reason
            if reason.startswith("out of memory"):
                ctx.oom[p.name] = min(t, ctx.oom.get(p.name, t))
            if self.args.verbose:
                traceback.print_exc()
            gc.collect()
            return rec
        finally:
            ctx.blocked = None  # fp8_ragged's copy lives for one point only
        floor = floors[f"{p.weight_format}_weights_{p.mma}_mma"]
        rec.update(timing.as_dict())
        if warm_s is not None:
            rec["first_call_s"] = warm_s  # the background compile + first run
        rec.update(
            status="ok",
            check=check,
            floor_s=floor["floor_s"],
            floor_kind=f"{p.weight_format}_weights_{p.mma}_mma",
            time_over_floor=timing.median_s / floor["floor_s"],
            floor_fraction=floor["floor_s"] / timing.median_s,
            weight_bytes_touched=floor["weight_bytes"],
            achieved_weight_bytes_per_s=floor["weight_bytes"] / timing.median_s,
            achieved_flops_per_s=floor["flops"] / timing.median_s,
        )
        if p.name == "tokamax_ragged":
            rec["implementation"] = self.state.tokamax_note
        if p.name in ("xla_capacity", "fp8w_capacity", "fp8_capacity"):
            rec["capacity"] = inp.capacity
            rec["expert_rows_computed"] = inp.capacity * shape.num_experts
        self.state.ok(p.name)
        return rec

    def check(self, p: PathSpec, y, y_f32, y_ref) -> dict[str, Any]:
        rel_f32 = C.rel_l2(y, y_f32)
        out: dict[str, Any] = {"rel_l2_vs_f32": rel_f32}
        if p.name == "reference":
            out.update(oracle="f32", rel_l2=rel_f32, tol=TOL["reference_vs_f32"])
            out["rel_l2_vs_reference_rows"] = C.rel_l2(y, y_ref())
        elif p.oracle == "reference":
            r = C.rel_l2(y, y_ref())
            out.update(oracle="reference", rel_l2=r, tol=TOL["fp8_vs_reference"])
        else:
            out.update(oracle="f32", rel_l2=rel_f32, tol=TOL["bf16_vs_f32"])
        out["pass"] = bool(math.isfinite(out["rel_l2"]) and out["rel_l2"] <= out["tol"])
        return out


class _Skip(Exception):
    pass


class _Bound:
    """``fn(*inputs, *weights)`` as a callable of the inputs alone (what the timer rotates)."""

    def __init__(self, fn, wts):
        self.fn, self.wts = fn, wts

    def __call__(self, *inputs):
        return self.fn(*inputs, *self.wts)


class ModelCtx:
    """The weights of one model in every format the paths read (extra formats made on first use)."""

    def __init__(self, shape: Shape, weights: MoEWeights, w13t, w2t):
        self.shape, self.weights, self.w13t, self.w2t = shape, weights, w13t, w2t
        self._scales = None
        self.blocked = None  # fp8_ragged's K-blocked copy: made per point, dropped after the path ran
        self.ffi_fn = None  # one jitted FFI function per model (shared with the prewarm threads)
        self.oom: dict[str, int] = {}  # path -> smallest T that ran out of memory

    def scales(self):
        if self._scales is None:
            self._scales = B.scale_rows(self.weights)
        return self._scales

    def blocks(self):
        if self.blocked is None:
            self.blocked = B.blocked_fp8(self.weights)
        return self.blocked

    def resident_bytes(self) -> int:
        arrs = [self.weights.l1, self.weights.l1_sf, self.weights.l2, self.weights.l2_sf]
        if self.w13t is not None:
            arrs += [self.w13t, self.w2t]
        for extra in (self._scales, self.blocked):
            if extra is not None:
                arrs.extend(extra)
        return int(sum(a.nbytes for a in arrs))

    def expert_group(self, cap: int) -> int:
        """Experts per step of fp8w_capacity: their bf16 copies stay under ~1 GiB (a divisor of E)."""
        e = self.shape.num_experts
        per = bytes_per_expert("bf16", self.shape.hidden, self.shape.intermediate)
        g = max(1, min(e, GIB // per))
        while e % g:
            g -= 1
        return g

    def free(self) -> None:
        self._scales = self.blocked = self.ffi_fn = None
        self.weights = self.w13t = self.w2t = None


def best_of(paths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The point's summary: fastest passing bf16 XLA path, fastest passing path other than ``ffi``
    and ``reference``, and the FFI's speed-up over the latter."""

    def ok(n):
        r = paths.get(n)
        return r is not None and r["status"] == "ok" and r["check"]["pass"]

    def pick(names):
        c = [n for n in names if ok(n)]
        return min(c, key=lambda n: paths[n]["median_s"]) if c else None

    bf16 = pick(XLA_BF16)
    xla_any = pick([p.name for p in PATHS if p.name not in ("ffi", "reference")])
    out: dict[str, Any] = {"best_xla_bf16": bf16, "best_xla_any": xla_any}
    if bf16:
        out["best_xla_bf16_s"] = paths[bf16]["median_s"]
    if xla_any:
        out["best_xla_any_s"] = paths[xla_any]["median_s"]
    if ok("ffi") and xla_any:
        out["ffi_speedup_vs_best_xla"] = paths[xla_any]["median_s"] / paths["ffi"]["median_s"]
    return out


# =============================================================================================
# CLI
# =============================================================================================


def _experts(s: str) -> dict[str, int]:
    """argparse type of ``--experts``: ``N`` (every model) or ``flash=N,pro=M``."""
    out: dict[str, int] = {}
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = int(v)
        else:
            out["*"] = int(part)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.moe_layer", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="flash,pro", help="comma list of flash, pro (default both)")
    p.add_argument(
        "--tokens", type=C.int_list, default=None, help=f"token counts (default {FULL_TOKENS}; --quick {QUICK_TOKENS})"
    )
    p.add_argument("--quick", action="store_true", help="fewer token counts and shorter timing (< 3 min on an H100)")
    p.add_argument(
        "--cpu-smoke", action="store_true", help=f"tiny shapes, tokens {SMOKE_TOKENS} (implied on a CPU device)"
    )
    p.add_argument("--no-shrink", action="store_true", help="on a CPU device, keep the real layer shapes")
    p.add_argument("--experts", type=_experts, default={}, help="E for every model (N) or per model (flash=N,pro=M)")
    p.add_argument(
        "--paths", default=None, help="comma list of paths to run (default all): " + ", ".join(x.name for x in PATHS)
    )
    p.add_argument("--include-reference", action="store_true", help="also time the pure-JAX reference on a GPU")
    p.add_argument("--out", default=str(C.RESULTS_DIR), help="output folder (JSON + PNG)")
    p.add_argument("--write-results", default=None, help="also fill the moe_layer section of this markdown file")
    p.add_argument(
        "--from-json", default=None, help="no measuring: re-render the PNG (and --write-results) from this JSON"
    )
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new points after this many seconds")
    p.add_argument("--deadline", type=float, default=None, help="same, as a Unix time (wins over --budget-s)")
    p.add_argument("--time-per-path", type=float, default=None, help="seconds of timed samples per path and point")
    p.add_argument("--sample-s", type=float, default=None, help="target length of one timing sample (s)")
    p.add_argument("--min-samples", type=int, default=5)
    p.add_argument(
        "--sets", type=int, default=None, help="rotating input sets (x, routing) per point (default 4; CPU smoke 2)"
    )
    p.add_argument(
        "--gather-max-gib", type=float, default=None, help="largest per-call weight gather of the gather paths"
    )
    p.add_argument(
        "--ffi-prewarm",
        type=int,
        default=1,
        help="threads compiling the FFI path's token counts ahead (the JIT serialises nvcc runs anyway)",
    )
    p.add_argument(
        "--ffi-num-max-tokens",
        type=int,
        default=None,
        help="token cap of the FFI kernel's buffer for every T (default: each point's own T, the smallest); "
        "a larger T runs the kernel in chunks of the cap",
    )
    p.add_argument(
        "--ffi-reserved-sms", type=int, default=None, help="SMs the FFI kernel leaves free (default: the op's, 2)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing paths")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if m not in ("flash", "pro"):
            p.error(f"--models: unknown model {m!r} (flash, pro)")
    if a.paths is not None:
        a.paths = [s.strip() for s in a.paths.split(",") if s.strip()]
        bad = [s for s in a.paths if s not in PATH_BY_NAME]
        if bad:
            p.error(f"--paths: unknown {bad}; choose from {', '.join(PATH_BY_NAME)}")
    if a.sets is not None and a.sets < 1:
        p.error("--sets must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    """The sweep of the command line (``python -m benchmarks.moe_layer``); 2 when a check failed."""
    C.set_gpu_memory_fraction()
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        if args.out == str(C.RESULTS_DIR):
            args.out = str(Path(args.from_json).parent)
        report.render_moe_layer(result, Path(args.out), args.write_results)
        return 0
    dev = C.device_info()
    on_cpu = dev["platform"] == "cpu"
    smoke = args.cpu_smoke or (on_cpu and not args.no_shrink)
    if args.tokens is None:
        args.tokens = list(SMOKE_TOKENS if smoke else (QUICK_TOKENS if args.quick else FULL_TOKENS))
    args.budget_given = args.budget_s is not None or args.quick
    if args.budget_s is None:
        args.budget_s = 50.0 if smoke else (160.0 if args.quick else 540.0)
    if args.time_per_path is None:
        args.time_per_path = 0.03 if smoke else (0.12 if args.quick else 0.3)
    if args.sample_s is None:
        args.sample_s = 0.01 if on_cpu else 0.003
    if smoke:
        args.min_samples = min(args.min_samples, 3)
        if args.gather_max_gib is None:
            args.gather_max_gib = 1 / 16
    if args.sets is None:
        args.sets = 2 if smoke else 4
    shrink_note = ""
    if smoke:
        shrink_note = (
            "CPU smoke run: tiny stand-in shapes (flash -> H=512 I=256 E=16, pro -> H=1024 I=256 E=24, same K/rho/clamp); "
            "numbers say nothing about the real layers"
            + ("" if args.cpu_smoke else " (shrunk automatically on a CPU device; --no-shrink keeps the real shapes)")
        )
        C.log(shrink_note)
    sweep = Sweep(args)
    C.log(
        f"device {dev['kind']} ({dev['platform']}), pool {((dev['memory_bytes_limit'] or 0) / GIB):.1f} GiB; tokens {args.tokens}"
    )
    t0 = time.perf_counter()
    ceilings = measure_ceilings(small=smoke or on_cpu, time_budget=0.1 if smoke else 1.0)
    C.log(
        f"ceilings: HBM {ceilings['hbm_bytes_per_s'] / 1e9:.0f} GB/s, bf16 {ceilings['bf16_flops_per_s'] / 1e12:.1f} TFLOP/s, "
        f"fp8 "
        + (
            f"{ceilings['fp8_flops_per_s'] / 1e12:.1f} TFLOP/s"
            if ceilings.get("fp8_flops_per_s")
            else ceilings["fp8_method"]
        )
        + f" ({time.perf_counter() - t0:.1f} s)"
    )
    extra = {}
    if B.tokamax_import_error() is None:
        import tokamax

        extra["tokamax"] = getattr(tokamax, "__version__", "?")
    sweep.result = {
        "schema": SCHEMA,
        "date": C.utc_now(),
        "command": C.command_line(),
        "device": dev,
        "versions": C.versions(extra),
        "cpu_smoke": smoke,
        "shrink_note": shrink_note,
        "args": {k: v for k, v in vars(args).items()},
        "ceilings": ceilings,
        "tolerances": TOL,
        "check_rows": CHECK_ROWS,
        "timing_method": (
            "jit; first call (compile) excluded; samples of n back-to-back calls rotating over "
            f"{args.sets} pre-generated (x, routing) sets, blocked on the last; per-call = sample / n; "
            "median, p10, p90 over samples"
        ),
        "paths": {p.name: dataclasses.asdict(p) for p in PATHS},
        "models": [],
    }
    lim = dev["memory_bytes_limit"]
    for i, name in enumerate(args.models):
        sweep.share_time(len(args.models) - i)
        shape = B.model_shape(name, smoke=smoke)
        override = args.experts.get(name, args.experts.get("*"))
        shape = choose_experts(shape, None if smoke else lim, override, with_bf16=sweep.wants_bf16())
        try:
            sweep.run_model(shape, args.tokens)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory making the weights: the next model still runs
            C.log(f"{shape.name}: failed: {type(e).__name__}: {C.first_line(e)}")
            if args.verbose:
                traceback.print_exc()
            sweep.result["models"].append(
                {"name": shape.name, "error": f"{type(e).__name__}: {C.first_line(e)}", "points": []}
            )
            gc.collect()
    sweep.result["elapsed_s"] = time.time() - sweep.t_start
    sweep.result["skipped_paths"] = dict(sweep.state.sticky)
    sweep.save()
    if sweep._pool is not None:
        sweep._pool.shutdown(wait=False, cancel_futures=True)
    C.log(f"wrote {sweep.out_json()}")
    report.render_moe_layer(sweep.result, Path(args.out), args.write_results)
    print("== summary ==")
    print(report.summary_table(sweep.result))
    fails = [
        (m["name"], q["tokens"], n)
        for m in sweep.result["models"]
        for q in m["points"]
        for n, r in q.get("paths", {}).items()
        if r.get("status") == "ok" and not r["check"]["pass"]
    ]
    if fails:
        print(f"CHECK FAILURES: {fails}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
