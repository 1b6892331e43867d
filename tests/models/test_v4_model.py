"""The whole DeepSeek V4 model against Hugging Face's DeepseekV4ForCausalLM and against itself.

(a) live oracle (torch + transformers only): HF on three tiny random configs covering sliding, CSA,
    HCA and hash-routed layers, f32, the same official-named weights in both; plus one test per
    place where HF departs from DeepSeek's inference code (we follow DeepSeek).
(b) the committed fixture ``tests/data/v4_tiny_hf_logits.npz`` (HF logits, made by
    ``tests/data/make_v4_hf_fixture.py``): no torch needed.
(c) 32 one-token decode steps through the cache equal the full forward at every position.
(d) quantized (FP8 x FP4 reference) vs exact experts: logits rel. L2 per layer count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import v4_oracle as o

from jax_megamoe._src.models.deepseek_v4 import hyper
from jax_megamoe._src.models.deepseek_v4.model import (
    DeepseekV4Block,
    DeepseekV4ForCausalLM,
    ModelCache,
    ModelOptions,
    forward,
    jit_forward,
)
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "v4_tiny_hf_logits.npz")
NAMES = tuple(o.oracle_configs())
TOL = 1e-5


def _positions(b: int, s: int, start: int = 0) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(start, start + s, dtype=jnp.int32)[None], (b, s))


@pytest.fixture(scope="module")
def fixture_data():
    return np.load(FIXTURE, allow_pickle=False)


def _fixture_case(data, name):
    cfg = DeepseekV4Config(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in json.loads(str(data[f"{name}/config"])).items()}
    )
    pre = f"{name}/w/"
    coded = {}
    for k in data.files:
        if k.startswith(pre) and k.endswith("/q"):
            w = k[len(pre) : -2]
            coded[w] = (data[k], float(data[f"{pre}{w}/step"]), float(data[f"{pre}{w}/offset"]))
    return cfg, o.decode_state_dict(coded), data[f"{name}/tokens"], data[f"{name}/logits"]


_OURS: dict[str, tuple] = {}


def _ours(data, name):
    """(cfg, weights, tokens, HF logits, our model, our logits) for a fixture config (computed once)."""
    if name not in _OURS:
        cfg, sd, tokens, hf_logits = _fixture_case(data, name)
        model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        o.load_into(model, sd)
        b, s = tokens.shape
        logits, _ = jit_forward(model)(None, jnp.asarray(tokens), _positions(b, s))
        _OURS[name] = (cfg, sd, tokens, hf_logits, model, np.asarray(logits))
    return _OURS[name]


# ---------------------------------------------------------------------------------------------
# (b) the committed fixture (no torch)
# ---------------------------------------------------------------------------------------------


def test_fixture_is_small_and_versioned(fixture_data):
    assert os.path.getsize(FIXTURE) < 2_000_000
    meta = json.loads(str(fixture_data["meta"]))
    assert meta["transformers"] and meta["torch"]
    assert sorted(n for n in NAMES) == sorted({k.split("/")[0] for k in fixture_data.files if "/" in k})
    # the fixture's configs are the oracle configs of today (else regenerate it)
    for name in NAMES:
        assert _fixture_case(fixture_data, name)[0] == o.oracle_configs()[name], name
    # together they cover every layer kind
    kinds = set()
    for name in NAMES:
        cfg = o.oracle_configs()[name]
        for i in range(cfg.num_hidden_layers):
            kinds.add((cfg.layer_compress_ratio(i), cfg.is_hash_layer(i)))
    assert {r for r, _ in kinds} == {0, 4, 128} and {h for _, h in kinds} == {True, False}


@pytest.mark.parametrize("name", NAMES)
def test_prefill_matches_hf_fixture(fixture_data, name):
    cfg, _, tokens, hf_logits, _, ours = _ours(fixture_data, name)
    assert ours.shape == hf_logits.shape == (*tokens.shape, cfg.vocab_size) and ours.dtype == np.float32
    err = o.rel_l2(ours, hf_logits)
    print(f"{name}: prefill logits rel. L2 vs HF fixture = {err:.3e}")
    assert err <= TOL, err
    # not vacuous: the logits depend on the tokens, and a perturbed weight moves them far past TOL
    assert float(np.std(hf_logits)) > 0.5
    assert o.rel_l2(ours[:, 1:], hf_logits[:, :-1]) > 0.1


def test_fixture_detects_a_wrong_weight(fixture_data):
    """The tolerance is tight enough to see one perturbed parameter deep in the model."""
    cfg, sd, tokens, hf_logits, _, _ = _ours(fixture_data, "mixed")
    bad = dict(sd)
    key = "layers.2.attn.compressor.ape"  # the HCA compressor: only positions >= 127 see it
    bad[key] = bad[key] * 1.01
    model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    o.load_into(model, bad)
    b, s = tokens.shape
    logits, _ = jit_forward(model)(None, jnp.asarray(tokens), _positions(b, s))
    err = o.rel_l2(np.asarray(logits)[:, 127:], hf_logits[:, 127:])
    print(f"1% on {key}: rel. L2 {err:.3e} on positions >= 127")
    assert err > 10 * TOL, err


# ---------------------------------------------------------------------------------------------
# (c) cached decoding == full forward
# ---------------------------------------------------------------------------------------------


def test_decode_32_steps_equals_full_forward(fixture_data):
    cfg, _, tokens, _, model, full = _ours(fixture_data, "mixed")
    b, s = tokens.shape
    steps = 32
    p = s - steps  # 108: the decode steps cross position 127, where the HCA layer's first entry appears
    step = jit_forward(model)
    cache = model.init_cache(b, s)
    assert isinstance(cache, ModelCache) and len(cache.layers) == cfg.num_hidden_layers
    logits, cache = step(cache, jnp.asarray(tokens[:, :p]), _positions(b, p))
    got = [np.asarray(logits)]
    for t in range(p, s):
        logits, cache = step(cache, jnp.asarray(tokens[:, t : t + 1]), _positions(b, 1, t))
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    per_pos = [o.rel_l2(got[:, t], full[:, t]) for t in range(s)]
    print(f"cached vs full: max rel. L2 over positions {max(per_pos):.3e} (prefill {p}, {steps} decode steps)")
    assert max(per_pos) <= 1e-5, max(per_pos)


# ---------------------------------------------------------------------------------------------
# (d) quantized vs exact experts
# ---------------------------------------------------------------------------------------------


def _quantized_and_exact(n_layers: int):
    from jax_megamoe._src.io.v4_checkpoint import dequantize_fp4_numpy
    from jax_megamoe._src.models.deepseek_v4.moe import random_moe_checkpoint
    from jax_megamoe._src.numerics.layout import MoEWeights

    cfg = DeepseekV4Config.tiny(num_hidden_layers=n_layers)
    q = DeepseekV4ForCausalLM(cfg, experts="quantized", backend="reference", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ex = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    # everything but the routed experts: copied; the experts: one FP4 checkpoint, dequantized for exact
    qs = nnx.to_flat_state(nnx.state(q))
    es = dict(nnx.to_flat_state(nnx.state(ex)))
    for path, v in qs:
        if "experts" in path:
            continue
        es[path].set_value(v.get_value())
    nnx.update(ex, nnx.from_flat_state(list(es.items())))
    for i in range(n_layers):
        ck = random_moe_checkpoint(cfg, 100 + i)
        q.layers[i].ffn.experts.set_value(MoEWeights.from_checkpoint(*ck, mode=q.layers[i].ffn.mode))
        w13 = np.stack([dequantize_fp4_numpy(ck.w13[e], ck.w13_scale[e]) for e in range(cfg.n_routed_experts)])
        w2 = np.stack([dequantize_fp4_numpy(ck.w2[e], ck.w2_scale[e]) for e in range(cfg.n_routed_experts)])
        ex.layers[i].ffn.experts.w13.set_value(jnp.asarray(w13, jnp.float32))
        ex.layers[i].ffn.experts.w2.set_value(jnp.asarray(w2, jnp.float32))
    return cfg, q, ex


def _logits_after_each_layer(model, tokens):
    """Logits of the model cut after layer 1, 2, ..., L (the same weights; one compile)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        m = nnx.merge(graphdef, state)
        pos = _positions(*tokens.shape)
        e = m.embed(tokens).astype(m.param_dtype)
        x = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], m.spec.hc_mult, e.shape[-1]))
        outs = []
        for layer in m.layers:
            x, _ = layer(x, pos, tokens, None)
            y = hyper.hc_head(x, m.hc_head_fn[...], m.hc_head_scale[...], m.hc_head_base[...], m.spec)
            outs.append(m.head(m.norm(y)))
        return outs

    return run(state, tokens)


