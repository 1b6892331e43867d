"""DeepSeek V4 attention (Flax NNX): parity with Hugging Face, cache consistency, shapes, errors.

Layer kinds: compress ratio 0 (sliding window only), 4 (CSA: overlapping compressor + Lightning
Indexer), 128 (HCA). Tiny dims; sequences cross several windows and compression blocks; YaRN is on
(factor 4 over an original length of 64, so most of the 8 rope frequencies are interpolated).

* HF parity (torch): our module and ``transformers``' ``DeepseekV4Attention`` with the same random
  float32 weights, full causal prefill, relative L2 <= 1e-5 (measured ~4e-7).
* Cache (no torch): prefill + 32 one-token decode steps, and two-chunk prefills, equal the uncached
  forward at every position (the cached path shares no code with the uncached compressor path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_megamoe._src.models.deepseek_v4.attention import (
    AttentionCache,
    DeepseekV4Attention,
)
from jax_megamoe._src.models.deepseek_v4.rope import (
    RopeSpec,
    inv_freq,
    rope_cos_sin,
    rope_spec,
)
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

RATIOS = (0, 4, 128)
#: Sequence lengths for the full-forward checks per ratio (several windows of 8 / blocks of 4 / 2 HCA blocks).
SEQ = {0: 45, 4: 53, 128: 262}
#: Cache capacity per ratio (leaves empty compressed slots to check).
MAX_LEN = {0: 64, 4: 64, 128: 512}
#: Decode steps after a prefill of SEQ - N_DECODE tokens (13, 21, 230: crosses windows / blocks / 256).
N_DECODE = 32
B = 2


def make_config(**overrides) -> DeepseekV4Config:
    base = {
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "head_dim": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 16,
        "o_groups": 2,
        "o_lora_rank": 24,
        "sliding_window": 8,
        "compress_ratios": RATIOS,
        "index_n_heads": 16,
        "index_head_dim": 32,
        "index_topk": 4,
        "yarn_factor": 4.0,
        "yarn_original_max_position": 64,
    }
    return DeepseekV4Config.tiny(**{**base, **overrides})


CFG = make_config()


def make_layer(ratio: int, cfg: DeepseekV4Config = CFG, seed: int = 0, dtype=jnp.float32) -> DeepseekV4Attention:
    """A layer of kind ``ratio`` with random weights everywhere, drawn with numpy (no per-shape
    compiles): matrices N(0, 1/in); norm weights 1 + N(0, .3^2); ``ape`` and ``attn_sink`` N(0, .3^2)."""
    abstract = nnx.eval_shape(
        lambda: DeepseekV4Attention(cfg, RATIOS.index(ratio), param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed + 17 * ratio)
    values = {}
    for path, var in nnx.to_flat_state(params):
        shape, vdtype = var.get_value().shape, var.get_value().dtype
        r = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2 and path[-1] == "weight":
            r = r / np.sqrt(shape[1])
        elif path[-1] == "weight":
            r = 1.0 + 0.3 * r
        else:
            r = 0.3 * r
        values[path] = jnp.asarray(r, vdtype)
    for path, var in nnx.to_flat_state(params):
        var.set_value(values[path])
    return nnx.merge(graphdef, params, rest)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, pos, cache):
    return nnx.merge(graphdef, state)(x, pos, cache)


def fwd(module, x, pos, cache=None):
    """The layer's forward under one jit (op-by-op dispatch is far slower); layers of the same
    structure share the compiled step, so ``_apply._cache_size()`` counts compiles."""
    graphdef, state = nnx.split(module)
    return _apply(graphdef, state, x, pos, cache)


def inputs(s: int, seed: int = 1, b: int = B) -> tuple[jax.Array, jax.Array]:
    x = np.random.default_rng(seed).standard_normal((b, s, CFG.hidden_size)).astype(np.float32)
    return jnp.asarray(x), jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# Hugging Face parity
# ---------------------------------------------------------------------------------------------


def _hf_forward(cfg, module, x, pos, **hf_overrides):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_oracle
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4Attention as HFAttention,
    )

    hc = hf_oracle.hf_config(cfg, **hf_overrides)
    hf = HFAttention(hc, module.layer_idx).float().eval()
    hf_oracle.copy_attention_to_hf(module, hf)
    pid = torch.from_numpy(np.asarray(pos, np.int64))
    b, s = pos.shape
    with torch.no_grad():
        y, _ = hf(
            torch.from_numpy(np.array(x, np.float32)),
            hf_oracle.hf_rope(hc, pid),
            pid,
            hf_oracle.hf_sliding_mask(s, cfg.sliding_window, b),
        )
    return y.numpy()


@pytest.mark.parametrize("ratio", RATIOS)
def test_matches_hf_full_prefill(ratio):
    x, pos = inputs(SEQ[ratio])
    y_hf = _hf_forward(CFG, make_layer(ratio), x, pos)
    assert rel(full_forward(ratio), y_hf) <= 1e-5


def test_hf_oracle_keys_cover_every_parameter():
    """Every one of our parameters lands on an HF parameter and vice versa (strict copy) per kind."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_oracle
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4Attention as HFAttention,
    )

    hc = hf_oracle.hf_config(CFG)
    for ratio in RATIOS:
        m = make_layer(ratio)
        hf = HFAttention(hc, m.layer_idx)
        hf_oracle.copy_attention_to_hf(m, hf)  # raises on any mismatch
        ours = hf_oracle.official_state_dict(m, "layers.1.attn.")
        theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith("inv_freq")}
        assert len(ours) == len(theirs)
        for k, v in ours.items():
            hk = hf_oracle.official_to_hf(k)[len("layers.1.self_attn.") :]
            np.testing.assert_array_equal(theirs[hk].numpy(), v)


