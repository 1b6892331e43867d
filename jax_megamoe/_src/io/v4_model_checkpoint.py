"""The whole DeepSeek V4 checkpoint: every tensor name, dtype and shape, a synthetic writer, a lazy reader.

Names are those of DeepSeek's own inference code (``inference/model.py``: its module attributes
are the checkpoint keys; Hugging Face renames them, see its ``conversion_mapping.py``). What each
tensor is on disk (``H`` hidden, ``E`` experts, ``I`` expert intermediate, ``nh`` heads, ``d``
head_dim, ``r`` q_lora_rank, ``g`` o_groups, ``o`` o_lora_rank, ``m = hc_mult``,
``mix = (2 + m) * m``; ``kind`` in brackets, see :data:`KINDS`)::

    embed.weight, head.weight            BF16 [vocab, H]                           [float]
    norm.weight, *.{attn,ffn}_norm.weight, q_norm, kv_norm, compressor.norm,
      mtp.*.{enorm,hnorm,norm}           BF16 [dim] (F32 accepted)                 [float]
    hc_head_{fn,base,scale}              F32 [m, m*H], [m], [1]                    [float]
    layers.i.hc_{attn,ffn}_{fn,base,scale}  F32 [mix, m*H], [mix], [3]             [float]
    layers.i.attn.{wq_a,wq_b,wkv,wo_a,wo_b}.weight  F8_E4M3 [out, in]              [fp8]
      (wq_a [r, H], wq_b [nh*d, r], wkv [d, H], wo_a [g*o, nh*d/g], wo_b [H, g*o])
    *.scale next to each fp8 weight       F8_E8M0 [ceil(out/128), ceil(in/128)]    [fp8_scale]
      (F32 accepted: the older ``weight_scale_inv`` style, same meaning)
    layers.i.attn.attn_sink               F32 [nh]                                  [float]
    layers.i.attn.compressor.*  (ratio > 0; c = 2 when ratio 4 else 1)
      wkv.weight, wgate.weight BF16 [c*d, H]; ape F32 [ratio, c*d]; norm.weight [d]
    layers.i.attn.indexer.*  (ratio 4): wq_b.weight F8_E4M3 [ni*di, r] (+ scale),
      weights_proj.weight BF16 [ni, H], compressor.* as above with d = di, c = 2
    layers.i.ffn.gate.weight              BF16 [E, H]                               [float]
    layers.i.ffn.gate.bias                F32 [E]     (non-hash layers)             [float]
    layers.i.ffn.gate.tid2eid             I64 [vocab, K] (hash layers; I32 accepted) [int]
    layers.i.ffn.experts.e.{w1,w3}.weight I8 [I, H/2] packed E2M1 (low nibble = even) [fp4]
    layers.i.ffn.experts.e.w2.weight      I8 [H, I/2]                              [fp4]
    layers.i.ffn.experts.e.w*.scale       F8_E8M0 [rows, cols/32] (UE8M0 per 32)   [fp4_scale]
    layers.i.ffn.shared_experts.{w1,w3}.weight F8_E4M3 [I*n_shared, H], w2 [H, I*n_shared] [fp8]
    mtp.k.*   DeepSeek's MTPBlock k: a whole decoder layer (attention with the compress ratio
              of index num_hidden_layers + k, never hash-routed) plus e_proj.weight,
              h_proj.weight F8_E4M3 [H, H] (+ scale), enorm, hnorm, norm [H], hc_head_* as the top.

The MTP block's embedding and head are the model's own (DeepSeek's ``MTPBlock.embed/head`` point
at ``Transformer.embed/head``); copies a release may carry under ``mtp.`` (names holding ``emb``
or ending ``head.weight``, which DeepSeek's ``convert.py`` drops) are listed by
:func:`is_ignored_tensor` and skipped by the loaders.

:func:`write_synthetic_checkpoint` writes random tensors in exactly this layout (or, with
``float_weights=True``, every FP8/FP4 weight as dense BF16 with no scale, the layout the Hugging
Face parity tests read) into ``model-0000k-of-0000n.safetensors`` shards with
``model.safetensors.index.json`` and a ``config.json`` in Hugging Face key names, one tensor at a
time (peak host memory: one chunk of one tensor). :func:`check_checkpoint_layout` checks a
checkpoint's headers against :func:`expected_tensors` without reading any data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from jax_megamoe._src.io.safetensors_reader import (
    CONFIG_NAME,
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    safetensors_dtype,
)
from jax_megamoe._src.numerics.progress import make_progress
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

__all__ = [
    "KINDS",
    "CheckpointTensors",
    "TensorSpec",
    "check_checkpoint_layout",
    "expected_tensors",
    "fp8_scale_shape",
    "hf_config_dict",
    "is_ignored_tensor",
    "mtp_compress_ratio",
    "read_config",
    "scale_name",
    "synthetic_tensor",
    "tensor_kind",
    "write_synthetic_checkpoint",
]

#: ``kind`` of a tensor: ``fp8`` an FP8 E4M3 weight with a 128x128 block scale next to it,
#: ``fp8_scale`` that scale, ``fp4`` a packed E2M1 routed-expert weight, ``fp4_scale`` its UE8M0
#: per-32 scale, ``float`` a BF16/F32 tensor used as is, ``int`` the hash table.
KINDS = ("fp8", "fp8_scale", "fp4", "fp4_scale", "float", "int")

_FLOATS = ("BF16", "F32", "F16")


class TensorSpec(NamedTuple):
    """What one checkpoint tensor must be: ``dtypes`` lists the official dtype first, then the
    ones also accepted."""

    shape: tuple[int, ...]
    dtypes: tuple[str, ...]
    kind: str


# ---------------------------------------------------------------------------------------------
# Kinds by name
# ---------------------------------------------------------------------------------------------

_EXPERT_W = re.compile(r"(^|\.)experts\.\d+\.w[123]\.weight$")
_EXPERT_S = re.compile(r"(^|\.)experts\.\d+\.w[123]\.scale$")
_FP8_W = re.compile(
    r"((^|\.)attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|(^|\.)indexer\.wq_b|(^|\.)shared_experts\.w[123]|(^|\.)[eh]_proj)\.weight$"
)
_F32 = re.compile(r"((^|\.)hc_(attn|ffn|head)_(fn|base|scale)|(^|\.)attn_sink|(^|\.)ape|(^|\.)gate\.bias)$")
_INT = re.compile(r"(^|\.)gate\.tid2eid$")


def tensor_kind(name: str) -> tuple[str, tuple[str, ...]]:
    """``(kind, accepted dtypes, official first)`` of a tensor from its name alone (names may be
    relative to a block, e.g. ``gate.weight``).

    FP8 weights and FP4 experts may also be stored dense (BF16/F32/F16, no scale); FP8 routed
    experts (``F8_E4M3`` with a 128x128 scale) are accepted as re-packagings do.
    """
    if _EXPERT_W.search(name):
        return "fp4", ("I8", "U8", "F8_E4M3", *_FLOATS)
    if _EXPERT_S.search(name):
        return "fp4_scale", ("F8_E8M0", "U8", "F32")
    if name.endswith((".scale", ".weight_scale_inv")):
        return "fp8_scale", ("F8_E8M0", "F32", "U8")
    if _FP8_W.search(name):
        return "fp8", ("F8_E4M3", *_FLOATS)
    if _INT.search(name):
        return "int", ("I64", "I32")
    if _F32.search(name):
        return "float", ("F32", "BF16")
    return "float", ("BF16", "F32", "F16")


def scale_name(weight_name: str) -> str:
    """``x.weight`` -> ``x.scale`` (DeepSeek's name for the block scale of ``x``)."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"weight_name: {weight_name!r} does not end in '.weight'")
    return weight_name[: -len("weight")] + "scale"


def fp8_scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``[ceil(out/128), ceil(in/128)]``: one scale per 128x128 block (as DeepSeek's ``Linear``)."""
    n, k = shape
    return (-(-n // 128), -(-k // 128))


def is_ignored_tensor(name: str) -> bool:
    """True for the MTP block's copies of the embedding and head (``mtp.*`` names holding ``emb``
    or ending ``head.weight``): the model shares its own, as DeepSeek's ``convert.py`` does."""
    return name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight"))


# ---------------------------------------------------------------------------------------------
# The expected layout
# ---------------------------------------------------------------------------------------------


def mtp_compress_ratio(config: DeepseekV4Config, k: int) -> int:
    """Compress ratio of MTP block ``k``: entry ``num_hidden_layers + k`` of ``compress_ratios``
    when the config lists it (DeepSeek's configs do: 0 for V4-Pro's MTP block), else 0."""
    i = config.num_hidden_layers + k
    if config.compress_ratios is not None and len(config.compress_ratios) > i:
        return int(config.compress_ratios[i])
    return 0


def _linear(out: dict[str, TensorSpec], name: str, shape: tuple[int, int], official: str, float_weights: bool) -> None:
    """One linear weight (``official``: "fp8" with a scale, or "bf16")."""
    if official == "fp8" and not float_weights:
        out[f"{name}.weight"] = TensorSpec(shape, ("F8_E4M3",), "fp8")
        out[f"{name}.scale"] = TensorSpec(fp8_scale_shape(shape), ("F8_E8M0", "F32"), "fp8_scale")
    else:
        out[f"{name}.weight"] = TensorSpec(shape, ("BF16", "F32"), "float")


def _norm(out: dict[str, TensorSpec], name: str, dim: int) -> None:
    out[f"{name}.weight"] = TensorSpec((dim,), ("BF16", "F32"), "float")


def _f32(out: dict[str, TensorSpec], name: str, shape: tuple[int, ...]) -> None:
    out[name] = TensorSpec(tuple(shape), ("F32", "BF16"), "float")


def _compressor(out: dict[str, TensorSpec], pre: str, cfg: DeepseekV4Config, ratio: int, head_dim: int) -> None:
    c = 2 if ratio == 4 else 1
    _f32(out, f"{pre}ape", (ratio, c * head_dim))
    _linear(out, f"{pre}wkv", (c * head_dim, cfg.hidden_size), "bf16", False)
    _linear(out, f"{pre}wgate", (c * head_dim, cfg.hidden_size), "bf16", False)
    _norm(out, f"{pre}norm", head_dim)


def _block(out: dict[str, TensorSpec], pre: str, cfg: DeepseekV4Config, ratio: int, is_hash: bool, fw: bool) -> None:
    """One decoder layer (DeepSeek's ``Block``) under ``pre`` (``layers.3.`` / ``mtp.0.``)."""
    h, m = cfg.hidden_size, cfg.hc_mult
    mix = (2 + m) * m
    nh, d, r = cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    g, o = cfg.o_groups, cfg.o_lora_rank
    _norm(out, f"{pre}attn_norm", h)
    _norm(out, f"{pre}ffn_norm", h)
    for part in ("attn", "ffn"):
        _f32(out, f"{pre}hc_{part}_fn", (mix, m * h))
        _f32(out, f"{pre}hc_{part}_base", (mix,))
        _f32(out, f"{pre}hc_{part}_scale", (3,))
    a = f"{pre}attn."
    _f32(out, f"{a}attn_sink", (nh,))
    _linear(out, f"{a}wq_a", (r, h), "fp8", fw)
    _norm(out, f"{a}q_norm", r)
    _linear(out, f"{a}wq_b", (nh * d, r), "fp8", fw)
    _linear(out, f"{a}wkv", (d, h), "fp8", fw)
    _norm(out, f"{a}kv_norm", d)
    _linear(out, f"{a}wo_a", (g * o, nh * d // g), "fp8", fw)
    _linear(out, f"{a}wo_b", (h, g * o), "fp8", fw)
    if ratio:
        _compressor(out, f"{a}compressor.", cfg, ratio, d)
        if ratio == 4:
            ni, di = cfg.index_n_heads, cfg.index_head_dim
            _linear(out, f"{a}indexer.wq_b", (ni * di, r), "fp8", fw)
            _linear(out, f"{a}indexer.weights_proj", (ni, h), "bf16", fw)
            _compressor(out, f"{a}indexer.compressor.", cfg, ratio, di)
    f = f"{pre}ffn."
    e, i, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    out[f"{f}gate.weight"] = TensorSpec((e, h), ("BF16", "F32"), "float")
    if is_hash:
        out[f"{f}gate.tid2eid"] = TensorSpec((cfg.vocab_size, k), ("I64", "I32"), "int")
    else:
        _f32(out, f"{f}gate.bias", (e,))
    for ex in range(e):
        for proj, (rows, cols) in (("w1", (i, h)), ("w2", (h, i)), ("w3", (i, h))):
            base = f"{f}experts.{ex}.{proj}"
            if fw:
                out[f"{base}.weight"] = TensorSpec((rows, cols), ("BF16", "F32"), "float")
            else:
                out[f"{base}.weight"] = TensorSpec((rows, cols // 2), ("I8", "U8"), "fp4")
                out[f"{base}.scale"] = TensorSpec((rows, cols // 32), ("F8_E8M0", "U8"), "fp4_scale")
    if cfg.n_shared_experts:
        si = cfg.shared_intermediate_size
        for proj, shape in (("w1", (si, h)), ("w2", (h, si)), ("w3", (si, h))):
            _linear(out, f"{f}shared_experts.{proj}", shape, "fp8", fw)


def _hc_head(out: dict[str, TensorSpec], pre: str, cfg: DeepseekV4Config) -> None:
    m, h = cfg.hc_mult, cfg.hidden_size
    _f32(out, f"{pre}hc_head_fn", (m, m * h))
    _f32(out, f"{pre}hc_head_base", (m,))
    _f32(out, f"{pre}hc_head_scale", (1,))


def expected_tensors(
    config: DeepseekV4Config, *, include_mtp: bool = True, float_weights: bool = False
) -> dict[str, TensorSpec]:
    """Every tensor of the official layout for ``config``: ``{name: TensorSpec(shape, dtypes, kind)}``
    in file order (embedding, layers, final norm/head/hyper-head, MTP blocks).

    ``dtypes`` lists the official dtype first (the one :func:`write_synthetic_checkpoint` writes)
    and those also accepted. ``float_weights=True`` describes the dense layout instead: every
    FP8 weight and FP4 expert as BF16/F32 ``[out, in]`` with no scale. ``include_mtp``: the
    ``config.num_nextn_predict_layers`` MTP blocks (``mtp.k.*``).
    """
    if not isinstance(config, DeepseekV4Config):
        raise TypeError(f"config: expected a DeepseekV4Config, got {type(config).__name__}")
    cfg, fw = config, bool(float_weights)
    out: dict[str, TensorSpec] = {}
    out["embed.weight"] = TensorSpec((cfg.vocab_size, cfg.hidden_size), ("BF16", "F32"), "float")
    for li in range(cfg.num_hidden_layers):
        _block(out, f"layers.{li}.", cfg, cfg.layer_compress_ratio(li), cfg.is_hash_layer(li), fw)
    _norm(out, "norm", cfg.hidden_size)
    out["head.weight"] = TensorSpec((cfg.vocab_size, cfg.hidden_size), ("BF16", "F32"), "float")
    _hc_head(out, "", cfg)
    if include_mtp:
        h = cfg.hidden_size
        for k in range(cfg.num_nextn_predict_layers):
            pre = f"mtp.{k}."
            _block(out, pre, cfg, mtp_compress_ratio(cfg, k), False, fw)
            _linear(out, f"{pre}e_proj", (h, h), "fp8", fw)
            _linear(out, f"{pre}h_proj", (h, h), "fp8", fw)
            for nm in ("enorm", "hnorm", "norm"):
                _norm(out, f"{pre}{nm}", h)
            _hc_head(out, pre, cfg)
    return out


def check_checkpoint_layout(
    ck: Checkpoint, config: DeepseekV4Config, *, include_mtp: bool = True, strict: bool = True
) -> None:
    """Check a checkpoint's index and headers against :func:`expected_tensors` (no data is read).

    Each FP8/FP4 weight may be official (with its scale) or dense (BF16/F32, then without a
    scale). Raises :class:`CheckpointError` naming the first missing tensor, wrong dtype or
    shape, or (``strict``) a tensor the layout does not have. MTP tensors are ignored when
    ``include_mtp`` is false, as are :func:`is_ignored_tensor` names.
    """
    want = expected_tensors(config, include_mtp=include_mtp)
    dense = expected_tensors(config, include_mtp=include_mtp, float_weights=True)
    seen: set[str] = set()
    for name, spec in want.items():
        if spec.kind in ("fp8_scale", "fp4_scale"):
            continue
        if name not in ck:
            raise CheckpointError(f"tensor {name!r} is missing: not listed in {ck.source}")
        ti = ck.info(name)
        seen.add(name)
        alt = dense[name]
        if spec.kind == "fp4" and ti.dtype == "F8_E4M3":  # FP8 routed experts (re-packagings)
            spec = TensorSpec(alt.shape, ("F8_E4M3",), "fp8")
            sn = scale_name(name)
            if sn not in ck:
                raise CheckpointError(f"tensor {sn!r} is missing: not listed in {ck.source} (the scale of {name})")
            seen.update((name, sn))
            _check_info(ti, spec, config)
            _check_info(ck.info(sn), TensorSpec(fp8_scale_shape(alt.shape), ("F32", "F8_E8M0"), "fp8_scale"), config)
            continue
        if spec.kind in ("fp8", "fp4") and ti.dtype in alt.dtypes + ("F16",):
            spec = alt
            sn = scale_name(name)
            if sn in ck:
                raise CheckpointError(
                    f"tensor {sn!r} in {ck.info(sn).file}: {name} is stored dense ({ti.dtype}), so it has no scale"
                )
        _check_info(ti, spec, config)
        if spec.kind in ("fp8", "fp4"):
            sn = scale_name(name)
            if sn not in ck:
                raise CheckpointError(f"tensor {sn!r} is missing: not listed in {ck.source} (the scale of {name})")
            seen.add(sn)
            _check_info(ck.info(sn), want[sn], config)
    if strict:
        extra = [
            n
            for n in ck.names()
            if n not in seen and not is_ignored_tensor(n) and (include_mtp or not n.startswith("mtp."))
        ]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(
                f"tensor {extra[0]!r} in {ck.source} is not part of the DeepSeek V4 layout for this config{more}"
            )


def _check_info(ti: TensorInfo, spec: TensorSpec, cfg: DeepseekV4Config) -> None:
    where = f"tensor {ti.name!r} in {ti.file}"
    if ti.dtype not in spec.dtypes:
        raise CheckpointError(f"{where}: dtype {ti.dtype} is not supported; expected {' or '.join(spec.dtypes)}")
    if tuple(ti.shape) != tuple(spec.shape):
        raise CheckpointError(f"{where}: shape {list(ti.shape)} does not match the expected {list(spec.shape)}")


# ---------------------------------------------------------------------------------------------
# config.json (Hugging Face key names)
# ---------------------------------------------------------------------------------------------


def hf_config_dict(config: DeepseekV4Config, *, quantized: bool = True) -> dict[str, Any]:
    """``config.json`` contents for ``config`` in Hugging Face key names (the release's own style:
    ``compress_ratios`` per layer then per MTP block, ``num_hash_layers``, ``qk_rope_head_dim``,
    ``rope_scaling``), plus the FP8 ``quantization_config`` when ``quantized``."""
    c = config
    n = c.num_hidden_layers
    ratios = [c.layer_compress_ratio(i) for i in range(n)]
    ratios += [mtp_compress_ratio(c, k) for k in range(c.num_nextn_predict_layers)]
    d: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "torch_dtype": "bfloat16",
    }
    skip = {
        "compress_ratios",
        "yarn_factor",
        "yarn_original_max_position",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "renorm_eps",
    }
    for f in dataclasses.fields(c):
        if f.name not in skip:
            d[f.name] = getattr(c, f.name)
    d["compress_ratios"] = ratios
    if c.yarn_factor is not None:
        d["rope_scaling"] = {
            "type": "yarn",
            "factor": c.yarn_factor,
            "original_max_position_embeddings": c.yarn_original_max_position,
            "beta_fast": c.yarn_beta_fast,
            "beta_slow": c.yarn_beta_slow,
        }
    if quantized:
        d["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "scale_fmt": "ue8m0",
        }
        d["expert_dtype"] = "fp4"
    return d


def read_config(path: str | os.PathLike[str]) -> DeepseekV4Config:
    """The :class:`DeepseekV4Config` of a checkpoint folder's ``config.json``
    (:meth:`DeepseekV4Config.from_hf_config`; errors as :class:`CheckpointError` naming the file)."""
    p = os.path.join(os.fspath(path), CONFIG_NAME) if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(p):
        raise CheckpointError(f"{p}: no config.json; pass config=DeepseekV4Config(...)")
    try:
        return DeepseekV4Config.from_hf_config(p)
    except (OSError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: cannot read the model config ({e})") from None


# ---------------------------------------------------------------------------------------------
# Synthetic tensors
# ---------------------------------------------------------------------------------------------

_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_BF16 = np.dtype(ml_dtypes.bfloat16)
#: 256 E4M3 codes spread like N(0, 1) (sorted normal quantiles, none zero or NaN): a random byte
#: indexes it, so FP8 weights come from one table look-up per element.
_E4M3_LUT = np.sort(np.random.default_rng(12345).standard_normal(256)).astype(np.float32)
_E4M3_LUT = np.where(np.abs(_E4M3_LUT) < 0.02, np.copysign(0.02, _E4M3_LUT), _E4M3_LUT).astype(_E4M3).view(np.uint8)
#: RMS of a uniformly random E2M1 code, and the gain of a scale exponent jittered by one.
_E2M1_RMS = math.sqrt(68.5 / 8)
_JITTER_RMS = math.sqrt(1.75)
_CHUNK_BYTES = 32 << 20  # rows generated at a time: host memory stays at one chunk per tensor


def _seed(seed: int, name: str) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())])))


def _centre_byte(log2_value: float) -> int:
    return int(np.clip(127 + round(log2_value), 2, 252))


def _std(name: str, spec: TensorSpec) -> tuple[float, float]:
    """``(mean, std)`` of a float tensor: norms ~1, linears ~1/sqrt(fan_in), small mHC mixers."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if re.search(r"hc_\w+_fn$", name):
        return 0.0, 0.02
    if re.search(r"hc_\w+_scale$", name):
        return 0.5, 0.1
    if re.search(r"hc_\w+_base$|ape$|gate\.bias$", name):
        return 0.0, 0.1
    if name == "embed.weight" or name.endswith("attn_sink"):
        return 0.0, 1.0
    if len(spec.shape) == 2:
        return 0.0, 1.0 / math.sqrt(spec.shape[1] * (2 if spec.kind == "fp4" else 1))
    return 0.0, 1.0


def _rows_per_chunk(shape: tuple[int, ...], itemsize: int) -> int:
    row = max(1, math.prod(shape[1:]) * itemsize)
    return max(1, _CHUNK_BYTES // row)


def synthetic_tensor(name: str, spec: TensorSpec, config: DeepseekV4Config, seed: int) -> Iterator[np.ndarray]:
    """The synthetic tensor ``name`` in row chunks (concatenated along axis 0: the whole tensor),
    in its official dtype (``spec.dtypes[0]``). Random, never all zero, seeded per name (the same
    seed gives the same tensor whatever else the checkpoint holds)."""
    rng = _seed(seed, name)
    dt_s = spec.dtypes[0]
    dt = SAFETENSORS_DTYPES[dt_s]
    shape = tuple(spec.shape)
    rows = shape[0] if shape else 1
    step = _rows_per_chunk(shape, dt.itemsize)
    cfg = config
    for r0 in range(0, rows, step):
        sub = (min(step, rows - r0), *shape[1:]) if shape else ()
        n = math.prod(sub)
        if spec.kind == "fp8":
            a = _E4M3_LUT[rng.integers(0, 256, n, dtype=np.uint8)].view(_E4M3)
        elif spec.kind == "fp4":
            a = rng.integers(0, 256, n, dtype=np.uint8).view(np.int8)
        elif spec.kind == "fp8_scale":
            k = (shape[1] * 128) if len(shape) == 2 else 128
            c = _centre_byte(-0.5 * math.log2(k))
            a = rng.integers(c - 1, c + 2, n, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
        elif spec.kind == "fp4_scale":
            k = shape[1] * 32
            target = 1.0 if name.endswith("w2.scale") else 2.0
            c = _centre_byte(math.log2(target / (math.sqrt(k) * _E2M1_RMS * _JITTER_RMS)))
            a = rng.integers(c - 1, c + 2, n, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
        elif spec.kind == "int":
            e, kk = cfg.n_routed_experts, shape[1]
            keys = rng.random((sub[0], e), dtype=np.float32)
            a = np.argsort(keys, axis=1)[:, :kk].astype(dt)
        else:
            mean, std = _std(name, spec)
            a = (mean + std * rng.standard_normal(n, dtype=np.float32)).astype(dt)
        yield np.ascontiguousarray(a.reshape(sub))


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------


def _shard_plan(specs: Mapping[str, TensorSpec], shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        nb = math.prod(spec.shape) * SAFETENSORS_DTYPES[spec.dtypes[0]].itemsize
        if shards[-1] and size + nb > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nb
    return shards


def _write_shard(path: str, names: list[str], specs: Mapping[str, TensorSpec], gen: Any, progress: Any) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name in names:
        spec = specs[name]
        nb = math.prod(spec.shape) * SAFETENSORS_DTYPES[spec.dtypes[0]].itemsize
        header[name] = {"dtype": spec.dtypes[0], "shape": list(spec.shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name in names:
            spec = specs[name]
            want = math.prod(spec.shape) * SAFETENSORS_DTYPES[spec.dtypes[0]].itemsize
            got = 0
            for chunk in gen(name, spec):
                if safetensors_dtype(chunk.dtype) != spec.dtypes[0]:
                    raise AssertionError(f"{name}: generated {chunk.dtype} for {spec.dtypes[0]}")
                f.write(chunk.view(np.uint8).data if chunk.ndim else chunk.reshape(1).view(np.uint8).data)
                got += chunk.nbytes
                if progress is not None:
                    progress(chunk.nbytes)
            if got != want:
                raise AssertionError(f"{name}: wrote {got} bytes, expected {want}")
    return off


def _float_spec(spec: TensorSpec) -> TensorSpec:
    """The dense layout writes its official dtype first; only the hash table is not a float."""
    if spec.kind == "int":
        return spec
    return TensorSpec(spec.shape, ("BF16",) if spec.dtypes[0] != "F32" else ("F32",), spec.kind)


def write_synthetic_checkpoint(
    path: str | os.PathLike[str],
    config: DeepseekV4Config,
    *,
    seed: int = 0,
    layers: int | None = None,
    float_weights: bool = False,
    shard_size: int = 5 << 30,
    include_mtp: bool = True,
    progress: Any = None,
) -> dict[str, TensorSpec]:
    """Write a random checkpoint in the official DeepSeek V4 layout; returns what was written.

    Names, shapes and dtypes are :func:`expected_tensors` (FP8 E4M3 linears with E8M0 128x128
    scales, packed E2M1 experts with UE8M0 per-32 scales, BF16/F32 elsewhere); values are random
    and never all zero (FP8 codes spread like N(0,1) with scales near ``1/sqrt(fan_in)``, so a
    forward pass stays finite). ``float_weights=True`` writes every FP8/FP4 weight dense (BF16
    ``[out, in]``, no scale), what the Hugging Face parity tests load. ``layers``: write only the
    first ``layers`` decoder layers (the config written says so). Shards of at most
    ``shard_size`` bytes (a tensor is never split), ``model.safetensors.index.json`` and
    ``config.json`` (Hugging Face keys, :func:`hf_config_dict`). Tensors are generated and written
    one chunk at a time, so V4-Flash-sized layers need little host memory. ``progress``: see
    :func:`jax_megamoe._src.numerics.progress.make_progress` (bytes).
    """
    if not isinstance(config, DeepseekV4Config):
        raise TypeError(f"config: expected a DeepseekV4Config, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an integer, got {type(seed).__name__}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size: {shard_size!r} must be a positive number of bytes")
    cfg = config
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or not 1 <= layers:
            raise ValueError(f"layers: {layers!r} must be a positive integer")
        ratios = tuple(cfg.layer_compress_ratio(i) for i in range(int(layers)))
        ratios += tuple(mtp_compress_ratio(cfg, k) for k in range(cfg.num_nextn_predict_layers))
        cfg = dataclasses.replace(cfg, num_hidden_layers=int(layers), compress_ratios=ratios)
    specs = expected_tensors(cfg, include_mtp=include_mtp, float_weights=float_weights)
    if float_weights:
        specs = {n: _float_spec(s) for n, s in specs.items()}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    plan = _shard_plan(specs, int(shard_size))
    total = sum(math.prod(s.shape) * SAFETENSORS_DTYPES[s.dtypes[0]].itemsize for s in specs.values())
    bar = make_progress(progress, total, "write synthetic checkpoint", "B")
    done = [0]

    def tick(nb: int) -> None:
        done[0] += nb
        if bar is not None:
            bar(done[0])

    def gen(name: str, spec: TensorSpec) -> Iterator[np.ndarray]:
        return synthetic_tensor(name, spec, cfg, int(seed))

    weight_map: dict[str, str] = {}
    n = len(plan)
    for k, names in enumerate(plan):
        fn = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        _write_shard(os.path.join(path, fn), names, specs, gen, tick)
        weight_map.update({nm: fn for nm in names})
    if bar is not None:
        bar.close()
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf_config_dict(cfg, quantized=not float_weights), f, indent=1)
    return specs


# ---------------------------------------------------------------------------------------------
# Lazy tensor mapping over a checkpoint
# ---------------------------------------------------------------------------------------------


class CheckpointTensors(Mapping):
    """A read-only ``{name: array}`` view of a :class:`Checkpoint`: ``m[name]`` is a checked,
    read-only view into the memory-mapped shard (no copy); :meth:`info` gives dtype and shape
    without reading data. :meth:`release` tells that a tensor is no longer needed: once every
    tensor of a shard is released, that shard's mapping is dropped (its pages leave the
    process's resident set), so a loader walking the model keeps about one shard mapped.
    """

    def __init__(self, ck: Checkpoint, names: Any = None) -> None:
        self.ck = ck
        self._names = [n for n in (ck.names() if names is None else names)]
        self._left: dict[str, int] = {}
        for n in self._names:
            fn = ck.weight_map[n]
            self._left[fn] = self._left.get(fn, 0) + 1
        self._released: set[str] = set()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.ck:
            raise KeyError(name)
        return self.ck.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.ck

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def info(self, name: str) -> TensorInfo:
        """The header entry of ``name`` (dtype string, shape, file), checked, no data read."""
        return self.ck.file_of(name).check(name)

    def where(self, name: str) -> str:
        return self.ck.info(name).file

    def release(self, name: str) -> None:
        """``name`` is no longer needed: its pages leave the resident set (``MADV_DONTNEED`` on a
        read-only file mapping only drops them; a later read faults them back in from the file),
        and the shard's mapping is dropped once every tensor of it is released."""
        if name in self._released or name not in self.ck.weight_map:
            return
        self._released.add(name)
        fn = self.ck.weight_map[name]
        sf = self.ck._files.get(fn)
        if sf is not None:
            _drop_pages(sf, name)
        self._left[fn] = self._left.get(fn, 1) - 1
        if self._left[fn] <= 0 and sf is not None:
            sf.close()


def _drop_pages(sf: Any, name: str) -> None:
    mm = getattr(getattr(sf, "_mm", None), "_mmap", None)
    ti = sf.tensors.get(name)
    if mm is None or ti is None or ti.nbytes == 0 or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = (sf.data_start + ti.begin) // page * page
    end = min(len(mm), -(-(sf.data_start + ti.end) // page) * page)
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):  # advice only
        pass
