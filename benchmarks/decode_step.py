"""A decode step in ONE program: L routed-expert layers inside one jitted step, per-layer time.

``benchmarks.moe_layer`` times one dispatched ``jit`` call per layer; at decode T that is mostly
host dispatch (one Python call, one executable launch per layer). A serving step is one program
with many layers. This script times that: for T = 1 ... 256 tokens, ``--layers`` (default 43, as
V4-Flash) routed-expert layers chained as in the model, ``x = x + moe(rms_norm(x))`` (the norm keeps
every layer's input at the scale the random weights are made for), inside one ``jax.jit``, for each
path, with the same weights and routing:

  ffi             ``ops.mega_moe(backend="ffi")`` (``baselines.ffi_mega_moe``), token cap
                  ``num_max_tokens`` = the smallest power of two >= T, at least 128
  tokamax_ragged  bf16, sort + ``tokamax.ragged_dot`` (skipped when tokamax does not import)
  xla_capacity    bf16, capacity layout, one batched einsum over all experts   } the best of
  xla_gather      bf16, each token gathers its K experts' weights              } these two is
                                                                                 "best XLA"
  reference       ``jax_megamoe.reference`` (on CPU; on a GPU only with --include-reference)

and an **empty** step: the same program with each layer's MoE replaced by ``0 * (input, routing)``
(norm, residual add, barriers and loop stay), i.e. the fixed cost of the step's structure, reported
per layer.

Weights: ``--layers-distinct`` (default 8) distinct random weight sets per format, layer ``l``
using set ``l mod L``; the FP8 sets are ``baselines.random_fp8_weights`` (6 GiB each for
V4-Flash), the bf16 sets their exact dequantisation (12 GiB each). L is reduced until the sets
fit in 80% of the device pool (bf16 usually gets fewer: the output says which L was used and why).
Cycling is sound because all L sets together (and already one layer's touched experts at T=1)
are far larger than the 50 MiB L2, so no layer finds its experts in L2 from an earlier layer.

Routing: a distinct random top-K routing per layer (``baselines.make_routing``, rho folded in),
the same for every path. Each layer's (x, routing) goes through ``lax.optimization_barrier`` first:
as a router would, the routing of layer l then becomes available only after layer l-1, so XLA
cannot hoist routing-only work (sorts, weight gathers) ahead of the previous layer.

Program shape (``--loop``): ``scan`` (default) runs a ``lax.scan`` over ``layers // L`` cycles
whose body is the L distinct layers unrolled (the weight sets are loop-invariant operands: no
stacked copy), then the ``layers mod L`` remaining layers unrolled; ``unroll`` unrolls all layers
(about 4x the XLA compile time at 43 layers and L=8).

Floor per layer: max(mean distinct experts hit per layer x bytes per FP8 expert / HBM bandwidth,
FLOPs / FP8 matmul peak), with the sweep's measured ceilings and roofline (``benchmarks.sweep``); every time is also
given as a multiple of it (the bf16-weight floor is in the JSON too). Timing: ``_common.measure``
on the step (median over samples of n back-to-back steps), per layer = step / layers.

Sanity check: each path's step output (input set 0, every path on the same weight cycle) is
compared with ``xla_capacity``'s (else the first path that ran): rel. L2 within ``CHECK_TOL``
(looser between FP8 and bf16 activations, whose per-layer difference compounds over the layers). It
catches wrong weights (rel. L2 ~1.4), not numerics (``benchmarks.moe_layer`` checks those per layer).

    python -m benchmarks.decode_step                       # GPU: V4-Flash, T = 1 ... 256, 43 layers
    python -m benchmarks.decode_step --smoke --out /tmp/ds # CPU: tiny shapes, 3 layers, T = 1, 4
    python -m benchmarks.decode_step --from-json benchmarks/results/decode_step.json   # re-draw the PNG

Outputs ``decode_step.json`` and ``decode_step.png`` in ``--out``; ``--write-results`` fills the
``decode_step`` section of a RESULTS.md. With ``--model pro`` the files and the section are
``decode_step_pro`` (so one RESULTS.md keeps both models).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import _common as C
from benchmarks import baselines as B
from benchmarks import report
from benchmarks import sweep as S

SCHEMA = "jax_megamoe.benchmarks.decode_step/1"
FULL_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SMOKE_TOKENS = (1, 4)
GIB = 2**30
#: Paths in run order, per weight format (each format's weight sets are resident one at a time).
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fp8", ("ffi", "ffi_fused", "ffi_decode", "reference")),
    ("bf16", ("tokamax_ragged", "xla_capacity", "xla_gather")),
)
PATH_NAMES = tuple(n for _, names in PHASES for n in names)
XLA_PATHS = ("xla_capacity", "xla_gather")
#: Step outputs are compared with this baseline (first one that ran) ...
CHECK_ORDER = ("xla_capacity", "xla_gather", "tokamax_ragged", "reference", "ffi", "ffi_fused", "ffi_decode")
#: ... within these relative L2s. Over 43 layers the difference of FP8 and bf16 activations (4-5% in
#: one layer) compounds to ~0.25 (CPU, smoke shapes); bf16 paths differ by ~0.03; wrong weights give ~1.4.
#: FP8 paths against each other compound too: on an H100 (T = 1-8, 43 V4-Flash layers) the fused
#: kernel and the decode kernels are each 0.29-0.34 from the reference (one layer: 5e-3 and 1e-4).
CHECK_TOL = {"same_activations": 0.5, "fp8_vs_bf16_activations": 0.5}
ACTIVATIONS = {
    "ffi": "fp8",
    "ffi_fused": "fp8",
    "ffi_decode": "fp8",
    "reference": "fp8",
    "tokamax_ragged": "bf16",
    "xla_capacity": "bf16",
    "xla_gather": "bf16",
}
#: The weight sets of one format may take this much of the device pool.
SETS_POOL_FRACTION = 0.8
L2_BYTES = 50 * 2**20  # H100 / H200
DEFAULT_OUT = str(C.REPO / "benchmarks" / "results")


#: ``ffi`` is what users get (``kernel="auto"``); ``ffi_fused`` / ``ffi_decode`` force one kernel, so the
#: table shows the crossover that ``jax_megamoe._src.kernels._decode.DECODE_MAX_PAIRS`` encodes.
FFI_KERNELS = {"ffi": "auto", "ffi_fused": "fused", "ffi_decode": "decode"}
#: moe_layer's plot styles plus the two forced-kernel rows (colours the XLA paths do not use).
_STYLE = {
    **report.STYLE,
    "ffi_fused": dict(color="tab:red", marker="^", ls="--"),
    "ffi_decode": dict(color="tab:purple", marker="d", ls="--"),
}
SPEC = {
    **B.PATH_BY_NAME,
    "ffi_fused": dataclasses.replace(B.PATH_BY_NAME["ffi"], name="ffi_fused", label="FFI, DeepGEMM fused kernel"),
    "ffi_decode": dataclasses.replace(B.PATH_BY_NAME["ffi"], name="ffi_decode", label="FFI, decode kernels"),
}


def ffi_cap(t: int) -> int:
    """The FFI kernel's token cap for T: the smallest power of two >= T, at least 128."""
    return max(128, 1 << max(0, t - 1).bit_length())


