"""One GPU: the per-device expert compute of the token-form collective EP path on a simulated receive
buffer, against the single-GPU kernel on the same (token, expert) pairs.

For a simulated EP size ``n``: ``n`` source devices of ``T_l`` tokens each (uniform top-6 over E 256,
V4-Flash shapes, FP8), this device is rank 0 and owns experts ``[0, E/n)``; ``T_l = T_pairs / K``
(default 4096) so that this device receives about the pairs a single GPU computes at T = 4096. The
receive buffer is laid out exactly as one-level :func:`jax_megamoe.parallel.ep_moe_hier`
(``axes=("ep", None)``) receives it: ``n`` blocks of ``capacity`` rows, each token once with its ``K`` slots (local id or -1), padding
rows all -1. Times, each one jitted call per step on inputs already on the GPU:

  recv_exact     the collective path's expert stage (``local_experts`` below, backend ffi: ONE
                 single-rank kernel call) on the buffer sized for the exact worst case (``T_l`` rows
                 per source)
  recv_declared  the same with a declared capacity (``--capacity-factor`` x the mean rows per
                 source, rounded up to 128): less padding
  kernel_same    the single-GPU kernel on exactly the received token rows (no padding rows), same
                 local experts: "the single-GPU kernel on the same pairs" -- the acceptance baseline
  pairs_top1     the same pairs as top-1 rows (the pair form of ``parallel.ep_moe``'s collective path,
                 unpadded), to show what the token form saves
  ep1_t4096      context: the single-GPU kernel at T = 4096 over all E experts (``--ep1``)

Acceptance: recv_exact / kernel_same <= 1.3. Outputs ``ep_recv_sim.json`` / ``.png`` in ``--out``
and a short table on stdout.

    python -m benchmarks.ep_recv_sim                       # EP 8,4,2 simulated, V4-Flash (GPU)
    python -m benchmarks.ep_recv_sim --smoke --backend reference --ep 2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common as C
from jax_megamoe.ops import MoEOptions

SCHEMA = "jax_megamoe.benchmarks.ep_recv_sim/1"
ACCEPT = 1.3


def receive_buffer(n: int, tl: int, e: int, k: int, rho: float, h: int, cap: int, seed: int):
    """Host arrays of rank 0's receive buffer ``[n * cap]`` rows and of its real rows alone."""
    from benchmarks.baselines import make_routing

    rng = np.random.default_rng([seed, n, tl])
    el = e // n
    xs, ids, ws, real = [], [], [], []
    for _s in range(n):
        idx, w = make_routing(tl, e, k, rho, rng)
        local = idx < el
        send = np.nonzero(local.any(axis=1))[0]
        if send.size > cap:
            raise ValueError(f"capacity {cap} < {send.size} rows from one source (raise --capacity-factor)")
        x = rng.standard_normal((send.size, h), dtype=np.float32)
        rid = np.where(local[send], idx[send], -1).astype(np.int32)
        rw = np.where(local[send], w[send], 0).astype(np.float32)
        real.append((x, rid, rw))
        pad = cap - send.size
        xs.append(np.concatenate([x, np.zeros((pad, h), np.float32)]))
        ids.append(np.concatenate([rid, np.full((pad, k), -1, np.int32)]))
        ws.append(np.concatenate([rw, np.zeros((pad, k), np.float32)]))
    buf = tuple(np.concatenate(a) for a in (xs, ids, ws))
    comp = tuple(np.concatenate([r[i] for r in real]) for i in range(3))
    return buf, comp


def local_experts(x, idx, w, weights, *, clamp, backend, chunk):
    """The collective path's per-device expert stage on its received rows: ``x`` bf16 ``[R, H]``,
    ``idx`` int32 ``[R, 1]`` local expert ids (-1: padding row), ``w`` f32 ``[R, 1]``: one
    single-rank kernel call over all R rows (``backend="ffi"``, a layer of the E/n local experts),
    else the reference in ``chunk``-row pieces."""
    from jax_megamoe import ops, reference

    if backend == "ffi":
        local = dataclasses.replace(weights, num_experts=weights.num_local_experts)
        return ops.mega_moe(
            x,
            idx,
            w,
            local,
            mode="fp8",
            activation_clamp=clamp,
            backend="ffi",
            options=MoEOptions(num_max_tokens=x.shape[0]),
        )
    return reference.mega_moe(
        x, idx, w, weights, mode="fp8", activation_clamp=clamp, options=MoEOptions(chunk_rows=chunk)
    )


