"""The MoE-related part of a DeepSeek V4 ``config.json`` (:class:`DeepseekV4Config`).

Plain, frozen, hashable data with no Flax or JAX in it: the checkpoint reader infers it
(:mod:`jax_megamoe._src.io.v4_checkpoint`), the converter records it, the model
(:mod:`jax_megamoe.models.deepseek_v4`, which re-exports it) is built from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["DeepseekV4Config", "REQUIRED_KEYS"]


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


_BOUND = "jax_megamoe.bound"


def _integer(default: Any = dataclasses.MISSING, *, lo: int = 1) -> Any:
    """A field that ``__post_init__`` checks to be an integer >= ``lo``."""
    return dataclasses.field(default=default, metadata={_BOUND: {"kind": "int", "lo": lo, "optional": False}})


def _number(
    default: Any = dataclasses.MISSING, *, lo: float = 0.0, lo_open: bool = False, optional: bool = False
) -> Any:
    """A field that ``__post_init__`` checks to be a finite number >= ``lo`` (> with ``lo_open``),
    or ``None`` where ``optional``."""
    bound = {"kind": "float", "lo": lo, "lo_open": lo_open, "optional": optional}
    return dataclasses.field(default=default, metadata={_BOUND: bound})


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

    # Each checked field says its bound where it is declared; ``__post_init__`` reads the bounds.
    # -- the MoE block ---------------------------------------------------------------------------
    hidden_size: int = _integer()
    moe_intermediate_size: int = _integer()
    n_routed_experts: int = _integer()
    num_experts_per_tok: int = _integer()
    n_shared_experts: int = _integer(lo=0)
    routed_scaling_factor: float = _number(lo_open=True)
    swiglu_limit: float | None = _number(optional=True)
    num_hash_layers: int = _integer(lo=0)
    vocab_size: int = _integer()
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    renorm_eps: float = _number(1e-20)
    # -- the rest of the model; defaults are V4-Flash's, grouped by the part that reads them -----
    # the stack
    num_hidden_layers: int = _integer(43)
    num_nextn_predict_layers: int = _integer(1, lo=0)
    rms_norm_eps: float = _number(1e-6, lo_open=True)
    tie_word_embeddings: bool = False
    # attention: low-rank Q, one shared K=V head, grouped low-rank output
    num_attention_heads: int = _integer(64)
    head_dim: int = _integer(512)
    q_lora_rank: int = _integer(1024)
    qk_rope_head_dim: int = _integer(64, lo=0)
    o_groups: int = _integer(8)
    o_lora_rank: int = _integer(1024)
    sliding_window: int = _integer(128)
    #: Per-layer compress ratio: 0 sliding window only, 4 CSA (compressor + indexer), 128 HCA.
    #: ``None``: HF's default schedule (two HCA layers, then CSA / HCA interleaved).
    compress_ratios: tuple[int, ...] | None = None
    # the Lightning Indexer of the CSA layers
    index_n_heads: int = _integer(64)
    index_head_dim: int = _integer(128)
    index_topk: int = _integer(512)
    # RoPE: plain on the sliding-window layers, YaRN on the compressed ones
    rope_theta: float = _number(10000.0, lo_open=True)
    compress_rope_theta: float = _number(160000.0, lo_open=True)
    #: YaRN on the compressed layers (``None``: plain RoPE there too).
    yarn_factor: float | None = _number(16.0, lo_open=True, optional=True)
    yarn_original_max_position: int = _integer(65536)
    yarn_beta_fast: float = _number(32.0)
    yarn_beta_slow: float = _number(1.0)
    max_position_embeddings: int = _integer(1048576)
    # mHC hyper-connections
    hc_mult: int = _integer(4)
    hc_sinkhorn_iters: int = _integer(20)
    hc_eps: float = _number(1e-6)
    # tokens
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            bound = f.metadata.get(_BOUND)
            value = getattr(self, f.name)
            if bound is None or (value is None and bound["optional"]):
                continue
            if bound["kind"] == "int":
                _check_int(f.name, value, bound["lo"])
            else:
                _check_float(f.name, value, lo=bound["lo"], lo_open=bound["lo_open"])
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok: {self.num_experts_per_tok} exceeds n_routed_experts = {self.n_routed_experts}"
            )
        if self.scoring_func != "sqrtsoftplus":
            raise ValueError(f"scoring_func: {self.scoring_func!r} is not supported; DeepSeek V4 uses 'sqrtsoftplus'")
        if not isinstance(self.norm_topk_prob, (bool, np.bool_)):
            raise ValueError(f"norm_topk_prob: {self.norm_topk_prob!r} must be a bool")
        if self.qk_rope_head_dim > self.head_dim or self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim: {self.qk_rope_head_dim} must be even and <= head_dim = {self.head_dim}"
            )
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

    # -- presets (the values are the module-level table :data:`_PRESETS`) -----------------------
    @classmethod
    def v4_flash(cls, **overrides: Any) -> DeepseekV4Config:
        """DeepSeek-V4-Flash (``deepseek-ai/DeepSeek-V4-Flash``): 43 layers, hidden 4096, 256 experts.

        The attention values are Hugging Face's ``DeepseekV4Config`` defaults (which are Flash's);
        the compress schedule is MaxText's ``deepseek4-284b.yml``: layers 0-1 sliding window only,
        then CSA (4) on even and HCA (128) on odd indices, plus ratio 0 for the MTP layer.
        """
        return cls(**{**_preset("v4_flash"), **overrides})

    @classmethod
    def v4_pro(cls, **overrides: Any) -> DeepseekV4Config:
        """DeepSeek-V4-Pro (its ``inference/config.json``): 61 layers, hidden 7168, 384 experts."""
        return cls(**{**_preset("v4_pro"), **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> DeepseekV4Config:
        """A small V4-like model for tests, valid in every kernel mode (H % 512 == 0, I % 256 == 0),
        with small attention (4 layers: sliding, CSA, HCA, CSA; 16 indexer heads)."""
        return cls(**{**_preset("tiny"), **overrides})

    @classmethod
    def tiny_model(cls, **overrides: Any) -> DeepseekV4Config:
        """A whole model small enough for CPU seconds (exact experts only: H=64 is below the kernels'
        alignment): 5 layers covering sliding (0), CSA (4) and HCA (128), two hash-routed layers,
        16 indexer heads (fewer make the indexer's top-k over ReLU scores tie-prone)."""
        return cls(**{**_preset("tiny_model"), **overrides})

    # -- reading a checkpoint's config.json -----------------------------------------------------
    @classmethod
    def from_hf_config(cls, path: str | os.PathLike[str] | Mapping[str, Any]) -> DeepseekV4Config:
        """The config of a checkpoint's ``config.json`` (a folder, the file, or its parsed dict).

        Reads Hugging Face key names (``hidden_size``, ``layer_types`` / ``compress_ratios``,
        ``mlp_layer_types`` / ``num_hash_layers``, ``rope_parameters`` / ``rope_scaling``, ...) and
        DeepSeek's inference key names (``dim``, ``n_layers``, ``n_heads``, ``compress_ratios``,
        ``rope_factor``, ``original_seq_len``, ...). Unknown keys are ignored; keys missing from
        :data:`REQUIRED_KEYS` raise a ValueError naming them; other missing keys take Hugging
        Face's defaults (which are V4-Flash's).
        """
        return cls(**_fields_from_json(_read_json(path)))


# ---------------------------------------------------------------------------------------------
# presets: one row per field, one column per preset
# ---------------------------------------------------------------------------------------------

_PRESET_NAMES: tuple[str, ...] = ("v4_flash", "v4_pro", "tiny", "tiny_model")

# fmt: off
_PRESETS: tuple[tuple[Any, ...], ...] = (
    # field                     v4_flash  v4_pro    tiny   tiny_model
    ("hidden_size",             4096,     7168,     512,   64),
    ("moe_intermediate_size",   2048,     3072,     256,   32),
    ("n_routed_experts",        256,      384,      16,    8),
    ("num_experts_per_tok",     6,        6,        4,     2),
    ("n_shared_experts",        1,        1,        1,     1),
    ("routed_scaling_factor",   1.5,      2.5,      1.5,   1.5),
    ("swiglu_limit",            10.0,     10.0,     10.0,  10.0),
    ("num_hash_layers",         3,        3,        1,     2),
    ("vocab_size",              129280,   129280,   1000,  256),
    ("num_hidden_layers",       43,       61,       4,     5),
    ("num_attention_heads",     64,       128,      4,     4),
    ("head_dim",                512,      512,      64,    32),
    ("q_lora_rank",             1024,     1536,     64,    32),
    ("qk_rope_head_dim",        64,       64,       16,    8),
    ("o_groups",                8,        16,       2,     2),
    ("o_lora_rank",             1024,     1024,     32,    16),
    ("sliding_window",          128,      128,      16,    16),
    ("compress_ratios",
        (0, 0) + (4, 128) * 20 + (4, 0),
        (128, 128) + (4, 128) * 29 + (4, 0),
        (0, 4, 128, 4),
        (0, 4, 128, 4, 0)),
    ("index_n_heads",           64,       64,       16,    16),
    ("index_head_dim",          128,      128,      32,    16),
    ("index_topk",              512,      1024,     8,     4),
    ("num_nextn_predict_layers", 1,       1,        0,     0),
)
# fmt: on


def _preset(name: str) -> dict[str, Any]:
    """The fields of preset ``name`` (a column of :data:`_PRESETS`)."""
    col = 1 + _PRESET_NAMES.index(name)
    return {row[0]: row[col] for row in _PRESETS}


# ---------------------------------------------------------------------------------------------
# config.json -> fields
# ---------------------------------------------------------------------------------------------

#: The fields a ``config.json`` must give (under either naming); everything else has a default.
REQUIRED_KEYS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
)