def test_yarn_has_no_magnitude_scale_unlike_hf_default():
    """DeepSeek's YaRN changes only the frequencies (cos/sin are not scaled). HF's generic YaRN
    helper would multiply cos/sin by 0.1 ln(factor) + 1; HF's V4 config forces attention_factor=1.0
    to match DeepSeek. We follow DeepSeek: equal to HF's V4 rope, and differ from the generic one by
    exactly that mscale."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_oracle
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4RotaryEmbedding,
    )

    hc = hf_oracle.hf_config(CFG)
    assert hc.rope_parameters["compress"]["attention_factor"] == 1.0
    pos = np.arange(0, 300, 7)[None]
    cos, sin = rope_cos_sin(rope_spec(CFG, 4), jnp.asarray(pos))
    rot = DeepseekV4RotaryEmbedding(hc)
    hcos, hsin = rot(torch.zeros(()), torch.from_numpy(pos), layer_type="compress")
    np.testing.assert_allclose(np.asarray(cos), hcos.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), hsin.numpy(), atol=2e-6)
    # the sliding-only layers: plain rope_theta, no YaRN
    cos0, _ = rope_cos_sin(rope_spec(CFG, 0), jnp.asarray(pos))
    hcos0, _ = rot(torch.zeros(()), torch.from_numpy(pos), layer_type="main")
    np.testing.assert_allclose(np.asarray(cos0), hcos0.numpy(), atol=2e-6)
    # HF's YaRN without the V4 override: cos/sin scaled by mscale = 0.1 ln(4) + 1
    hc2 = hf_oracle.hf_config(CFG)
    hc2.rope_parameters["compress"].pop("attention_factor")
    hcos2, _ = DeepseekV4RotaryEmbedding(hc2)(torch.zeros(()), torch.from_numpy(pos), layer_type="compress")
    mscale = 0.1 * np.log(4.0) + 1
    np.testing.assert_allclose(hcos2.numpy(), mscale * np.asarray(cos), atol=5e-6)
    assert np.abs(hcos2.numpy() - np.asarray(cos)).max() > 0.1


def test_yarn_blends_frequencies_on_compressed_layers_only():
    spec_c, spec_0 = rope_spec(CFG, 128), rope_spec(CFG, 0)
    plain = inv_freq(RopeSpec(dim=16, theta=CFG.compress_rope_theta))
    yarn = inv_freq(spec_c)
    # the fastest pair is extrapolated (unchanged), the slow ones are divided by the factor
    assert yarn[0] == plain[0]
    np.testing.assert_allclose(yarn[3:], plain[3:] / 4.0, rtol=1e-6)
    np.testing.assert_allclose(inv_freq(spec_0), 1.0 / (1e4 ** (np.arange(0, 16, 2) / 16)), rtol=1e-6)
    assert rope_spec(make_config(yarn_factor=None), 4).yarn_factor is None


def test_indexer_selection_is_exercised():
    """The CSA parity above is only meaningful if the top-k drops entries: with index_topk >= every
    entry the output must change."""
    x, pos = inputs(SEQ[4])
    y_small, _ = fwd(make_layer(4), x, pos)
    y_all, _ = fwd(make_layer(4, make_config(index_topk=64)), x, pos)
    assert rel(y_small, y_all) > 1e-2


def test_compressed_entries_are_attended():
    """The HCA parity is only meaningful if the compressed keys matter: the same layer without its
    compressor agrees before the first entry exists (position 127) and differs after it."""
    x, pos = inputs(SEQ[128])
    m = make_layer(128)
    y, _ = fwd(m, x, pos)
    m.compress_ratio = 0  # same weights and RoPE, compressed keys off
    y0, _ = fwd(m, x, pos)
    y, y0 = np.asarray(y), np.asarray(y0)
    np.testing.assert_allclose(y[:, :127], y0[:, :127], rtol=1e-6, atol=1e-6)
    assert rel(y[:, 127:], y0[:, 127:]) > 1e-2


# ---------------------------------------------------------------------------------------------
# Cache consistency (no torch)
# ---------------------------------------------------------------------------------------------


@functools.cache
def full_forward(ratio: int) -> np.ndarray:
    """The uncached forward over SEQ[ratio] tokens (shared by the tests below)."""
    x, pos = inputs(SEQ[ratio])
    return np.asarray(fwd(make_layer(ratio), x, pos)[0])


def assert_close_per_position(y, y_ref):
    y, y_ref = np.asarray(y), np.asarray(y_ref)
    tol = 2e-6 + 1e-5 * np.abs(y_ref).max()
    err = np.abs(y - y_ref).max(axis=(0, 2))  # per position
    assert err.max() <= tol, f"worst position {int(err.argmax())}: {err.max():.3g} > {tol:.3g}"
    assert rel(y, y_ref) <= 1e-5


@pytest.mark.parametrize("ratio", RATIOS)
def test_prefill_then_decode_equals_full_forward(ratio):
    m = make_layer(ratio)
    s = SEQ[ratio]
    p = s - N_DECODE
    x, pos = inputs(s)
    cache = m.init_cache(B, MAX_LEN[ratio])
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), cache)
    y, cache = fwd(m, x[:, :p], pos[:, :p], cache)
    outs = [y]
    y, cache = fwd(m, x[:, p : p + 1], pos[:, p : p + 1], cache)
    outs.append(y)
    compiled = _apply._cache_size()
    for i in range(p + 1, s):
        y, cache = fwd(m, x[:, i : i + 1], pos[:, i : i + 1], cache)
        outs.append(y)
    assert _apply._cache_size() == compiled  # one compiled step served every decode position
    assert jax.tree.map(lambda a: (a.shape, a.dtype), cache) == shapes
    assert_close_per_position(np.concatenate([np.asarray(o) for o in outs], axis=1), full_forward(ratio))


@nnx.jit
def _dense(compressor, x, start):
    return compressor.dense(x, start)


@pytest.mark.parametrize("ratio", RATIOS)
def test_two_chunk_prefill_equals_full_forward(ratio):
    """A prefill of SEQ - 32 tokens (not aligned to the window or the ratio), then a 32-token chunk
    (longer than the window); the cached compressed entries equal the uncached compressor's and
    the slots past the seen blocks stay empty."""
    m = make_layer(ratio)
    s = SEQ[ratio]
    p = s - N_DECODE
    x, pos = inputs(s)
    cache = m.init_cache(B, MAX_LEN[ratio])
    y1, cache = fwd(m, x[:, :p], pos[:, :p], cache)
    y2, cache = fwd(m, x[:, p:], pos[:, p:], cache)
    assert_close_per_position(np.concatenate([y1, y2], axis=1), full_forward(ratio))
    if ratio == 0:
        return
    n = s // ratio
    pairs = [(cache.compressor.entries, m.compressor)]
    if ratio == 4:
        pairs.append((cache.indexer.entries, m.indexer.compressor))
    for entries, comp in pairs:
        dense = _dense(comp, x, pos[:, 0])
        assert dense.shape[1] == n
        np.testing.assert_allclose(np.asarray(entries[:, :n]), np.asarray(dense), rtol=1e-5, atol=1e-6)
        assert not np.asarray(entries[:, n:]).any()


def test_bf16_input_and_cache():
    m = make_layer(4)
    x, pos = inputs(SEQ[4])
    y32, _ = fwd(m, x, pos)
    cache = m.init_cache(B, SEQ[4], dtype=jnp.bfloat16)
    assert cache.window.dtype == jnp.bfloat16 and cache.compressor.entries.dtype == jnp.bfloat16
    assert cache.compressor.kv.dtype == jnp.float32  # pending state stays f32
    y, cache = fwd(m, x.astype(jnp.bfloat16), pos, cache)
    assert y.dtype == jnp.bfloat16
    assert rel(y.astype(jnp.float32), y32) < 5e-2


def test_bf16_params_compute_in_f32():
    m32 = make_layer(128)
    m16 = make_layer(128, dtype=jnp.bfloat16)
    # the same draws, rounded to bf16 where the parameter is bf16
    assert m16.wq_a.weight[...].dtype == jnp.bfloat16
    assert m16.attn_sink[...].dtype == jnp.float32 and m16.compressor.ape[...].dtype == jnp.float32
    assert m16.kv_norm.weight[...].dtype == jnp.float32
    x, pos = inputs(SEQ[128])
    y32, _ = fwd(m32, x, pos)
    y16, none = fwd(m16, x, pos)
    assert none is None
    assert y16.dtype == jnp.float32
    assert rel(y16, y32) < 3e-2


# ---------------------------------------------------------------------------------------------
# Shapes, names, validation
# ---------------------------------------------------------------------------------------------

_COMMON = {
    "wq_a.weight",
    "q_norm.weight",
    "wq_b.weight",
    "wkv.weight",
    "kv_norm.weight",
    "wo_a.weight",
    "wo_b.weight",
    "attn_sink",
}
_COMP = {"compressor.wkv.weight", "compressor.wgate.weight", "compressor.ape", "compressor.norm.weight"}
_IDX = {"indexer.wq_b.weight", "indexer.weights_proj.weight"} | {"indexer." + k for k in _COMP}


@pytest.mark.parametrize("ratio", RATIOS)
def test_parameter_names_and_shapes(ratio):
    m = nnx.eval_shape(lambda: DeepseekV4Attention(CFG, RATIOS.index(ratio), rngs=nnx.Rngs(0)))
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    want = _COMMON | (_COMP if ratio else set()) | (_IDX if ratio == 4 else set())
    assert set(flat) == want
    h, d, c = CFG.hidden_size, CFG.head_dim, 2 if ratio == 4 else 1
    assert flat["wq_a.weight"].shape == (48, h) and flat["wq_a.weight"].dtype == jnp.bfloat16
    assert flat["wq_b.weight"].shape == (4 * d, 48)
    assert flat["wo_a.weight"].shape == (2 * 24, 4 * d // 2)
    assert flat["wo_b.weight"].shape == (2 * 24, h)[::-1]
    assert flat["attn_sink"].shape == (4,) and flat["attn_sink"].dtype == jnp.float32
    if ratio:
        assert flat["compressor.wkv.weight"].shape == (c * d, h)
        assert flat["compressor.ape"].shape == (ratio, c * d)
    if ratio == 4:
        assert flat["indexer.wq_b.weight"].shape == (16 * 32, 48)
        assert flat["indexer.weights_proj.weight"].shape == (16, h)
        assert flat["indexer.compressor.ape"].shape == (4, 2 * 32)


@pytest.mark.parametrize("ratio", RATIOS)
def test_init_cache_shapes(ratio):
    c = make_layer(ratio).init_cache(3, 300)
    assert isinstance(c, AttentionCache)
    assert c.window.shape == (3, 8, 32)
    if ratio == 0:
        assert c.compressor is None and c.indexer is None
    else:
        k = 2 if ratio == 4 else 1
        assert c.compressor.entries.shape == (3, 300 // ratio, 32)
        assert c.compressor.kv.shape == c.compressor.gate.shape == (3, k * ratio, k * 32)
        assert np.isneginf(np.asarray(c.compressor.gate)).all()
    if ratio == 4:
        assert c.indexer.entries.shape == (3, 75, 32)
        assert c.indexer.kv.shape == (3, 8, 64)


def test_validation_errors_name_the_argument():
    m = make_layer(4)
    x, pos = inputs(9)
    with pytest.raises(ValueError, match="x"):
        m(x[..., :10], pos)
    with pytest.raises(ValueError, match="positions"):
        m(x, pos[:, :5])
    with pytest.raises(TypeError, match="positions"):
        m(x, pos.astype(jnp.float32))
    with pytest.raises(TypeError, match="cache"):
        m(x, pos, {"window": 0})
    with pytest.raises(ValueError, match="cache"):
        m(x, pos, make_layer(128).init_cache(B, 16))
    with pytest.raises(ValueError, match="cache"):
        m(x, pos, m.init_cache(B + 1, 16))
    with pytest.raises(ValueError, match="batch"):
        m.init_cache(0, 16)
    with pytest.raises(ValueError, match="max_len"):
        m.init_cache(1, 0)
    with pytest.raises(ValueError, match="layer_idx"):
        DeepseekV4Attention(CFG, -1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="config"):
        DeepseekV4Attention({"hidden_size": 64}, 0, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# DeepSeek's quantisation simulation (simulate_quant=True; Hugging Face has none)
# ---------------------------------------------------------------------------------------------

QCFG = make_config(head_dim=80)  # 64 non-RoPE channels: one FP8 block of 64


def _is_pow2(s: np.ndarray) -> bool:
    m, _ = np.frexp(s)
    return bool(np.all(m == 0.5))


def test_fp8_roundtrip_grid_scale_and_error():
    import ml_dtypes

    from jax_megamoe._src.models.deepseek_v4.qat import fp8_roundtrip

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 128)) * np.exp(rng.uniform(-6, 6, (6, 1)))).astype(np.float32)
    x[0, :64] *= 1e-7  # a block below the 1e-4 amax floor
    q = np.asarray(fp8_roundtrip(jnp.asarray(x), 64))
    xb, qb = x.reshape(6, 2, 64), q.reshape(6, 2, 64)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), 1e-4)
    s = 2.0 ** np.ceil(np.log2(amax / 448.0))
    assert _is_pow2(s) and np.all(s >= amax / 448) and np.all(s < 2 * amax / 448)
    code = qb / s
    np.testing.assert_array_equal(code.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), code)  # on the grid
    normal = np.abs(xb / s) >= 2.0**-6
    err = np.abs(qb - xb)
    assert np.all(err[normal] <= 2.0**-4 * np.abs(xb[normal]) * (1 + 1e-6))
    assert np.all(err[~normal] <= (2.0**-10 * s * np.ones_like(xb))[~normal] * (1 + 1e-6))
    assert np.abs(q - x).max() > 0  # it does round


def test_fp4_roundtrip_is_nearest_on_the_e2m1_grid():
    from jax_megamoe._src.models.deepseek_v4.qat import fp4_roundtrip

    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 64)) * 3).astype(np.float32)
    q = np.asarray(fp4_roundtrip(jnp.asarray(x), 32))
    xb, qb = x.reshape(5, 2, 32), q.reshape(5, 2, 32)
    s = 2.0 ** np.ceil(np.log2(np.abs(xb).max(-1, keepdims=True) / 6.0))
    assert _is_pow2(s)
    code, target = np.abs(qb / s), np.abs(xb / s)
    assert np.isin(code, grid).all()
    best = np.abs(target[..., None] - grid).min(-1)
    np.testing.assert_allclose(np.abs(code - target), best, atol=1e-6)  # nearest grid point
    assert np.all(np.sign(qb) * np.sign(xb) >= 0)


def test_hadamard_is_orthonormal():
    from jax_megamoe._src.models.deepseek_v4.qat import hadamard

    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 3, 32)).astype(np.float32)
    ha, hb = np.asarray(hadamard(jnp.asarray(a))), np.asarray(hadamard(jnp.asarray(b)))
    np.testing.assert_allclose(np.sum(ha * hb, -1), np.sum(a * b, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(hadamard(jnp.asarray(ha))), a, atol=1e-5)  # H is its own inverse
    with pytest.raises(ValueError, match="power of two"):
        hadamard(jnp.ones((2, 24)))


def _qlayer(ratio: int, sim: bool) -> DeepseekV4Attention:
    m = make_layer(ratio, QCFG)
    if not sim:
        return m
    q = nnx.eval_shape(
        lambda: DeepseekV4Attention(
            QCFG, RATIOS.index(ratio), param_dtype=jnp.float32, rngs=nnx.Rngs(0), simulate_quant=True
        )
    )
    graphdef, _, rest = nnx.split(q, nnx.Param, ...)
    return nnx.merge(graphdef, nnx.state(m, nnx.Param), rest)


@pytest.mark.parametrize("ratio", (0, 4))
def test_simulate_quant_changes_little_and_keeps_the_cache_exact(ratio):
    """With DeepSeek's FP8 / FP4 round trips: a small, nonzero change against exact float32 where the
    selection cannot differ, and the
    cached path (prefill + decode) still equals the uncached forward (the stored rows are rounded
    the same way)."""
    s = SEQ[ratio]
    x, pos = inputs(s)
    m_exact, m_sim = _qlayer(ratio, False), _qlayer(ratio, True)
    assert m_sim.simulate_quant and (ratio == 0 or m_sim.compressor.quant == "fp8")
    y_exact, _ = fwd(m_exact, x, pos)
    y_sim, _ = fwd(m_sim, x, pos)
    # FP8 on the K=V rows moves the output a little; on CSA layers keep to the positions whose
    # entries all fit in index_topk (t < 4 (topk + 1)), as the FP4 indexer may pick other entries later
    n = SEQ[ratio] if ratio == 0 else 4 * (QCFG.index_topk + 1) - 1
    assert 1e-4 < rel(np.asarray(y_sim)[:, :n], np.asarray(y_exact)[:, :n]) < 0.05
    p = s - 4
    cache = m_sim.init_cache(B, MAX_LEN[ratio])
    outs = []
    y, cache = fwd(m_sim, x[:, :p], pos[:, :p], cache)
    outs.append(y)
    for i in range(p, s):
        y, cache = fwd(m_sim, x[:, i : i + 1], pos[:, i : i + 1], cache)
        outs.append(y)
    assert rel(np.concatenate(outs, axis=1), y_sim) < 1e-4


def test_simulate_quant_validates_block_sizes():
    with pytest.raises(ValueError, match="head_dim"):
        DeepseekV4Attention(CFG, 0, rngs=nnx.Rngs(0), simulate_quant=True)
    with pytest.raises(ValueError, match="index_head_dim"):
        DeepseekV4Attention(make_config(head_dim=80, index_head_dim=48), 1, rngs=nnx.Rngs(0), simulate_quant=True)


@pytest.mark.parametrize("ratio", (4, 128))
def test_rows_at_different_positions_decode_together(ratio):
    """Each row of a batch continues its own sequence: caches of rows prefilled to different lengths,
    stacked, decode one step together and match each row's own full forward."""
    m = make_layer(ratio)
    s = SEQ[ratio]
    x, pos = inputs(s, b=1)
    y_full = np.asarray(fwd(m, x, pos)[0])
    lens = (s - 3, s - 8)  # not aligned to the window or the ratio
    caches = []
    for n in lens:
        _, c = fwd(m, x[:, :n], pos[:, :n], m.init_cache(1, MAX_LEN[ratio]))
        caches.append(c)
    cache = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), *caches)
    xs = jnp.concatenate([x[:, n : n + 1] for n in lens], axis=0)
    ps = jnp.asarray([[lens[0]], [lens[1]]], jnp.int32)
    y, _ = fwd(m, xs, ps, cache)
    for row, n in enumerate(lens):
        np.testing.assert_allclose(np.asarray(y[row, 0]), y_full[0, n], rtol=1e-5, atol=2e-6)
