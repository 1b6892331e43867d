"""DeepSeek V4 MoE block (Flax NNX): gate, hash routing, shared expert, the whole block.

Every numerical check compares against an independent numpy float64 computation built from the
same parameters (the routed experts dequantised here from the checkpoint bytes, not through
``jax_megamoe.quant``/``layout``).

Error bound of the block (``test_block_matches_float64``): the block differs from the exact
function only by (a) the kernels' activation quantisation of x and of the SwiGLU output before
L2, and (b) bf16 roundings. Model each quantiser as a relative error of RMS ``eps`` per element,
independent across elements; with random weights a dot product then inherits a relative RMS
error ``eps``. The routed output sees three such errors (x -> gate, x -> up, both feeding h,
then h itself), so ``||r_hat - r|| ~ sqrt(3) * eps * ||r||``. For a format with ``m`` mantissa
bits the relative error of a value in ``[2^e, 2^(e+1))`` is uniform over half an ulp of
``2^(e-m)``: RMS ``2^-m / sqrt(12)`` at the bottom of the binade, less above it, so
``eps <= 2^-m / sqrt(12)``: FP8 e4m3 (m = 3) 0.036, FP4 e2m1 (m = 1) 0.144 (plus E2M1's flush of
values below a quarter of the smallest step, which the 0.144 covers for Gaussian-like rows).
bf16 roundings (of the gate/up accumulators, each expert output, the shared intermediate and the
final output) each contribute at most ``2^-9`` relative; ``2^-8 * ||y||`` covers them. Bound:

    ||y_hat - y||_2 <= sqrt(3) * eps_mode * ||r||_2 + 2^-8 * ||y||_2
    eps: fp8xfp4 / fp8 -> 0.036 (B = 0.0625),  mxf4xmxf4 -> 0.144 (B = 0.25)

with ``r`` the float64 routed part and ``y`` the float64 total. This is a statistical bound
(expected values, not a worst case); over the 24 x 512 outputs of a test its own fluctuation is
about 1%. Measured (seeds 0-3, x of RMS 3, about 16% of routed gate/up values clamped):
``||y_hat - y|| / ||r||`` = 0.049-0.050 (fp8xfp4), 0.046-0.047 (fp8), 0.210-0.215 (mxf4xmxf4),
i.e. 0.69-0.75 and 0.83-0.85 of the bound: the quantisers' effective RMS errors are about 0.028
(e4m3) and 0.12 (e2m1) against the bottom-of-binade 0.036 and 0.144 used in the bound.

The shared expert alone has a rigorous element-wise bound (``test_shared_expert_matches_float64``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jax_megamoe.models import deepseek_v4 as dsv4
from jax_megamoe.models.deepseek_v4 import (
    DeepseekV4Config,
    DeepseekV4Gate,
    DeepseekV4MoE,
    DeepseekV4SharedExpert,
    MoEBlockOptions,
    random_moe_checkpoint,
)

MODES = ("fp8xfp4", "mxf4xmxf4", "fp8")
#: Relative RMS error of one activation quantiser (see the module docstring).
EPS_MODE = {"fp8xfp4": 2.0**-3 / math.sqrt(12), "fp8": 2.0**-3 / math.sqrt(12), "mxf4xmxf4": 2.0**-1 / math.sqrt(12)}
BF16 = jnp.bfloat16

CFG = DeepseekV4Config.tiny()


# ------------------------------------------------------------------------------------------------
# Independent float64 helpers
# ------------------------------------------------------------------------------------------------

_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
_E2M1_SIGNED = np.concatenate([_E2M1, -_E2M1])


def deq_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Packed E2M1 (low nibble = even column) times 2^(UE8M0 - 127) per 32 columns, float64."""
    packed = np.asarray(packed)
    vals = np.stack([_E2M1_SIGNED[packed & 0xF], _E2M1_SIGNED[packed >> 4]], axis=-1)
    vals = vals.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    s = np.ldexp(1.0, np.asarray(scale).astype(np.int64) - 127)
    return vals * np.repeat(s, 32, axis=-1)


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def silu(g):
    return g / (1.0 + np.exp(-g))


def swiglu64(g, u, limit):
    if limit is not None:
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
    return silu(g) * u


def gate64(gate: DeepseekV4Gate, x, token_ids=None):
    """(idx, weights, unbiased scores) in float64; ties to the lowest id (stable sort)."""
    cfg = gate.config
    z = f64(x) @ f64(gate.weight.get_value()).T
    s = np.sqrt(np.logaddexp(0.0, z))
    if gate.is_hash_layer:
        idx = np.asarray(gate.tid2eid.get_value())[np.asarray(token_ids)]
    else:
        b = s + f64(gate.bias.get_value())[None, :]
        idx = np.argsort(-b, axis=1, kind="stable")[:, : cfg.num_experts_per_tok]
    w = np.take_along_axis(s, idx, axis=1)
    if cfg.norm_topk_prob:
        w = w / w.sum(axis=1, keepdims=True)
    return idx, w * cfg.routed_scaling_factor, s