def test_quantized_vs_exact_experts_per_layer_count():
    """The same random FP4 experts, run quantized (the kernels' FP8 x FP4 numerics, reference backend:
    bf16 MoE input, FP8 activations, requantized intermediate) and exact (dequantized f32 weights,
    f32 math). One MoE layer loses about 4-5% (FP8 e4m3 activations); the random tiny model then
    amplifies the difference layer by layer (and non-hash layers may route differently)."""
    n = 4
    cfg, q, ex = _quantized_and_exact(n)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 24)), jnp.int32)
    lq = _logits_after_each_layer(q, tokens)
    le = _logits_after_each_layer(ex, tokens)
    errs = {k + 1: o.rel_l2(a, b) for k, (a, b) in enumerate(zip(lq, le))}
    x = jax.random.normal(jax.random.key(0), (64, cfg.hidden_size), jnp.float32).astype(jnp.bfloat16)
    tid = jnp.arange(64, dtype=jnp.int32)
    block = o.rel_l2(q.layers[0].ffn(x, tid).astype(jnp.float32), ex.layers[0].ffn(x.astype(jnp.float32), tid))
    print(
        f"quantized ({q.layers[0].ffn.mode}, reference) vs exact experts: one MoE block rel. L2 {block:.3e}; "
        "logits rel. L2 by layer count: " + ", ".join(f"{k}: {e:.3e}" for k, e in errs.items())
    )
    for a in lq:
        assert bool(jnp.all(jnp.isfinite(a))) and float(jnp.std(a)) > 0.1
    assert 1e-3 < block < 6e-2, block  # FP8 activation quantization: visible, small
    assert 1e-3 < errs[1] < 5e-2, errs
    assert all(e < 0.5 for e in errs.values()), errs