def set_bytes(shape: B.Shape, fmt: str) -> int:
    return B.bytes_per_expert(fmt, shape.hidden, shape.intermediate) * shape.num_experts


def choose_sets(
    shape: B.Shape, fmt: str, *, requested: int, n_layers: int, limit: int | None, explicit: bool
) -> tuple[int, str]:
    """How many distinct weight sets of ``fmt`` to hold, and why."""
    per = set_bytes(shape, fmt)
    want = max(1, min(requested, n_layers))
    src = "--layers-distinct" if explicit else "default"
    if limit is None:
        return want, f"{want} ({src}; no device memory limit known)"
    # A bf16 set is dequantised from an FP8 one, which is alive while it is made.
    budget = SETS_POOL_FRACTION * limit - (set_bytes(shape, "fp8") if fmt == "bf16" else 0)
    fit = int(budget // per)
    if fit >= want:
        return want, (
            f"{want} ({src}): {want} x {per / GIB:.2f} GiB = {want * per / GIB:.1f} GiB fits in "
            f"{SETS_POOL_FRACTION:.0%} of the {limit / GIB:.1f} GiB pool"
        )
    got = max(1, fit)
    return got, (
        f"{got}, not {want} ({src}): {want} x {per / GIB:.2f} GiB would exceed {SETS_POOL_FRACTION:.0%} of the "
        f"{limit / GIB:.1f} GiB pool" + (" (with the FP8 set each is made from)" if fmt == "bf16" else "")
    )


# =============================================================================================
# The step program
# =============================================================================================


def rms_norm(x):
    """The MoE's input norm (unit weight): ``x * rsqrt(mean(x^2) + 1e-6)`` in f32 -> bf16."""
    xf = x.astype(B.F32)
    return (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def empty_layer(xn, idx, w):
    """The MoE replaced by an op of no cost that still reads its input and the layer's routing."""
    return xn[:1, :1] * 0 + (w[:1, :1] * 0).astype(xn.dtype)


def make_step(layer, *, n_layers: int, n_sets: int, loop: str):
    """``step(x, idx [layers, T, K], w [layers, T, K], sets)`` -> x after ``n_layers`` residual
    layers ``x = x + layer(rms_norm(x), idx[l], w[l], *sets[l % n_sets])`` in one jitted program.
    ``layer`` is jitted on its own so that it is traced and lowered once per program, not once per
    unrolled layer (tokamax's Mosaic kernels); XLA inlines the calls."""
    layer = jax.jit(layer)

    def one(x, i, w, wts):
        x, i, w = lax.optimization_barrier((x, i, w))  # routing available only after the previous layer
        return x + layer(rms_norm(x), i, w, *wts).astype(x.dtype)

    def step(x, idx, w, sets):
        assert len(sets) == n_sets, (len(sets), n_sets)
        cycles = n_layers // n_sets if loop == "scan" else 0
        start = 0
        if cycles > 1:

            def body(x, iw):
                ic, wc = iw
                for j in range(n_sets):
                    x = one(x, ic[j], wc[j], sets[j])
                return x, None

            m = cycles * n_sets
            xs = (idx[:m].reshape(cycles, n_sets, *idx.shape[1:]), w[:m].reshape(cycles, n_sets, *w.shape[1:]))
            x, _ = lax.scan(body, x, xs)
            start = m
        for layer_i in range(start, n_layers):
            x = one(x, idx[layer_i], w[layer_i], sets[layer_i % n_sets])
        return x

    return jax.jit(step)


# =============================================================================================
# Inputs
# =============================================================================================


@dataclasses.dataclass
class Point:
    """One T's inputs on the host: ``sets`` of (x [T, H], idx [layers, T, K], w [layers, T, K])."""

    tokens: int
    sets: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    distinct: float  # mean distinct experts hit per layer (over layers and sets)
    distinct_min: int
    distinct_max: int
    capacity: int  # the largest expert load of any layer (xla_capacity drops nothing)


def make_point(shape: B.Shape, t: int, n_layers: int, n_sets: int, seed: int) -> Point:
    rng = np.random.default_rng([seed, t, shape.num_experts, n_layers])
    sets, hits, loads = [], [], []
    for _ in range(n_sets):
        x = rng.standard_normal((t, shape.hidden), dtype=np.float32)
        routes = [B.make_routing(t, shape.num_experts, shape.top_k, shape.rho, rng) for _ in range(n_layers)]
        idx = np.stack([r[0] for r in routes])
        w = np.stack([r[1] for r in routes])
        sets.append((x, idx, w))
        for layer_idx in idx:
            hits.append(len(np.unique(layer_idx)))
            loads.append(int(np.bincount(layer_idx.reshape(-1), minlength=shape.num_experts).max()))
    return Point(t, sets, float(np.mean(hits)), int(min(hits)), int(max(hits)), int(max(loads)))


def device_sets(p: Point):
    return [(jnp.asarray(x, B.BF16), jnp.asarray(i), jnp.asarray(w)) for x, i, w in p.sets]


# =============================================================================================
# The benchmark
# =============================================================================================


class Bench:
    """State of one run; what it learns about the paths is a :class:`benchmarks.sweep.PathState`,
    as in the moe_layer sweep."""

    def __init__(self, args: argparse.Namespace, shape: B.Shape, result: dict[str, Any]):
        self.args, self.shape, self.result = args, shape, result
        self.state = S.PathState(include_reference=args.include_reference, gather_max_gib=args.gather_max_gib)
        self.oom: dict[str, int] = {}  # path -> smallest T that ran out of memory
        self.outputs: dict[tuple[int, str], np.ndarray] = {}  # (T, path) -> step output on the check cycle
        self.points: dict[int, Point] = {}
        self.t_start = time.time()
        self.deadline = self.t_start + args.budget_s
        if args.deadline:
            self.deadline = min(self.deadline, args.deadline) if args.budget_given else args.deadline
        self.phase_deadline = self.deadline

    def remaining(self) -> float:
        return min(self.deadline, self.phase_deadline) - time.time()

    def save(self) -> None:
        C.write_json(Path(self.args.out) / f"{output_stem(self.args.model)}.json", self.result)

    def point(self, t: int) -> Point:
        if t not in self.points:
            self.points[t] = make_point(self.shape, t, self.args.layers, self.args.sets, self.args.seed)
        return self.points[t]

    def rec(self, t: int) -> dict[str, Any]:
        return next(q for q in self.result["points"] if q["tokens"] == t)

    def static_skip(self, name: str) -> str | None:
        if name not in self.args.paths:
            return "not asked for (--paths)"
        return self.state.static_skip(SPEC[name])

    # ---- weight sets ----------------------------------------------------------------------

    def make_sets(self, fmt: str, n: int) -> list[tuple[Any, ...]]:
        """``n`` distinct weight sets; set j is seed ``seed + j`` in both formats (the bf16 sets are
        the exact dequantisation of the FP8 ones)."""
        out = []
        for j in range(n):
            w8 = B.random_fp8_weights(self.shape, self.args.seed + j)
            if fmt == "fp8":
                out.append((w8,))
            else:
                w13t, w2t = B.dequantize_all_bf16(w8)
                jax.block_until_ready((w13t, w2t))
                del w8
                out.append((w13t, w2t))
            jax.block_until_ready(out[-1])
        return out

    def layer_fn(self, name: str, p: Point, sets):
        clamp = self.shape.clamp
        if name in FFI_KERNELS:
            return partial(
                B.ffi_mega_moe,
                clamp=clamp,
                cap=ffi_cap(p.tokens),
                reserved_sms=self.args.ffi_reserved_sms,
                kernel=FFI_KERNELS[name],
            )
        if name == "reference":
            return partial(B.reference_mega_moe, clamp=clamp)
        if name == "xla_capacity":
            return partial(B.xla_capacity, clamp=clamp, cap=p.capacity)
        if name == "xla_gather":
            return partial(B.xla_gather, clamp=clamp)
        if name == "tokamax_ragged":
            x, i, w = device_sets(p)[0]
            impl, dt = self.state.pick_tokamax(clamp, (x, i[0], w[0]), sets[0][0], sets[0][1])
            return partial(B.tokamax_ragged, clamp=clamp, implementation=impl, out_dtype=dt)
        raise ValueError(name)

    def gather_limit(self, resident: int) -> float:
        """``moe_layer``'s limit on one weight gather, next to ``resident`` bytes of weight sets."""
        return self.state.gather_limit(resident)

    # ---- phases ---------------------------------------------------------------------------

    def run_phase(self, fmt: str, names: tuple[str, ...], n_sets: int, check_cycle: int) -> None:
        a, shape = self.args, self.shape
        skips = {n: self.static_skip(n) for n in names}
        runnable = [n for n in names if skips[n] is None]
        for t in a.tokens:
            for n in names:
                if skips[n] is not None:
                    self.rec(t)["paths"][n] = {"status": "skipped", "reason": skips[n]}
        for n in names:
            if skips[n] is not None:
                C.log(f"{n}: skipped: {skips[n]}")
        if not runnable:
            self.save()
            return
        info = self.result["weight_sets"][fmt]
        info["paths"] = runnable
        t0 = time.perf_counter()
        try:
            sets = self.make_sets(fmt, n_sets)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the other format still runs
            msg = f"making the {n_sets} {fmt} weight sets failed: {type(e).__name__}: {C.first_line(e)}"
            C.log(msg)
            info["error"] = msg
            for t in a.tokens:
                for n in runnable:
                    self.rec(t)["paths"][n] = {"status": "failed", "reason": msg}
            self.save()
            gc.collect()
            return
        info["setup_s"] = time.perf_counter() - t0
        resident = n_sets * set_bytes(shape, fmt)
        C.log(
            f"{fmt}: {n_sets} weight sets ({resident / GIB:.2f} GiB) ready in {info['setup_s']:.1f} s; paths {runnable}"
        )
        check_sets = tuple(sets[j % check_cycle] for j in range(n_sets))
        empty = make_step(empty_layer, n_layers=a.layers, n_sets=n_sets, loop=a.loop)
        no_weights = tuple(() for _ in range(n_sets))
        try:
            for t in a.tokens:
                q = self.rec(t)
                p = self.point(t)
                xs = device_sets(p)
                if self.remaining() <= 0:
                    for n in runnable:
                        q["paths"][n] = {
                            "status": "skipped",
                            "reason": "time budget exhausted (--budget-s / --deadline)",
                        }
                    C.log(f"{fmt} T={t}: skipped, time budget exhausted")
                    self.save()
                    continue
                # The empty step of this format's program shape.
                try:
                    tm = C.measure(
                        lambda x, i, w: empty(x, i, w, no_weights),
                        xs,
                        budget_s=min(a.time_per_point, self.remaining()),
                        sample_s=a.sample_s,
                        min_samples=a.min_samples,
                    )
                    q["empty"][fmt] = {"distinct_sets": n_sets, **tm.as_dict(), "per_layer_s": tm.median_s / a.layers}
                    C.log(
                        f"{fmt} T={t}: empty step {C.fmt_time(tm.median_s)} = {C.fmt_time(tm.median_s / a.layers)} per layer "
                        f"(compile {tm.first_call_s:.1f} s); {self.remaining():.0f} s left"
                    )
                except Exception as e:  # noqa: BLE001
                    q["empty"][fmt] = {"distinct_sets": n_sets, "error": f"{type(e).__name__}: {C.first_line(e)}"}
                for n in runnable:
                    q["paths"][n] = self.run_path(n, p, q, xs, sets, check_sets, resident)
                    self.save()
                del xs
        finally:
            del sets, check_sets
            gc.collect()

    def run_path(self, name: str, p: Point, q: dict[str, Any], xs, sets, check_sets, resident: int) -> dict[str, Any]:
        a, shape, t = self.args, self.shape, p.tokens
        rec: dict[str, Any] = {"status": "skipped", "reason": None}
        reason = self.state.sticky.get(name)
        if reason is None and name == "xla_gather":
            g = t * shape.top_k * B.bytes_per_expert("bf16", shape.hidden, shape.intermediate)
            if g > self.gather_limit(resident):
                reason = (
                    f"gathering {t}x{shape.top_k} experts would materialise {C.fmt_bytes(g)} per layer "
                    f"(limit {C.fmt_bytes(self.gather_limit(resident))}, --gather-max-gib)"
                )
        if reason is None and name in self.oom and t >= self.oom[name]:
            reason = f"ran out of memory at T={self.oom[name]} (its memory grows with T)"
        if reason is None and self.remaining() <= 0:
            reason = "time budget exhausted (--budget-s / --deadline)"
        if reason is not None:
            rec["reason"] = reason
            C.log(f"  {name:15s} T={t}: skipped: {reason}")
            return rec
        n_sets = len(sets)
        try:
            step = make_step(self.layer_fn(name, p, sets), n_layers=a.layers, n_sets=n_sets, loop=a.loop)
            t0 = time.perf_counter()
            y0 = step(*xs[0], sets)
            jax.block_until_ready(y0)
            first = time.perf_counter() - t0
            if any(c is not s for c, s in zip(check_sets, sets)):
                y0 = step(*xs[0], check_sets)  # the common weight cycle of every path (same executable)
            self.outputs[(t, name)] = np.asarray(y0).astype(np.float32)
            del y0
            tm = C.measure(
                lambda x, i, w: step(x, i, w, sets),
                xs,
                budget_s=min(a.time_per_point, max(0.0, self.remaining())),
                sample_s=a.sample_s,
                first_call_s=first,
                min_samples=a.min_samples,
            )
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the sweep goes on
            status, why = self.state.classify(e, name)
            rec["status"], rec["reason"] = status, why
            if why.startswith("out of memory"):
                self.oom[name] = min(t, self.oom.get(name, t))
            if a.verbose:
                traceback.print_exc()
            C.log(f"  {name:15s} T={t}: {status}: {why}")
            gc.collect()
            return rec
        spec = SPEC[name]
        floor = q["floor_s"]
        own = q["floors"][f"{spec.weight_format}_weights_{spec.mma}_mma"]["floor_s"]
        per = tm.median_s / a.layers
        empty = q["empty"].get(spec.weight_format, {})
        rec.update(tm.as_dict())
        rec.update(
            status="ok",
            distinct_sets=n_sets,
            per_layer_s=per,
            per_layer_p10_s=tm.p10_s / a.layers,
            per_layer_p90_s=tm.p90_s / a.layers,
            time_over_floor=per / floor,
            floor_fraction=floor / per,
            own_floor_kind=f"{spec.weight_format}_weights_{spec.mma}_mma",
            time_over_own_floor=per / own,
        )
        if "per_layer_s" in empty:
            rec["per_layer_minus_empty_s"] = per - empty["per_layer_s"]
        if name in FFI_KERNELS:
            rec["num_max_tokens"] = ffi_cap(t)
        if name == "xla_capacity":
            rec["capacity"] = p.capacity
        if name == "tokamax_ragged":
            rec["implementation"] = self.state.tokamax_note
        self.state.ok(name)
        C.log(
            f"  {name:15s} T={t}: {C.fmt_time(per)} per layer ({rec['time_over_floor']:.1f}x floor), step "
            f"{C.fmt_time(tm.median_s)}, first call {first:.1f} s; {self.remaining():.0f} s left"
        )
        return rec

    # ---- after all phases -----------------------------------------------------------------

    def check_and_summarise(self) -> list[str]:
        """Step outputs vs the baseline path at each T; best XLA and speed-ups. Returns failures."""
        fails = []
        for q in self.result["points"]:
            t, paths = q["tokens"], q["paths"]
            ran = [n for n in CHECK_ORDER if paths.get(n, {}).get("status") == "ok" and (t, n) in self.outputs]
            base = ran[0] if ran else None
            for n in ran:
                y = self.outputs[(t, n)]
                finite = bool(np.isfinite(y).all())
                if n == base:
                    chk = {"baseline": True, "finite": finite, "pass": finite}
                else:
                    r = C.rel_l2(y, self.outputs[(t, base)])
                    tol = CHECK_TOL[
                        "same_activations" if ACTIVATIONS[n] == ACTIVATIONS[base] else "fp8_vs_bf16_activations"
                    ]
                    chk = {
                        "vs": base,
                        "rel_l2": r,
                        "tol": tol,
                        "finite": finite,
                        "pass": bool(finite and math.isfinite(r) and r <= tol),
                    }
                chk["weight_cycle"] = self.result["check"]["weight_cycle"]
                paths[n]["check"] = chk
                if not chk["pass"]:
                    fails.append(
                        f"T={t} {n}: "
                        + (
                            f"rel L2 {chk['rel_l2']:.3g} vs {base} > {chk['tol']:g}"
                            if "rel_l2" in chk
                            else "non-finite output"
                        )
                    )
            q["best"] = best_of(paths)
        return fails


def best_of(paths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def ok(n):
        r = paths.get(n, {})
        return r.get("status") == "ok" and r.get("check", {}).get("pass", True)

    xla = [n for n in XLA_PATHS if ok(n)]
    out: dict[str, Any] = {"best_xla": None}
    if xla:
        b = min(xla, key=lambda n: paths[n]["per_layer_s"])
        out.update(best_xla=b, best_xla_per_layer_s=paths[b]["per_layer_s"])
    if ok("ffi"):
        ffi = paths["ffi"]["per_layer_s"]
        if xla:
            out["ffi_speedup_vs_best_xla"] = out["best_xla_per_layer_s"] / ffi
        if ok("tokamax_ragged"):
            out["ffi_speedup_vs_tokamax"] = paths["tokamax_ragged"]["per_layer_s"] / ffi
    return out


# =============================================================================================
# Reports
# =============================================================================================

_LABEL = {
    "ffi": "ffi (FFI, kernel=auto, FP8)",
    "ffi_fused": "ffi_fused (DeepGEMM fused kernel, FP8)",
    "ffi_decode": "ffi_decode (decode kernels, FP8)",
    "tokamax_ragged": "tokamax_ragged (bf16)",
    "xla_capacity": "xla_capacity (bf16)",
    "xla_gather": "xla_gather (bf16)",
    "reference": "reference (pure JAX)",
}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    fig, ax = plt.subplots(figsize=(8, 5.6))
    for name in PATH_NAMES:
        xs, ys, lo, hi = [], [], [], []
        for q in pts:
            r = q["paths"].get(name, {})
            if r.get("status") == "ok":
                xs.append(q["tokens"])
                ys.append(r["per_layer_s"] * 1e6)
                lo.append(r["per_layer_p10_s"] * 1e6)
                hi.append(r["per_layer_p90_s"] * 1e6)
        if xs:
            st = dict(_STYLE.get(name, {}))
            ax.plot(xs, ys, label=_LABEL.get(name, name), ms=4, **st)
            ax.fill_between(xs, lo, hi, color=st.get("color"), alpha=0.12, lw=0)
    fl = [(q["tokens"], q["floor_s"] * 1e6) for q in pts if q.get("floor_s")]
    if fl:
        ax.plot(*zip(*fl), ls="--", color="black", lw=1.2, label="floor (FP8 weights of the touched experts, FP8 MMA)")
    fb = [(q["tokens"], q["floors"]["bf16_weights_bf16_mma"]["floor_s"] * 1e6) for q in pts if q.get("floors")]
    if fb:
        ax.plot(*zip(*fb), ls="--", color="tab:green", lw=1.0, alpha=0.7, label="floor, bf16 weights")
    for fmt, col in (("fp8", "dimgray"), ("bf16", "silver")):
        em = [
            (q["tokens"], q["empty"][fmt]["per_layer_s"] * 1e6)
            for q in pts
            if "per_layer_s" in q.get("empty", {}).get(fmt, {})
        ]
        if em:
            lab = result["weight_sets"][fmt]["distinct"]
            ax.plot(*zip(*em), ls=":", color=col, marker=".", label=f"empty step per layer ({fmt} program, L={lab})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ts = sorted(q["tokens"] for q in pts)
    if ts:
        ax.set_xticks(ts, [str(t) for t in ts])
    m = result["model"]
    ax.set_xlabel("tokens T")
    ax.set_ylabel("time per layer inside one step (us), median; band p10-p90")
    ax.set_title(
        f"{m['name']}: {result['n_layers']} layers in one jitted step, H={m['hidden']} I={m['intermediate']} "
        f"E={m['num_experts']} K={m['top_k']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
    dev = result.get("device", {})
    fig.suptitle(f"decode step on {dev.get('kind', '?')} ({result.get('date', '')})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_markdown(result: dict[str, Any], png: str | None = None) -> str:
    dev, ver, ceil, m = result["device"], result["versions"], result["ceilings"], result["model"]
    ws = result["weight_sets"]
    n = result["n_layers"]
    label = {"git_head": "git ", "platform_version": ""}
    soft = [
        f"{label.get(k, k + ' ')}{ver[k]}"
        for k in ("jax", "jaxlib", "jax_megamoe", "git_head", "tokamax", "platform_version")
        if ver.get(k)
    ]
    lines = [
        f"## Decode step: all layers in one program, {m['name']} (`python -m benchmarks.decode_step`)",
        "",
        f"- **{dev.get('kind')}** ({dev.get('platform')}) on {result.get('date')}; " + ", ".join(soft),
        f"- `{result.get('command')}`",
        f"- measured ceilings{' (' + result['ceilings_source'] + ')' if result.get('ceilings_source') else ''}: "
        f"HBM {C.fmt_rate(ceil['hbm_bytes_per_s'], 'B/s')}; bf16 matmul {C.fmt_rate(ceil['bf16_flops_per_s'], 'FLOP/s')}; FP8 matmul "
        + (
            C.fmt_rate(ceil["fp8_flops_per_s"], "FLOP/s")
            if ceil.get("fp8_flops_per_s")
            else str(ceil.get("fp8_method"))
        ),
        f"- layers: {m['name']} H={m['hidden']}, I={m['intermediate']}, E={m['num_experts']}, K={m['top_k']}, "
        f"{n} layers per step, one `jax.jit` program ({result['loop_note']})",
    ]
    if m.get("e_note"):
        lines.append(f"- *{m['e_note']}*")
    for fmt in ("fp8", "bf16"):
        w = ws[fmt]
        used = ", ".join(f"`{p}`" for p in w.get("paths", [])) or "no path ran"
        lines.append(
            f"- {fmt} weight sets ({used}): **L = {w['distinct']} distinct**, cycled over {n} layers (layer l uses set l mod L); "
            f"L = {w['why']}" + (f"; *{w['error']}*" if w.get("error") else "")
        )
    lines.append(f"- {result['l2_note']}")
    if result.get("shrink_note"):
        lines.append(f"- **{result['shrink_note']}**")
    lines += [
        "- layer: `x = x + moe(rms_norm(x), routing_l)`; a distinct random top-K routing per layer, the same for every path; "
        "each layer's input and routing pass an `optimization_barrier` (routing known only after the previous layer, as with a router)",
        f"- cells: median time per layer = step time / {n} (multiple of the floor); floor = max(experts hit x FP8 bytes per expert "
        "/ HBM bandwidth, FLOPs / FP8 matmul peak); empty step: the same program with the MoE replaced by `0 * (input, routing)` "
        "(norm, residual add, loop and barriers stay). "
        f"Timing: {result.get('timing_method', '')}",
        f"- check: every path's step output (input set 0, all on the same weight cycle L = {result['check']['weight_cycle']}) vs "
        f"`{CHECK_ORDER[0]}`'s (or the first that ran), rel. L2 <= {result['check']['tol']['same_activations']:g} "
        f"(same activation type) / {result['check']['tol']['fp8_vs_bf16_activations']:g} (FP8 vs bf16 activations: "
        "their per-layer difference compounds over the layers; wrong weights give ~1.4); a sanity check, not a numerics check",
        "",
    ]
    if png:
        lines += [f"![time per layer inside one step vs tokens]({png})", ""]
    pts = result["points"]
    lines.append("| | " + " | ".join(f"T={q['tokens']}" for q in pts) + " |")
    lines.append("|---|" + "---:|" * len(pts))

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(q) for q in pts) + " |")

    skips: dict[tuple[str, str], list[str]] = {}
    fails: list[str] = []
    row("experts hit per layer", lambda q: f"{q['distinct_experts']:.1f}")
    row("**floor** per layer", lambda q: C.fmt_time(q["floor_s"]))
    row("floor, bf16 weights", lambda q: C.fmt_time(q["floors"]["bf16_weights_bf16_mma"]["floor_s"]))
    for name in PATH_NAMES:
        if not any(q["paths"].get(name, {}).get("status") == "ok" for q in pts):
            for q in pts:
                r = q["paths"].get(name, {})
                if r.get("reason"):
                    skips.setdefault((name, r["reason"]), []).append(f"T={q['tokens']}")
            continue

        def cell(q, name=name):
            r = q["paths"].get(name, {})
            if r.get("status") == "ok":
                chk = r.get("check", {})
                mark = ""
                if not chk.get("pass", True):
                    mark = " **check FAIL**"
                    fails.append(
                        f"T={q['tokens']} `{name}`: rel L2 {chk.get('rel_l2')} vs `{chk.get('vs')}`, finite {chk.get('finite')}"
                    )
                return f"{C.fmt_time(r['per_layer_s'])} ({r['time_over_floor']:.1f}x){mark}"
            if r.get("reason"):
                skips.setdefault((name, r["reason"]), []).append(f"T={q['tokens']}")
            return "-" if r.get("status") != "failed" else "failed"

        row(f"`{name}`" + (f" (L={ws['fp8' if name in PHASES[0][1] else 'bf16']['distinct']})"), cell)
    row(
        "**best XLA**",
        lambda q: (
            f"`{q['best']['best_xla']}` {C.fmt_time(q['best']['best_xla_per_layer_s'])}"
            if q.get("best", {}).get("best_xla")
            else "-"
        ),
    )
    if any(q["paths"].get("ffi", {}).get("status") == "ok" for q in pts):  # else its reason is under "Not run"
        row(
            "**ffi fraction of floor**",
            lambda q: (
                f"{q['paths']['ffi']['floor_fraction']:.2f}" if q["paths"].get("ffi", {}).get("status") == "ok" else "-"
            ),
        )
        row(
            "ffi speed-up vs best XLA",
            lambda q: (
                f"{q['best']['ffi_speedup_vs_best_xla']:.2f}x"
                if q.get("best", {}).get("ffi_speedup_vs_best_xla")
                else "-"
            ),
        )
        row(
            "ffi speed-up vs tokamax",
            lambda q: (
                f"{q['best']['ffi_speedup_vs_tokamax']:.2f}x"
                if q.get("best", {}).get("ffi_speedup_vs_tokamax")
                else "-"
            ),
        )
    for fmt in ("fp8", "bf16"):
        if any("per_layer_s" in q.get("empty", {}).get(fmt, {}) for q in pts):
            row(
                f"empty step, per layer ({fmt} program, L={ws[fmt]['distinct']})",
                lambda q, fmt=fmt: C.fmt_time(q.get("empty", {}).get(fmt, {}).get("per_layer_s")),
            )
    lines.append("")
    if fails:
        lines += ["### Check failures", ""] + [f"- {f}" for f in fails] + [""]
    if skips:
        lines += ["### Not run", ""]
        for (name, why), where in sorted(skips.items()):
            lines.append(f"- `{name}` ({', '.join(where)}): {why}")
        lines.append("")
    return "\n".join(lines)


def output_stem(model: str) -> str:
    """File stem and RESULTS.md section of a ``--model`` run: ``decode_step`` (flash) or ``decode_step_pro``."""
    return "decode_step" if model == "flash" else f"decode_step_{model}"


def finalize(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The PNG in ``--out`` and, with ``--write-results``, the RESULTS.md section (linking the PNG)."""
    stem = output_stem(result.get("args", {}).get("model", "flash"))
    png = Path(args.out) / f"{stem}.png"
    try:
        plot(result, png)
    except Exception as e:  # noqa: BLE001 - the JSON and the table are worth more than the plot
        C.log(f"no PNG ({type(e).__name__}: {e})")
    if not args.write_results:
        return
    md = Path(args.write_results)
    link = os.path.relpath(png.resolve(), md.resolve().parent) if png.is_file() else None
    C.replace_section(md, stem, results_markdown(result, link))
    C.log(f"{png if link else 'no PNG'}; section {stem} of {md} written")


# =============================================================================================
# CLI
# =============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_step",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="flash", choices=("flash", "pro"))
    p.add_argument(
        "--tokens", type=C.int_list, default=None, help=f"token counts (default {FULL_TOKENS}; --smoke {SMOKE_TOKENS})"
    )
    p.add_argument("--layers", type=int, default=None, help="layers per step (default 43; --smoke 3)")
    p.add_argument(
        "--layers-distinct",
        type=int,
        default=None,
        help="distinct weight sets per format, cycled over the layers (default 8, --smoke 2; reduced to fit memory)",
    )
    p.add_argument(
        "--loop",
        choices=("scan", "unroll"),
        default="scan",
        help="scan: lax.scan over cycles of the L distinct layers (default); unroll: every layer unrolled",
    )
    p.add_argument("--paths", default=None, help="comma list (default all): " + ", ".join(PATH_NAMES))
    p.add_argument("--include-reference", action="store_true", help="also time the pure-JAX reference on a GPU")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes (H=512 I=256 E=16 K=4), 3 layers, 2 distinct sets, T = 1, 4 (implied on a CPU device)",
    )
    p.add_argument(
        "--experts",
        type=int,
        default=None,
        help="E (default: the model's, reduced when one FP8 + bf16 set does not fit)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (JSON + PNG)")
    p.add_argument("--write-results", default=None, help="also fill this RESULTS.md (its decode_step section)")
    p.add_argument("--from-json", default=None, help="no measuring: re-render the PNG / RESULTS.md from this JSON")
    p.add_argument(
        "--ceilings-from", default=None, help="take the HBM / matmul ceilings from this moe_layer or decode_step JSON"
    )
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new work after this many seconds")
    p.add_argument(
        "--deadline", type=float, default=None, help="same, as a Unix time (wins over the default --budget-s)"
    )
    p.add_argument(
        "--time-per-point", type=float, default=None, help="seconds of timed samples per path and T (default 0.5)"
    )
    p.add_argument("--sample-s", type=float, default=None, help="target length of one timing sample (default 0.05 s)")
    p.add_argument("--min-samples", type=int, default=5)
    p.add_argument("--sets", type=int, default=2, help="rotating input sets (x + every layer's routing) per T")
    p.add_argument("--gather-max-gib", type=float, default=None, help="largest per-layer weight gather of xla_gather")
    p.add_argument(
        "--ffi-reserved-sms", type=int, default=None, help="SMs the FFI kernel leaves free (default: the op's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing paths")
    a = p.parse_args(argv)
    if a.paths is None:
        a.paths = list(PATH_NAMES)
    else:
        a.paths = [s.strip() for s in a.paths.split(",") if s.strip()]
        bad = [s for s in a.paths if s not in PATH_NAMES]
        if bad:
            p.error(f"--paths: unknown {bad}; choose from {', '.join(PATH_NAMES)}")
    for k in ("layers", "layers_distinct", "sets"):
        v = getattr(a, k)
        if v is not None and v < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return a


def loop_note(loop: str, n_layers: int, fp8_l: int, bf16_l: int) -> str:
    if loop == "unroll":
        return f"all {n_layers} layers unrolled"
    parts = []
    for fmt, ell in (("fp8", fp8_l), ("bf16", bf16_l)):
        cyc = n_layers // ell
        if cyc > 1:
            parts.append(
                f"{fmt}: `lax.scan` over {cyc} cycles of {ell} unrolled layers + {n_layers - cyc * ell} unrolled"
            )
        else:
            parts.append(f"{fmt}: {n_layers} layers unrolled")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.decode_step``; 2 when a check failed."""
    C.set_gpu_memory_fraction("0.92")  # the weight sets are big; the FFI's buffers live outside the pool
    args = parse_args(argv)
    if args.from_json:  # re-render only; the PNG goes next to the JSON unless --out says otherwise
        src = Path(args.from_json)
        args.out = str(src.parent) if args.out == DEFAULT_OUT else args.out
        finalize(args, json.loads(src.read_text()))
        return 0
    dev = C.device_info()
    on_cpu = dev["platform"] == "cpu"
    smoke = args.smoke or on_cpu
    if args.tokens is None:
        args.tokens = list(SMOKE_TOKENS if smoke else FULL_TOKENS)
    explicit_l = args.layers_distinct is not None
    args.layers = args.layers or (3 if smoke else 43)
    args.layers_distinct = args.layers_distinct or (2 if smoke else 8)
    args.budget_given = args.budget_s is not None
    if args.budget_s is None:
        args.budget_s = 120.0 if smoke else 540.0
    if args.time_per_point is None:
        args.time_per_point = 0.05 if smoke else 0.5
    if args.sample_s is None:
        args.sample_s = 0.02 if on_cpu else 0.05
    if smoke:
        args.min_samples = min(args.min_samples, 3)
        if args.gather_max_gib is None:
            args.gather_max_gib = 1 / 16
    shrink_note = ""
    shape = B.model_shape(args.model, smoke=smoke)
    if smoke:
        shape = dataclasses.replace(shape, top_k=4)
        shrink_note = (
            f"smoke run: tiny stand-in shapes (H={shape.hidden} I={shape.intermediate} E={shape.num_experts} K=4), "
            f"{args.layers} layers; numbers say nothing about the real layers"
            + ("" if args.smoke else " (implied on a CPU device)")
        )
        C.log(shrink_note)
    lim = None if on_cpu else dev["memory_bytes_limit"]
    wants_bf16 = any(n in args.paths for n in PHASES[1][1])
    shape = S.choose_experts(shape, lim, args.experts, with_bf16=wants_bf16)
    l8, why8 = choose_sets(
        shape, "fp8", requested=args.layers_distinct, n_layers=args.layers, limit=lim, explicit=explicit_l
    )
    l16, why16 = choose_sets(
        shape, "bf16", requested=args.layers_distinct, n_layers=args.layers, limit=lim, explicit=explicit_l
    )
    cycle = math.gcd(l8, l16)
    C.log(
        f"device {dev['kind']} ({dev['platform']}), pool {((dev['memory_bytes_limit'] or 0) / GIB):.1f} GiB; "
        f"{shape.name} H={shape.hidden} I={shape.intermediate} E={shape.num_experts} K={shape.top_k}; {args.layers} layers; "
        f"weight sets fp8 L={l8}, bf16 L={l16}; tokens {args.tokens}"
    )
    t0 = time.perf_counter()
    ceilings_source = ""
    if args.ceilings_from:
        src = json.loads(Path(args.ceilings_from).read_text())
        ceilings = src["ceilings"]
        kind = src.get("device", {}).get("kind")
        ceilings_source = f"from {Path(args.ceilings_from).name}, measured on {kind}" + (
            "" if kind == dev["kind"] else f" -- NOT this device ({dev['kind']})"
        )
    else:
        ceilings = S.measure_ceilings(small=smoke or on_cpu, time_budget=0.1 if smoke else 0.5)
    C.log(
        f"ceilings: HBM {ceilings['hbm_bytes_per_s'] / 1e9:.0f} GB/s, bf16 {ceilings['bf16_flops_per_s'] / 1e12:.1f} TFLOP/s, fp8 "
        + (
            f"{ceilings['fp8_flops_per_s'] / 1e12:.1f} TFLOP/s"
            if ceilings.get("fp8_flops_per_s")
            else str(ceilings.get("fp8_method"))
        )
        + f" ({time.perf_counter() - t0:.1f} s)"
    )
    peaks = S.compute_peaks(ceilings)
    extra = {}
    if B.tokamax_import_error() is None:
        import tokamax

        extra["tokamax"] = getattr(tokamax, "__version__", "?")
    sets_info = {}
    for fmt, ell, why in (("fp8", l8, why8), ("bf16", l16, why16)):
        allb = ell * set_bytes(shape, fmt)
        sets_info[fmt] = {
            "distinct": ell,
            "requested": args.layers_distinct,
            "why": why,
            "set_bytes": set_bytes(shape, fmt),
            "all_sets_bytes": allb,
            "cycling_valid": allb > L2_BYTES,
            "paths": [],
        }
    bpe8 = B.bytes_per_expert("fp8", shape.hidden, shape.intermediate)
    valid = all(s["cycling_valid"] for s in sets_info.values())
    l2_note = (
        f"cycling L < {args.layers} weight sets is sound only while they cannot sit in the {L2_BYTES / 2**20:.0f} MiB L2: "
        f"all FP8 sets {C.fmt_bytes(sets_info['fp8']['all_sets_bytes'])}, all bf16 sets {C.fmt_bytes(sets_info['bf16']['all_sets_bytes'])}, "
        f"one layer's touched experts at T=1 {shape.top_k * bpe8 / 2**20:.0f} MiB (FP8)"
        + (" -- holds" if valid else " -- does NOT hold for these shapes (smoke numbers only)")
    )
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "device": dev,
        "versions": C.versions(extra),
        "date": C.utc_now(),
        "command": C.command_line(),
        "args": dict(vars(args)),
        "smoke": smoke,
        "shrink_note": shrink_note,
        "ceilings": ceilings,
        "ceilings_source": ceilings_source,
        "peaks": peaks,
        "model": {
            "name": shape.name,
            "hidden": shape.hidden,
            "intermediate": shape.intermediate,
            "num_experts": shape.num_experts,
            "full_experts": shape.full_experts,
            "top_k": shape.top_k,
            "routed_scaling_factor": shape.rho,
            "activation_clamp": shape.clamp,
            "e_note": shape.e_note,
            "bytes_per_expert": {f: B.bytes_per_expert(f, shape.hidden, shape.intermediate) for f in ("fp8", "bf16")},
        },
        "n_layers": args.layers,
        "loop": args.loop,
        "loop_note": loop_note(args.loop, args.layers, l8, l16),
        "weight_sets": sets_info,
        "l2_bytes": L2_BYTES,
        "l2_note": l2_note,
        "check": {"weight_cycle": cycle, "tol": CHECK_TOL, "order": list(CHECK_ORDER)},
        "timing_method": (
            f"jit; first call (compile) excluded; samples of n back-to-back steps rotating over {args.sets} input sets "
            "(x and every layer's routing), blocked on the last; per step = sample / n; median, p10, p90 over samples"
        ),
        "points": [],
    }
    bench = Bench(args, shape, result)
    for t in args.tokens:
        p = bench.point(t)
        floors = {
            f"{fmt}_weights_{mma}_mma": S.roofline(
                tokens=t,
                top_k=shape.top_k,
                hidden=shape.hidden,
                intermediate=shape.intermediate,
                distinct_experts=p.distinct,
                fmt=fmt,
                hbm_bytes_per_s=ceilings["hbm_bytes_per_s"],
                flops_per_s=peaks[mma],
            )
            for fmt, mma in (("fp8", "fp8"), ("bf16", "bf16"))
        }
        result["points"].append(
            {
                "tokens": t,
                "distinct_experts": p.distinct,
                "distinct_experts_min": p.distinct_min,
                "distinct_experts_max": p.distinct_max,
                "capacity": p.capacity,
                "ffi_num_max_tokens": ffi_cap(t),
                "flops_per_layer": S.layer_flops(t, shape.top_k, shape.hidden, shape.intermediate),
                "floors": floors,
                "floor_s": floors["fp8_weights_fp8_mma"]["floor_s"],
                "empty": {},
                "paths": {},
            }
        )
    bench.save()
    for i, (fmt, names) in enumerate(PHASES):
        now = time.time()  # an equal share of the time left per format (unused time carries over)
        bench.phase_deadline = now + max(0.0, bench.deadline - now) / (len(PHASES) - i)
        bench.run_phase(fmt, names, l8 if fmt == "fp8" else l16, cycle)
    fails = bench.check_and_summarise()
    result["elapsed_s"] = time.time() - bench.t_start
    result["skipped_paths"] = dict(bench.state.sticky)
    bench.save()
    C.log(f"wrote {Path(args.out) / (output_stem(args.model) + '.json')}")
    finalize(args, result)
    print("== summary (per layer) ==")
    for q in result["points"]:
        cells = [f"T={q['tokens']:4d}  floor {C.fmt_time(q['floor_s']):>9s}"]
        for n in PATH_NAMES:
            r = q["paths"].get(n, {})
            if r.get("status") == "ok":
                cells.append(f"{n} {C.fmt_time(r['per_layer_s'])} ({r['time_over_floor']:.1f}x)")
        print("  ".join(cells))
    if fails:
        print("CHECK FAILURES: " + "; ".join(fails))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
