"""Hugging Face DeepSeek V4 as a test oracle: config translation and weight copying.

Only imported by tests that have ``pytest.importorskip("torch")`` / ``("transformers")`` first (the
package never imports torch). Reusable by the model tests:

* :func:`hf_config` -- a ``transformers.DeepseekV4Config`` equal to our :class:`DeepseekV4Config`;
* :func:`official_to_hf` -- official checkpoint key -> HF parameter name (the ``deepseek_v4`` entry of
  ``transformers/conversion_mapping.py``, re-stated as ordered regex renames);
* :func:`official_state_dict` -- an NNX module's parameters by official key (``prefix`` + NNX path);
* :func:`hf_state_dict` -- official-keyed tensors -> an HF ``state_dict`` (renames; routed experts
  stacked into ``gate_up_proj`` / ``down_proj``);
* :func:`copy_attention_to_hf` -- our ``DeepseekV4Attention`` weights into an HF ``DeepseekV4Attention``;
* :func:`hf_rope` / :func:`hf_sliding_mask` -- the ``position_embeddings`` dict and eager mask HF's
  attention expects when called on its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}

#: Official -> HF renames, applied in this order (mirrors transformers' conversion_mapping deepseek_v4).
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight", "embed_tokens.weight"),
    (r"^head\.weight", "lm_head.weight"),
    (r"^hc_head_fn", "hc_head.hc_fn"),
    (r"^hc_head_base", "hc_head.hc_base"),
    (r"^hc_head_scale", "hc_head.hc_scale"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn", ".attn_hc.fn"),
    (r"\.hc_attn_base", ".attn_hc.base"),
    (r"\.hc_attn_scale", ".attn_hc.scale"),
    (r"\.hc_ffn_fn", ".ffn_hc.fn"),
    (r"\.hc_ffn_base", ".ffn_hc.base"),
    (r"\.hc_ffn_scale", ".ffn_hc.scale"),
    (r"\.attn_sink", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
)


def official_to_hf(key: str, *, model_prefix: str = "") -> str:
    """HF name of an official checkpoint key (``layers.3.attn.wq_a.weight`` -> ``layers.3.self_attn.q_a_proj.weight``).

    Routed-expert keys (``ffn.experts.{e}.w{1,2,3}.weight``) are merged, not renamed: see
    :func:`hf_state_dict`. ``model_prefix`` (e.g. ``"model."``) is put before decoder keys.
    """
    out = key
    for src, dst in _RENAMES:
        out = re.sub(src, dst, out)
    if model_prefix and not out.startswith("lm_head."):
        out = model_prefix + out
    return out


def hf_config(cfg: DeepseekV4Config, **overrides: Any):
    """A ``transformers.DeepseekV4Config`` with the same model as ``cfg`` (eager attention)."""
    from transformers import DeepseekV4Config as HFConfig

    n = cfg.num_hidden_layers
    layer_types = [_LAYER_TYPE[cfg.layer_compress_ratio(i)] for i in range(n)]
    rope_parameters: dict[str, Any] = {"rope_type": "default"}
    if cfg.yarn_factor is not None:
        rope_parameters = {
            "rope_type": "yarn",
            "factor": float(cfg.yarn_factor),
            "original_max_position_embeddings": int(cfg.yarn_original_max_position),
            "beta_fast": float(cfg.yarn_beta_fast),
            "beta_slow": float(cfg.yarn_beta_slow),
        }
    kwargs: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": n,
        "num_attention_heads": cfg.num_attention_heads,
        "head_dim": cfg.head_dim,
        "q_lora_rank": cfg.q_lora_rank,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "routed_scaling_factor": float(cfg.routed_scaling_factor),
        "norm_topk_prob": bool(cfg.norm_topk_prob),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": float(cfg.rope_theta),
        "compress_rope_theta": float(cfg.compress_rope_theta),
        "layer_types": layer_types,
        "mlp_layer_types": ["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(n)],
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": float(cfg.hc_eps),
        "swiglu_limit": float(cfg.swiglu_limit or 0.0),
        "sliding_window": cfg.sliding_window,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "rms_norm_eps": float(cfg.rms_norm_eps),
        "partial_rotary_factor": cfg.qk_rope_head_dim / cfg.head_dim,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    kwargs.update(overrides)
    hf = HFConfig(**kwargs)
    hf._attn_implementation = "eager"
    return hf


def official_state_dict(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """Parameters of an NNX module keyed by official name (``prefix`` + dotted NNX path), as numpy."""
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        out[prefix + ".".join(str(p) for p in path)] = np.asarray(var[...])
    return out


def hf_state_dict(tensors: Mapping[str, Any], *, model_prefix: str = "model.") -> dict[str, Any]:
    """Official-keyed tensors -> HF ``state_dict`` entries (torch tensors, float32).

    Routed experts ``layers.{i}.ffn.experts.{e}.w1/w3/w2.weight`` become
    ``layers.{i}.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (w1 rows then w3 rows) and
    ``down_proj`` ``[E, H, I]``.
    """
    import torch

    def t(a: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())

    out: dict[str, Any] = {}
    experts: dict[str, dict[int, dict[str, Any]]] = {}
    pat = re.compile(r"^(.*)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")
    for key, val in tensors.items():
        m = pat.match(key)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = val
            continue
        out[official_to_hf(key, model_prefix=model_prefix)] = t(val)
    for layer, per_e in experts.items():
        ids = sorted(per_e)
        base = official_to_hf(layer + ".ffn.experts", model_prefix=model_prefix)
        out[base + ".gate_up_proj"] = torch.stack(
            [torch.cat([t(per_e[e]["w1"]), t(per_e[e]["w3"])], dim=0) for e in ids]
        )
        out[base + ".down_proj"] = torch.stack([t(per_e[e]["w2"]) for e in ids])
    return out


def copy_attention_to_hf(ours: nnx.Module, theirs: Any) -> None:
    """Load our ``DeepseekV4Attention`` parameters into an HF ``DeepseekV4Attention`` (strict: every HF
    parameter must be covered and every one of ours must land)."""
    import torch

    src = official_state_dict(ours, "layers.0.attn.")
    mapped = {
        official_to_hf(k)[len("layers.0.self_attn.") :]: torch.from_numpy(np.asarray(v, np.float32).copy())
        for k, v in src.items()
    }
    missing, unexpected = theirs.load_state_dict(mapped, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise AssertionError(f"weight copy mismatch: HF missing {missing}, not in HF {unexpected}")


def hf_rope(hf_cfg: Any, position_ids: Any) -> dict[str, tuple[Any, Any]]:
    """HF's ``position_embeddings`` dict ({"main", "compress"} -> (cos, sin)) at ``position_ids`` [B, S]."""
    import torch
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4RotaryEmbedding,
    )

    rot = DeepseekV4RotaryEmbedding(hf_cfg)
    dummy = torch.zeros((), dtype=torch.float32)
    return {k: rot(dummy, position_ids, layer_type=k) for k in ("main", "compress")}


def hf_sliding_mask(seq_len: int, window: int, batch: int = 1) -> Any:
    """Additive float mask ``[B, 1, S, S]``: query ``t`` sees keys ``t - window < k <= t``."""
    import torch

    q = torch.arange(seq_len)[:, None]
    k = torch.arange(seq_len)[None, :]
    ok = (k <= q) & (k > q - window)
    m = torch.where(ok, 0.0, float("-inf")).to(torch.float32)
    return m[None, None].expand(batch, 1, seq_len, seq_len).contiguous()
