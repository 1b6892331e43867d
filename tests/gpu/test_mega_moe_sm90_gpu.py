"""sm_90 fused Mega MoE through XLA FFI (target jax_megamoe_mega_moe_sm90) vs the pure-JAX reference.

GPU only (H100/H200). The target is called directly with ``jax.ffi.ffi_call`` (a tiny local
wrapper, independent of ``ops.mega_moe``); the reference runs on the CPU device. Prints lines
starting with ``TABLE `` (shape, T, relative L2 error, time per call, card).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from expert_checks import check_per_expert, expert_errors, plant_scale_block, single_expert_routing

from jax_megamoe import ops, reference
from jax_megamoe.layout import MoEWeights
from jax_megamoe.ops import MoEOptions

GPU_ARCH = ops.device_arch()
TARGET = "jax_megamoe_mega_moe_sm90"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU_ARCH != 9, reason="sm_90 kernels need an H100/H200")]

REL_TOL = 1e-2
# Every expert's rows (one expert per token); 2x for each 128-column block. Measured on an H100
# (2026-12-06): worst expert 1.20e-2 at the small shape (H=512; whole output 2.5e-3), 7.0e-3 at
# V4-Flash size (worst cell 1.31e-2). A planted 2x scale block gives O(1) there, far above either bound.
PER_EXPERT_TOL = 2e-2
SMALL = dict(H=512, I=256, E=16, K=4)
FLASH = dict(H=4096, I=2048, E=256, K=6)  # DeepSeek V4-Flash routed experts


def _card() -> str:
    return jax.devices()[0].device_kind


# --------------------------------------------------------------------------------------
# Local wrapper around the FFI target (the contract of ffi/handlers/mega_moe_sm90.h)
# --------------------------------------------------------------------------------------


@functools.cache
def _ffi_fn(*, H, I, E, K, cap, clamp, fast_math, rsf, reserved_sms=0, wide_tile=False):
    from jax_megamoe._src.kernels import _ffi

    assert _ffi.register(), _ffi.status().reason

    from jax_megamoe._src.kernels._calls import MegaMoECall

    # The one definition of the target's attributes (what ops.mega_moe emits), bare ffi_call here.
    call = MegaMoECall("fp8", num_experts=E, capacity=cap, activation_clamp=clamp, routed_scaling_factor=rsf,
                       fast_math=fast_math, reserved_sms=reserved_sms, sm90_wide_tile=wide_tile)  # fmt: skip
    assert call.target == TARGET

    def f(x, idx, w, l1, l1_sf, l2, l2_sf):
        return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), has_side_effect=True)(
            x, idx, w, l1, l1_sf, l2, l2_sf, **call.attributes(hidden=H, intermediate=I, top_k=K)
        )

    return jax.jit(f)


def mega_moe_ffi(x, idx, w, weights, *, cap, clamp=float("inf"), fast_math=True, rsf=1.0, wide_tile=False):
    f = _ffi_fn(
        H=weights.hidden,
        I=weights.intermediate,
        E=weights.num_local_experts,
        K=idx.shape[1],
        cap=cap,
        clamp=float(clamp),
        fast_math=fast_math,
        rsf=float(rsf),
        wide_tile=bool(wide_tile),
    )
    return f(x, idx.astype(jnp.int32), w, weights.l1, weights.l1_sf, weights.l2, weights.l2_sf)


# --------------------------------------------------------------------------------------
# Inputs: FP8 block-scaled weights generated on the GPU, routing with distinct experts
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("rows", "cols"))
def _quantized_block(key, *, rows, cols):
    """Random f32 [n, rows, cols] -> e4m3 with one f32 scale per 128x128 block (amax / 448)."""
    k1, k2 = jax.random.split(key)
    n = 8
    v = jax.random.normal(k1, (n, rows // 128, 128, cols // 128, 128), jnp.float32)
    block_scale = 0.02 * jnp.exp(0.5 * jax.random.normal(k2, (n, rows // 128, 1, cols // 128, 1), jnp.float32))
    b = v * block_scale
    amax = jnp.max(jnp.abs(b), axis=(2, 4))
    s = jnp.maximum(amax, 1e-12) / 448.0
    q = (b / s[:, :, None, :, None]).astype(jnp.float8_e4m3fn).reshape(n, rows, cols)
    return q, s.astype(jnp.float32)


@functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
def _put(buf, chunk, start: int):
    return jax.lax.dynamic_update_slice_in_dim(buf, chunk, start, 0)


def _weights(seed: int, *, H, I, E, **_) -> MoEWeights:
    """Generated and converted 8 experts at a time into preallocated (donated) leaves: V4-Pro's l1
    is 17 GB, and a second full copy (concatenate, or the gate/up interleave of the whole tensor)
    does not fit an 80 GB H100 next to the other fixtures."""
    key = jax.random.PRNGKey(seed)
    leaves = None
    for c in range(E // 8):
        ka, kb = jax.random.split(jax.random.fold_in(key, c))
        w13, s13 = _quantized_block(ka, rows=2 * I, cols=H)
        w2, s2 = _quantized_block(kb, rows=H, cols=I)
        part = MoEWeights.from_fp8(w13, s13, w2, s2)
        del w13, s13, w2, s2
        parts = [part.l1, part.l1_sf, part.l2, part.l2_sf]
        if leaves is None:
            leaves = [jnp.zeros((E, *a.shape[1:]), a.dtype) for a in parts]
        leaves = [_put(buf, a, c * 8) for buf, a in zip(leaves, parts)]
        del part, parts
    return MoEWeights(*leaves, "fp8", H, I, E).validate()


def _routing(seed: int, t: int, k: int, experts: np.ndarray, *, drop: float = 0.05, empty_rows=(1,)):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    idx[rng.random((t, k)) < drop] = -1
    for r in empty_rows:
        if r < t:
            idx[r] = -1  # a token with no expert at all: its output row must be exactly 0
    w = rng.random((t, k)).astype(np.float32)
    w = w / w.sum(axis=1, keepdims=True)
    return idx, w


def _x(seed: int, t: int, h: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, h)) * np.exp(rng.normal(0.0, 0.5, size=(t, 1)))
    return jnp.asarray(x, jnp.bfloat16)


# --------------------------------------------------------------------------------------
# Reference on the CPU, on the subset of experts the routing uses (same function, fewer bytes)
# --------------------------------------------------------------------------------------


def _cpu_weights(weights: MoEWeights, experts: np.ndarray) -> MoEWeights:
    cpu = jax.devices("cpu")[0]
    sel = jnp.asarray(experts)
    leaves = [jax.device_put(np.asarray(getattr(weights, n)[sel]), cpu) for n in ("l1", "l1_sf", "l2", "l2_sf")]
    return MoEWeights(*leaves, weights.mode, weights.hidden, weights.intermediate, len(experts))


def _reference(x, idx, w, cpu_weights: MoEWeights, experts: np.ndarray, *, clamp, rsf):
    cpu = jax.devices("cpu")[0]
    remap = np.full(int(experts.max()) + 1, -1, np.int32)
    remap[experts] = np.arange(len(experts), dtype=np.int32)
    idx = np.asarray(idx)
    idx_sub = np.where(idx >= 0, remap[np.maximum(idx, 0)], -1).astype(np.int32)
    with jax.default_device(cpu):
        y = reference.mega_moe(
            jax.device_put(np.asarray(x), cpu),
            jax.device_put(idx_sub, cpu),
            jax.device_put(np.asarray(w), cpu),
            cpu_weights,
            mode="fp8",
            activation_clamp=None if np.isinf(clamp) else clamp,
            options=MoEOptions(routed_scaling_factor=rsf, fast_math=True),
        )
        return np.asarray(y)


def _check(got, want, idx, *, what: str) -> float:
    g = np.asarray(got).astype(np.float64)
    r = np.asarray(want).astype(np.float64)
    assert g.shape == r.shape, (what, g.shape, r.shape)
    assert np.isfinite(g).all(), f"{what}: non-finite outputs"
    empty = (np.asarray(idx) < 0).all(axis=1)
    assert (g[empty] == 0).all(), f"{what}: rows without experts must be exactly 0"
    rel = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
    assert rel <= REL_TOL, f"{what}: relative L2 error {rel:.3e} > {REL_TOL}"
    max_abs = float(np.max(np.abs(g - r))) if g.size else 0.0
    print(f"TABLE check|{what}|rel_l2={rel:.2e}|max_abs={max_abs:.2e}|max|ref|={float(np.max(np.abs(r))):.2e}")
    return rel


def _time_device(x, idx, w, weights, *, cap, clamp=float("inf"), n: int = 20, wide_tile=False) -> float:
    """Seconds per call of n back-to-back calls inside ONE jitted program (no Python dispatch per call)."""
    f = _ffi_fn(
        H=weights.hidden,
        I=weights.intermediate,
        E=weights.num_local_experts,
        K=idx.shape[1],
        cap=cap,
        clamp=float(clamp),
        fast_math=True,
        rsf=1.0,
        wide_tile=bool(wide_tile),
    )

    @jax.jit
    def many(x, idx, w, l1, l1_sf, l2, l2_sf):
        y = x
        for _ in range(n):  # has_side_effect: every call is kept, in order, on one stream
            y = f(x, idx, w, l1, l1_sf, l2, l2_sf)
        return y

    args = (x, idx.astype(jnp.int32), w, weights.l1, weights.l1_sf, weights.l2, weights.l2_sf)
    jax.block_until_ready(many(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(many(*args))
        best = min(best, (time.perf_counter() - t0) / n)
    return best


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_weights():
    return _weights(1, **SMALL)


@pytest.mark.parametrize("t", [1, 16, 128])
def test_small_shape(small_weights, t):
    s, cap = SMALL, 128
    experts = np.arange(s["E"])
    idx, w = _routing(10 + t, t, s["K"], experts)
    x = _x(20 + t, t, s["H"])
    t0 = time.perf_counter()
    y = jax.block_until_ready(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), small_weights, cap=cap))
    first = time.perf_counter() - t0
    ref = _reference(x, idx, w, _cpu_weights(small_weights, experts), experts, clamp=float("inf"), rsf=1.0)
    rel = _check(y, ref, idx, what=f"small T={t}")
    dt = _time_device(x, jnp.asarray(idx), jnp.asarray(w), small_weights, cap=cap)
    print(
        f"TABLE mega_moe_sm90|H={s['H']} I={s['I']} E={s['E']} K={s['K']}|T={t}|cap={cap}|rel_l2={rel:.2e}|"
        f"{dt * 1e6:.1f} us/call in-graph (first call {first:.2f} s)|{_card()}"
    )


def test_small_shape_prefill_tile(small_weights):
    """T*K/E >= 64: the 64-row tile by default (the 128x256 tile with its 2-CTA cluster only with
    the sm90_wide_tile attribute, policy.sm90_wide_tile, which the probe tests/gpu/probe_block_m.py measures)."""
    s, cap, t = SMALL, 256, 256
    experts = np.arange(s["E"])
    idx, w = _routing(77, t, s["K"], experts)
    x = _x(78, t, s["H"])
    y = jax.block_until_ready(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), small_weights, cap=cap, rsf=1.5))
    ref = _reference(x, idx, w, _cpu_weights(small_weights, experts), experts, clamp=float("inf"), rsf=1.5)
    rel = _check(y, ref, idx, what=f"small prefill T={t}")
    print(
        f"TABLE mega_moe_sm90|H={s['H']} I={s['I']} E={s['E']} K={s['K']} (T*K/E = 64)|T={t}|"
        f"cap={cap}|rel_l2={rel:.2e}|rsf=1.5|{_card()}"
    )


def test_small_shape_10000_calls(small_weights):
    """10,000 consecutive calls with varying inputs; samples stay correct, nothing hangs."""
    s, cap, t = SMALL, 128, 64
    experts = np.arange(s["E"])
    routings = [_routing(1000 + j, t, s["K"], experts, empty_rows=(j,)) for j in range(5)]
    routings_dev = [(jnp.asarray(i), jnp.asarray(w)) for i, w in routings]
    x0 = _x(999, t, s["H"])
    step = jax.jit(lambda x, i: x * (1 + (i % 7)).astype(jnp.bfloat16) - (i % 3).astype(jnp.bfloat16))
    cpu_w = _cpu_weights(small_weights, experts)
    samples = {0, 1, 4999, 7777, 9999}
    got = {}
    t0 = time.perf_counter()
    for n in range(10000):
        xi = step(x0, jnp.int32(n))
        idx, w = routings_dev[n % 5]
        y = mega_moe_ffi(xi, idx, w, small_weights, cap=cap)
        if n in samples:
            got[n] = (xi, y)
    jax.block_until_ready(y)
    dt = (time.perf_counter() - t0) / 10000
    rels = []
    for n, (xi, y) in got.items():
        idx, w = routings[n % 5]
        ref = _reference(xi, idx, w, cpu_w, experts, clamp=float("inf"), rsf=1.0)
        rels.append(_check(y, ref, idx, what=f"call {n}"))
    print(
        f"TABLE mega_moe_sm90|H={s['H']} I={s['I']} E={s['E']} K={s['K']}|T={t} x10000|cap={cap}|"
        f"max rel_l2={max(rels):.2e} on {len(rels)} samples|{dt * 1e6:.1f} us/call incl. input update|{_card()}"
    )


@pytest.fixture(scope="module")
def flash_weights():
    return _weights(2, **FLASH)


@pytest.mark.parametrize("t", [1, 16, 128, 512])
def test_v4_flash_shape(flash_weights, t):
    s, cap, clamp = FLASH, 512, 10.0
    # Route into 24 of the 256 experts so the CPU reference stays cheap (the kernel sees E=256).
    experts = np.sort(np.random.default_rng(5).choice(s["E"], size=24, replace=False))
    idx, w = _routing(300 + t, t, s["K"], experts)
    x = _x(400 + t, t, s["H"])
    t0 = time.perf_counter()
    y = jax.block_until_ready(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), flash_weights, cap=cap, clamp=clamp))
    first = time.perf_counter() - t0
    ref = _reference(x, idx, w, _cpu_weights(flash_weights, experts), experts, clamp=clamp, rsf=1.0)
    rel = _check(y, ref, idx, what=f"V4-Flash T={t}")
    dt = _time_device(x, jnp.asarray(idx), jnp.asarray(w), flash_weights, cap=cap, clamp=clamp)
    print(
        f"TABLE mega_moe_sm90|V4-Flash H={s['H']} I={s['I']} E={s['E']} K={s['K']} clamp={clamp}|T={t}|cap={cap}|"
        f"rel_l2={rel:.2e}|{dt * 1e6:.1f} us/call in-graph (first call {first:.2f} s)|{_card()}"
    )


# --------------------------------------------------------------------------------------
# The public op, the Flax block, V4-Pro, and separate buffers per config
# --------------------------------------------------------------------------------------


def test_ops_mega_moe_is_the_same_kernel(small_weights):
    """ops.mega_moe(backend='ffi') runs the same target: bit-identical to the direct call."""
    t, k = 48, SMALL["K"]
    experts = np.arange(SMALL["E"])
    idx, w = _routing(11, t, k, experts)
    x = _x(12, t, SMALL["H"])
    direct = np.asarray(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), small_weights, cap=1024, clamp=10.0))
    f = jax.jit(functools.partial(ops.mega_moe, activation_clamp=10.0, backend="ffi"))
    got = np.asarray(f(x, jnp.asarray(idx), jnp.asarray(w), small_weights))
    np.testing.assert_array_equal(got.view(np.uint16), direct.view(np.uint16))
    want = _reference(x, idx, w, _cpu_weights(small_weights, experts), experts, clamp=10.0, rsf=1.0)
    err = _check(got, want, idx, what="ops.mega_moe")
    print(f"TABLE ops.mega_moe|H=512 I=256 E=16 K=4|T={t}|rel_l2={err:.2e}|same bits as direct target|{_card()}")


def test_two_configs_get_separate_buffers(small_weights):
    """Interleaved calls with two caps (two buffers) stay correct."""
    k = SMALL["K"]
    experts = np.arange(SMALL["E"])
    cw = _cpu_weights(small_weights, experts)
    cases = []
    for cap, t, seed in ((128, 24, 21), (384, 200, 22)):
        idx, w = _routing(seed, t, k, experts)
        x = _x(seed + 100, t, SMALL["H"])
        cases.append((cap, x, idx, w, _reference(x, idx, w, cw, experts, clamp=float("inf"), rsf=1.0)))
    for rep in range(20):
        for cap, x, idx, w, want in cases:
            got = np.asarray(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), small_weights, cap=cap))
            if rep in (0, 19):
                _check(got, want, idx, what=f"cap={cap} rep={rep}")
    print(f"TABLE buffers|caps 128 and 384 interleaved x20|T=24,200|correct|separate buffers|{_card()}")


def test_flax_block_on_the_kernel_matches_the_reference():
    from flax import nnx

    from jax_megamoe.models.deepseek_v4 import DeepseekV4Config, DeepseekV4MoE

    cfg = DeepseekV4Config.tiny()
    block = DeepseekV4MoE(cfg, layer_idx=cfg.num_hash_layers, mode="fp8", backend="auto", rngs=nnx.Rngs(3))
    x = _x(31, 37, cfg.hidden_size)

    @nnx.jit
    def run(m, x):
        return m(x)

    y_kernel = np.asarray(run(block, x), np.float32)
    block.backend = "reference"
    y_ref = np.asarray(run(block, x), np.float32)
    err = float(np.linalg.norm(y_kernel - y_ref) / np.linalg.norm(y_ref))
    assert np.isfinite(y_kernel).all() and err <= REL_TOL, err
    print(
        f"TABLE flax block|tiny (H=512 I=256 E=16 K=4), T=37 -> bucket 64|nnx.jit|rel_l2={err:.2e}|vs reference backend|{_card()}"
    )


@pytest.mark.parametrize("t", [16, 128])
def test_v4_pro_shape(t):
    """V4-Pro routed experts (H=7168, I=3072, 384 experts, top-6) in FP8: 25 GB of weights."""
    pro = dict(H=7168, I=3072, E=384, K=6)
    weights = _pro_weights()
    experts = np.random.default_rng(5).choice(pro["E"], size=24, replace=False)
    idx, w = _routing(40 + t, t, pro["K"], experts)
    x = _x(50 + t, t, pro["H"])
    got = np.asarray(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), weights, cap=512, clamp=10.0, rsf=2.5))
    want = _reference(x, idx, w, _cpu_weights(weights, experts), experts, clamp=10.0, rsf=2.5)
    err = _check(got, want, idx, what=f"V4-Pro T={t}")
    print(f"TABLE mega_moe|V4-Pro H=7168 I=3072 E=384 K=6|T={t}|rel_l2={err:.2e}|cap 512, rho 2.5|{_card()}")


@functools.lru_cache(maxsize=1)
def _pro_weights():
    return _weights(7, H=7168, I=3072, E=384)


def test_graph_target_is_captured_and_gives_the_same_bits():
    """JAX_MEGAMOE_GRAPH_TARGETS=1 with XLA's command buffers on for custom calls: the _graph target
    lands inside a command buffer and its replays give the plain target's bits (a fresh process,
    since XLA_FLAGS is read once)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("one_mega_call.py")
    # This process already holds most of the card: the child allocates on demand instead.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    r = subprocess.run([sys.executable, str(script), "--graph"], capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    line = next(line for line in out.splitlines() if line.startswith("graph "))
    print("TABLE graph target|" + line + f"|{_card()}")


