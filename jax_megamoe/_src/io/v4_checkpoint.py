"""Load one DeepSeek V4 MoE layer from a safetensors checkpoint into kernel layout.

What is read (names relative to the layer prefix ``layers.{i}.``; ``E`` experts, ``H`` hidden,
``I`` expert intermediate, ``K`` top-k, ``I_s = I * n_shared_experts``)::

    ffn.gate.weight                     BF16      [E, H]          router
    ffn.gate.bias                       F32       [E]             selection bias (non-hash layers;
                                                                  BF16 accepted, the on-disk dtype
                                                                  is unconfirmed)
    ffn.gate.tid2eid                    I64       [vocab, K]      hash table (hash layers; I32 accepted)
    ffn.experts.{e}.w1.weight           I8        [I, H/2]        packed E2M1 (U8 accepted)
    ffn.experts.{e}.w1.scale            F8_E8M0   [I, H/32]       UE8M0, one per 32 along K (U8 accepted)
    ffn.experts.{e}.w3.*                as w1                     up projection
    ffn.experts.{e}.w2.weight           I8        [H, I/2]
    ffn.experts.{e}.w2.scale            F8_E8M0   [H, I/32]
    ffn.shared_experts.{w1,w3}.weight   F8_E4M3   [I_s, H]
    ffn.shared_experts.w2.weight        F8_E4M3   [H, I_s]
    ffn.shared_experts.*.scale          F8_E8M0   [N/128, K/128]  128x128 blocks (F32 accepted)

FP8 expert checkpoints (``sgl-project/DeepSeek-V4-*-FP8`` and similar re-packagings) are read too:
``ffn.experts.{e}.w{1,2,3}.weight`` F8_E4M3 ``[N, K]`` with a 128x128 block scale named ``.scale``
or ``.weight_scale_inv`` (F32, or F8_E8M0). They give mode ``'fp8'`` (sm_90) weights only: turning
FP8 back into FP4 would be lossy, so asking for an sm_100 mode raises :class:`CheckpointError`.

How it is read: the folder's ``model.safetensors.index.json`` maps tensor names to shard files
(a folder with a single ``model.safetensors`` or un-indexed ``*.safetensors`` shards, or a single
file, work too). Each shard's header (8-byte little-endian length + JSON) is parsed here, not by
the ``safetensors`` package, so ``F8_E8M0`` and I8-packed FP4 read the same everywhere. A shard is
memory-mapped once (``np.memmap``) and a tensor is a read-only view of its byte range; only the
tensors of the requested layer are ever touched, so the rest of the model is never read. The
routed experts are streamed one expert at a time into preallocated checkpoint-format arrays
(``w13 uint8[E, 2I, H/2]`` gate rows then up rows, ``w13_scale uint8[E, 2I, H/32]``, ``w2``,
``w2_scale``), which :meth:`jax_megamoe.layout.MoEWeights.from_checkpoint_with_report` turns into
the kernel layout of the chosen mode (``mxf4xmxf4`` / ``fp8xfp4`` keep the FP4 bytes; ``fp8``
converts them to FP8 128x128 and returns the :class:`~jax_megamoe.layout.ConversionReport`, which
is also logged).

Every tensor read is checked: dtype, shape (against the sizes derived from the gate and expert-0
shapes and against the config), and that its ``data_offsets`` span exactly ``dtype x shape``
bytes inside the file. Each shard's header must lay its tensors out as the official format does
(:class:`SafetensorsFile`: no overlapping or aliased offsets, no gaps, no hidden trailing data;
JSON key order is free). A UE8M0 scale byte 0xFF (NaN in E8M0) in a routed-expert scale or an
E8M0 128x128 block scale is refused, naming the tensor, the first position and the count
(``allow_nan_scales=True`` on :func:`read_moe_layer` / :func:`load_moe_layer` /
:func:`build_moe_layer` accepts it). Failures raise :class:`CheckpointError` (a ``ValueError``)
naming the tensor and the file.

A source checkpoint carries no checksum, so a flipped data byte cannot be detected here; what
is guaranteed is that reading is faithful: every array holds exactly the bytes the file holds
at that tensor's offsets (the integrity tests check this byte for byte).

Nibble order: DeepGEMM and this package pack element ``2j`` of a row in the **low** nibble
(``nibble_order="low_even"``), which is torch's ``float4_e2m1fn_x2`` convention the checkpoint is
expected to follow. ``nibble_order="high_even"`` swaps the nibbles of every routed-expert byte while
reading. :func:`check_nibble_order` (arrays) and :func:`check_checkpoint_nibble_order` (one expert
of a checkpoint against a BF16/F32 reference) tell which order a checkpoint really uses. **With no
real checkpoint available here, the order has been verified on synthetic data only.**
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from jax_megamoe._src.io.safetensors_reader import (
    CONFIG_NAME,
    Checkpoint,
    CheckpointError,
    CheckpointSource,
    _as_checkpoint,
)
from jax_megamoe._src.numerics._validate import ArrayIn
from jax_megamoe._src.numerics.layout import ConversionReport, MoEWeights, nan_scale_message
from jax_megamoe._src.numerics.progress import ProgressArg, make_progress
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

NIBBLE_ORDERS = ("low_even", "high_even")
#: ``config=`` of the readers: a ``DeepseekV4Config`` (used as is, after the checks), a dict of
#: fields (laid over ``config.json``) or None (``config.json`` of the checkpoint folder).
ConfigArg = DeepseekV4Config | Mapping[str, Any] | None


def _check_file_scale(ck: Checkpoint, name: str, scale: np.ndarray, lead: str, allow_nan_scales: bool) -> None:
    """:func:`jax_megamoe.layout.nan_scale_message` on the ``[rows, cols]`` tensor ``name`` as a :class:`CheckpointError`."""
    if allow_nan_scales:
        return
    msg = nan_scale_message(f"tensor {name!r} in {ck.info(name).file}", scale, ("row", "col"), lead=lead)
    if msg is not None:
        raise CheckpointError(msg)


# ---------------------------------------------------------------------------------------------
# Nibble order
# ---------------------------------------------------------------------------------------------

_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_SWAP_LUT = np.array([((b & 15) << 4) | (b >> 4) for b in range(256)], np.uint8)


def _check_nibble_order_arg(nibble_order: str) -> str:
    if nibble_order not in NIBBLE_ORDERS:
        raise ValueError(f"nibble_order: {nibble_order!r} is not one of {', '.join(NIBBLE_ORDERS)}")
    return nibble_order


def _u8(name: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.itemsize != 1 or x.dtype.kind not in "uifV":
        raise TypeError(f"{name}: expected one-byte elements (uint8, int8, float8_e8m0fnu), got {x.dtype.name}")
    return x.view(np.uint8)


def swap_nibbles(packed: ArrayIn) -> np.ndarray:
    """Packed FP4 bytes with their two nibbles exchanged (``high_even`` <-> ``low_even``)."""
    return _SWAP_LUT[_u8("packed", packed)]


def dequantize_fp4_numpy(packed: ArrayIn, scale: ArrayIn, nibble_order: str = "low_even") -> np.ndarray:
    """Checkpoint MXFP4 ``[..., N, K/2]`` + UE8M0 ``[..., N, K/32]`` -> float32 ``[..., N, K]`` (host,
    exact), reading element ``2j`` from the low (``low_even``) or high (``high_even``) nibble."""
    _check_nibble_order_arg(nibble_order)
    p, s = _u8("packed", packed), _u8("scale", scale)
    if p.ndim < 1 or p.shape[-1] * 2 != s.shape[-1] * 32 or p.shape[:-1] != s.shape[:-1]:
        raise ValueError(f"scale: shape {list(s.shape)} is not [..., K/32] for packed {list(p.shape)} = [..., K/2]")
    lo, hi = p & 15, p >> 4
    even, odd = (lo, hi) if nibble_order == "low_even" else (hi, lo)
    v = np.stack([_E2M1[even], _E2M1[odd]], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    f = np.ldexp(np.float32(1.0), s.astype(np.int32) - 127).astype(np.float32)
    return v * np.repeat(f, 32, axis=-1)


def nibble_order_errors(packed: ArrayIn, scale: ArrayIn, reference: ArrayIn) -> dict[str, float]:
    """Relative L2 error ``||dequant - reference|| / ||reference||`` for each nibble order."""
    ref = np.asarray(reference).astype(np.float64)
    p = _u8("packed", packed)
    want = (*p.shape[:-1], p.shape[-1] * 2)
    if ref.shape != want:
        raise ValueError(f"reference: shape {list(ref.shape)} does not match the unpacked weight {list(want)}")
    norm = float(np.linalg.norm(ref)) or 1.0
    return {
        o: float(np.linalg.norm(dequantize_fp4_numpy(p, scale, o).astype(np.float64) - ref)) / norm
        for o in NIBBLE_ORDERS
    }


def check_nibble_order(packed: ArrayIn, scale: ArrayIn, reference: ArrayIn, *, margin: float = 0.5) -> str:
    """Which nibble order makes the packed FP4 bytes match ``reference`` (BF16/F32 ``[..., N, K]``).

    Dequantizes both ways and returns ``"low_even"`` or ``"high_even"``, whichever has the smaller
    error, provided it is below ``margin`` times the other one; raises :class:`CheckpointError`
    when the data cannot tell the orders apart (e.g. equal nibbles everywhere) or neither fits.
    The reference may be the exact FP4 values or the unquantized weights they were made from.
    """
    err = nibble_order_errors(packed, scale, reference)
    best = min(err, key=err.get)
    other = err["high_even" if best == "low_even" else "low_even"]
    if err[best] > 0.25:
        raise CheckpointError(
            f"nibble order: neither order matches the reference (relative error low_even {err['low_even']:.3e}, "
            f"high_even {err['high_even']:.3e}); is it the same tensor?"
        )
    if other == 0 or err[best] > margin * other:
        raise CheckpointError(
            f"nibble order: cannot tell the orders apart (relative error low_even {err['low_even']:.3e}, "
            f"high_even {err['high_even']:.3e}); use another expert or a reference with more structure"
        )
    return best


def check_checkpoint_nibble_order(
    path: CheckpointSource,
    layer_idx: int,
    reference: ArrayIn | CheckpointSource,
    *,
    expert: int = 0,
    proj: str = "w1",
    prefix: str | None = None,
) -> str:
    """:func:`check_nibble_order` on ``ffn.experts.{expert}.{proj}`` of a checkpoint layer.

    ``reference``: the same weight as an array ``[N, K]``, or a checkpoint (folder/file path or
    :class:`Checkpoint`) holding ``{prefix}ffn.experts.{expert}.{proj}.weight`` in BF16/F16/F32
    (e.g. a dequantized BF16 release).
    """
    ck, own = _as_checkpoint(path)
    try:
        pre = layer_prefix(layer_idx) if prefix is None else prefix
        name = f"{pre}ffn.experts.{expert}.{proj}.weight"
        ti = ck.expect(name, ("I8", "U8"), None, "packed FP4 routed-expert weights")
        n, k2 = ti.shape
        st = ck.expect(f"{pre}ffn.experts.{expert}.{proj}.scale", ("F8_E8M0", "U8"), (n, k2 // 16), "UE8M0 scales")
        del st
        packed = np.array(ck.raw(name)).reshape(n, k2)
        scale = np.array(ck.raw(f"{pre}ffn.experts.{expert}.{proj}.scale")).reshape(n, k2 // 16)
        if isinstance(reference, (str, os.PathLike, Checkpoint)):
            rk, rown = _as_checkpoint(reference)
            try:
                rk.expect(name, ("BF16", "F16", "F32"), (n, 2 * k2), "the reference weight")
                ref = np.asarray(rk.get(name), np.float32)
            finally:
                if rown:
                    rk.close()
        else:
            ref = reference
        return check_nibble_order(packed, scale, ref)
    finally:
        if own:
            ck.close()


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

#: ``config.json`` keys read into :class:`~jax_megamoe.models.deepseek_v4.DeepseekV4Config`.
CONFIG_KEYS = (
    "hidden_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "routed_scaling_factor",
    "swiglu_limit",
    "num_hash_layers",
    "vocab_size",
    "scoring_func",
    "norm_topk_prob",
)


def layer_prefix(layer_idx: int) -> str:
    """The tensor-name prefix of decoder layer ``layer_idx`` (``layers.{i}.``)."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, (int, np.integer)) or layer_idx < 0:
        raise ValueError(f"layer_idx: {layer_idx!r} must be a non-negative integer")
    return f"layers.{int(layer_idx)}."