def shared64(shared: DeepseekV4SharedExpert, x, limit):
    x = f64(x)
    w1, w3, w2 = (f64(p.get_value()) for p in (shared.w1.weight, shared.w3.weight, shared.w2.weight))
    g, u = x @ w1.T, x @ w3.T
    h = swiglu64(g, u, limit)
    return h @ w2.T, dict(g=g, u=u, h=h, w1=w1, w3=w3, w2=w2, x=x)


def block64(block: DeepseekV4MoE, ckpt, x, token_ids=None, *, limit="config"):
    """(routed, shared, idx, stats) of the whole block in float64 from the checkpoint bytes."""
    cfg = block.config
    limit = cfg.activation_clamp if limit == "config" else limit
    idx, w, _ = gate64(block.gate, x, token_ids)
    w13 = deq_fp4(ckpt.w13, ckpt.w13_scale)  # [E, 2I, H]
    w2 = deq_fp4(ckpt.w2, ckpt.w2_scale)  # [E, H, I]
    xs = f64(x)
    i = cfg.moe_intermediate_size
    routed = np.zeros_like(xs)
    clamped = 0
    for t in range(xs.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            if e < 0:
                continue
            gu = w13[e] @ xs[t]
            g, u = gu[:i], gu[i:]
            clamped += int(np.sum(g > cfg.swiglu_limit) + np.sum(np.abs(u) > cfg.swiglu_limit))
            routed[t] += w2[e] @ (swiglu64(g, u, limit) * w[t, k])
    shared, sh = shared64(block.shared_experts, x, limit)
    clamped_shared = int(np.sum(sh["g"] > cfg.swiglu_limit) + np.sum(np.abs(sh["u"]) > cfg.swiglu_limit))
    return routed, shared, idx, dict(clamped=clamped, clamped_shared=clamped_shared)


def rand_x(seed: int, t: int, h: int = CFG.hidden_size, rms: float = 3.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((t, h)) * rms, BF16)


def set_bias(gate: DeepseekV4Gate, bias: np.ndarray) -> None:
    gate.bias.set_value(jnp.asarray(bias, jnp.float32))


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_presets_have_published_values():
    f = DeepseekV4Config.v4_flash()
    assert (f.hidden_size, f.moe_intermediate_size, f.n_routed_experts, f.num_experts_per_tok) == (4096, 2048, 256, 6)
    assert (f.n_shared_experts, f.routed_scaling_factor, f.swiglu_limit, f.num_hash_layers) == (1, 1.5, 10.0, 3)
    assert (f.vocab_size, f.scoring_func, f.norm_topk_prob) == (129280, "sqrtsoftplus", True)
    p = DeepseekV4Config.v4_pro()
    assert (p.hidden_size, p.moe_intermediate_size, p.n_routed_experts, p.num_experts_per_tok) == (7168, 3072, 384, 6)
    assert (p.n_shared_experts, p.routed_scaling_factor, p.swiglu_limit, p.num_hash_layers) == (1, 2.5, 10.0, 3)
    assert (p.vocab_size, p.scoring_func, p.norm_topk_prob) == (129280, "sqrtsoftplus", True)
    assert f.shared_intermediate_size == 2048 and p.shared_intermediate_size == 3072
    t = DeepseekV4Config.tiny()
    assert (t.hidden_size, t.n_routed_experts, t.num_experts_per_tok, t.routed_scaling_factor) == (512, 16, 4, 1.5)
    assert (t.swiglu_limit, t.num_hash_layers, t.vocab_size) == (10.0, 1, 1000)
    # Presets are valid for every kernel mode they claim (tiny: all three).
    from jax_megamoe._src.numerics import config as cfgmod

    for c, modes in ((f, MODES), (p, MODES), (t, MODES)):
        for m in modes:
            cfgmod.validate_moe_shape(
                hidden=c.hidden_size,
                intermediate=c.moe_intermediate_size,
                num_experts=c.n_routed_experts,
                top_k=c.num_experts_per_tok,
                mode=m,
            )
    assert hash(f) == hash(DeepseekV4Config.v4_flash()) and f == DeepseekV4Config.v4_flash()
    assert DeepseekV4Config.v4_flash(num_hash_layers=0).num_hash_layers == 0


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", 0),
        ("hidden_size", 512.0),
        ("moe_intermediate_size", -256),
        ("n_routed_experts", 0),
        ("num_experts_per_tok", 17),
        ("num_experts_per_tok", 0),
        ("n_shared_experts", -1),
        ("routed_scaling_factor", 0.0),
        ("routed_scaling_factor", float("nan")),
        ("swiglu_limit", -1.0),
        ("swiglu_limit", float("inf")),
        ("num_hash_layers", -1),
        ("vocab_size", 0),
        ("scoring_func", "sigmoid"),
        ("norm_topk_prob", "yes"),
        ("renorm_eps", -1e-20),
        # the rest of the model: each field's bound is declared with it
        ("num_hidden_layers", 0),
        ("num_nextn_predict_layers", -1),
        ("rms_norm_eps", 0.0),
        ("qk_rope_head_dim", -2),
        ("sliding_window", 0),
        ("index_topk", 2.5),
        ("rope_theta", 0.0),
        ("compress_rope_theta", float("inf")),
        ("yarn_factor", -16.0),
        ("yarn_original_max_position", 0),
        ("yarn_beta_fast", float("nan")),
        ("max_position_embeddings", True),
        ("hc_mult", 0),
        ("hc_sinkhorn_iters", 0),
        ("hc_eps", -1e-6),
    ],
)
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        DeepseekV4Config.tiny(**{field: value})