# ---------------------------------------------------------------------------------------------
# pieces and argument checks (no torch)
# ---------------------------------------------------------------------------------------------


def test_sinkhorn_comb_is_doubly_stochastic_and_pre_post_ranges():
    spec = hyper.HyperSpec(hc_mult=4, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    rng = np.random.default_rng(0)
    mixes = jnp.asarray(rng.standard_normal((3, 5, spec.mix_size)), jnp.float32)
    pre, post, comb = hyper.hc_split_sinkhorn(
        mixes, jnp.asarray([1.0, 0.7, 1.3]), jnp.asarray(rng.standard_normal(spec.mix_size), jnp.float32), spec
    )
    assert pre.shape == post.shape == (3, 5, 4) and comb.shape == (3, 5, 4, 4)
    assert bool(jnp.all((pre > 0) & (pre <= 1 + 1e-6))) and bool(jnp.all((post > 0) & (post < 2)))
    np.testing.assert_allclose(np.asarray(comb.sum(-2)), 1.0, atol=1e-5)  # columns: normalised last
    np.testing.assert_allclose(np.asarray(comb.sum(-1)), 1.0, atol=1e-2)  # rows: after 20 iterations
    # fewer iterations: rows further from 1
    spec1 = dataclasses_replace(spec, sinkhorn_iters=1)
    _, _, comb1 = hyper.hc_split_sinkhorn(mixes, jnp.ones(3), jnp.zeros(spec.mix_size), spec1)
    assert float(jnp.max(jnp.abs(comb1.sum(-1) - 1))) > float(jnp.max(jnp.abs(comb.sum(-1) - 1)))


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_forward_argument_errors():
    cfg = o.oracle_configs()["clamped"]
    model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    tok = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="positions"):
        forward(model, None, tok, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(TypeError, match="tokens"):
        forward(model, None, tok.astype(jnp.float32), _positions(1, 4))
    with pytest.raises(TypeError, match="cache"):
        forward(model, {"layers": ()}, tok, _positions(1, 4))
    with pytest.raises(ValueError, match="experts"):
        DeepseekV4ForCausalLM(cfg, experts="dense", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="param_dtype"):
        DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float16, rngs=nnx.Rngs(0))