_LAYER_RE = re.compile(r"^layers\.(\d+)\.ffn\.gate\.weight$")


def list_moe_layers(path: CheckpointSource) -> list[int]:
    """Indices of the decoder layers with an MoE gate (``layers.{i}.ffn.gate.weight``)."""
    ck, own = _as_checkpoint(path)
    try:
        return sorted(int(m.group(1)) for n in ck.names() if (m := _LAYER_RE.match(n)))
    finally:
        if own:
            ck.close()


def _hash_layers_in_index(ck: Checkpoint) -> list[int]:
    rx = re.compile(r"^layers\.(\d+)\.ffn\.gate\.tid2eid$")
    return sorted(int(m.group(1)) for n in ck.names() if (m := rx.match(n)))


@dataclasses.dataclass(frozen=True)
class _Dims:
    num_experts: int
    hidden: int
    intermediate: int
    shared_intermediate: int | None  # None: no shared expert tensors
    top_k: int | None  # from tid2eid
    vocab: int | None
    is_hash: bool
    expert_format: str  # "fp4" | "fp8"


def _derive_dims(ck: Checkpoint, pre: str) -> _Dims:
    gname = f"{pre}ffn.gate.weight"
    g = ck.expect(gname, ("BF16",), None, "the router weight")
    if len(g.shape) != 2:
        raise CheckpointError(
            f"tensor {gname!r} in {g.file}: expected a rank-2 [E, H] router weight, got {list(g.shape)}"
        )
    e, h = g.shape
    has_t, has_b = f"{pre}ffn.gate.tid2eid" in ck, f"{pre}ffn.gate.bias" in ck
    if has_t == has_b:
        state = "both" if has_t else "neither"
        raise CheckpointError(
            f"layer {pre!r}: {ck.source} lists {state} of {pre}ffn.gate.tid2eid (hash layers) and "
            f"{pre}ffn.gate.bias (other layers); exactly one is expected"
        )
    top_k = vocab = None
    if has_t:
        t = ck.info(f"{pre}ffn.gate.tid2eid")
        if len(t.shape) != 2:
            raise CheckpointError(f"tensor {t.name!r} in {t.file}: expected [vocab, K], got {list(t.shape)}")
        vocab, top_k = t.shape
    w1 = f"{pre}ffn.experts.0.w1.weight"
    ti = ck.info(w1)
    if len(ti.shape) != 2:
        raise CheckpointError(f"tensor {w1!r} in {ti.file}: expected a rank-2 weight, got {list(ti.shape)}")
    if ti.dtype in ("I8", "U8"):
        fmt = "fp4"
        i = ti.shape[0]
        if ti.shape[1] * 2 != h:
            raise CheckpointError(
                f"tensor {w1!r} in {ti.file}: shape {list(ti.shape)} is not [I, H/2] with H = {h} from "
                f"{gname} {list(g.shape)}"
            )
    elif ti.dtype == "F8_E4M3":
        fmt = "fp8"
        i = ti.shape[0]
        if ti.shape[1] != h:
            raise CheckpointError(
                f"tensor {w1!r} in {ti.file}: shape {list(ti.shape)} is not [I, H] with H = {h} from {gname} {list(g.shape)}"
            )
    else:
        raise CheckpointError(
            f"tensor {w1!r} in {ti.file}: dtype {ti.dtype} is not supported for routed-expert weights; expected "
            "I8 (packed FP4, U8 accepted) or F8_E4M3 (FP8 checkpoints)"
        )
    rx = re.compile(r"^" + re.escape(pre) + r"ffn\.experts\.(\d+)\.")
    ids = {int(m.group(1)) for n in ck.names() if (m := rx.match(n))}
    if ids != set(range(e)):
        extra = sorted(ids - set(range(e)))[:8]
        missing = sorted(set(range(e)) - ids)[:8]
        raise CheckpointError(
            f"layer {pre!r}: {gname} has E = {e} rows but {ck.source} lists {len(ids)} routed experts "
            f"(missing ids {missing}, unexpected ids {extra})"
        )
    si = None
    sname = f"{pre}ffn.shared_experts.w1.weight"
    if sname in ck:
        st = ck.info(sname)
        if len(st.shape) != 2 or st.shape[1] != h:
            raise CheckpointError(f"tensor {sname!r} in {st.file}: shape {list(st.shape)} is not [I_s, H={h}]")
        si = st.shape[0]
    return _Dims(e, h, i, si, top_k, vocab, has_t, fmt)


