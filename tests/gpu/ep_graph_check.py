"""The fused expert-parallel kernel inside XLA's CUDA graphs (2+ sm_90 GPUs): with
``JAX_MEGAMOE_GRAPH_TARGETS=1`` and command buffers on for custom calls, 100 steps of the fused
``ep_moe`` give the plain target's bits. Run by tests/gpu/test_ep_fused_gpu.py in a fresh process
(XLA_FLAGS is read once); prints one ``graph ...`` line, exits non-zero on a failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jax_megamoe.parallel import EPOptions

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer=CUSTOM_CALL,FUSION"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parallel_worker import make_routing, make_weights  # noqa: E402

from jax_megamoe import parallel  # noqa: E402
from jax_megamoe import policy as _policy  # noqa: E402


def main() -> int:
    gpus = jax.devices()
    n = 2
    mesh = jax.sharding.Mesh(np.array(gpus[:n]), ("ep",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("ep"))
    w_all = parallel.shard_weights(make_weights("fp8"), mesh)
    inputs = [tuple(jax.device_put(a, sharded) for a in make_routing(n, 16, seed=900 + j)) for j in range(3)]

    def layer(x, i, w, ww, policy):
        y = parallel.ep_moe(
            x * 2,
            i,
            w,
            ww,
            mesh=mesh,
            mode="fp8",
            options=EPOptions(activation_clamp=10.0, dispatch="fused", policy=policy),
        )
        return (y.astype(jnp.float32) * 0.5).astype(jnp.bfloat16)

    # The process policy (JAX_MEGAMOE_GRAPH_TARGETS) is read once per process: each function names
    # its own, the plain target and then the command-buffer compatible twin.
    base = _policy.current()
    plain = jax.jit(lambda *a: layer(*a, policy=base.replace(graph_targets=False)))
    want = [np.asarray(plain(*a, w_all)) for a in inputs]
    graph = jax.jit(lambda *a: layer(*a, policy=base.replace(graph_targets=True)))
    hlo = graph.lower(*inputs[0], w_all).compile().as_text()
    ok_target = "jax_megamoe_mega_moe_sm90_graph" in hlo and "num_ranks=2" in hlo.replace(" ", "")
    from jax_megamoe._src.kernels import _ffi

    before = _ffi.execute_stats()
    for s in range(100):
        y = graph(*inputs[s % 3], w_all)
    jax.block_until_ready(y)
    same = all(
        np.array_equal(np.asarray(graph(*a, w_all)).view(np.uint16), e.view(np.uint16)) for a, e in zip(inputs, want)
    )
    after = _ffi.execute_stats()
    # Each rank runs the first execution eagerly, then records its launches (n or more captured
    # executes: XLA re-records when buffer addresses change) and otherwise replays.
    ok_graph = after[1] - before[1] >= n and after[0] - before[0] <= n
    print(
        f"graph EP{n} fused target={ok_target} recorded_per_rank_then_replayed={ok_graph} "
        f"(execute stats {before} -> {after}) 100 steps same_bits_as_plain={same}"
    )
    return 0 if (ok_target and ok_graph and same) else 1


if __name__ == "__main__":
    sys.exit(main())
