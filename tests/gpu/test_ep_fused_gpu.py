"""Fused intranode expert parallelism on several sm_90 GPUs of one host (``parallel.ep_moe``,
``dispatch="fused"``): DeepGEMM's multi-rank Mega MoE kernel with library-owned, peer-mapped
symmetric buffers, one custom call per device inside ``shard_map``.

Needs >= 2 GPUs (skips otherwise). Checks, each printing ``TABLE`` lines:
- EP 2 and 4 on the tiny V4 shape with skewed routing (rank 0's tokens all routed nowhere, no pair
  for the last rank's experts, an id >= E, an expert named twice by one token) against the
  pure-JAX reference (rel. L2 <= 1e-2, routed-nowhere rows exactly 0), and against the single-GPU
  kernel (EP 1) on the same tokens;
- V4-Flash shapes (H 4096, I 2048, E 256, K 6) against the collective path with reference math;
- 1,000 consecutive steps with a rank that has zero tokens, samples checked;
- the Flax block with a mesh takes the fused path and matches the single-device kernel.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe import ops, parallel, reference
from jax_megamoe.ops import MoEOptions
from jax_megamoe.parallel import EPOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: parallel_worker helpers
from parallel_worker import make_routing, make_weights  # noqa: E402

GPUS = [d for d in jax.devices() if d.platform == "gpu"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ops.device_arch() != 9, reason="the fused kernel needs sm_90 GPUs"),
    pytest.mark.skipif(len(GPUS) < 2, reason="expert parallelism needs at least 2 GPUs"),
]

REL_TOL = 1e-2
CLAMP = 10.0
EP_SIZES = [n for n in (2, 4, 8) if n <= len(GPUS)]


def _card() -> str:
    return f"{len(GPUS)} x {GPUS[0].device_kind}"


def _mesh(n: int):
    return jax.sharding.Mesh(np.array(GPUS[:n]), ("ep",))


def _rel(got, want) -> float:
    g = np.asarray(got, np.float64)
    r = np.asarray(want, np.float64)
    return float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))


def _check(got, want, idx, num_experts: int, *, what: str) -> float:
    g = np.asarray(got).astype(np.float32)
    assert g.shape == np.asarray(want).shape, (what, g.shape)
    assert np.isfinite(g).all(), f"{what}: non-finite outputs"
    idx = np.asarray(idx)
    nowhere = ((idx < 0) | (idx >= num_experts)).all(axis=1)
    assert (g[nowhere] == 0).all(), f"{what}: rows routed nowhere must be exactly 0"
    rel = _rel(g, want)
    assert rel <= REL_TOL, f"{what}: relative L2 error {rel:.3e} > {REL_TOL}"
    return rel


@pytest.fixture(scope="module")
def tiny_fp8():
    return make_weights("fp8")  # DeepSeek V4 tiny: H 512, I 256, E 16, K 4 (FP4 checkpoint -> FP8)


@pytest.mark.parametrize("n", EP_SIZES)
def test_fused_matches_reference_tiny(tiny_fp8, n):
    x, idx, w = make_routing(n, tiny_fp8.num_experts, seed=100 + n)  # T = 32 tokens, T/n per rank
    args = (jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w))
    mesh = _mesh(n)
    path = parallel.ep_path(mesh, "ep", "fp8", 32 // n)
    assert path == "fused", parallel.fused_available(mesh, "ep", "fp8")
    t0 = time.perf_counter()
    y = jax.block_until_ready(
        parallel.ep_moe(
            *args, tiny_fp8, mesh=mesh, mode="fp8", options=EPOptions(activation_clamp=CLAMP, routed_scaling_factor=1.5)
        )
    )
    first = time.perf_counter() - t0
    assert y.sharding.spec[0] == "ep"
    ref = reference.mega_moe(
        *args, tiny_fp8, mode="fp8", activation_clamp=CLAMP, options=MoEOptions(routed_scaling_factor=1.5)
    )
    rel = _check(y, ref, idx, tiny_fp8.num_experts, what=f"fused EP{n} tiny")
    tl = 32 // n
    assert (np.asarray(y)[:tl] == 0).all()  # rank 0: no token routed anywhere
    # The single-GPU kernel on the same 32 tokens: same per-token quantisation and combine order.
    one = ops.mega_moe(
        *args,
        tiny_fp8,
        activation_clamp=CLAMP,
        backend="ffi",
        options=MoEOptions(routed_scaling_factor=1.5, kernel="fused"),
    )
    a, b = np.asarray(y).view(np.uint16), np.asarray(one).view(np.uint16)
    differing = int((a != b).sum())
    rel1 = _rel(y, one)
    assert rel1 <= REL_TOL
    print(
        f"TABLE ep_fused|tiny H=512 I=256 E=16 K=4|EP{n}|T=32 ({tl}/rank)|rel_l2 vs reference={rel:.2e}|"
        f"vs EP1 kernel rel={rel1:.1e} differing bf16={differing}/{a.size}|first call {first:.1f} s|{_card()}"
    )


@pytest.fixture(scope="module")
def flash_fp8():
    """V4-Flash FP8 experts (6.4 GB), freed with the module so later GPU tests get the memory back."""
    from test_mega_moe_sm90_gpu import FLASH, _weights

    return _weights(2, **FLASH)


@pytest.mark.parametrize("n", EP_SIZES)
def test_fused_v4_flash_matches_collective_reference(flash_fp8, n):
    from test_mega_moe_sm90_gpu import FLASH

    weights = parallel.shard_weights(flash_fp8, _mesh(n))
    t = 64 * n
    rng = np.random.default_rng(7 + n)
    idx = np.stack([rng.choice(FLASH["E"], size=FLASH["K"], replace=False) for _ in range(t)]).astype(np.int32)
    idx[: t // n] = -1  # rank 0 has zero tokens
    idx[rng.random(idx.shape) < 0.05] = -1
    w = rng.uniform(0.05, 0.5, idx.shape).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((t, FLASH["H"])), jnp.bfloat16)
    args = (x, jnp.asarray(idx), jnp.asarray(w))
    mesh = _mesh(n)
    kw = dict(mesh=mesh, mode="fp8")
    y = parallel.ep_moe(*args, weights, **kw, options=EPOptions(activation_clamp=CLAMP, dispatch="fused"))
    ref = parallel.ep_moe(
        *args, weights, **kw, options=EPOptions(activation_clamp=CLAMP, dispatch="ragged", backend="reference")
    )
    rel = _check(y, ref, idx, FLASH["E"], what=f"fused EP{n} V4-Flash")
    print(
        f"TABLE ep_fused|V4-Flash H=4096 I=2048 E=256 K=6 clamp 10|EP{n}|T={t} ({t // n}/rank, rank 0 empty)|"
        f"rel_l2 vs reference={rel:.2e}|collective path with reference math as oracle|{_card()}"
    )


def test_fused_1000_steps_with_an_empty_rank(tiny_fp8):
    n = len(GPUS) if len(GPUS) in (2, 4, 8) else 2
    mesh = _mesh(n)
    routings = [make_routing(n, tiny_fp8.num_experts, seed=500 + j) for j in range(4)]  # rank 0 always empty
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("ep"))
    dev = [tuple(jax.device_put(a, sharded) for a in r) for r in routings]
    w_sh = parallel.shard_weights(tiny_fp8, mesh)
    run = jax.jit(
        lambda x, i, w, ww: parallel.ep_moe(
            x, i, w, ww, mesh=mesh, mode="fp8", options=EPOptions(activation_clamp=CLAMP, dispatch="fused")
        )
    )
    vary = jax.jit(lambda x, s: (x * (1 + s % 5).astype(jnp.bfloat16)).astype(jnp.bfloat16))
    samples = {0, 1, 333, 998, 999}
    got = {}
    jax.block_until_ready(run(*dev[0], w_sh))
    t0 = time.perf_counter()
    for s in range(1000):
        x, i, w = dev[s % 4]
        xs = vary(x, jnp.int32(s))
        y = run(xs, i, w, w_sh)
        if s in samples:
            got[s] = (xs, y)
    jax.block_until_ready(y)
    dt = (time.perf_counter() - t0) / 1000
    t0 = time.perf_counter()
    for s in range(200):  # the layer alone, same inputs
        y2 = run(*dev[0], w_sh)
    jax.block_until_ready(y2)
    dt_layer = (time.perf_counter() - t0) / 200
    rels = []
    for s, (xs, y) in got.items():
        _, i, w = routings[s % 4]
        xh = jnp.asarray(np.asarray(xs))
        ref = reference.mega_moe(xh, jnp.asarray(i), jnp.asarray(w), tiny_fp8, mode="fp8", activation_clamp=CLAMP)
        rels.append(_check(y, ref, i, tiny_fp8.num_experts, what=f"step {s}"))
        assert (np.asarray(y)[: 32 // n] == 0).all()
    print(
        f"TABLE ep_fused|tiny, rank 0 with zero tokens|EP{n}|1000 steps|max rel_l2={max(rels):.2e} on "
        f"{len(rels)} samples|{dt * 1e6:.0f} us/step incl. input update, {dt_layer * 1e6:.0f} us/step layer only|"
        f"{_card()}"
    )


def test_flax_block_with_a_mesh_takes_the_fused_path():
    from flax import nnx

    from jax_megamoe.models.deepseek_v4 import DeepseekV4Config, DeepseekV4MoE, MoEBlockOptions

    cfg = DeepseekV4Config.tiny()
    n = EP_SIZES[-1]
    mesh = _mesh(n)
    layer = cfg.num_hash_layers
    sharded = DeepseekV4MoE(cfg, layer_idx=layer, mode="fp8", rngs=nnx.Rngs(3), options=MoEBlockOptions(mesh=mesh))
    single = DeepseekV4MoE(cfg, layer_idx=layer, mode="fp8", rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((37, cfg.hidden_size)) * 2, jnp.bfloat16)

    @nnx.jit
    def run(m, x):
        return m(x)

    t_pad = 37 + (-37) % n
    path = parallel.ep_path(mesh, "ep", "fp8", t_pad // n)
    assert path == "fused"
    y_mesh = np.asarray(run(sharded, x), np.float32)
    y_one = np.asarray(run(single, x), np.float32)
    single.backend = "reference"
    y_ref = np.asarray(run(single, x), np.float32)
    assert np.isfinite(y_mesh).all()
    e1, e2 = _rel(y_mesh, y_one), _rel(y_mesh, y_ref)
    assert e1 <= REL_TOL and e2 <= REL_TOL, (e1, e2)
    print(
        f"TABLE flax block|tiny, mesh ep={n}, T=37 -> padded to {t_pad}|fused path|rel_l2 vs 1-GPU kernel="
        f"{e1:.1e}, vs reference={e2:.1e}|{_card()}"
    )


def test_fused_inside_cuda_graphs():
    """JAX_MEGAMOE_GRAPH_TARGETS=1: the multi-rank kernel recorded into each GPU's command buffer
    replays with the plain target's bits (fresh process: XLA_FLAGS is read once)."""
    import subprocess

    script = Path(__file__).with_name("ep_graph_check.py")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    line = next(line for line in out.splitlines() if line.startswith("graph "))
    print("TABLE ep_fused|" + line + f"|{_card()}")


