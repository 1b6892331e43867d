"""Token-form and two-level expert parallelism on sm_90 GPUs (``jax_megamoe._src.kernels.parallel_hier``).

- one GPU: one-level ``ep_moe_hier`` (``axes=("ep", None)``) on a 1-device mesh (the single-rank kernel once over the received rows)
  against the reference and the plain single-GPU kernel;
- n >= 2 GPUs: the same one level (ragged all-to-all + one kernel call per GPU), with and without a
  second pass past ``pair_capacity``, against the reference (kernel tolerance), stats checked;
- n >= 4 GPUs: ``ep_moe_hier`` on a ``(2, n/2)`` mesh (a simulated host axis): one XLA exchange over
  "host", the fused multi-rank kernel over each half; against the reference.
Each test prints a ``TABLE`` line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe import ops, reference
from jax_megamoe._src.kernels import parallel_hier
from jax_megamoe.ops import MoEOptions
from jax_megamoe.parallel import EPOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hier_worker import expected_rows  # noqa: E402
from parallel_worker import make_routing, make_weights  # noqa: E402

GPUS = [d for d in jax.devices() if d.platform == "gpu"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ops.device_arch() != 9, reason="the kernels here need sm_90 GPUs"),
]
REL_TOL = 1e-2
CLAMP = 10.0


def _rel(got, want) -> float:
    g, r = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))


def _check(y, ref, idx, e, what):
    g = np.asarray(y).astype(np.float32)
    assert np.isfinite(g).all(), what
    nowhere = ((idx < 0) | (idx >= e)).all(axis=1)
    assert (g[nowhere] == 0).all(), f"{what}: rows routed nowhere must be 0"
    assert np.any(g != 0), what
    rel = _rel(g, np.asarray(ref).astype(np.float32))
    assert rel <= REL_TOL, f"{what}: rel L2 {rel:.2e}"
    return rel


@pytest.fixture(scope="module")
def tiny_fp8():
    return make_weights("fp8")


def test_grouped_one_gpu(tiny_fp8):
    # make_routing's skew needs n >= 2 shards (it leaves the last shard's experts unrouted); one GPU
    # takes all of them.
    x, idx, w = make_routing(2, tiny_fp8.num_experts, seed=3)
    args = (jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w))
    mesh = jax.sharding.Mesh(np.array(GPUS[:1]), ("ep",))
    path = parallel_hier.hier_path(mesh, "ep", None, "fp8", 32)
    assert (path.intranode, path.backend) == ("local", "ffi"), path
    y = parallel_hier.ep_moe_hier(
        *args, tiny_fp8, mesh=mesh, axes=("ep", None), mode="fp8", options=EPOptions(activation_clamp=CLAMP)
    )
    ref = reference.mega_moe(*args, tiny_fp8, mode="fp8", activation_clamp=CLAMP)
    rel = _check(y, ref, idx, tiny_fp8.num_experts, "grouped 1 GPU")
    one = ops.mega_moe(*args, tiny_fp8, activation_clamp=CLAMP, backend="ffi", options=MoEOptions(kernel="fused"))
    same = bool(np.array_equal(np.asarray(y).view(np.uint16), np.asarray(one).view(np.uint16)))
    print(
        f"TABLE ep_hier|grouped 1 GPU tiny|rel vs reference={rel:.2e}|bitwise vs single-GPU kernel={same}|"
        f"{GPUS[0].device_kind}"
    )


@pytest.mark.skipif(len(GPUS) < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("capacity", [None, 1])
def test_grouped_multi_gpu(tiny_fp8, capacity):
    n = max(m for m in (2, 4, 8) if m <= len(GPUS))
    x, idx, w = make_routing(n, tiny_fp8.num_experts, seed=40 + n)
    args = (jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w))
    mesh = jax.sharding.Mesh(np.array(GPUS[:n]), ("ep",))
    path = parallel_hier.hier_path(mesh, "ep", None, "fp8", 32 // n, options=EPOptions(pair_capacity=capacity))
    assert (path.dispatch, path.backend) == ("ragged", "ffi"), path
    y, st = parallel_hier.ep_moe_hier(
        *args,
        tiny_fp8,
        mesh=mesh,
        axes=("ep", None),
        mode="fp8",
        options=EPOptions(activation_clamp=CLAMP, pair_capacity=capacity, return_stats=True),
    )
    ref = reference.mega_moe(*args, tiny_fp8, mode="fp8", activation_clamp=CLAMP)
    rel = _check(y, ref, idx, tiny_fp8.num_experts, f"grouped EP{n} capacity={capacity}")
    want = expected_rows(idx, tiny_fp8.num_experts, n, n, capacity or 32)
    assert tuple(int(v) for v in st) == want
    print(
        f"TABLE ep_hier|grouped EP{n} tiny capacity={capacity}|rel vs reference={rel:.2e}|stats={want}|"
        f"{len(GPUS)} x {GPUS[0].device_kind}"
    )


@pytest.mark.skipif(len(GPUS) < 4, reason="a two-level mesh with a fused stage needs 4 GPUs")
def test_hier_fused_simulated_hosts(tiny_fp8):
    n = 8 if len(GPUS) >= 8 else 4
    x, idx, w = make_routing(n, tiny_fp8.num_experts, seed=60 + n)
    args = (jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w))
    mesh = jax.sharding.Mesh(np.array(GPUS[:n]).reshape(2, n // 2), ("host", "ep"))
    path = parallel_hier.hier_path(mesh, "host", "ep", "fp8", 32 // n)
    assert path.intranode == "fused", path
    for capacity in (None, 1):
        y, st = parallel_hier.ep_moe_hier(
            *args,
            tiny_fp8,
            mesh=mesh,
            mode="fp8",
            options=EPOptions(activation_clamp=CLAMP, pair_capacity=capacity, return_stats=True),
        )
        ref = reference.mega_moe(*args, tiny_fp8, mode="fp8", activation_clamp=CLAMP)
        rel = _check(y, ref, idx, tiny_fp8.num_experts, f"hier 2x{n // 2} capacity={capacity}")
        want = expected_rows(idx, tiny_fp8.num_experts, 2, n, capacity or 32)
        assert tuple(int(v) for v in st) == want
        print(
            f"TABLE ep_hier|hier 2x{n // 2} fused intranode capacity={capacity}|rel vs reference={rel:.2e}|"
            f"stats={want}|{len(GPUS)} x {GPUS[0].device_kind}"
        )