def test_model_options_travel_from_the_model_to_each_block():
    """The model's keywords become one frozen ModelOptions that every block is built from; a block
    built alone from the same options has the same structure and dtypes."""
    cfg = o.oracle_configs()["clamped"]
    model = DeepseekV4ForCausalLM(
        cfg, experts="exact", param_dtype=jnp.float32, backend="reference", rngs=nnx.Rngs(0), simulate_quant=False
    )
    want = ModelOptions(backend="reference", experts="exact", param_dtype=jnp.float32)
    assert model.options == want and hash(model.options) == hash(want) and want != ModelOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        want.experts = "quantized"
    block = DeepseekV4Block(cfg, 1, rngs=nnx.Rngs(3), options=want)
    layer = model.layers[1]
    assert block.ffn.expert_kind == layer.ffn.expert_kind == "exact" and block.ffn.backend == "reference"
    assert block.stream_dtype == layer.stream_dtype == np.float32 and not block.attn.simulate_quant
    got = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(block))
    assert got == jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(layer))
    x = jax.random.normal(jax.random.key(1), (1, 4, cfg.hc_mult, cfg.hidden_size), jnp.float32)
    tok = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 4)), jnp.int32)
    y, _ = block(x, _positions(1, 4), tok)
    assert y.shape == x.shape and y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))
    assert float(jnp.abs(y - x).max()) > 0
    with pytest.raises(ValueError, match="experts: 'dense' is not one of"):
        ModelOptions(experts="dense")
    with pytest.raises(TypeError, match="param_dtype: float16 is not supported"):
        ModelOptions(param_dtype=jnp.float16)
    with pytest.raises(TypeError, match=r"options: expected a jax_megamoe\.models\.deepseek_v4\.ModelOptions"):
        DeepseekV4Block(cfg, 0, rngs=nnx.Rngs(0), options={"experts": "exact"})


# ---------------------------------------------------------------------------------------------
# (a) live oracle: Hugging Face (torch + transformers)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_cases(fixture_data, tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = {}
    for name in NAMES:
        cfg, sd, tokens, _, _, ours = _ours(fixture_data, name)
        hf = o.hf_model(cfg, sd, str(tmp_path_factory.mktemp(name)))
        out[name] = (cfg, sd, tokens, hf, ours)
    del torch
    return out


@pytest.mark.parametrize("name", NAMES)
def test_prefill_matches_hf_live(hf_cases, fixture_data, name):
    import torch

    _cfg, _sd, tokens, hf, ours = hf_cases[name]
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    err = o.rel_l2(ours, ref)
    print(f"{name}: prefill logits rel. L2 vs live HF = {err:.3e}")
    assert err <= TOL, err
    # the fixture was made by this HF (or one that computes the same)
    assert o.rel_l2(fixture_data[f"{name}/logits"], ref) <= 1e-6


def test_hf_softmax_max_subtraction_is_immaterial(hf_cases, monkeypatch):
    """HF subtracts the row max before its sink softmax (marked 'not in the original'); DeepSeek's
    sparse_attn does not. In f32 at these magnitudes the two agree to rounding, and ours matches both."""
    import torch
    import torch.nn.functional as F
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mod

    def no_max_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = mod.repeat_kv(key, module.num_key_value_groups)
        v = mod.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        sinks = module.sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
        probs = F.softmax(torch.cat([w, sinks], dim=-1), dim=-1)[..., :-1]  # no max subtraction
        return torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous(), probs

    _cfg, _sd, tokens, hf, ours = hf_cases["mixed"]
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        monkeypatch.setattr(mod, "eager_attention_forward", no_max_eager)
        ref_nomax = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    d = o.rel_l2(ref_nomax, ref)
    print(f"HF with vs without the max subtraction: rel. L2 {d:.3e}; ours vs without: {o.rel_l2(ours, ref_nomax):.3e}")
    assert d <= 1e-6
    assert o.rel_l2(ours, ref_nomax) <= TOL


def test_router_runs_in_f32_as_deepseek_not_model_dtype():
    """DeepSeek's Gate computes ``linear(x.float(), weight.float())``; HF's routers run
    ``F.linear(hidden, weight)`` in the model dtype. With bf16 activations and weights ours equals
    the f32 product of the bf16 values, and the bf16 linear HF would run differs from it."""
    torch = pytest.importorskip("torch")
    from jax_megamoe._src.models.deepseek_v4.moe import DeepseekV4Gate

    cfg = DeepseekV4Config.tiny()
    gate = DeepseekV4Gate(cfg, 3, rngs=nnx.Rngs(0))  # bf16 weight
    x = jax.random.normal(jax.random.key(1), (64, cfg.hidden_size), jnp.float32).astype(jnp.bfloat16)
    ours = np.asarray(gate.scores(x))
    xt = torch.tensor(np.asarray(x.astype(jnp.float32))).to(torch.bfloat16)
    wt = torch.tensor(np.asarray(gate.weight.get_value().astype(jnp.float32))).to(torch.bfloat16)
    deepseek = torch.sqrt(F_softplus(torch.nn.functional.linear(xt.float(), wt.float()))).numpy()
    hf_bf16 = torch.sqrt(F_softplus(torch.nn.functional.linear(xt, wt).float())).numpy()
    e_ds, e_hf = o.rel_l2(ours, deepseek), o.rel_l2(hf_bf16, deepseek)
    print(f"router scores: ours vs DeepSeek f32 {e_ds:.2e}, HF bf16 linear vs DeepSeek {e_hf:.2e}")
    assert e_ds <= 1e-6 and e_hf > 100 * max(e_ds, 1e-9)


