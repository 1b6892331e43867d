"""The MoE-related part of a DeepSeek V4 ``config.json`` (:class:`DeepseekV4Config`).

Plain, frozen, hashable data with no Flax or JAX in it: the checkpoint reader infers it
(:mod:`jax_megamoe._src.io.v4_checkpoint`), the converter records it, the model
(:mod:`jax_megamoe.models.deepseek_v4`, which re-exports it) is built from it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["DeepseekV4Config"]


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: {value!r} must be an integer")
    if value < lo:
        raise ValueError(f"{name}: {value} must be >= {lo}")


def _check_float(name: str, value: Any, *, lo: float, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: {value!r} must be a number")
    v = float(value)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo):
        rel = ">" if lo_open else ">="
        raise ValueError(f"{name}: {value} must be finite and {rel} {lo}")


@dataclasses.dataclass(frozen=True)
class DeepseekV4Config:
    """The MoE-related part of a DeepSeek V4 ``config.json`` (frozen, hashable: it is static).

    Field names follow the Hugging Face config keys. ``renorm_eps`` is added to the sum of the
    selected scores before renormalising. REF adds nothing; Hugging Face and MaxText add 1e-20,
    which is the default here because it changes nothing REF computes: a sum of sqrtsoftplus
    scores above about 1.7e-13 absorbs 1e-20 exactly in fp32 (1e-20 is below half an ulp), so
    the weights are bit-identical to REF's, while a row whose selected scores are all zero (a
    hash-layer token id outside the vocabulary, see :class:`DeepseekV4Gate`, or logits below
    about -104 everywhere) gets weights 0 instead of NaN.
    """

    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    routed_scaling_factor: float
    swiglu_limit: float | None
    num_hash_layers: int
    vocab_size: int
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    renorm_eps: float = 1e-20
    # -- the rest of the model (attention, mHC, head); defaults are V4-Flash's ------------------
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    q_lora_rank: int = 1024
    qk_rope_head_dim: int = 64
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    #: Per-layer compress ratio: 0 sliding window only, 4 CSA (compressor + indexer), 128 HCA.
    #: ``None``: HF's default schedule (two HCA layers, then CSA / HCA interleaved).
    compress_ratios: tuple[int, ...] | None = None
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    #: YaRN on the compressed layers (``None``: plain RoPE there too).
    yarn_factor: float | None = 16.0
    yarn_original_max_position: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    def __post_init__(self) -> None:
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("moe_intermediate_size", self.moe_intermediate_size, 1)
        _check_int("n_routed_experts", self.n_routed_experts, 1)
        _check_int("num_experts_per_tok", self.num_experts_per_tok, 1)
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok: {self.num_experts_per_tok} exceeds n_routed_experts = {self.n_routed_experts}"
            )
        _check_int("n_shared_experts", self.n_shared_experts, 0)
        _check_float("routed_scaling_factor", self.routed_scaling_factor, lo=0.0, lo_open=True)
        if self.swiglu_limit is not None:
            _check_float("swiglu_limit", self.swiglu_limit, lo=0.0)
        _check_int("num_hash_layers", self.num_hash_layers, 0)
        _check_int("vocab_size", self.vocab_size, 1)
        if self.scoring_func != "sqrtsoftplus":
            raise ValueError(
                f"scoring_func: {self.scoring_func!r} is not supported; DeepSeek V4 uses 'sqrtsoftplus'"
            )
        if not isinstance(self.norm_topk_prob, (bool, np.bool_)):
            raise ValueError(f"norm_topk_prob: {self.norm_topk_prob!r} must be a bool")
        _check_float("renorm_eps", self.renorm_eps, lo=0.0)
        for name in ("num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank", "o_groups",
                     "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "hc_mult"):
            _check_int(name, getattr(self, name), 1)
        _check_int("qk_rope_head_dim", self.qk_rope_head_dim, 0)
        if self.qk_rope_head_dim > self.head_dim or self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: {self.qk_rope_head_dim} must be even and <= head_dim = {self.head_dim}")
        if self.num_attention_heads % self.o_groups:
            raise ValueError(f"o_groups: {self.o_groups} must divide num_attention_heads = {self.num_attention_heads}")
        if self.compress_ratios is not None:
            if not isinstance(self.compress_ratios, tuple):
                object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
            bad = [r for r in self.compress_ratios if r not in (0, 4, 128)]
            if bad or len(self.compress_ratios) < self.num_hidden_layers:
                raise ValueError(
                    f"compress_ratios: {self.compress_ratios!r} must hold one of 0, 4, 128 per layer "
                    f"({self.num_hidden_layers} layers)"
                )

    # -- derived values -------------------------------------------------------------------------
    @property
    def activation_clamp(self) -> float | None:
        """The SwiGLU clamp the kernels get: REF clamps only when ``swiglu_limit > 0``."""
        if self.swiglu_limit is None or float(self.swiglu_limit) <= 0:
            return None
        return float(self.swiglu_limit)

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def layer_compress_ratio(self, layer_idx: int) -> int:
        """0 (sliding window only), 4 (CSA) or 128 (HCA) for layer ``layer_idx``."""
        if self.compress_ratios is not None:
            return self.compress_ratios[layer_idx]
        # HF's default schedule: two HCA layers, then CSA on odd and HCA on even indices.
        return 128 if layer_idx < 2 or layer_idx % 2 == 0 else 4

    @property
    def qk_nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def is_hash_layer(self, layer_idx: int, *, is_mtp: bool = False) -> bool:
        """Layers ``< num_hash_layers`` route by token id; the MTP block never does."""
        return (not is_mtp) and layer_idx < self.num_hash_layers

    # -- presets --------------------------------------------------------------------------------
    @classmethod
    def v4_flash(cls, **overrides: Any) -> DeepseekV4Config:
        """DeepSeek-V4-Flash (``deepseek-ai/DeepSeek-V4-Flash`` ``config.json``)."""
        base = dict(
            hidden_size=4096,
            moe_intermediate_size=2048,
            n_routed_experts=256,
            num_experts_per_tok=6,
            n_shared_experts=1,
            routed_scaling_factor=1.5,
            swiglu_limit=10.0,
            num_hash_layers=3,
            vocab_size=129280,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def v4_pro(cls, **overrides: Any) -> DeepseekV4Config:
        """DeepSeek-V4-Pro (values as quoted from its ``config.json``)."""
        base = dict(
            hidden_size=7168,
            moe_intermediate_size=3072,
            n_routed_experts=384,
            num_experts_per_tok=6,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            swiglu_limit=10.0,
            num_hash_layers=3,
            vocab_size=129280,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> DeepseekV4Config:
        """A small V4-like layer for tests: valid in every kernel mode (H % 512 == 0, I % 256 == 0)."""
        base = dict(
            hidden_size=512,
            moe_intermediate_size=256,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            routed_scaling_factor=1.5,
            swiglu_limit=10.0,
            num_hash_layers=1,
            vocab_size=1000,
        )
        return cls(**{**base, **overrides})