def test_config_optional_fields_take_none():
    """``swiglu_limit`` and ``yarn_factor`` are the only checked fields that may be None."""
    cfg = DeepseekV4Config.tiny(swiglu_limit=None, yarn_factor=None)
    assert cfg.swiglu_limit is None and cfg.yarn_factor is None
    with pytest.raises(ValueError, match="rope_theta"):
        DeepseekV4Config.tiny(rope_theta=None)


def test_config_clamp_semantics():
    assert CFG.activation_clamp == 10.0
    assert DeepseekV4Config.tiny(swiglu_limit=0.0).activation_clamp is None  # REF: clamp only if > 0
    assert DeepseekV4Config.tiny(swiglu_limit=None).activation_clamp is None
    assert CFG.is_hash_layer(0) and not CFG.is_hash_layer(1) and not CFG.is_hash_layer(0, is_mtp=True)


# ------------------------------------------------------------------------------------------------
# Gate
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gate_bias_selects_but_does_not_weigh(seed):
    rng = np.random.default_rng(100 + seed)
    gate = DeepseekV4Gate(CFG, 1, rngs=nnx.Rngs(seed))
    x = rand_x(seed, 24, rms=1.0)
    # A random bias of the size of the score spread changes some selections...
    bias = rng.standard_normal(CFG.n_routed_experts) * 0.5
    set_bias(gate, bias)
    idx, w = gate(x)
    assert idx.dtype == jnp.int32 and w.dtype == jnp.float32 and idx.shape == w.shape == (24, 4)
    idx64, w64, s64 = gate64(gate, x)
    np.testing.assert_array_equal(np.asarray(idx), idx64)
    np.testing.assert_allclose(np.asarray(w), w64, rtol=2e-6, atol=0)
    unbiased = np.argsort(-s64, axis=1, kind="stable")[:, :4]
    assert any(set(a) != set(b) for a, b in zip(unbiased, idx64)), "the bias must change some selection"
    # ... and weights are the *unbiased* scores at the chosen ids: renormalised, times rho.
    ws = np.take_along_axis(s64, np.asarray(idx), axis=1)
    np.testing.assert_allclose(np.asarray(w), ws / ws.sum(1, keepdims=True) * CFG.routed_scaling_factor, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(w).sum(1), CFG.routed_scaling_factor, rtol=1e-6)

    # A bias constructed to force one expert that no token picks without it.
    chosen = set(unbiased.reshape(-1).tolist())
    outsider = (
        next(e for e in range(CFG.n_routed_experts) if e not in chosen)
        if len(chosen) < 16
        else int(np.argmin(s64.max(0)))
    )
    forced = np.zeros(CFG.n_routed_experts)
    forced[outsider] = s64.max() - s64.min() + 1.0
    set_bias(gate, forced)
    idx2, w2 = gate(x)
    assert np.all(np.asarray(idx2)[:, 0] == outsider)  # largest biased score comes first
    ws2 = np.take_along_axis(s64, np.asarray(idx2), axis=1)
    np.testing.assert_allclose(np.asarray(w2), ws2 / ws2.sum(1, keepdims=True) * 1.5, rtol=2e-6)
    # The forced expert's weight is its (small) unbiased score, not the bias.
    assert np.all(np.asarray(w2)[:, 0] < 1.5 / 2)