def F_softplus(t):
    import torch

    return torch.nn.functional.softplus(t)


def test_expert_weight_applied_before_down_projection():
    """DeepSeek's Expert scales ``silu(gate) * up`` by the routing weight and then runs ``w2`` (our
    kernels do the same); HF's experts scale ``w2``'s output. Ours equals DeepSeek's order in f32
    and HF's to rounding; in bf16 (DeepSeek casts the scaled intermediate before w2) they differ."""
    torch = pytest.importorskip("torch")
    from jax_megamoe._src.models.deepseek_v4.moe import ExactExperts

    e, h, i, t, k = 8, 64, 32, 40, 2
    ex = ExactExperts(e, h, i, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((t, h)).astype(np.float32)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.1, 2.0, (t, k)).astype(np.float32)
    ours = np.asarray(ex(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), 10.0))
    w13 = torch.tensor(np.asarray(ex.w13.get_value()))
    w2 = torch.tensor(np.asarray(ex.w2.get_value()))

    def run(before: bool, dtype):
        y = torch.zeros(t, h, dtype=torch.float32)
        xt = torch.tensor(x)
        for r in range(t):
            for j in range(k):
                ee = int(idx[r, j])
                gu = w13[ee] @ xt[r]
                g, u = gu[:i].clamp(max=10.0), gu[i:].clamp(-10.0, 10.0)
                act = torch.nn.functional.silu(g) * u
                if before:
                    y[r] += (w2[ee].to(dtype) @ (w[r, j] * act).to(dtype)).float()
                else:
                    y[r] += (w2[ee].to(dtype) @ act.to(dtype)).float() * w[r, j]
        return y.numpy()

    ds, hf = run(True, torch.float32), run(False, torch.float32)
    print(f"exact experts: ours vs DeepSeek order {o.rel_l2(ours, ds):.2e}, vs HF order {o.rel_l2(ours, hf):.2e}")
    assert o.rel_l2(ours, ds) <= 1e-6 and o.rel_l2(ours, hf) <= 1e-5
    ds16, hf16 = run(True, torch.bfloat16), run(False, torch.bfloat16)
    assert o.rel_l2(ds16, hf16) > 1e-4  # the order is visible once the intermediate is rounded


