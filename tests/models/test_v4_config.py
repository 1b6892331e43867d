"""DeepseekV4Config presets and ``from_hf_config`` (Hugging Face and DeepSeek key names)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jax_megamoe._src.numerics.v4_config import REQUIRED_KEYS, DeepseekV4Config

# DeepSeek-V4-Pro's inference/config.json (DeepSeek's own key names), as published.
PRO_DEEPSEEK_KEYS = {
    "vocab_size": 129280,
    "dim": 7168,
    "moe_inter_dim": 3072,
    "n_layers": 61,
    "n_hash_layers": 3,
    "n_heads": 128,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "n_activated_experts": 6,
    "score_func": "sqrtsoftplus",
    "route_scale": 2.5,
    "swiglu_limit": 10.0,
    "q_lora_rank": 1536,
    "head_dim": 512,
    "rope_head_dim": 64,
    "o_groups": 16,
    "o_lora_rank": 1024,
    "window_size": 128,
    "original_seq_len": 65536,
    "rope_theta": 10000,
    "rope_factor": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 1024,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "dtype": "fp8",
    "scale_fmt": "ue8m0",
    "expert_dtype": "fp4",
    "compress_rope_theta": 160000,
    "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0],
}


def test_v4_pro_preset_is_its_deepseek_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRO_DEEPSEEK_KEYS))
    for src in (tmp_path, tmp_path / "config.json", str(tmp_path), PRO_DEEPSEEK_KEYS):
        assert DeepseekV4Config.from_hf_config(src) == DeepseekV4Config.v4_pro()
    p = DeepseekV4Config.v4_pro()
    assert (p.num_hidden_layers, p.num_attention_heads, p.q_lora_rank, p.o_groups, p.index_topk) == (
        61,
        128,
        1536,
        16,
        1024,
    )
    assert [p.layer_compress_ratio(i) for i in range(4)] == [128, 128, 4, 128] and p.layer_compress_ratio(60) == 4


def test_v4_flash_preset():
    f = DeepseekV4Config.v4_flash()
    assert (f.num_hidden_layers, f.num_attention_heads, f.q_lora_rank, f.o_groups, f.index_topk) == (
        43,
        64,
        1024,
        8,
        512,
    )
    # MaxText deepseek4-284b.yml: layers 0-1 sliding only, then CSA on even / HCA on odd indices
    assert [f.layer_compress_ratio(i) for i in range(6)] == [0, 0, 4, 128, 4, 128]
    assert f.layer_compress_ratio(42) == 4 and len(f.compress_ratios) == 44 and f.compress_ratios[-1] == 0


def test_from_hf_config_reads_what_transformers_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import v4_oracle as o

    for name, cfg in o.oracle_configs().items():
        d = tmp_path / name
        transformers.DeepseekV4Config(**o.hf_config_dict(cfg)).save_pretrained(d)
        got = DeepseekV4Config.from_hf_config(d)
        want = dataclasses.replace(
            cfg, compress_ratios=cfg.compress_ratios[: cfg.num_hidden_layers], num_nextn_predict_layers=1
        )  # HF writes its own MTP count default
        assert got == want, (name, got, want)
    # HF's defaults: V4-Flash's sizes, HF's own schedule and no YaRN
    d = tmp_path / "default"
    transformers.DeepseekV4Config().save_pretrained(d)
    got = DeepseekV4Config.from_hf_config(d)
    f = DeepseekV4Config.v4_flash()
    assert dataclasses.replace(got, compress_ratios=f.compress_ratios, yarn_factor=f.yarn_factor) == f


def test_from_hf_config_hf_names_and_legacy_keys():
    base = {
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 32,
        "o_groups": 2,
        "unknown_key": {"ignored": True},
        "architectures": ["DeepseekV4ForCausalLM"],
    }
    c = DeepseekV4Config.from_hf_config(
        {
            **base,
            "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
            "mlp_layer_types": ["hash_moe", "moe", "moe"],
            "partial_rotary_factor": 0.25,
            "rope_scaling": {"type": "yarn", "factor": 8, "original_max_position_embeddings": 4096},
        }
    )
    assert c.compress_ratios == (0, 4, 128) and c.num_hash_layers == 1 and c.qk_rope_head_dim == 8
    assert (c.yarn_factor, c.yarn_original_max_position) == (8.0, 4096)
    c = DeepseekV4Config.from_hf_config(
        {**base, "compress_ratios": [4, 4, 0], "num_hash_layers": 0, "qk_rope_head_dim": 16}
    )
    assert c.compress_ratios == (4, 4, 0) and c.num_hash_layers == 0 and c.qk_rope_head_dim == 16
    assert c.yarn_factor is None  # no RoPE scaling given: none, as Hugging Face reads it
    with pytest.raises(ValueError, match="mlp_layer_types"):
        DeepseekV4Config.from_hf_config({**base, "mlp_layer_types": ["moe", "hash_moe", "moe"]})
    with pytest.raises(ValueError, match="layer_types"):
        DeepseekV4Config.from_hf_config({**base, "layer_types": ["full_attention"] * 3})


@pytest.mark.parametrize("drop", ["hidden_size", "num_experts_per_tok", "vocab_size"])
def test_from_hf_config_names_missing_required_keys(drop):
    d = {
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
    }
    assert set(d) == set(REQUIRED_KEYS)
    assert DeepseekV4Config.from_hf_config(d).hidden_size == 64  # the rest defaults (V4-Flash's values)
    del d[drop]
    with pytest.raises(ValueError, match=drop):
        DeepseekV4Config.from_hf_config(d)
    # DeepSeek's name for the same field is accepted instead
    alias = {"hidden_size": "dim", "num_experts_per_tok": "n_activated_experts", "vocab_size": None}[drop]
    if alias:
        assert DeepseekV4Config.from_hf_config({**d, alias: 64 if alias == "dim" else 2}).hidden_size == 64


def test_from_hf_config_bad_path(tmp_path):
    with pytest.raises(ValueError, match="path"):
        DeepseekV4Config.from_hf_config(tmp_path / "nope")
    with pytest.raises(TypeError, match="path"):
        DeepseekV4Config.from_hf_config(3)


def test_tiny_presets():
    t = DeepseekV4Config.tiny()
    assert (t.hidden_size, t.moe_intermediate_size, t.n_routed_experts, t.num_experts_per_tok) == (512, 256, 16, 4)
    m = DeepseekV4Config.tiny_model()
    kinds = {(m.layer_compress_ratio(i), m.is_hash_layer(i)) for i in range(m.num_hidden_layers)}
    assert {r for r, _ in kinds} == {0, 4, 128} and {h for _, h in kinds} == {True, False}
    assert m.index_n_heads >= 16 and 64 <= m.hidden_size <= 128 and 4 <= m.num_hidden_layers <= 6