def test_gate_ties_pick_lowest_expert_id():
    gate = DeepseekV4Gate(CFG, 1, rngs=nnx.Rngs(3))
    w = np.asarray(gate.weight.get_value())
    # Every row equal: all 16 scores tie (and are not zero) -> experts 0..K-1, equal weights.
    gate.weight.set_value(jnp.asarray(np.repeat(w[:1], 16, axis=0)))
    x = rand_x(3, 8, rms=1.0)
    idx, wt = gate(x)
    np.testing.assert_array_equal(np.asarray(idx), np.tile(np.arange(4), (8, 1)))
    np.testing.assert_allclose(np.asarray(wt), 1.5 / 4, rtol=1e-6)
    # Partial tie for the last slot: experts 10, 11, 12 forced in; 2 and 5 identical and next.
    w2 = w.copy()
    w2[5] = w2[2]
    gate.weight.set_value(jnp.asarray(w2))
    bias = np.zeros(16)
    bias[[10, 11, 12]] = 100.0
    bias[[2, 5]] = 50.0
    set_bias(gate, bias)
    idx, _ = gate(x)
    for row in np.asarray(idx):
        assert set(row) == {10, 11, 12, 2}
    # jax.jit gives the same selection.
    g, st = nnx.split(gate)
    idx_j, _ = jax.jit(lambda st, x: nnx.merge(g, st)(x))(st, x)
    np.testing.assert_array_equal(np.asarray(idx_j), np.asarray(idx))