def test_hyper_connection_matches_hf_modules():
    """Our mHC pieces (DeepSeek's order: project, then scale by the row rsqrt) vs HF's modules
    (normalise, then project): the same function to f32 rounding."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DeepseekV4Config as HFConfig
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mod

    cfg = o.oracle_configs()["mixed"]
    hcfg = HFConfig(**o.hf_config_dict(cfg))
    spec = hyper.HyperSpec.from_config(cfg)
    rng = np.random.default_rng(0)
    hc, d = cfg.hc_mult, cfg.hidden_size
    x = rng.standard_normal((2, 7, hc, d)).astype(np.float32)
    y = rng.standard_normal((2, 7, d)).astype(np.float32)
    fn = (0.05 * rng.standard_normal((spec.mix_size, hc * d))).astype(np.float32)
    base = (0.5 * rng.standard_normal(spec.mix_size)).astype(np.float32)
    scale = (1 + 0.3 * rng.standard_normal(3)).astype(np.float32)
    m = mod.DeepseekV4HyperConnection(hcfg)
    with torch.no_grad():
        m.fn.copy_(torch.tensor(fn))
        m.base.copy_(torch.tensor(base))
        m.scale.copy_(torch.tensor(scale))
        post_t, comb_t, coll_t = m(torch.tensor(x))
        out_t = post_t.unsqueeze(-1) * torch.tensor(y).unsqueeze(-2) + torch.matmul(
            comb_t.transpose(-1, -2), torch.tensor(x)
        )
    coll, post, comb = hyper.hc_pre(jnp.asarray(x), jnp.asarray(fn), jnp.asarray(scale), jnp.asarray(base), spec)
    out = hyper.hc_post(jnp.asarray(y), jnp.asarray(x), post, comb)
    for a, b, what in (
        (coll, coll_t, "collapsed"),
        (post, post_t, "post"),
        (comb, comb_t, "comb"),
        (out, out_t, "out"),
    ):
        assert o.rel_l2(a, b.numpy()) <= 1e-6, what
    head = mod.DeepseekV4HyperHead(hcfg)
    fn_h = (0.05 * rng.standard_normal((hc, hc * d))).astype(np.float32)
    base_h = rng.standard_normal(hc).astype(np.float32)
    with torch.no_grad():
        head.hc_fn.copy_(torch.tensor(fn_h))
        head.hc_base.copy_(torch.tensor(base_h))
        head.hc_scale.fill_(0.8)
        h_t = head(torch.tensor(x)).numpy()
    h = hyper.hc_head(jnp.asarray(x), jnp.asarray(fn_h), jnp.asarray([0.8], jnp.float32), jnp.asarray(base_h), spec)
    assert o.rel_l2(h, h_t) <= 1e-6


def test_bf16_params_track_f32(fixture_data):
    """param_dtype bf16 (the stream and the linear weights in bf16, math in f32) stays near f32."""
    cfg, sd, tokens, hf_logits, _, _ours_logits = _ours(fixture_data, "clamped")
    model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    o.load_into(model, sd)
    assert model.layers[0].attn.wq_a.weight.get_value().dtype == jnp.bfloat16
    assert model.layers[0].hc_attn_fn.get_value().dtype == jnp.float32  # hc parameters stay f32
    b, s = tokens.shape
    logits, _ = jit_forward(model)(None, jnp.asarray(tokens), _positions(b, s))
    assert logits.dtype == jnp.float32
    err = o.rel_l2(logits, hf_logits)
    print(f"bf16 params vs HF f32: rel. L2 {err:.3e}")
    assert 1e-4 < err < 5e-2, err


def test_exact_moe_block_hash_padding_and_dtypes():
    """Exact experts: out-of-vocabulary ids on a hash layer route nowhere (only the shared expert),
    f32 and bf16 inputs both work, and the output keeps the input dtype."""
    from jax_megamoe._src.models.deepseek_v4.moe import DeepseekV4MoE, MoEBlockOptions

    cfg = DeepseekV4Config.tiny_model()
    block = DeepseekV4MoE(cfg, 0, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert block.is_hash_layer and block.expert_kind == "exact"
    x = jax.random.normal(jax.random.key(0), (6, cfg.hidden_size), jnp.float32)
    tid = jnp.asarray([3, -1, 7, cfg.vocab_size, 0, 5], jnp.int32)
    y = block(x, tid)
    shared = block.shared_experts(x)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y[1]), np.asarray(shared[1]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y[3]), np.asarray(shared[3]), rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(y[0] - shared[0]))) > 1e-2  # a routed token gets its experts
    yb = block(x.astype(jnp.bfloat16), tid)
    assert yb.dtype == jnp.bfloat16 and o.rel_l2(yb.astype(jnp.float32), y) < 2e-2
    with pytest.raises(ValueError, match="MoEWeights"):
        _ = block.moe_weights
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    with pytest.raises(ValueError, match="options.mesh: experts='exact' runs on one device"):
        DeepseekV4MoE(cfg, 0, experts="exact", rngs=nnx.Rngs(0), options=MoEBlockOptions(mesh=mesh))
    with pytest.raises(TypeError, match="MoEBlockOptions.mesh: expected a jax.sharding.Mesh"):
        MoEBlockOptions(mesh=object())


def test_simulate_quant_model_option():
    """DeepSeek's attention quantisation simulation (FP8 KV, FP4 indexer) as a model option: a small,
    visible change from the exact f32 model with the same weights."""
    cfg = DeepseekV4Config.tiny_model(
        num_hidden_layers=3, compress_ratios=(0, 4, 128), head_dim=72, index_head_dim=32, vocab_size=128
    )  # 64 non-rope dims: FP8 blocks of 64
    sd = o.random_state_dict(cfg, 5)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 40)), jnp.int32)
    out = {}
    for sim in (False, True):
        model = DeepseekV4ForCausalLM(
            cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0), simulate_quant=sim
        )
        o.load_into(model, sd)
        assert all(layer.attn.simulate_quant == sim for layer in model.layers)
        out[sim], _ = jit_forward(model)(None, tokens, _positions(1, 40))
    err = o.rel_l2(out[True], out[False])
    print(f"simulate_quant=True vs exact f32 attention: logits rel. L2 {err:.3e}")
    assert 1e-4 < err < 1e-1, err
