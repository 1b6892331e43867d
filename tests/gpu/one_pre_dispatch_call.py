"""One jitted FFI pre-dispatch call checked against the reference: small enough for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 tests/gpu/one_pre_dispatch_call.py [--graph]

``--graph`` uses the command-buffer-compatible target with XLA's CUDA graphs forced on for it.
"""

from __future__ import annotations

import os
import sys

if "--graph" in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer=CUSTOM_CALL,FUSION"
    )
    os.environ["JAX_MEGAMOE_GRAPH_TARGETS"] = "1"

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_megamoe import ops, reference


def main() -> int:
    rng = np.random.default_rng(0)
    t, h, k, cap = 5, 4096, 6, 128
    x = jnp.asarray(rng.standard_normal((t, h)) * 4, jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-1, 256, size=(t, k)), jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    f = jax.jit(
        functools.partial(ops.pre_dispatch, mode="fp8", num_max_tokens=cap, routed_scaling_factor=1.5, backend="ffi")
    )
    text = f.lower(x, idx, w).as_text()
    target = [line for line in text.splitlines() if "custom_call @jax_megamoe" in line][0].split("@")[1].split("(")[0]
    outs = [jax.block_until_ready(f(x * (i + 1), idx, w)) for i in range(3)]
    with jax.default_device(jax.devices("cpu")[0]):
        want = reference.pre_dispatch(
            jax.device_put(np.asarray(x * 3), jax.devices("cpu")[0]),
            np.asarray(idx),
            np.asarray(w),
            mode="fp8",
            num_max_tokens=cap,
            routed_scaling_factor=1.5,
        )
    ok = all(np.array_equal(np.asarray(g).view(np.uint8), np.asarray(e).view(np.uint8)) for g, e in zip(outs[-1], want))
    print(f"target={target} bit_exact={ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
