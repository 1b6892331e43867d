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
    base = DeepseekV4Config.tiny_model()
    return {
        # sliding, CSA, HCA, CSA, sliding; layers 0-1 hash-routed; YaRN on the compressed layers
        "mixed": base,
        # HCA first, CSA, sliding; one hash layer; no YaRN; hc_mult 2; more experts, top-3
        "hca_first": DeepseekV4Config.tiny_model(
            num_hidden_layers=3, compress_ratios=(128, 4, 0), num_hash_layers=1, yarn_factor=None, hc_mult=2,
            n_routed_experts=16, num_experts_per_tok=3, sliding_window=8, index_topk=6, o_groups=4,
        ),
        # no hash layers, a tight SwiGLU clamp (bites), wider hidden, 7 Sinkhorn iterations
        "clamped": DeepseekV4Config.tiny_model(
            hidden_size=96, num_hidden_layers=3, compress_ratios=(4, 0, 128), num_hash_layers=0, swiglu_limit=0.5,
            routed_scaling_factor=2.5, hc_sinkhorn_iters=7, num_attention_heads=2, o_groups=1,
        ),
    }


def our_param_shapes(cfg: DeepseekV4Config) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Official name -> (shape, numpy dtype) of every parameter of an exact-expert model of ``cfg``."""
    model = nnx.eval_shape(lambda: DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32,
                                                         rngs=nnx.Rngs(0)))
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


def random_state_dict(cfg: DeepseekV4Config, seed: int) -> dict[str, np.ndarray]:
    """Random official-named weights (f32; tid2eid int32 with distinct experts per row), scaled so
    every part of the model matters (norm weights, biases, sinks and hc parameters are not at init)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in sorted(our_param_shapes(cfg).items()):
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("tid2eid"):
            v, k = shape
            out[name] = np.stack([rng.permutation(cfg.n_routed_experts)[:k] for _ in range(v)]).astype(np.int32)
        elif name.endswith("norm.weight"):
            out[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf == "attn_sink":
            out[name] = rng.standard_normal(shape).astype(np.float32)
        elif leaf == "ape":
            out[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith("gate.bias"):
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif re.search(r"hc_\w+_fn$|^hc_head_fn$", name):
            out[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        elif re.search(r"hc_\w+_base$|^hc_head_base$", name):
            out[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        elif re.search(r"hc_\w+_scale$|^hc_head_scale$", name):
            out[name] = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        elif name == "embed.weight":
            out[name] = rng.standard_normal(shape).astype(np.float32)
        else:  # linear weights [out, in]
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    return out


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
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim, q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
        num_experts_per_tok=cfg.num_experts_per_tok, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, routed_scaling_factor=cfg.routed_scaling_factor,
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
        compress_ratios=list(cfg.compress_ratios[: cfg.num_hidden_layers]), num_hash_layers=cfg.num_hash_layers,
        hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
        swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.sliding_window, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
    )
    if cfg.yarn_factor is not None:
        d["rope_parameters"] = dict(
            rope_type="yarn", factor=cfg.yarn_factor, original_max_position_embeddings=cfg.yarn_original_max_position,
            beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow,
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
    model = HFModel.from_pretrained(tmpdir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def rel_l2(a: Any, b: Any) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