def test_nonfinite_token_poisons_only_its_own_row(small_weights):
    """An inf in one token's activations: the kernel and the reference both give that row non-finite
    values (the group's scale is inf) and every other row exactly what it gets without the inf."""
    s, cap, t = SMALL, 128, 16
    experts = np.arange(s["E"])
    idx, w = _routing(91, t, s["K"], experts, empty_rows=())
    x = np.asarray(_x(92, t, s["H"]), np.float32)
    x[3, 200] = np.inf
    x = jnp.asarray(x, jnp.bfloat16)
    y = np.asarray(jax.block_until_ready(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), small_weights, cap=cap)))
    ref = _reference(x, idx, w, _cpu_weights(small_weights, experts), experts, clamp=float("inf"), rsf=1.0)
    bad_y = ~np.isfinite(y.astype(np.float32)).all(axis=1)
    bad_r = ~np.isfinite(ref.astype(np.float32)).all(axis=1)
    assert bad_r.tolist() == [r == 3 for r in range(t)], bad_r
    assert bad_y.tolist() == bad_r.tolist(), (bad_y, bad_r)
    keep = np.arange(t) != 3
    _check(y[keep], ref[keep], idx[keep], what="rows without the inf")
    print(
        f"TABLE mega_moe_sm90|inf in token 3|non-finite rows kernel={np.flatnonzero(bad_y).tolist()} "
        f"reference={np.flatnonzero(bad_r).tolist()}|{_card()}"
    )


