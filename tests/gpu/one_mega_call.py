"""One small fused Mega MoE call (sm_90) for compute-sanitizer; exits non-zero on a wrong result.

    compute-sanitizer --tool memcheck python3 tests/gpu/one_mega_call.py
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_megamoe import ops, reference
from jax_megamoe.layout import MoEWeights


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
    y = np.asarray(ops.mega_moe(x, idx, w, wg, activation_clamp=10.0, num_max_tokens=128, backend="ffi"), np.float32)
    with jax.default_device(cpu):
        want = np.asarray(reference.mega_moe(jax.device_put(np.asarray(x), cpu), np.asarray(idx), np.asarray(w), wc,
                                             mode="fp8", activation_clamp=10.0), np.float32)
    err = float(np.linalg.norm(y - want) / np.linalg.norm(want))
    print(f"mega_moe rel_l2={err:.2e}")
    return 0 if err < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