def infer_config(
    path: CheckpointSource, layer_idx: int, config: ConfigArg = None, *, prefix: str | None = None
) -> DeepseekV4Config:
    """The :class:`~jax_megamoe.models.deepseek_v4.DeepseekV4Config` of a checkpoint layer, checked
    against its tensor shapes.

    ``config``: a ``DeepseekV4Config`` (used as is, after the checks), a dict of fields (laid over
    ``config.json``), or None (``config.json`` of the checkpoint folder). Fields missing from both
    are derived from the tensors where possible: ``hidden_size``, ``n_routed_experts`` (gate),
    ``moe_intermediate_size`` (expert 0), ``n_shared_experts`` (shared w1), ``num_experts_per_tok``
    and ``vocab_size`` (any ``tid2eid``), ``num_hash_layers`` (layers holding a ``tid2eid``).
    ``routed_scaling_factor`` and ``swiglu_limit`` have no tensor to come from.
    """
    ck, own = _as_checkpoint(path)
    try:
        pre = layer_prefix(layer_idx) if prefix is None else prefix
        return _infer_config(ck, int(layer_idx), pre, config, _derive_dims(ck, pre))
    finally:
        if own:
            ck.close()


def _infer_config(ck: Checkpoint, layer_idx: int, pre: str, config: ConfigArg, d: _Dims) -> DeepseekV4Config:
    if isinstance(config, DeepseekV4Config):
        cfg, origin = config, "the config passed in"
    else:
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config: expected a DeepseekV4Config, a dict or None, got {type(config).__name__}")
        cj = ck.config_json()
        fields: dict[str, Any] = {k: cj[k] for k in CONFIG_KEYS if cj is not None and k in cj}
        origin = os.path.join(ck.folder, CONFIG_NAME) if cj is not None else "tensor shapes"
        if config:
            unknown = set(config) - {f.name for f in dataclasses.fields(DeepseekV4Config)}
            if unknown:
                raise ValueError(f"config: unknown fields {sorted(unknown)}")
            fields.update(config)
            origin += " + the fields passed in"
        derived: dict[str, Any] = {
            "hidden_size": d.hidden,
            "moe_intermediate_size": d.intermediate,
            "n_routed_experts": d.num_experts,
        }
        if d.shared_intermediate is not None and d.shared_intermediate % d.intermediate == 0:
            derived["n_shared_experts"] = d.shared_intermediate // d.intermediate
        elif d.shared_intermediate is None:
            derived["n_shared_experts"] = 0
        hash_layers = _hash_layers_in_index(ck)
        if hash_layers:
            t = ck.info(f"layers.{hash_layers[0]}.ffn.gate.tid2eid")
            if len(t.shape) == 2:
                derived["vocab_size"], derived["num_experts_per_tok"] = t.shape
            if hash_layers == list(range(len(hash_layers))):
                derived["num_hash_layers"] = len(hash_layers)
        else:
            derived["num_hash_layers"] = 0
        for k, v in derived.items():
            fields.setdefault(k, v)
        needed = ("num_experts_per_tok", "routed_scaling_factor", "swiglu_limit", "num_hash_layers", "vocab_size")
        missing = [k for k in needed if k not in fields]
        if missing:
            raise CheckpointError(
                f"config: {', '.join(missing)} cannot be derived from the tensors of {ck.source} and there is no "
                f"{CONFIG_NAME} holding them; pass config=DeepseekV4Config(...) or config={{...}} with these fields"
            )
        try:
            cfg = DeepseekV4Config(**fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config from {origin}: {e}") from None

    def mismatch(what: str, have: Any, want: Any, src: str) -> CheckpointError:
        return CheckpointError(f"config ({origin}): {what} = {want} but {src} gives {have}")

    g = f"{pre}ffn.gate.weight {list((d.num_experts, d.hidden))}"
    if cfg.hidden_size != d.hidden:
        raise mismatch("hidden_size", d.hidden, cfg.hidden_size, g)
    if cfg.n_routed_experts != d.num_experts:
        raise mismatch("n_routed_experts", d.num_experts, cfg.n_routed_experts, g)
    if cfg.moe_intermediate_size != d.intermediate:
        raise mismatch(
            "moe_intermediate_size", d.intermediate, cfg.moe_intermediate_size, f"{pre}ffn.experts.0.w1.weight"
        )
    want_si = cfg.shared_intermediate_size if cfg.n_shared_experts > 0 else None
    if d.shared_intermediate != want_si:
        have = "no shared expert" if d.shared_intermediate is None else f"I_s = {d.shared_intermediate}"
        raise CheckpointError(
            f"config ({origin}): n_shared_experts = {cfg.n_shared_experts} (I_s = {want_si}) but "
            f"{pre}ffn.shared_experts.w1.weight gives {have}"
        )
    if d.is_hash != cfg.is_hash_layer(layer_idx):
        raise CheckpointError(
            f"config ({origin}): num_hash_layers = {cfg.num_hash_layers} makes layer {layer_idx} "
            f"{'a' if cfg.is_hash_layer(layer_idx) else 'not a'} hash layer, but {ck.source} has "
            f"{pre}ffn.gate.{'tid2eid' if d.is_hash else 'bias'}"
        )
    if d.is_hash:
        t = f"{pre}ffn.gate.tid2eid {[d.vocab, d.top_k]}"
        if cfg.num_experts_per_tok != d.top_k:
            raise mismatch("num_experts_per_tok", d.top_k, cfg.num_experts_per_tok, t)
        if cfg.vocab_size != d.vocab:
            raise mismatch("vocab_size", d.vocab, cfg.vocab_size, t)
    return cfg


# ---------------------------------------------------------------------------------------------
# Reading one layer (checkpoint format)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class MoELayerTensors:
    """One MoE layer in checkpoint format, on the host (numpy, owned copies).

    ``expert_format == "fp4"``: ``w13 uint8[E, 2I, H/2]`` (rows ``[gate | up]``, low nibble = even
    K whatever the checkpoint's order was), ``w13_scale uint8[E, 2I, H/32]``, ``w2 uint8[E, H, I/2]``,
    ``w2_scale uint8[E, H, I/32]`` (the arguments of ``MoEWeights.from_checkpoint``).
    ``expert_format == "fp8"``: ``w13 float8_e4m3fn[E, 2I, H]``, ``w13_scale float32[E, 2I/128,
    H/128]``, ``w2 float8_e4m3fn[E, H, I]``, ``w2_scale float32[E, H/128, I/128]`` (of
    ``MoEWeights.from_fp8``).
    ``shared``: ``{"w1", "w1_scale", "w2", "w2_scale", "w3", "w3_scale"}``: ``float8_e4m3fn``
    weights and their 128x128 scales as stored (UE8M0 as uint8 bytes, or float32); None without a
    shared expert.
    """

    layer_idx: int
    prefix: str
    config: DeepseekV4Config
    is_hash_layer: bool
    expert_format: str
    w13: np.ndarray
    w13_scale: np.ndarray
    w2: np.ndarray
    w2_scale: np.ndarray
    gate_weight: np.ndarray  # bfloat16 [E, H]
    gate_bias: np.ndarray | None  # float32 [E]
    tid2eid: np.ndarray | None  # int32 [vocab, K]
    shared: dict[str, np.ndarray] | None
    nibble_order: str
    source: str

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w13, self.w13_scale, self.w2, self.w2_scale))