def _large_t_routing(seed: int, t: int, k: int, e: int, *, skewed: bool):
    """Top-k over all ``e`` experts: uniform, or skewed (8 hot experts take about half the slots)."""
    rng = np.random.default_rng(seed)
    p = np.ones(e)
    if skewed:
        p[rng.choice(e, size=8, replace=False)] = e / 8.0
    p /= p.sum()
    idx = np.stack([rng.choice(e, size=k, replace=False, p=p) for _ in range(t)]).astype(np.int32)
    idx[rng.random((t, k)) < 0.02] = -1
    idx[1] = -1  # a token routed nowhere: its row must be exactly 0
    w = rng.random((t, k)).astype(np.float32)
    return idx, w / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "skewed"])
@pytest.mark.parametrize("t", [1024, 2048, 4096])
def test_large_t_matches_the_reference(flash_weights, model, skewed, t):
    """Issue 15: the contract (rel. L2 <= 1e-2, routed-nowhere rows exactly 0) at prefill sizes,
    cap = T, routing over all experts. The reference runs on the GPU (HIGHEST precision) on 256
    rows spread over the batch, row 1 (routed nowhere) included."""
    s = FLASH if model == "flash" else dict(H=7168, I=3072, E=384, K=6)
    weights = flash_weights if model == "flash" else _pro_weights()
    idx, w = _large_t_routing(700 + t + skewed, t, s["K"], s["E"], skewed=skewed)
    x = _x(800 + t, t, s["H"])
    clamp, rsf = (10.0, 1.0) if model == "flash" else (10.0, 2.5)
    y = np.asarray(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), weights, cap=t, clamp=clamp, rsf=rsf))
    rows = np.unique(np.concatenate([[1], np.linspace(0, t - 1, 255).round().astype(np.int64)]))
    ref = np.asarray(
        reference.mega_moe(
            x[rows],
            jnp.asarray(idx[rows]),
            jnp.asarray(w[rows]),
            weights,
            mode="fp8",
            activation_clamp=clamp,
            options=MoEOptions(routed_scaling_factor=rsf),
        )
    )
    rel = _check(y[rows], ref, idx[rows], what=f"V4-{model} T={t} {'skewed' if skewed else 'uniform'}")
    assert (y[1] == 0).all()
    print(f"TABLE mega_moe_sm90|V4-{model} cap=T|T={t}|{'skewed' if skewed else 'uniform'}|rel_l2={rel:.2e}|{_card()}")


