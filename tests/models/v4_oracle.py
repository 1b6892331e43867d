"""Shared helpers of the whole-model oracle tests: random official-named weights, loading them into
our model (a rename-free walk of the NNX paths) and into Hugging Face's DeepseekV4ForCausalLM (through
HF's own ``from_pretrained`` and its deepseek_v4 conversion mapping), HF configs for our configs."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_megamoe._src.models.deepseek_v4.model import DeepseekV4ForCausalLM
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


def oracle_configs() -> dict[str, DeepseekV4Config]:
    """Three tiny configs that together cover sliding, CSA, HCA, hash and normal layers, YaRN on/off."""
    return {
        # sliding, CSA, HCA, CSA, sliding; layers 0-1 hash-routed; YaRN on the compressed layers
        "mixed": DeepseekV4Config.tiny_model(vocab_size=128),
        # HCA first, CSA, sliding; one hash layer; no YaRN; hc_mult 2; more experts, top-3
        "hca_first": DeepseekV4Config.tiny_model(
            num_hidden_layers=3,
            compress_ratios=(128, 4, 0),
            num_hash_layers=1,
            yarn_factor=None,
            hc_mult=2,
            n_routed_experts=16,
            num_experts_per_tok=3,
            sliding_window=8,
            index_topk=6,
            o_groups=4,
            vocab_size=128,
        ),
        # no hash layers, a tight SwiGLU clamp (bites), wider hidden, 7 Sinkhorn iterations
        "clamped": DeepseekV4Config.tiny_model(
            hidden_size=96,
            num_hidden_layers=3,
            compress_ratios=(4, 0, 128),
            num_hash_layers=0,
            swiglu_limit=0.5,
            routed_scaling_factor=2.5,
            hc_sinkhorn_iters=7,
            num_attention_heads=2,
            o_groups=1,
            vocab_size=128,
        ),
    }


def our_param_shapes(cfg: DeepseekV4Config) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Official name -> (shape, numpy dtype) of every parameter of an exact-expert model of ``cfg``."""
    model = nnx.eval_shape(
        lambda: DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    )
    out: dict[str, tuple[tuple[int, ...], Any]] = {}
    e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for path, v in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        if name.endswith("ffn.experts.w13"):
            pre = name[: -len(".w13")]
            for ex in range(e):
                out[f"{pre}.{ex}.w1.weight"] = ((i, h), np.float32)
                out[f"{pre}.{ex}.w3.weight"] = ((i, h), np.float32)
        elif name.endswith("ffn.experts.w2"):
            pre = name[: -len(".w2")]
            for ex in range(e):
                out[f"{pre}.{ex}.w2.weight"] = ((h, i), np.float32)
        else:
            val = v.get_value() if hasattr(v, "get_value") else v
            out[name] = (tuple(val.shape), np.dtype(val.dtype))
    return out


#: Quantisation grid of the random weights: integers in [-8, 8] times a per-tensor f32 step, plus an
#: offset (1 for norm weights / hc scales). The fixture stores the int8 codes (1 byte a weight,
#: compressible) and decodes them to the very same f32 values HF and our model were given.
_Q = 8


def random_coded_state_dict(cfg: DeepseekV4Config, seed: int) -> dict[str, tuple[np.ndarray, float, float]]:
    """Random official-named weights as ``name -> (int8 codes, step, offset)`` (tid2eid: int32 codes,
    distinct experts per row), scaled so every part of the model matters (norm weights, biases,
    sinks and hc parameters are away from their init values)."""
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[np.ndarray, float, float]] = {}
    sd_uniform = np.sqrt(((2 * _Q + 1) ** 2 - 1) / 12.0)  # std of the integer codes
    for name, (shape, _dtype) in sorted(our_param_shapes(cfg).items()):
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("tid2eid"):
            v, k = shape
            out[name] = (
                np.stack([rng.permutation(cfg.n_routed_experts)[:k] for _ in range(v)]).astype(np.int32),
                1.0,
                0.0,
            )
            continue
        offset = 0.0
        if name.endswith("norm.weight"):
            std, offset = 0.2, 1.0
        elif leaf == "attn_sink":
            std = 1.0
        elif leaf == "ape":
            std = 0.5
        elif name.endswith("gate.bias"):
            std = 0.1
        elif re.search(r"(^|_)fn$", leaf):
            std = 0.05
        elif re.search(r"(^|_)base$", leaf):
            std = 0.5
        elif re.search(r"(^|_)scale$", leaf):
            std, offset = 0.3, 1.0
        elif name == "embed.weight":
            std = 1.0
        else:  # linear weights [out, in]
            std = 1.0 / np.sqrt(shape[-1])
        codes = rng.integers(-_Q, _Q + 1, shape).astype(np.int8)
        out[name] = (codes, float(np.float32(std / sd_uniform)), offset)
    return out