def _dev(arrs):
    x, i, w = arrs
    return jnp.asarray(x, jnp.bfloat16), jnp.asarray(i), jnp.asarray(w)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.baselines import model_shape, random_fp8_weights
    from jax_megamoe import ops

    shape = model_shape("flash", smoke=args.smoke)
    h, e, k = shape.hidden, shape.num_experts, shape.top_k
    clamp = shape.clamp
    be = args.backend
    results: dict[str, Any] = {
        "schema": SCHEMA, "created": C.utc_now(), "command": C.command_line(), "device": C.device_info(),
        "versions": C.versions(), "shape": shape.__dict__, "pairs_target": args.pairs_tokens * k, "points": [],
    }  # fmt: skip

    t_start = time.perf_counter()

    def _late() -> bool:
        return args.time_limit is not None and time.perf_counter() - t_start > args.time_limit

    def timed(name: str, n: int, fn, arrs, point_extra: dict[str, Any]):
        point: dict[str, Any] = {"ep": n, "what": name, **point_extra}
        if _late():
            point["error"] = f"skipped: --time-limit {args.time_limit} s reached"
            results["points"].append(point)
            return None
        C.log(f"EP{n} {name} ...")
        try:
            f = jax.jit(fn)
            t1 = time.perf_counter()
            y = f(*arrs)
            jax.block_until_ready(y)
            first = time.perf_counter() - t1
            timing = C.measure(f, [arrs], budget_s=args.budget, sample_s=0.05, first_call_s=first)
            point.update(timing.as_dict())
            C.log(f"EP{n} {name}: {timing.median_s * 1e6:.1f} us (first call {first:.1f} s)")
            results["points"].append(point)
            C.write_json(args.out / "ep_recv_sim.json", results)
            return np.asarray(y).astype(np.float32)
        except Exception as err:  # noqa: BLE001
            point["error"] = f"{type(err).__name__}: {str(err)[:400]}"
            C.log(f"EP{n} {name}: FAILED {point['error']}")
            traceback.print_exc()
            results["points"].append(point)
            return None

    for n in args.ep:
        el = e // n
        if e % n or el < k:
            C.log(f"EP{n}: skipped (E={e} not split into >= K={k} experts per device)")
            continue
        tl = args.pairs_tokens  # per source: n sources x tl tokens x K/n local pairs ~= tl * K pairs
        local_shape = dataclasses.replace(shape, num_experts=el)
        w_loc = random_fp8_weights(local_shape, seed=2)  # this device's E/n experts
        chunk = 128
        p_hit = 1.0 - np.prod([(e - el - j) / (e - j) for j in range(k)])  # P(token has a local slot)
        mean_rows = p_hit * tl
        declared = min(tl, int(-(-int(np.ceil(mean_rows * args.capacity_factor)) // 128) * 128))
        buf, comp = receive_buffer(n, tl, e, k, shape.rho, h, tl, seed=n)
        rows_real = comp[0].shape[0]
        pairs = int((comp[1] >= 0).sum())
        common = {"experts": el, "pairs": pairs, "real_rows": rows_real, "sources": n, "tokens_per_source": tl}

        def local_stage(x, i, ww, W=w_loc):
            return local_experts(x, i, ww, W, clamp=clamp, backend=be, chunk=chunk)

        y_exact = timed("recv_exact", n, local_stage, _dev(buf), {**common, "rows": n * tl, "capacity": tl})

        def same(x, i, ww, W=w_loc, r=rows_real):
            loc = dataclasses.replace(W, num_experts=W.num_local_experts)
            return ops.mega_moe(
                x, i, ww, loc, mode="fp8", activation_clamp=clamp, backend=be, options=MoEOptions(num_max_tokens=r)
            )

        y_same = timed("kernel_same", n, same, _dev(comp), {**common, "rows": rows_real})
        if y_exact is not None and y_same is not None:
            # The real rows of the padded buffer, in order, against the compact call.
            keep = np.concatenate([np.arange(s * tl, s * tl + c) for s, c in enumerate(_per_source(buf[1], n, tl))])
            got = y_exact[keep]
            results["points"][-1]["rel_l2_recv_vs_same"] = C.rel_l2(got, y_same)
            results["points"][-1]["bitwise_recv_vs_same"] = bool(np.array_equal(got, y_same))
        try:
            buf_d, _ = receive_buffer(n, tl, e, k, shape.rho, h, declared, seed=n)
            timed("recv_declared", n, local_stage, _dev(buf_d), {**common, "rows": n * declared, "capacity": declared})
        except ValueError as err:  # a source sent more rows than the declared capacity
            results["points"].append({"ep": n, "what": "recv_declared", **common, "error": str(err)})
        if args.pairs_form:
            r, kk = np.nonzero(comp[1] >= 0)
            pair = (comp[0][r], comp[1][r, kk][:, None], comp[2][r, kk][:, None])
            timed(
                "pairs_top1",
                n,
                lambda x, i, ww, rr=len(r): same(x, i, ww, r=rr),
                _dev(pair),
                {**common, "rows": len(r)},
            )
        del w_loc
    if args.ep1 and not _late():
        w_all = random_fp8_weights(shape, seed=1)
        rng = np.random.default_rng(5)
        from benchmarks.baselines import make_routing

        t = args.pairs_tokens
        idx, w = make_routing(t, e, k, shape.rho, rng)
        arrs = _dev((rng.standard_normal((t, h), dtype=np.float32), idx, w))
        timed("ep1_t4096", 1, lambda x, i, ww, W=w_all: ops.mega_moe(
            x, i, ww, W, mode="fp8", activation_clamp=clamp, backend=be, options=MoEOptions(num_max_tokens=t)), arrs,
            {"rows": t, "pairs": t * k, "experts": e})  # fmt: skip
        del w_all

    return results


def _per_source(ids: np.ndarray, n: int, tl: int) -> list[int]:
    """Real (leading) rows of each source block: rows with any slot >= 0 (the blocks are packed)."""
    return [int((ids[s * tl : (s + 1) * tl] >= 0).any(axis=1).sum()) for s in range(n)]


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    pts = [p for p in results["points"] if "median_s" in p]
    out = []
    for n in sorted({p["ep"] for p in pts if p["ep"] > 1}):
        by = {p["what"]: p for p in pts if p["ep"] == n}
        base = by.get("kernel_same")
        row = {"ep": n}
        for name, p in by.items():
            row[name] = p["median_s"]
            if base:
                row[f"{name}_ratio"] = p["median_s"] / base["median_s"]
        row["pairs"] = next(iter(by.values()))["pairs"]
        row["accept"] = bool(base and "recv_exact" in by and by["recv_exact"]["median_s"] <= ACCEPT * base["median_s"])
        out.append(row)
    return out


def table(results: dict[str, Any]) -> str:
    dev = results["device"]
    ep1 = next((p for p in results["points"] if p.get("what") == "ep1_t4096" and "median_s" in p), None)
    names = ("recv_exact", "recv_declared", "kernel_same", "pairs_top1")
    lines = [
        f"Collective EP path, per-device expert compute on a simulated receive buffer (V4-Flash, FP8), "
        f"{dev['kind']}, {results['created']}; median per call, ratio vs kernel_same (single-GPU kernel on the "
        f"same pairs); acceptance recv_exact <= {ACCEPT}x. `python -m benchmarks.ep_recv_sim`.",
        "",
        "| EP (sim) | local E | pairs | " + " | ".join(names) + " | accept |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    pts = results["points"]
    for row in summary(results):
        el = next(p["experts"] for p in pts if p["ep"] == row["ep"])
        cells = []
        for nm in names:
            cells.append(f"{C.fmt_time(row[nm])} ({row.get(nm + '_ratio', float('nan')):.2f}x)" if nm in row else "")
        lines.append(f"| {row['ep']} | {el} | {row['pairs']:,} | " + " | ".join(cells) + f" | {row['accept']} |")
    if ep1:
        lines += [
            "",
            f"Single-GPU kernel at T={ep1['rows']} over all {ep1['experts']} experts: {C.fmt_time(ep1['median_s'])}.",
        ]
    errs = [p for p in pts if "error" in p]
    if errs:
        lines += ["", "Failed: " + "; ".join(f"EP{p['ep']} {p['what']}: {p['error'][:160]}" for p in errs)]
    rel = [p["rel_l2_recv_vs_same"] for p in pts if "rel_l2_recv_vs_same" in p]
    if rel:
        lines += ["", f"recv_exact real rows vs kernel_same: rel. L2 <= {max(rel):.1e}."]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        C.log("matplotlib is not installed: no PNG")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(results)
    if not rows:
        return
    names = [nm for nm in ("recv_exact", "recv_declared", "kernel_same", "pairs_top1") if any(nm in r for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    wbar = 0.8 / len(names)
    for j, nm in enumerate(names):
        ax.bar([i + j * wbar for i in range(len(rows))], [r.get(nm, 0) * 1e3 for r in rows], wbar, label=nm)
    ax.set_xticks([i + 0.4 - wbar / 2 for i in range(len(rows))], [f"EP{r['ep']}" for r in rows])
    ax.set_ylabel("ms per call")
    ax.set_title(f"Per-device expert compute, simulated receive ({results['device']['kind']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    """``python -m benchmarks.ep_recv_sim``; 3 when an EP size misses the acceptance ratio."""
    C.set_gpu_memory_fraction("0.8")
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.ep_recv_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--ep", type=lambda s: [int(v) for v in s.split(",")], default=[8, 4, 2])
    ap.add_argument("--pairs-tokens", type=int, default=4096, help="T whose T*K pairs the device receives")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--backend", default="ffi", choices=("ffi", "reference"))
    ap.add_argument("--no-ep1", dest="ep1", action="store_false")
    ap.add_argument("--no-pairs-form", dest="pairs_form", action="store_false")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; later points are skipped (recorded)")
    ap.add_argument("--smoke", action="store_true", help="tiny stand-in shape (CPU smoke test)")
    ap.add_argument("--out", type=Path, default=C.REPO / "benchmarks" / "results")
    ap.add_argument("--from-json", type=Path)
    ap.add_argument("--write-results", type=Path)
    a = ap.parse_args()
    if a.from_json:
        import json

        results = json.loads(a.from_json.read_text())
    else:
        a.out.mkdir(parents=True, exist_ok=True)
        results = run(a)
        C.write_json(a.out / "ep_recv_sim.json", results)
    plot(results, a.out / "ep_recv_sim.png")
    text = table(results)
    print(text)
    if a.write_results:
        C.replace_section(a.write_results, "ep_recv_sim", text)
    rows = summary(results)
    return 0 if rows and all(r["accept"] for r in rows) else 3


if __name__ == "__main__":
    raise SystemExit(main())