def test_above_the_cap_the_kernel_runs_in_chunks(flash_weights):
    """Above num_max_tokens, ops.mega_moe runs the fused kernel once per chunk of the cap through
    the one buffer (auto and ffi alike): each chunk is what the kernel computes for those rows
    alone, and the whole stays within the contract against the reference."""
    s, cap = FLASH, 1024
    idx, w = _large_t_routing(901, cap + 8, s["K"], s["E"], skewed=False)
    x = _x(902, cap + 8, s["H"])
    args = (x, jnp.asarray(idx), jnp.asarray(w), flash_weights)
    opts = MoEOptions(num_max_tokens=cap, kernel="fused")
    y_auto = np.asarray(ops.mega_moe(*args, activation_clamp=10.0, backend="auto", options=opts))
    y_ffi = np.asarray(ops.mega_moe(*args, activation_clamp=10.0, backend="ffi", options=opts))
    y_ref = np.asarray(reference.mega_moe(*args, mode="fp8", activation_clamp=10.0))
    rel = _check(y_auto, y_ref, idx, what=f"V4-Flash T={cap + 8} through cap {cap}")
    _check(y_ffi, y_ref, idx, what=f"V4-Flash T={cap + 8} through cap {cap}, backend=ffi")
    tail = np.asarray(
        ops.mega_moe(x[cap:], *(jnp.asarray(a[cap:]) for a in (idx, w)), flash_weights, activation_clamp=10.0,
                     backend="ffi", options=opts)
    )  # fmt: skip
    _check(y_auto[cap:], tail, idx[cap:], what="the last chunk vs the kernel on those rows alone")
    print(f"TABLE mega_moe_sm90|V4-Flash T={cap + 8} > cap {cap}|2 chunks|rel_l2={rel:.2e}|{_card()}")


