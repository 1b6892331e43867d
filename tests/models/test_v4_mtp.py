"""The MTP block and speculative greedy decoding (CPU, tiny f32 configs, random weights).

No torch oracle: Hugging Face's DeepseekV4ForCausalLM has no MTP block. The block's wiring is
checked against a direct jnp transcription of DeepSeek's ``MTPBlock.forward`` (reusing our
decoder layer for the inner ``Block``); speculative decoding against plain greedy decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_megamoe._src.models.deepseek_v4 import hyper
from jax_megamoe._src.models.deepseek_v4.model import (
    DeepseekV4Block,
    DeepseekV4ForCausalLM,
    forward_streams,
    jit_forward,
)
from jax_megamoe._src.models.deepseek_v4.mtp import mtp_draft, speculative_greedy
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config


def _plain_greedy(model, prompt, n):
    b, plen = prompt.shape
    step = jit_forward(model)
    cache = model.init_cache(b, plen + n + 2)
    pos = jnp.broadcast_to(jnp.arange(plen, dtype=jnp.int32)[None], (b, plen))
    logits, cache = step(cache, jnp.asarray(prompt), pos)
    tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    out = [np.asarray(tok)]
    for i in range(1, n):
        logits, cache = step(cache, tok[:, None], jnp.full((b, 1), plen + i - 1, jnp.int32))
        tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        out.append(np.asarray(tok))
    return np.stack(out, 1)


def _rms(x, eps):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def test_mtp_block_matches_deepseek_formula():
    cfg = DeepseekV4Config.tiny_model(num_hidden_layers=2, compress_ratios=(0, 4, 4), num_nextn_predict_layers=1)
    model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    blk = model.mtp[0]
    assert blk.layer_idx == 2 and blk.attn.compress_ratio == 4 and not blk.ffn.gate.is_hash_layer
    rng = np.random.default_rng(0)
    for name in ("enorm", "hnorm", "norm"):  # non-trivial norm weights, so a swapped norm shows
        getattr(blk, name).weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, cfg.hidden_size), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    _, streams, _ = forward_streams(model, None, tokens)
    nxt = jnp.roll(tokens, -1, axis=1)
    got, _ = mtp_draft(model, None, streams, nxt, jnp.broadcast_to(jnp.arange(12)[None], (2, 12)))
    # DeepSeek: e = enorm(embed(ids)); x = hnorm(x); x = e_proj(e)[:, :, None] + h_proj(x); Block; head
    eps = cfg.rms_norm_eps
    e = blk.enorm.weight[...] * _rms(model.embed.weight[...][nxt], eps)
    h = blk.hnorm.weight[...] * _rms(streams, eps)
    x = (e @ blk.e_proj.weight[...].T)[:, :, None] + h @ blk.h_proj.weight[...].T
    x, _ = DeepseekV4Block.__call__(blk, x, jnp.broadcast_to(jnp.arange(12)[None], (2, 12)), nxt, None)
    y = hyper.hc_head(x, blk.hc_head_fn[...], blk.hc_head_scale[...], blk.hc_head_base[...], blk.spec)
    want = (blk.norm.weight[...] * _rms(y, eps)) @ model.head.weight[...].T
    assert float(jnp.std(want)) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4 * float(jnp.abs(want).max()))


def test_speculative_greedy_equals_plain_greedy_random_weights():
    """Random MTP weights: drafts are rejected; the rejected token's cache writes (sliding window,
    CSA/HCA compressors, indexer; main layers and the CSA MTP layer) never change a later token."""
    cfg = DeepseekV4Config.tiny_model(
        num_hidden_layers=3, compress_ratios=(0, 4, 128, 4), num_hash_layers=1, num_nextn_predict_layers=1
    )
    model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    res = speculative_greedy(model, prompt, 24)
    np.testing.assert_array_equal(res.tokens, _plain_greedy(model, prompt, 24))
    assert res.drafted > res.accepted and res.replays > 0  # exact-rollback rejects and replays both ran
    assert res.drafted - res.accepted > res.replays


def test_speculative_greedy_accept_and_reject_branches():
    """A 1-layer model whose MTP block is a copy of that layer (unit-RMS embeddings, e_proj = I,
    h_proj = 0, attention output halved in both): the draft is usually the main model's next token,
    so accepts, rejects and replays all happen; the tokens still equal plain greedy's."""
    cfg = DeepseekV4Config.tiny_model(
        num_hidden_layers=1, compress_ratios=(4, 4), num_hash_layers=0, num_nextn_predict_layers=1
    )
    model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    w = model.embed.weight[...]
    model.embed.weight[...] = w / jnp.sqrt(jnp.mean(w * w, -1, keepdims=True))
    blk = model.mtp[0]
    nnx.update(blk, nnx.split(model.layers[0])[1])
    blk.h_proj.weight[...] = jnp.zeros_like(blk.h_proj.weight[...])
    blk.e_proj.weight[...] = jnp.eye(cfg.hidden_size)
    for n in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
        getattr(blk, n)[...] = getattr(model, n)[...]
    for m in (model.layers[0], blk):
        m.attn.wo_b.weight[...] = m.attn.wo_b.weight[...] * 0.5
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    res = speculative_greedy(model, prompt, 30)
    np.testing.assert_array_equal(res.tokens, _plain_greedy(model, prompt, 30))
    assert res.accepted > 0 and res.drafted - res.accepted - res.replays > 0 and res.replays > 0, res
    assert res.steps < 30 - 1 and 0 < res.acceptance_rate < 1


def test_argument_errors():
    cfg = DeepseekV4Config.tiny_model(num_hidden_layers=1, compress_ratios=(0,))
    model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert len(model.mtp) == 0
    with pytest.raises(ValueError, match="model: has no MTP block"):
        speculative_greedy(model, np.zeros((1, 3), np.int32), 4)
    cfg = DeepseekV4Config.tiny_model(num_hidden_layers=1, compress_ratios=(0, 0), num_nextn_predict_layers=1)
    model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="new_tokens"):
        speculative_greedy(model, np.zeros((1, 3), np.int32), 0)
    with pytest.raises(ValueError, match="prompt"):
        speculative_greedy(model, np.full((1, 3), cfg.vocab_size, np.int32), 2)
    with pytest.raises(ValueError, match="streams"):
        mtp_draft(model, None, jnp.zeros((1, 3, 64)), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32))