def _read_gate(ck: Checkpoint, pre: str, cfg: Any, d: _Dims) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    e, h = d.num_experts, d.hidden
    gw = np.array(ck.get(ck.expect(f"{pre}ffn.gate.weight", ("BF16",), (e, h), "the router weight", "[E, H]").name))
    bias = tid = None
    if d.is_hash:
        name = f"{pre}ffn.gate.tid2eid"
        ti = ck.expect(name, ("I64", "I32"), (cfg.vocab_size, cfg.num_experts_per_tok), "the hash table", "[vocab, K]")
        t = np.asarray(ck.get(name))
        bad = (t < 0) | (t >= e)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise CheckpointError(
                f"tensor {name!r} in {ti.file}: expert id {int(t[r, c])} at [{r}, {c}] is outside [0, {e}) "
                f"({int(bad.sum())} such entries)"
            )
        tid = t.astype(np.int32)
    else:
        name = f"{pre}ffn.gate.bias"
        ck.expect(name, ("F32", "BF16"), (e,), "the selection bias", "[E]")
        bias = np.asarray(ck.get(name)).astype(np.float32)
    return gw, bias, tid


def _read_fp8_pair(
    ck: Checkpoint, base: str, shape: tuple[int, int], what: str, raw_scale: bool, allow_nan_scales: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """FP8 weight (a read-only view into the shard) + 128x128 scale (``.scale`` or
    ``.weight_scale_inv``, an owned copy): UE8M0 as uint8 bytes when ``raw_scale``, else float32.
    A UE8M0 byte 0xFF (NaN) is refused unless ``allow_nan_scales``."""
    n, k = shape
    if n % 128 or k % 128:
        raise CheckpointError(f"tensor {base}.weight: shape {list(shape)} is not a whole number of 128x128 blocks")
    wname = f"{base}.weight"
    ck.expect(wname, ("F8_E4M3",), shape, what, "[N, K]")
    sname = f"{base}.scale" if f"{base}.scale" in ck else f"{base}.weight_scale_inv"
    if sname not in ck:
        raise CheckpointError(
            f"tensor {base}.scale is missing: neither it nor {base}.weight_scale_inv is listed in {ck.source}"
        )
    sti = ck.expect(sname, ("F8_E8M0", "F32", "U8"), None, f"the 128x128 block scale of {what}")
    if sti.shape != (n // 128, k // 128):
        hint = ""
        if len(sti.shape) == 2 and sti.shape[0] and n % sti.shape[0] == 0 and k % max(sti.shape[1], 1) == 0:
            hint = f" ({n // sti.shape[0]}x{k // max(sti.shape[1], 1)} blocks; only 128x128 blocks are supported)"
        raise CheckpointError(
            f"tensor {sname!r} in {sti.file}: shape {list(sti.shape)} does not match the expected "
            f"{[n // 128, k // 128]} = [N/128, K/128]{hint}"
        )
    w = ck.get(wname)  # a view: the caller copies it
    s = ck.get(sname)
    if sti.dtype in ("F8_E8M0", "U8"):
        s = np.array(s).view(np.uint8)
        _check_file_scale(ck, sname, s, "", allow_nan_scales)
        if not raw_scale:
            s = np.ldexp(np.float32(1.0), s.astype(np.int32) - 127).astype(np.float32)
    else:
        s = np.array(s, np.float32)
    return w, s


def read_moe_layer(
    path: CheckpointSource,
    layer_idx: int,
    *,
    config: ConfigArg = None,
    nibble_order: str = "low_even",
    progress: ProgressArg = None,
    prefix: str | None = None,
    allow_nan_scales: bool = False,
) -> MoELayerTensors:
    """Read one MoE layer's tensors (checkpoint format, host numpy) without touching the rest.

    ``path``: checkpoint folder/file or an open :class:`Checkpoint`. ``config``: see
    :func:`infer_config`. ``nibble_order``: the checkpoint's FP4 packing (``"low_even"``: element
    ``2j`` in the low nibble, DeepGEMM's and torch's convention; ``"high_even"``: swapped while
    reading). ``progress``: per-expert progress (see :func:`make_progress`). ``prefix`` overrides
    ``layers.{layer_idx}.`` (e.g. ``"mtp.0."``). ``allow_nan_scales``: accept UE8M0 scale bytes
    0xFF (NaN), which are otherwise a :class:`CheckpointError` naming the tensor and position.
    """
    _check_nibble_order_arg(nibble_order)
    ck, own = _as_checkpoint(path)
    try:
        pre = layer_prefix(layer_idx) if prefix is None else prefix
        d = _derive_dims(ck, pre)
        cfg = _infer_config(ck, int(layer_idx), pre, config, d)
        e, h, i = d.num_experts, d.hidden, d.intermediate
        gw, bias, tid = _read_gate(ck, pre, cfg, d)

        bar = make_progress(progress, e, f"layer {layer_idx}: read experts", "expert")
        if d.expert_format == "fp4":
            w13 = np.empty((e, 2 * i, h // 2), np.uint8)
            s13 = np.empty((e, 2 * i, h // 32), np.uint8)
            w2 = np.empty((e, h, i // 2), np.uint8)
            s2 = np.empty((e, h, i // 32), np.uint8)
            lut = _SWAP_LUT if nibble_order == "high_even" else None
            specs = (
                ("w1", (i, h // 2), (i, h // 32), "[I, H/2]", "[I, H/32]", w13[:, :i], s13[:, :i]),
                ("w3", (i, h // 2), (i, h // 32), "[I, H/2]", "[I, H/32]", w13[:, i:], s13[:, i:]),
                ("w2", (h, i // 2), (h, i // 32), "[H, I/2]", "[H, I/32]", w2, s2),
            )
            for ex in range(e):
                for proj, wshape, sshape, wdims, sdims, wdst, sdst in specs:
                    base = f"{pre}ffn.experts.{ex}.{proj}"
                    ck.expect(f"{base}.weight", ("I8", "U8"), wshape, "packed FP4 routed-expert weights", wdims)
                    ck.expect(f"{base}.scale", ("F8_E8M0", "U8"), sshape, "UE8M0 routed-expert scales", sdims)
                    src = ck.raw(f"{base}.weight").reshape(wshape)
                    if lut is None:
                        wdst[ex] = src
                    else:
                        np.take(lut, src, out=wdst[ex])
                    sdst[ex] = ck.raw(f"{base}.scale").reshape(sshape)
                    _check_file_scale(ck, f"{base}.scale", sdst[ex], f"expert {ex}, ", allow_nan_scales)
                if bar is not None:
                    bar(ex + 1)
        else:
            if i % 128:
                raise CheckpointError(
                    f"{pre}ffn.experts.0.w1.weight: I = {i} is not a multiple of 128 (FP8 128x128 blocks)"
                )
            w13 = np.empty((e, 2 * i, h), np.dtype(ml_dtypes.float8_e4m3fn))
            s13 = np.empty((e, 2 * i // 128, h // 128), np.float32)
            w2 = np.empty((e, h, i), np.dtype(ml_dtypes.float8_e4m3fn))
            s2 = np.empty((e, h // 128, i // 128), np.float32)
            for ex in range(e):
                base = f"{pre}ffn.experts.{ex}"
                what, nan_ok = "FP8 routed-expert weights", allow_nan_scales
                w13[ex, :i], s13[ex, : i // 128] = _read_fp8_pair(ck, f"{base}.w1", (i, h), what, False, nan_ok)
                w13[ex, i:], s13[ex, i // 128 :] = _read_fp8_pair(ck, f"{base}.w3", (i, h), what, False, nan_ok)
                w2[ex], s2[ex] = _read_fp8_pair(ck, f"{base}.w2", (h, i), what, False, nan_ok)
                if bar is not None:
                    bar(ex + 1)
        if bar is not None:
            bar.close()

        shared = None
        if cfg.n_shared_experts > 0:
            si = cfg.shared_intermediate_size
            shared = {}
            for proj, shape in (("w1", (si, h)), ("w2", (h, si)), ("w3", (si, h))):
                w, s = _read_fp8_pair(
                    ck, f"{pre}ffn.shared_experts.{proj}", shape, "the FP8 shared expert", True, allow_nan_scales
                )
                shared[proj], shared[f"{proj}_scale"] = np.array(w), s
        return MoELayerTensors(
            layer_idx=int(layer_idx),
            prefix=pre,
            config=cfg,
            is_hash_layer=d.is_hash,
            expert_format=d.expert_format,
            w13=w13,
            w13_scale=s13,
            w2=w2,
            w2_scale=s2,
            gate_weight=gw,
            gate_bias=bias,
            tid2eid=tid,
            shared=shared,
            nibble_order=nibble_order,
            source=ck.source,
        )
    finally:
        if own:
            ck.close()


# ---------------------------------------------------------------------------------------------
# Kernel layout
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class MoELayer:
    """One MoE layer ready to run: routed experts in kernel layout plus the gate and shared expert.

    ``weights``: :class:`~jax_megamoe.layout.MoEWeights` in ``mode``. ``report``: the FP4 -> FP8
    :class:`~jax_megamoe.layout.ConversionReport` (mode ``'fp8'`` from an FP4 checkpoint), else
    None. ``gate_weight`` bf16 ``[E, H]``, ``gate_bias`` f32 ``[E]`` (non-hash layers),
    ``tid2eid`` int32 ``[vocab, K]`` (hash layers), ``shared`` (see :class:`MoELayerTensors`).
    """

    layer_idx: int
    config: DeepseekV4Config
    mode: str
    weights: MoEWeights
    report: ConversionReport | None
    is_hash_layer: bool
    gate_weight: np.ndarray
    gate_bias: np.ndarray | None
    tid2eid: np.ndarray | None
    shared: dict[str, np.ndarray] | None
    expert_format: str = "fp4"
    nibble_order: str = "low_even"
    source: str = ""
