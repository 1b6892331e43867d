"""Expert-parallel step time: one DeepSeek V4-Flash routed-expert layer over EP 1 / 2 / 4 (/ 8) GPUs.

For every EP size ``n`` (devices of one host) and global batch ``T`` (split ``T/n`` tokens per GPU),
this times ``parallel.ep_moe`` on V4-Flash shapes (H 4096, I 2048, E 256, K 6, clamp 10, FP8
weights, ``E/n`` experts per GPU, uniform top-6 routing) along these paths:

  fused        ``dispatch="fused"``: DeepGEMM's multi-rank sm_90 kernel, one custom call per GPU
               (EP 1 is the same entry with one rank: the single-GPU kernel)
  ragged_ffi   ``dispatch="ragged", backend="ffi"``: XLA ragged all-to-all, the single-rank FFI
               kernel on each GPU's received rows, ragged all-to-all back (with ``--collective``)
  grouped_ffi  one-level ``parallel.ep_moe_hier`` (``axes=("ep", None)``, backend ffi): each token once per destination GPU
               (its K slots local or -1), ONE single-rank kernel call over the received rows
  hier         ``parallel.ep_moe_hier`` on a ``("host", "ep")`` = ``(2, n/2)`` mesh of the same
               GPUs (a simulated host axis, EP >= 4): one XLA exchange over "host", then the fused
               multi-rank kernel over each half's GPUs (``intranode="auto"``)

A step is one jitted call of the layer on inputs already sharded over the GPUs (``P("ep")``, as a
serving loop holds them); the time is the median over samples of back-to-back steps (pipelined
dispatch, one block at the end of each sample), and tokens/s = T / step. Each point is
also checked against the EP 1 fused result on the same tokens (rel. L2; the EP 1 kernel itself is
checked against the reference in tests/gpu). Results: ``ep_step.json`` and ``ep_step.png`` in
``--out``; ``--write-results`` fills the ``ep_step`` section of RESULTS.md.

    python -m benchmarks.ep_step                                  # EP 1,2,4 x T 64..4096 (GPU)
    python -m benchmarks.ep_step --ep 1,2 --tokens 256 --collective
    python -m benchmarks.ep_step --paths fused,ragged_ffi,grouped_ffi,hier   # every path
    python -m benchmarks.ep_step --from-json benchmarks/results/ep_step.json   # re-draw the PNG + table
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common as C
from jax_megamoe.parallel import EPOptions

SCHEMA = "jax_megamoe.benchmarks.ep_step/1"
_T0 = time.perf_counter()
TOKENS = (64, 256, 1024, 4096)
CLAMP = 10.0


PATHS = ("fused", "ragged_ffi", "grouped_ffi", "hier")


def _mesh(n: int, path: str = "fused"):
    if path == "hier":
        return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(2, n // 2), ("host", "ep"))
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("ep",))


def _spec(path: str):
    return jax.sharding.PartitionSpec(("host", "ep") if path == "hier" else "ep")


def _call(path: str, n: int, t: int, mesh, backend: str = "ffi"):
    from jax_megamoe import parallel

    kw: dict[str, Any] = dict(activation_clamp=CLAMP)
    if path == "fused":
        kw.update(dispatch="fused", num_max_tokens=max(t // n, 128))
    elif path == "ragged_ffi":
        kw.update(dispatch="ragged" if backend == "ffi" else "auto", backend=backend)
    else:
        kw.update(backend=backend)
    opts = parallel.EPOptions(**kw)
    if path in ("fused", "ragged_ffi"):
        return lambda x, i, w, ww: parallel.ep_moe(x, i, w, ww, mesh=mesh, mode="fp8", options=opts)
    if path == "grouped_ffi":
        return lambda x, i, w, ww: parallel.ep_moe_hier(
            x, i, w, ww, mesh=mesh, axes=("ep", None), mode="fp8", options=opts
        )
    return lambda x, i, w, ww: parallel.ep_moe_hier(x, i, w, ww, mesh=mesh, mode="fp8", options=opts)


def _inputs(t: int, seed: int, h: int, e: int, k: int, rho: float):
    from benchmarks.baselines import make_routing

    rng = np.random.default_rng([seed, t])
    x = jnp.asarray(rng.standard_normal((t, h), dtype=np.float32), jnp.bfloat16)
    idx, w = make_routing(t, e, k, rho, rng)
    return x, jnp.asarray(idx), jnp.asarray(w)


def _point(args, path, n, t, mesh, sets, w_n, baseline) -> dict[str, Any]:
    point: dict[str, Any] = {"ep": n, "tokens": t, "tokens_per_gpu": t // n, "path": path}
    if args.time_limit is not None and time.perf_counter() - _T0 > args.time_limit:
        point["error"] = f"skipped: --time-limit {args.time_limit} s reached"
        return point
    C.log(f"EP{n} T={t} {path} ...")
    try:
        f = jax.jit(_call(path, n, t, mesh, args.backend))
        t1 = time.perf_counter()
        y = np.asarray(f(*sets[0], w_n)).astype(np.float32)
        first = time.perf_counter() - t1
        timing = C.measure(
            lambda x, i, w, f=f, ww=w_n: f(x, i, w, ww),
            sets,
            budget_s=args.budget,
            sample_s=0.05,
            first_call_s=first,
        )
        point.update(timing.as_dict())
        point["tokens_per_s"] = t / timing.median_s
        if not np.isfinite(y).all():
            point["error"] = "non-finite output"
        if path == "fused" and n == 1:
            baseline[t] = y
        if t in baseline:
            point["rel_l2_vs_ep1"] = C.rel_l2(y, baseline[t])
        C.log(
            f"EP{n} T={t} {path}: {timing.median_s * 1e6:.1f} us/step "
            f"({t / timing.median_s:,.0f} tokens/s), first call {first:.1f} s, "
            f"rel vs EP1 {point.get('rel_l2_vs_ep1', float('nan')):.1e}"
        )
    except Exception as err:  # noqa: BLE001 - record and go on with the next point
        point["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        C.log(f"EP{n} T={t} {path}: FAILED {point['error']}")
        traceback.print_exc()
    return point


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.baselines import model_shape, random_fp8_weights

    shape = model_shape("flash", smoke=args.smoke)
    n_dev = jax.device_count()
    eps = [n for n in args.ep if n <= n_dev]
    C.log(f"{n_dev} x {jax.devices()[0].device_kind}; EP {eps}; T {args.tokens}; shape {shape}")
    t0 = time.perf_counter()
    weights = random_fp8_weights(shape, seed=1)
    jax.block_until_ready(weights.l1)
    C.log(f"weights: {shape.num_experts} FP8 experts in {time.perf_counter() - t0:.1f} s")
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": C.utc_now(),
        "command": C.command_line(),
        "device": C.device_info(),
        "versions": C.versions(),
        "shape": shape.__dict__,
        "points": [],
    }
    baseline: dict[int, np.ndarray] = {}
    paths_all = [p for p in args.paths if p in PATHS]
    if args.collective and "ragged_ffi" not in paths_all:
        paths_all.append("ragged_ffi")
    for n in eps:
        for path in [p for p in paths_all if p == "fused" or (n > 1 and (p != "hier" or n % 4 == 0))]:
            mesh = _mesh(n, path)
            sharding = jax.sharding.NamedSharding(mesh, _spec(path))
            w_n = jax.tree.map(lambda a, s=sharding: jax.device_put(a, s), weights)
            if path in ("grouped_ffi", "hier"):
                from jax_megamoe import parallel

                hosts, axis = ("host", "ep") if path == "hier" else ("ep", None)
                C.log(
                    f"EP{n} {path}: {parallel.hier_path(mesh, hosts, axis, 'fp8', 64, options=EPOptions(backend=args.backend))}"
                )
            for t in args.tokens:
                if t % n:
                    continue
                # Inputs already sharded over the GPUs, as a serving loop holds them (no per-step reshard).
                sets = [
                    tuple(
                        jax.device_put(a, sharding)
                        for a in _inputs(t, s, shape.hidden, shape.num_experts, shape.top_k, shape.rho)
                    )
                    for s in range(3)
                ]
                results["points"].append(_point(args, path, n, t, mesh, sets, w_n, baseline))
                C.write_json(args.out / "ep_step.json", results)
            del w_n
    return results


def table(results: dict[str, Any]) -> str:
    pts = [p for p in results["points"] if "median_s" in p]
    dev = results["device"]
    eps = sorted({p["ep"] for p in pts})
    toks = sorted({p["tokens"] for p in pts})
    paths = sorted({p["path"] for p in pts}, key=lambda s: (s != "fused", s))
    lines = [
        f"V4-Flash routed experts (H 4096, I 2048, E 256, K 6, FP8), {dev['count']} x {dev['kind']}, "
        f"{results['created']}; median step time (tokens/s), T = global tokens per step split over the GPUs; "
        "`python -m benchmarks.ep_step`.",
        "",
        "| path | EP | " + " | ".join(f"T={t}" for t in toks) + " |",
        "|---|---|" + "---|" * len(toks),
    ]
    for path in paths:
        for n in eps:
            cells = []
            for t in toks:
                p = next((q for q in pts if q["ep"] == n and q["tokens"] == t and q["path"] == path), None)
                cells.append("" if p is None else f"{C.fmt_time(p['median_s'])} ({p['tokens_per_s'] / 1e3:,.0f}k/s)")
            if any(cells):
                lines.append(f"| {path} | {n} | " + " | ".join(cells) + " |")
    errs = [p for p in results["points"] if "error" in p]
    if errs:
        lines += [
            "",
            "Failed points: " + "; ".join(f"EP{p['ep']} T={p['tokens']} {p['path']}: {p['error']}" for p in errs),
        ]
    rels = [p["rel_l2_vs_ep1"] for p in pts if "rel_l2_vs_ep1" in p and p["ep"] > 1]
    if rels:
        lines += ["", f"Every EP>1 output vs the EP 1 output on the same tokens: rel. L2 <= {max(rels):.1e}."]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        C.log("matplotlib is not installed: no PNG (plot later with --from-json on a machine that has it)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in results["points"] if "median_s" in p]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(p["path"], p["ep"]) for p in pts}):
        sel = sorted((p for p in pts if (p["path"], p["ep"]) == key), key=lambda p: p["tokens"])
        ax.plot(
            [p["tokens"] for p in sel], [p["median_s"] * 1e3 for p in sel], marker="o", label=f"{key[0]} EP{key[1]}"
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global tokens per step")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"V4-Flash MoE layer, expert parallel ({results['device']['kind']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    """``python -m benchmarks.ep_step``."""
    C.set_gpu_memory_fraction("0.7")
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.ep_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ep", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=list(TOKENS))
    ap.add_argument("--collective", action="store_true", help="also time ragged all-to-all + single-rank kernel")
    ap.add_argument(
        "--paths",
        type=lambda s: [v for v in s.split(",") if v],
        default=["fused"],
        help=f"comma list of {', '.join(PATHS)}",
    )
    ap.add_argument(
        "--backend",
        default="ffi",
        choices=("ffi", "reference"),
        help="per-GPU expert compute of the collective paths (reference: CPU smoke test)",
    )
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; later points are skipped (recorded)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed steps per point")
    ap.add_argument("--smoke", action="store_true", help="tiny stand-in shape (CPU smoke test)")
    ap.add_argument("--out", type=Path, default=C.REPO / "benchmarks" / "results")
    ap.add_argument("--from-json", type=Path)
    ap.add_argument("--write-results", type=Path)
    a = ap.parse_args()
    if a.from_json:
        import json

        results = json.loads(a.from_json.read_text())
    else:
        results = run(a)
    plot(results, a.out / "ep_step.png")
    text = table(results)
    print(text)
    if a.write_results:
        C.replace_section(a.write_results, "ep_step", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