def decode_state_dict(coded: dict[str, tuple[np.ndarray, float, float]]) -> dict[str, np.ndarray]:
    """The f32 (int32 for tid2eid) arrays of :func:`random_coded_state_dict`'s codes."""
    out = {}
    for name, (q, step, offset) in coded.items():
        if q.dtype == np.int32:
            out[name] = q
        else:
            out[name] = (q.astype(np.float32) * np.float32(step) + np.float32(offset)).astype(np.float32)
    return out


def random_state_dict(cfg: DeepseekV4Config, seed: int) -> dict[str, np.ndarray]:
    """Random official-named f32 weights (see :func:`random_coded_state_dict`)."""
    return decode_state_dict(random_coded_state_dict(cfg, seed))


def load_into(model: DeepseekV4ForCausalLM, sd: dict[str, np.ndarray]) -> None:
    """Set every parameter of ``model`` from official names (experts stacked into w13 / w2)."""
    experts: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for name, arr in sd.items():
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = arr
            continue
        obj: Any = model
        parts = name.split(".")
        for p in parts[:-1]:
            obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
        var = getattr(obj, parts[-1])
        cur = var.get_value()
        assert tuple(cur.shape) == tuple(arr.shape), (name, cur.shape, arr.shape)
        var.set_value(jnp.asarray(arr).astype(cur.dtype))
    for pre, per in experts.items():
        obj = model
        for p in pre.split("."):
            obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
        n = len(per)
        w13 = np.stack([np.concatenate([per[e]["w1"], per[e]["w3"]], 0) for e in range(n)])
        w2 = np.stack([per[e]["w2"] for e in range(n)])
        obj.w13.set_value(jnp.asarray(w13).astype(obj.w13.get_value().dtype))
        obj.w2.set_value(jnp.asarray(w2).astype(obj.w2.get_value().dtype))


def hf_config_dict(cfg: DeepseekV4Config) -> dict[str, Any]:
    """Keyword arguments of transformers' DeepseekV4Config for ``cfg``."""
    d: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        compress_ratios=list(cfg.compress_ratios[: cfg.num_hidden_layers]),
        num_hash_layers=cfg.num_hash_layers,
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps,
        swiglu_limit=cfg.swiglu_limit,
        sliding_window=cfg.sliding_window,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
    )
    if cfg.yarn_factor is not None:
        d["rope_parameters"] = dict(
            rope_type="yarn",
            factor=cfg.yarn_factor,
            original_max_position_embeddings=cfg.yarn_original_max_position,
            beta_fast=cfg.yarn_beta_fast,
            beta_slow=cfg.yarn_beta_slow,
        )
    return d


def hf_model(cfg: DeepseekV4Config, sd: dict[str, np.ndarray], tmpdir: str):
    """Hugging Face's DeepseekV4ForCausalLM (f32, eager) loaded from ``sd`` saved under official names."""
    import torch
    from safetensors.numpy import save_file
    from transformers import DeepseekV4Config as HFConfig
    from transformers import DeepseekV4ForCausalLM as HFModel

    hcfg = HFConfig(**hf_config_dict(cfg))
    hcfg.save_pretrained(tmpdir)
    with open(os.path.join(tmpdir, "config.json")) as f:
        cj = json.load(f)
    cj["torch_dtype"] = "float32"
    with open(os.path.join(tmpdir, "config.json"), "w") as f:
        json.dump(cj, f)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, os.path.join(tmpdir, "model.safetensors"))
    model, info = HFModel.from_pretrained(
        tmpdir, torch_dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"HF did not take every weight as given: {bad}"
    hf_names = set(model.state_dict())
    n_expert = sum(1 for k in sd if _EXPERT.match(k))
    # every official tensor has one HF home (the routed experts of a layer merge into two)
    assert len(hf_names) == len(sd) - n_expert + 2 * cfg.num_hidden_layers, (len(hf_names), len(sd))
    model.eval()
    return model


def rel_l2(a: Any, b: Any) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