def test_gate_routed_scaling_and_renormalisation():
    x = rand_x(5, 16, rms=1.0)
    ws = {}
    for rho in (1.0, 2.5):
        gate = DeepseekV4Gate(DeepseekV4Config.tiny(routed_scaling_factor=rho), 2, rngs=nnx.Rngs(7))
        set_bias(gate, np.random.default_rng(7).standard_normal(16) * 0.3)
        ws[rho] = gate(x)
    np.testing.assert_array_equal(np.asarray(ws[1.0][0]), np.asarray(ws[2.5][0]))
    # rho multiplies the normalised weights in f32: bit-exact.
    np.testing.assert_array_equal(np.asarray(ws[2.5][1]), np.asarray(ws[1.0][1] * jnp.float32(2.5)))
    np.testing.assert_allclose(np.asarray(ws[1.0][1]).sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ws[2.5][1]).sum(1), 2.5, rtol=1e-6)
    # Without norm_topk_prob the weights are the raw unbiased scores times rho.
    gate = DeepseekV4Gate(DeepseekV4Config.tiny(norm_topk_prob=False), 2, rngs=nnx.Rngs(7))
    idx, w = gate(x)
    _, _, s64 = gate64(gate, x)
    np.testing.assert_allclose(np.asarray(w), np.take_along_axis(s64, np.asarray(idx), 1) * 1.5, rtol=2e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_gate_hash_routing(seed):
    rng = np.random.default_rng(200 + seed)
    gate = DeepseekV4Gate(CFG, 0, rngs=nnx.Rngs(seed))
    assert gate.is_hash_layer and not hasattr(gate, "bias")
    assert "bias" not in nnx.state(gate) and "tid2eid" in nnx.state(gate)
    table0 = np.asarray(gate.tid2eid.get_value())
    assert table0.dtype == np.int32 and table0.shape == (CFG.vocab_size, CFG.num_experts_per_tok)
    # Default: SGLang's dummy table (t + k) % E, K distinct experts per row.
    np.testing.assert_array_equal(table0, (np.arange(1000)[:, None] + np.arange(4)) % 16)
    # A random table of distinct experts per row.
    table = np.argsort(rng.random((CFG.vocab_size, 16)), axis=1)[:, :4].astype(np.int32)
    gate.tid2eid.set_value(jnp.asarray(table))
    x = rand_x(seed + 10, 20, rms=1.0)
    tid = rng.integers(0, CFG.vocab_size, 20).astype(np.int32)
    idx, w = gate(x, jnp.asarray(tid))
    np.testing.assert_array_equal(np.asarray(idx), table[tid])
    idx64, w64, s64 = gate64(gate, x, tid)
    np.testing.assert_allclose(np.asarray(w), w64, rtol=2e-6)
    # Hash routing ignores the best-scoring experts: weights come from the chosen ids' scores.
    assert not np.array_equal(np.sort(np.asarray(idx), 1), np.sort(np.argsort(-s64, 1)[:, :4], 1))
    with pytest.raises(ValueError, match="token_ids"):
        gate(x)
    with pytest.raises(ValueError, match="token_ids"):
        gate(x, jnp.asarray(tid[:5]))
    with pytest.raises(TypeError, match="token_ids"):
        gate(x, jnp.asarray(tid, jnp.float32))
    # Out-of-range ids: no expert (-1) and weight 0 for that row; other rows unchanged.
    bad = tid.copy()
    bad[[1, 4, 7]] = [-1, CFG.vocab_size, CFG.vocab_size + 123]
    idx_b, w_b = gate(x, jnp.asarray(bad))
    assert np.all(np.asarray(idx_b)[[1, 4, 7]] == -1) and np.all(np.asarray(w_b)[[1, 4, 7]] == 0)
    keep = np.setdiff1d(np.arange(20), [1, 4, 7])
    np.testing.assert_array_equal(np.asarray(idx_b)[keep], np.asarray(idx)[keep])
    np.testing.assert_array_equal(np.asarray(w_b)[keep], np.asarray(w)[keep])


def test_non_hash_gate_has_bias_no_table():
    gate = DeepseekV4Gate(CFG, 1, rngs=nnx.Rngs(0))
    assert not gate.is_hash_layer and not hasattr(gate, "tid2eid")
    assert gate.bias.get_value().dtype == jnp.float32 and gate.bias.get_value().shape == (16,)
    assert gate.weight.get_value().dtype == BF16 and gate.weight.get_value().shape == (16, 512)
    assert isinstance(gate.bias, dsv4.GateBias) and isinstance(gate.weight, nnx.Param)
    # token_ids are optional and ignored on non-hash layers.
    x = rand_x(0, 4, rms=1.0)
    a = gate(x)
    b = gate(x, jnp.arange(4, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    # The MTP block is never hash-routed.
    assert not DeepseekV4Gate(CFG, 0, rngs=nnx.Rngs(0), is_mtp=True).is_hash_layer


# ------------------------------------------------------------------------------------------------
# Shared expert
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_expert_matches_float64(seed):
    """Rigorous element-wise bound: the only non-negligible rounding is bf16(h) (2^-9 relative).

    |s_hat - s| <= 2^-8 * (|W2| @ |h|) + 1e-4 * (|W2| @ (|u| * (|W1| @ |x|) + |silu(g)| * (|W3| @ |x|)))
    The first term is twice bf16's unit roundoff on h; the second covers fp32 accumulation of
    the H = 512-term gate/up dot products (gamma_512 ~ 3e-5) through the SwiGLU's sensitivity.
    """
    shared = DeepseekV4SharedExpert(512, 256, swiglu_limit=10.0, rngs=nnx.Rngs(seed))
    x = rand_x(seed, 32, rms=4.0)
    out = shared(x)
    assert out.dtype == jnp.float32 and out.shape == (32, 512)
    s64, d = shared64(shared, x, 10.0)
    assert np.sum(d["g"] > 10) > 0 and np.sum(np.abs(d["u"]) > 10) > 0, "the clamp must be active"
    ax = np.abs(d["x"])
    sens = np.abs(d["u"]) * (ax @ np.abs(d["w1"]).T) + np.abs(silu(d["g"])) * (ax @ np.abs(d["w3"]).T)
    bound = 2.0**-8 * (np.abs(d["h"]) @ np.abs(d["w2"]).T) + 1e-4 * (sens @ np.abs(d["w2"]).T)
    err = np.abs(np.asarray(out, np.float64) - s64)
    assert np.all(err <= bound), float(np.max(err / bound))
    # Without the clamp the result is far off: the clamp matters on these data.
    s_nc, _ = shared64(shared, x, None)
    assert np.max(np.abs(s_nc - s64) / bound) > 2  # a missing clamp would fail the bound


def test_shared_expert_load_fp8():
    quant = pytest.importorskip("jax_megamoe.quant")
    del quant
    rng = np.random.default_rng(0)
    shared = DeepseekV4SharedExpert(512, 256, swiglu_limit=10.0, rngs=nnx.Rngs(0))
    tensors = {}
    for name, shape in (("w1", (256, 512)), ("w3", (256, 512)), ("w2", (512, 256))):
        q = (rng.standard_normal(shape) * 50).astype(ml_dtypes.float8_e4m3fn)
        s = rng.integers(110, 125, (shape[0] // 128, shape[1] // 128)).astype(np.uint8)
        tensors[name] = (q, s)
    shared.load_fp8(*tensors["w1"], *tensors["w2"], *tensors["w3"])
    for name, (q, s) in tensors.items():
        want = q.astype(np.float64) * np.repeat(np.repeat(np.ldexp(1.0, s.astype(int) - 127), 128, 0), 128, 1)
        got = f64(getattr(shared, name).weight.get_value())
        np.testing.assert_array_equal(got, want)  # exact: e4m3 times 2^k fits bf16


# ------------------------------------------------------------------------------------------------
# Random checkpoints
# ------------------------------------------------------------------------------------------------


def test_random_checkpoint_shapes_determinism_and_scale():
    calls = []
    a = random_moe_checkpoint(CFG, 3, progress=lambda d, t: calls.append((d, t)))
    b = random_moe_checkpoint(CFG, 3)
    c = random_moe_checkpoint(CFG, 4, num_experts=2)
    e, h, i = 16, 512, 256
    want = [(e, 2 * i, h // 2), (e, 2 * i, h // 32), (e, h, i // 2), (e, h, i // 32)]
    assert [t.shape for t in a] == want and all(t.dtype == np.uint8 for t in a)
    assert c.w13.shape == (2, 2 * i, h // 2)
    for ta, tb in zip(a, b):
        np.testing.assert_array_equal(ta, tb)
    assert not np.array_equal(a.w13[:2], c.w13)
    assert len(calls) == e and calls[-1][0] == calls[-1][1] == sum(t.nbytes for t in a)
    c13 = dsv4.random_checkpoint_scale_bytes(h, 2.0)
    c2 = dsv4.random_checkpoint_scale_bytes(i, 1.0)
    assert set(np.unique(a.w13_scale)) == {c13 - 1, c13, c13 + 1}
    assert set(np.unique(a.w2_scale)) == {c2 - 1, c2, c2 + 1}
    assert len(np.unique(a.w13)) == 256  # every byte value (all E2M1 codes, both signs)
    # The stated design: unit-RMS inputs give gate/up RMS ~2 and expert outputs RMS ~1.
    xs = np.random.default_rng(0).standard_normal((64, h))
    gu = xs @ deq_fp4(a.w13[:4], a.w13_scale[:4]).reshape(-1, h).T
    assert 1.4 < np.sqrt(np.mean(gu**2)) < 2.8
    hs = np.random.default_rng(1).standard_normal((64, i))
    o = hs @ deq_fp4(a.w2[:4], a.w2_scale[:4]).reshape(-1, i).T
    assert 0.7 < np.sqrt(np.mean(o**2)) < 1.4


# ------------------------------------------------------------------------------------------------
# The block
# ------------------------------------------------------------------------------------------------

_BLOCKS: dict = {}


def make_block(mode: str, layer_idx: int, seed: int):
    """(block, checkpoint) with the routed experts built from a known random checkpoint."""
    key = (mode, layer_idx, seed)
    if key not in _BLOCKS:
        from jax_megamoe.layout import MoEWeights

        ckpt = random_moe_checkpoint(CFG, 1000 + seed)
        weights = MoEWeights.from_checkpoint(*ckpt, mode=mode)
        block = DeepseekV4MoE(CFG, layer_idx, mode=mode, rngs=nnx.Rngs(seed), options=MoEBlockOptions(weights=weights))
        if not block.is_hash_layer:
            set_bias(block.gate, np.random.default_rng(seed).standard_normal(16) * 0.3)
        _BLOCKS[key] = (block, ckpt)
    return _BLOCKS[key]


def _rel_err_and_bound(y_hat, routed, shared, mode):
    y = routed + shared
    err = np.linalg.norm(np.asarray(y_hat, np.float64) - y)
    bound = math.sqrt(3) * EPS_MODE[mode] * np.linalg.norm(routed) + 2.0**-8 * np.linalg.norm(y)
    return err, bound


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer_idx,seed", [(1, 0), (0, 1)])
def test_block_matches_float64(mode, layer_idx, seed):
    block, ckpt = make_block(mode, layer_idx, seed)
    assert block.mode == mode and block.moe_weights.mode == mode
    t = 24
    x = rand_x(50 + seed, t)
    tid = jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, t), jnp.int32)
    y = block(x, tid)
    assert y.dtype == BF16 and y.shape == (t, CFG.hidden_size)
    routed, shared, idx, stats = block64(block, ckpt, x, np.asarray(tid))
    np.testing.assert_array_equal(np.asarray(block.gate(x, tid)[0]), idx)
    assert stats["clamped"] > 0 and stats["clamped_shared"] > 0, stats  # the clamp is active
    err, bound = _rel_err_and_bound(y, routed, shared, mode)
    assert err <= bound, (err / np.linalg.norm(routed), bound / np.linalg.norm(routed))
    # The same data without the clamp in the oracle is far outside the bound: it is tested.
    r_nc, s_nc, _, _ = block64(block, ckpt, x, np.asarray(tid), limit=None)
    err_nc, _ = _rel_err_and_bound(y, r_nc, s_nc, mode)
    assert err_nc > 2 * bound
    assert np.linalg.norm(routed) > 0.5 * np.linalg.norm(shared) > 0  # both parts matter


def test_block_jit_equals_eager_and_split_merge():
    block, _ = make_block("fp8xfp4", 1, 0)
    x = rand_x(7, 16)
    eager = block(x)
    via_nnx = nnx.jit(lambda m, x: m(x))(block, x)
    g, state = nnx.split(block)
    assert "experts" in state and isinstance(block.experts, dsv4.RoutedExperts)
    via_jax = jax.jit(lambda st, x: nnx.merge(g, st)(x))(state, x)
    np.testing.assert_array_equal(np.asarray(eager, np.float32), np.asarray(via_nnx, np.float32))
    np.testing.assert_array_equal(np.asarray(eager, np.float32), np.asarray(via_jax, np.float32))
    assert float(jnp.sum(jnp.abs(eager.astype(jnp.float32)))) > 0
    # The reference backend is what "auto" runs on CPU.
    ref = DeepseekV4MoE(
        CFG, 1, rngs=nnx.Rngs(0), backend="reference", options=MoEBlockOptions(weights=block.moe_weights)
    )
    ref.gate.bias.set_value(block.gate.bias.get_value())
    ref.shared_experts = block.shared_experts
    np.testing.assert_array_equal(np.asarray(ref(x), np.float32), np.asarray(eager, np.float32))


def test_hash_block_under_jit_and_padding_ids():
    block, _ = make_block("fp8xfp4", 0, 1)
    x = rand_x(8, 12)
    tid = np.random.default_rng(8).integers(0, CFG.vocab_size, 12).astype(np.int32)
    f = nnx.jit(lambda m, x, t: m(x, t))
    np.testing.assert_array_equal(
        np.asarray(f(block, x, jnp.asarray(tid)), np.float32), np.asarray(block(x, jnp.asarray(tid)), np.float32)
    )
    # A padding id (-1) routes to no expert: that row is the shared expert alone.
    tid[3] = -1
    y = f(block, x, jnp.asarray(tid))
    sh = block.shared_experts(x)
    np.testing.assert_array_equal(np.asarray(y[3], np.float32), np.asarray(sh[3].astype(BF16), np.float32))
    with pytest.raises(ValueError, match="token_ids"):
        block(x)


def test_block_random_init_every_mode_and_no_shared():
    x = rand_x(9, 8)
    outs = {}
    for mode in MODES:
        block = DeepseekV4MoE(CFG, 2, mode=mode, rngs=nnx.Rngs(42))
        y = nnx.jit(lambda m, x: m(x))(block, x)
        assert y.shape == (8, 512) and y.dtype == BF16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
        outs[mode] = np.asarray(y, np.float64)
        assert block.moe_weights.num_experts == 16
    # Same seed -> same random checkpoint in every mode -> outputs agree up to quantisation.
    ref = outs["fp8xfp4"]
    for mode in ("fp8", "mxf4xmxf4"):
        assert np.linalg.norm(outs[mode] - ref) < 0.3 * np.linalg.norm(ref)
    # Deterministic given the seed.
    again = DeepseekV4MoE(CFG, 2, mode="fp8xfp4", rngs=nnx.Rngs(42))
    np.testing.assert_array_equal(np.asarray(again(x), np.float64), ref)
    # n_shared_experts = 0: routed experts only.
    cfg0 = DeepseekV4Config.tiny(n_shared_experts=0)
    b0 = DeepseekV4MoE(cfg0, 2, mode="fp8xfp4", rngs=nnx.Rngs(1))
    assert b0.shared_experts is None and b0(x).shape == (8, 512)
    # T = 0 is allowed.
    assert b0(jnp.zeros((0, 512), BF16)).shape == (0, 512)


def test_block_errors_name_the_argument():
    block, _ = make_block("fp8xfp4", 1, 0)
    x = rand_x(0, 4)
    with pytest.raises(TypeError, match="x"):
        block(x.astype(jnp.float32))
    with pytest.raises(ValueError, match="x"):
        block(rand_x(0, 4, h=256))
    with pytest.raises(ValueError, match="x"):
        block(x[None])
    with pytest.raises(ValueError, match="token_ids"):
        block(x, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="backend"):
        DeepseekV4MoE(CFG, 1, rngs=nnx.Rngs(0), backend="cuda", options=MoEBlockOptions(weights=block.moe_weights))
    with pytest.raises(ValueError, match="mode"):
        DeepseekV4MoE(CFG, 1, rngs=nnx.Rngs(0), mode="fp4")
    with pytest.raises(ValueError, match="weights"):
        DeepseekV4MoE(CFG, 1, rngs=nnx.Rngs(0), mode="mxf4xmxf4", options=MoEBlockOptions(weights=block.moe_weights))
    with pytest.raises(ValueError, match="hidden"):  # H % 512 != 0 is invalid for the sm_90 kernel
        DeepseekV4MoE(DeepseekV4Config.tiny(hidden_size=256), 1, rngs=nnx.Rngs(0), mode="fp8")
    with pytest.raises(ValueError, match="layer_idx"):
        DeepseekV4Gate(CFG, -1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="config"):
        DeepseekV4MoE({"hidden_size": 512}, 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ep_dispatch: 'collective' is not one of auto, fused, ragged, padded"):
        MoEBlockOptions(weights=block.moe_weights, ep_dispatch="collective")
    with pytest.raises(ValueError, match=r"ep_dispatch: 'dense' is not one of"):
        MoEBlockOptions(ep_dispatch="dense")


def test_block_abstract_and_jitted_init():
    """Random init also works on traced keys (nnx.eval_shape, nnx.jit), e.g. for sharded init."""
    abstract = nnx.eval_shape(lambda: DeepseekV4MoE(CFG, 1, mode="fp8", rngs=nnx.Rngs(0)))
    w = abstract.moe_weights
    assert (w.mode, w.num_experts, w.hidden, w.intermediate) == ("fp8", 16, 512, 256)
    assert isinstance(w.l1, jax.ShapeDtypeStruct) and w.l1.shape == (16, 512, 512)
    block = nnx.jit(lambda: DeepseekV4MoE(CFG, 0, mode="fp8xfp4", rngs=nnx.Rngs(0)))()
    y = block(rand_x(1, 3), jnp.asarray([5, 6, 7], jnp.int32))
    assert y.shape == (3, 512) and float(jnp.sum(jnp.abs(y.astype(jnp.float32)))) > 0


def test_block_option_specs_validate_and_hash():
    """MoEBlockOptions / BlockLoadOptions: frozen, hashable without weights, errors name the field."""
    opts = MoEBlockOptions(is_mtp=True, ep_dispatch="ragged")
    assert hash(opts) == hash(MoEBlockOptions(is_mtp=True, ep_dispatch="ragged")) and opts != MoEBlockOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.is_mtp = False  # type: ignore[misc]
    lo = dsv4.BlockLoadOptions(verify=False, nibble_order="high_even")
    assert hash(lo) == hash(dsv4.BlockLoadOptions(verify=False, nibble_order="high_even"))
    bad = [
        (TypeError, r"MoEBlockOptions\.weights", dict(weights=np.ones(3))),
        (TypeError, r"MoEBlockOptions\.is_mtp", dict(is_mtp=1)),
        (TypeError, r"MoEBlockOptions\.progress", dict(progress=3)),
        (TypeError, r"MoEBlockOptions\.ep_axis", dict(ep_axis="")),
        (TypeError, r"MoEBlockOptions\.policy", dict(policy="default")),
    ]
    for err, msg, kw in bad:
        with pytest.raises(err, match=msg):
            MoEBlockOptions(**kw)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    with pytest.raises(ValueError, match=r"MoEBlockOptions\.ep_axis: 'x' is not an axis of the mesh \('ep',\)"):
        MoEBlockOptions(mesh=mesh, ep_axis="x")
    with pytest.raises(ValueError, match=r"BlockLoadOptions\.nibble_order: 'big' is not one of low_even, high_even"):
        dsv4.BlockLoadOptions(nibble_order="big")
    with pytest.raises(TypeError, match=r"BlockLoadOptions\.verify"):
        dsv4.BlockLoadOptions(verify="yes")
    with pytest.raises(TypeError, match=r"options: expected a jax_megamoe\.models\.deepseek_v4\.MoEBlockOptions"):
        DeepseekV4MoE(CFG, 1, mode="fp8xfp4", rngs=nnx.Rngs(0), options={"is_mtp": True})
    with pytest.raises(TypeError, match=r"load_options: expected"):
        DeepseekV4MoE.from_checkpoint("/nonexistent", 1, load_options={"verify": False})
    # is_mtp through the spec: layer 0 is a hash layer, but never in the MTP block.
    assert DeepseekV4MoE(CFG, 0, mode="fp8xfp4", rngs=nnx.Rngs(0)).is_hash_layer
    assert not DeepseekV4MoE(
        CFG, 0, mode="fp8xfp4", rngs=nnx.Rngs(0), options=MoEBlockOptions(is_mtp=True)
    ).is_hash_layer
