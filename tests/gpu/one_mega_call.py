"""One small fused Mega MoE call (sm_90) for compute-sanitizer; exits non-zero on a wrong result.

    compute-sanitizer --tool memcheck python3 tests/gpu/one_mega_call.py [--graph]

``--graph`` also runs the command-buffer compatible target (``JAX_MEGAMOE_GRAPH_TARGETS=1``) with
XLA's CUDA graphs forced on for custom calls: checks that the compiled program puts the custom call
in a command buffer and that 200 replays over 4 inputs give the plain target's bits.
"""

from __future__ import annotations

import os
import sys
import time

from jax_megamoe.ops import MoEOptions

GRAPH = "--graph" in sys.argv
if GRAPH:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer=CUSTOM_CALL,FUSION"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_megamoe import ops, reference  # noqa: E402
from jax_megamoe import policy as _policy  # noqa: E402
from jax_megamoe.layout import MoEWeights  # noqa: E402


def _layer(x, idx, w, ww, policy=None):  # the MoE call between two small fusions, as in a model
    y = ops.mega_moe(
        x * 2,
        idx,
        w,
        ww,
        activation_clamp=10.0,
        backend="ffi",
        options=MoEOptions(num_max_tokens=128, kernel="fused", policy=policy),
    )
    return (y.astype(jnp.float32) * 0.5).astype(jnp.bfloat16)


def graph_check(wg, xs, idx, w) -> int:
    # The process policy (JAX_MEGAMOE_GRAPH_TARGETS) is read once per process, so each function
    # names its own policy: the plain target, then the command-buffer compatible twin.
    base = _policy.current()
    plain = jax.jit(lambda *a: _layer(*a, policy=base.replace(graph_targets=False)))
    want = [np.asarray(plain(x, idx, w, wg)) for x in xs]
    graph = jax.jit(lambda *a: _layer(*a, policy=base.replace(graph_targets=True)))
    hlo = graph.lower(xs[0], idx, w, wg).compile().as_text()
    in_target = "jax_megamoe_mega_moe_sm90_graph" in hlo
    from jax_megamoe._src.kernels import _ffi

    before = _ffi.execute_stats()
    jax.block_until_ready(graph(xs[0], idx, w, wg))  # first run: records the command buffer
    recorded = _ffi.execute_stats()
    timings = {}
    for name, f in (("plain", plain), ("graph", graph)):
        jax.block_until_ready(f(xs[0], idx, w, wg))
        t0 = time.perf_counter()
        for n in range(200):
            got = f(xs[n % 4], idx, w, wg)
        jax.block_until_ready(got)
        timings[name] = (time.perf_counter() - t0) / 200
    same = all(
        np.array_equal(np.asarray(graph(x, idx, w, wg)).view(np.uint16), e.view(np.uint16)) for x, e in zip(xs, want)
    )
    after = _ffi.execute_stats()
    # XLA runs a new command buffer's first execution eagerly, then records (captured executes; it
    # re-records the custom call whenever a buffer address changed) and replays. Every graph call
    # after the first must be captured or replayed, never eager: only the 201 plain calls are.
    graph_eager = (after[0] - before[0]) - 201
    captured = after[1] > before[1]
    print(
        f"graph target={in_target} captured={captured} eager_graph_executes={graph_eager} (execute stats "
        f"{before} -> {recorded} -> {after}) same_bits_as_plain={same} dispatched: plain "
        f"{timings['plain'] * 1e6:.0f} us/call, graph {timings['graph'] * 1e6:.0f} us/call"
    )
    return 0 if (in_target and captured and graph_eager <= 1 and same) else 1


def main() -> int:
    rng = np.random.default_rng(0)
    e, h, i, k, t = 16, 512, 256, 4, 8
    w13 = rng.integers(0, 256, size=(e, 2 * i, h // 2), dtype=np.uint8)
    w2 = rng.integers(0, 256, size=(e, h, i // 2), dtype=np.uint8)
    s13 = rng.integers(118, 122, size=(e, 2 * i, h // 32), dtype=np.uint8)
    s2 = rng.integers(118, 122, size=(e, h, i // 32), dtype=np.uint8)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        wc = MoEWeights.from_checkpoint(w13, s13, w2, s2, mode="fp8")
    wg = jax.device_put(wc, jax.devices()[0])
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]), jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    y = np.asarray(
        ops.mega_moe(
            x, idx, w, wg, activation_clamp=10.0, backend="ffi", options=MoEOptions(num_max_tokens=128, kernel="fused")
        ),
        np.float32,
    )
    with jax.default_device(cpu):
        want = np.asarray(
            reference.mega_moe(
                jax.device_put(np.asarray(x), cpu),
                np.asarray(idx),
                np.asarray(w),
                wc,
                mode="fp8",
                activation_clamp=10.0,
            ),
            np.float32,
        )
    err = float(np.linalg.norm(y - want) / np.linalg.norm(want))
    print(f"mega_moe rel_l2={err:.2e}")
    if err >= 1e-2:
        return 1
    if GRAPH:
        xs = [x * (j + 1) for j in range(4)]
        return graph_check(wg, xs, idx, w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
