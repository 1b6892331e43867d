"""Where does the single-GPU kernel's time go at decode-size T? V4-Flash shapes (E 256, K 6, FP8),
one GPU, ``ops.mega_moe(backend="ffi")`` at small T over token caps and reserved SMs, timed two ways:
``in_graph`` (20 calls inside one jitted program: kernel time plus launch gaps) and ``dispatch``
(one jitted call per step from Python, pipelined, as ``benchmarks.moe_layer`` times the ffi path).

    python -m benchmarks.small_t_probe [--tokens 1,8] [--caps 128,512,1024] [--reserved 0,2] [--graph]

``--graph`` turns XLA's command buffers on for custom calls (``XLA_FLAGS``, before jax starts) and
times every point twice: the plain target and the command-buffer compatible one
(``JAX_MEGAMOE_GRAPH_TARGETS=1``), column ``graph``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common as C


def main() -> int:
    """``python -m benchmarks.small_t_probe``."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.small_t_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap.add_argument("--tokens", type=ints, default=[1, 8, 64])
    ap.add_argument("--caps", type=ints, default=[128, 512, 1024])
    ap.add_argument("--reserved", type=ints, default=[0, 2])
    ap.add_argument("--graph", action="store_true", help="also time the command-buffer (CUDA graph) target")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--from-json", type=Path)
    ap.add_argument("--write-results", type=Path)
    a = ap.parse_args()
    if a.from_json:
        import json

        data = json.loads(a.from_json.read_text())
        text = table(data)
        print(text)
        if a.write_results:
            C.replace_section(a.write_results, "small_t_probe", text)
        return 0
    if a.graph:  # XLA reads its flags when the backend starts, which is below
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer=CUSTOM_CALL,FUSION"
        )
    from benchmarks.baselines import make_routing, model_shape, random_fp8_weights
    from jax_megamoe import ops
    from jax_megamoe import policy as _policy

    shape = model_shape("flash", smoke=False)
    weights = random_fp8_weights(shape, seed=1)
    rows = []
    for t in a.tokens:
        rng = np.random.default_rng(t)
        x = jnp.asarray(rng.standard_normal((t, shape.hidden), dtype=np.float32), jnp.bfloat16)
        idx, w = make_routing(t, shape.num_experts, shape.top_k, shape.rho, rng)
        idx, w = jnp.asarray(idx), jnp.asarray(w)
        for cap in a.caps:
            if cap < t:
                continue
            for r, graph in [(r, g) for r in a.reserved for g in ((False, True) if a.graph else (False,))]:
                pol = _policy.current().replace(graph_targets=graph)  # the process policy is read once
                kw = dict(
                    activation_clamp=10.0,
                    backend="ffi",
                    options=ops.MoEOptions(
                        num_max_tokens=cap,
                        reserved_sms=r,
                        kernel="fused",
                        policy=pol,
                    ),
                )  # token caps and reserved SMs are the fused kernel's
                one = jax.jit(lambda x, i, w, ww, kw=kw: ops.mega_moe(x, i, w, ww, **kw))

                @jax.jit
                def many(x, i, w, ww, kw=kw):
                    y = x
                    for _ in range(20):
                        y = ops.mega_moe(x, i, w, ww, **kw)
                    return y

                jax.block_until_ready(one(x, idx, w, weights))
                jax.block_until_ready(many(x, idx, w, weights))
                best = float("inf")
                for _ in range(5):
                    t0 = time.perf_counter()
                    jax.block_until_ready(many(x, idx, w, weights))
                    best = min(best, (time.perf_counter() - t0) / 20)
                timing = C.measure(lambda x, i, w: one(x, i, w, weights), [(x, idx, w)], budget_s=0.5, sample_s=0.05)
                row = dict(
                    tokens=t,
                    cap=cap,
                    reserved_sms=r,
                    graph=graph,
                    in_graph_us=best * 1e6,
                    dispatch_us=timing.median_s * 1e6,
                )
                rows.append(row)
                C.log(
                    f"T={t} cap={cap} reserved={r} graph={graph}: in-graph {best * 1e6:.1f} us/call, "
                    f"dispatched {timing.median_s * 1e6:.1f} us/call"
                )
    data = dict(device=C.device_info(), created=C.utc_now(), rows=rows)
    if a.out:
        C.write_json(a.out / "small_t_probe.json", data)
    text = table(data)
    print(text)
    if a.write_results:
        C.replace_section(a.write_results, "small_t_probe", text)
    return 0


def table(data: dict) -> str:
    rows = data["rows"]
    lines = [
        f"Single-GPU kernel at decode-size T, V4-Flash shapes (E 256, K 6, FP8), {data['device']['kind']}: "
        '`ops.mega_moe(backend="ffi")` per call, in-graph (20 calls in one jitted program) vs dispatched '
        "(one jitted call per step). `python -m benchmarks.small_t_probe`.",
        "",
        "| T | cap | reserved SMs | target | in-graph | dispatched |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "`_graph` (CUDA graph)" if r.get("graph") else "plain"
        lines.append(
            f"| {r['tokens']} | {r['cap']} | {r['reserved_sms']} | {target} | {r['in_graph_us']:.1f} us | "
            f"{r['dispatch_us']:.1f} us |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