# --------------------------------------------------------------------------------------
# Per expert and per scale block (tests/expert_checks.py): the whole-output bound above would
# pass one expert with a 10% error or one wrong 128x128 scale block
# --------------------------------------------------------------------------------------

PLANT = {"small": dict(expert_at=5, block=(2, 1)), "flash": dict(expert_at=5, block=(7, 3))}


@pytest.mark.parametrize("model", ["small", "flash"])
def test_every_expert_and_scale_block_and_a_planted_block_is_caught(request, model):
    """Each token routed to exactly one expert: every expert's rows within PER_EXPERT_TOL of the
    reference and every (expert, 128-column block) cell within 2x that. Then one l2_sf 128x128
    block of one expert is doubled: against the clean reference the check must name that expert and
    that column block (and no other expert), and the kernel on the planted weights must still match
    the reference on the same planted weights (the kernel reads that very scale)."""
    s = SMALL if model == "small" else FLASH
    weights = request.getfixturevalue("small_weights" if model == "small" else "flash_weights")
    if model == "small":
        experts, rows, clamp = np.arange(s["E"]), 32, float("inf")
    else:
        experts, rows, clamp = np.sort(np.random.default_rng(8).choice(s["E"], size=24, replace=False)), 32, 10.0
    idx, w = single_expert_routing(experts, rows_per_expert=rows, top_k=s["K"], seed=61)
    t = idx.shape[0]
    cap = 1024 if t > 512 else 512
    x = _x(62, t, s["H"])
    y = np.asarray(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), weights, cap=cap, clamp=clamp))
    ref = _reference(x, idx, w, _cpu_weights(weights, experts), experts, clamp=clamp, rsf=1.0)
    errs = check_per_expert(y, ref, idx, tol=PER_EXPERT_TOL, what=f"{model} clean")
    e_w, v_w, b_w, c_w = errs.worst()
    print(
        f"TABLE per expert|{model} H={s['H']} E={s['E']}, {len(experts)} experts x {rows} rows|clean|"
        f"max expert rel_l2={max(errs.per_expert.values()):.2e}|worst cell (expert {e_w}, cols {b_w}) "
        f"{c_w:.2e}|whole {errs.overall:.2e}|{_card()}"
    )

    target = int(experts[PLANT[model]["expert_at"]])
    r, c = PLANT[model]["block"]
    bad = plant_scale_block(weights, expert=target, leaf="l2_sf", block=(r, c), factor=2.0)
    y_bad = np.asarray(mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), bad, cap=cap, clamp=clamp))
    with pytest.raises(AssertionError, match=rf"over rel. L2 {PER_EXPERT_TOL:g}: \{{{target}: "):
        check_per_expert(y_bad, ref, idx, tol=PER_EXPERT_TOL, what=f"{model} planted")
    bad_errs = expert_errors(y_bad, ref, idx)
    assert [e for e, v in bad_errs.per_expert.items() if v > PER_EXPERT_TOL] == [target], bad_errs.per_expert
    assert np.flatnonzero(bad_errs.per_block[target] > 2 * PER_EXPERT_TOL).tolist() == [r], bad_errs.per_block[target]
    ref_bad = _reference(x, idx, w, _cpu_weights(bad, experts), experts, clamp=clamp, rsf=1.0)
    check_per_expert(y_bad, ref_bad, idx, tol=PER_EXPERT_TOL, what=f"{model} planted vs planted reference")
    print(
        f"TABLE per expert|{model}: l2_sf block ({r}, {c}) of expert {target} x2|caught: expert rel_l2="
        f"{bad_errs.per_expert[target]:.2e}, cell {bad_errs.per_block[target][r]:.2e}|whole output "
        f"{bad_errs.overall:.2e} ({'passes' if bad_errs.overall <= REL_TOL else 'fails'} the {REL_TOL:g} "
        f"whole-output bound)|kernel = reference on the planted weights|{_card()}"
    )