#: DeepSeek's inference key -> our (HF) field name.
_DEEPSEEK_KEYS: dict[str, str] = {
    "dim": "hidden_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_hash_layers": "num_hash_layers",
    "n_mtp_layers": "num_nextn_predict_layers",
    "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim",
    "norm_eps": "rms_norm_eps",
    "window_size": "sliding_window",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
}

_LAYER_TYPE_RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_HF_DEFAULT_HASH_LAYERS = 3
_HF_DEFAULTS: dict[str, Any] = {"n_shared_experts": 1, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0}


def _read_json(path: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(path, Mapping):
        return dict(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a folder, a config.json path or a dict, got {type(path).__name__}")
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if not os.path.isfile(p):
        raise ValueError(f"path: {p!r} does not exist (expected a checkpoint folder or its config.json)")
    with open(p, encoding="utf-8") as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"path: {p!r} does not hold a JSON object")
    return d


def _fields_from_json(cj: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(DeepseekV4Config)}
    out: dict[str, Any] = {}
    for k, v in cj.items():  # DeepSeek names first, HF names (when both are given) win
        if k in _DEEPSEEK_KEYS:
            out[_DEEPSEEK_KEYS[k]] = v
    for k in (
        "n_routed_experts",
        "n_shared_experts",
        "swiglu_limit",
        "q_lora_rank",
        "head_dim",
        "o_groups",
        "o_lora_rank",
        "rope_theta",
        "compress_rope_theta",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
        "hc_mult",
        "hc_sinkhorn_iters",
        "hc_eps",
        "vocab_size",
    ):
        if k in cj:
            out[k] = cj[k]
    # DeepSeek's YaRN keys: original_seq_len 0 disables YaRN.
    if "rope_factor" in cj or "original_seq_len" in cj:
        osl = int(cj.get("original_seq_len", 0) or 0)
        out["yarn_factor"] = float(cj.get("rope_factor", 1.0)) if osl > 0 else None
        if osl > 0:
            out["yarn_original_max_position"] = osl
    for k, v in cj.items():
        if k in names and k not in ("compress_ratios",):
            out[k] = v
    # Per-layer compress ratios: HF layer_types (with compress_rates) > compress_ratios.
    if isinstance(cj.get("layer_types"), (list, tuple)):
        rates = dict(_LAYER_TYPE_RATIO)
        if isinstance(cj.get("compress_rates"), Mapping):
            rates.update({str(k): int(v) for k, v in cj["compress_rates"].items()})
        bad = [t for t in cj["layer_types"] if t not in rates]
        if bad:
            raise ValueError(f"layer_types: unknown entries {sorted(set(map(str, bad)))}; expected {sorted(rates)}")
        out["compress_ratios"] = tuple(0 if t == "sliding_attention" else rates[t] for t in cj["layer_types"])
    elif cj.get("compress_ratios") is not None:
        out["compress_ratios"] = tuple(int(r) for r in cj["compress_ratios"])
    # Hash layers: HF mlp_layer_types (a prefix of "hash_moe") > num_hash_layers / n_hash_layers.
    if isinstance(cj.get("mlp_layer_types"), (list, tuple)):
        types = list(cj["mlp_layer_types"])
        n_hash = sum(1 for t in types if t == "hash_moe")
        if types[:n_hash] != ["hash_moe"] * n_hash:
            raise ValueError(f"mlp_layer_types: hash_moe layers must come first, got {types}")
        out["num_hash_layers"] = n_hash
    out.setdefault("num_hash_layers", _HF_DEFAULT_HASH_LAYERS)
    for k, v in _HF_DEFAULTS.items():  # fields the dataclass requires but Hugging Face defaults
        out.setdefault(k, v)
    # RoPE dims: qk_rope_head_dim > partial_rotary_factor * head_dim.
    if "qk_rope_head_dim" not in out and cj.get("partial_rotary_factor") is not None:
        out["qk_rope_head_dim"] = int(round(float(cj["partial_rotary_factor"]) * int(out.get("head_dim", 512))))
    # HF YaRN: rope_parameters {"main", "compress"} (nested) or a flat rope_parameters / rope_scaling.
    rp = cj.get("rope_parameters") or cj.get("rope_scaling")
    if isinstance(rp, Mapping):
        comp = rp.get("compress") if isinstance(rp.get("compress"), Mapping) else rp
        main = rp.get("main") if isinstance(rp.get("main"), Mapping) else None
        if main is not None and "rope_theta" in main:
            out["rope_theta"] = main["rope_theta"]
        if comp is not rp and "rope_theta" in comp:
            out["compress_rope_theta"] = comp["rope_theta"]
        if comp.get("rope_type", comp.get("type", "default")) == "yarn":
            out["yarn_factor"] = float(comp.get("factor", 1.0))
            for src, dst in (
                ("original_max_position_embeddings", "yarn_original_max_position"),
                ("beta_fast", "yarn_beta_fast"),
                ("beta_slow", "yarn_beta_slow"),
            ):
                if comp.get(src) is not None:
                    out[dst] = comp[src]
        elif "rope_factor" not in cj and "original_seq_len" not in cj:
            out["yarn_factor"] = None
    elif "rope_factor" not in cj and "original_seq_len" not in cj:
        out["yarn_factor"] = None  # as Hugging Face reads a config without any RoPE scaling
    if isinstance(out.get("eos_token_id"), (list, tuple)):
        out["eos_token_id"] = int(out["eos_token_id"][0]) if out["eos_token_id"] else None
    missing = [k for k in REQUIRED_KEYS if k not in out]
    if missing:
        raise ValueError(
            f"config.json: missing required keys {missing} (Hugging Face names; DeepSeek's inference names "
            f"{sorted(k for k, v in _DEEPSEEK_KEYS.items() if v in missing)} are accepted too)"
        )
    for k in ("yarn_original_max_position", "num_hash_layers", "qk_rope_head_dim", "hidden_size"):
        if isinstance(out.get(k), float) and float(out[k]).is_integer():
            out[k] = int(out[k])
    return {k: v for k, v in out.items() if k in names}