@pytest.mark.parametrize("n", EP_SIZES)
def test_plain_jit_token_sharded_runs_the_kernel_per_gpu(tiny_fp8, n):
    """jax_megamoe/kernels/_rules.py on GPUs: plain jax.jit over x / topk_idx / topk_weights sharded on the
    token dim over n GPUs, weights replicated: each GPU runs the single-GPU kernel on its own rows
    (no collective in the compiled program) and gets the bits the one-GPU call gives those rows;
    weights sharded on the expert dim fail with ShardingError instead of a gather."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x, idx, w = make_routing(n, tiny_fp8.num_experts, seed=300 + n)
    mesh = _mesh(n)
    args = [jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("ep"))) for a in (x, idx, w)]
    rep = jax.device_put(tiny_fp8, NamedSharding(mesh, P()))
    f = jax.jit(
        lambda a, b, c, ww: ops.mega_moe(
            a, b, c, ww, activation_clamp=CLAMP, backend="ffi", options=MoEOptions(kernel="fused")
        )
    )
    hlo = f.lower(*args, rep).compile().as_text()
    collectives = [c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if c in hlo]
    assert not collectives, collectives
    y = np.asarray(f(*args, rep))
    tl = x.shape[0] // n
    one = jax.jit(
        lambda a, b, c: ops.mega_moe(
            a, b, c, tiny_fp8, activation_clamp=CLAMP, backend="ffi", options=MoEOptions(kernel="fused")
        )
    )
    for d in range(n):  # the one-GPU kernel on shard d's rows alone
        rows = slice(d * tl, (d + 1) * tl)
        want = np.asarray(one(jnp.asarray(x[rows]), jnp.asarray(idx[rows]), jnp.asarray(w[rows])))
        np.testing.assert_array_equal(y[rows].view(np.uint16), want.view(np.uint16))
    ref = reference.mega_moe(
        jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), tiny_fp8, mode="fp8", activation_clamp=CLAMP
    )
    rel = _check(y, ref, idx, tiny_fp8.num_experts, what=f"plain jit token-sharded x{n}")
    sharded = jax.device_put(tiny_fp8, NamedSharding(mesh, P("ep")))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"ShardingError: weights.l1 .*'ep'.*ep_moe"):
        f.lower(*args, sharded).compile()
    print(
        f"TABLE plain jit|tiny, T={x.shape[0]} token-sharded over {n} GPUs|per-GPU kernel, no collective|"
        f"= one-GPU bits per shard|rel_l2={rel:.2e}|expert-sharded: ShardingError|{_card()}"
    )
