"""Load a whole DeepSeek V4 checkpoint into the Flax NNX model (official names -> NNX params).

The model's parameter paths mirror the checkpoint names (``layers.3.attn.wq_a.weight`` is
``model.layers[3].attn.wq_a.weight``), so :func:`load_state_dict` is a rename-free walk over the
model's variables (``nnx.iter_graph``). For each variable at dotted path ``p`` it takes the tensor
``p`` (or ``p.weight``: a bare parameter such as the shared expert's ``w1`` reads
``shared_experts.w1.weight``) and:

- **FP8 block-scaled weights** (``F8_E4M3`` + ``.scale`` 128x128, E8M0 or F32) are dequantized on
  the device to the parameter's dtype (the model's ``param_dtype``): the non-expert matmuls run
  as plain XLA dots, which have no FP8 x block-scale form, so keeping FP8 would only move the
  dequantization into every step. ``e4m3 x 2^k`` is exact in bf16 (and f32), so nothing is lost
  with E8M0 scales; DeepSeek's reference additionally quantizes the activations of these linears
  to FP8, which the model does not do.
- **Routed experts**: a :class:`~jax_megamoe.models.deepseek_v4.RoutedExperts` variable (the MoE
  block's ``experts``, a ``MoEWeights`` whose mode the block fixed from its ``mode=`` / the
  policy) gathers ``experts.{e}.{w1,w3,w2}.{weight,scale}`` of that layer into checkpoint-format
  arrays, :data:`EXPERT_CHUNK_BYTES` of experts at a time, builds each chunk with the existing
  builder (``MoEWeights.from_checkpoint_with_report``: the FP4 bytes kept for the sm_100 modes,
  FP4 -> FP8 conversion for ``fp8``, its report merged over the chunks and logged;
  ``MoEWeights.from_fp8`` for FP8 expert checkpoints) and writes it into preallocated, placed
  leaves (every leaf is per expert, so the bits equal one whole-layer build). The exact path
  (dense ``w13 [E, 2I, H]`` / ``w2 [E, H, I]`` parameters under ``...ffn.experts``) gets the
  FP4 experts dequantized exactly (FP8 ones dequantized, dense ones cast).
- Everything else (BF16/F32 tensors, the ``int`` hash table) is cast to the parameter's dtype.

Every tensor is checked before it is used (errors are :class:`CheckpointError`, a ValueError,
naming the tensor and, for a checkpoint, its file): a parameter with no tensor (missing), with
``strict`` a tensor no parameter takes (extra), a dtype the name's kind does not allow, a shape
other than the parameter's (scales: ``[ceil(N/128), ceil(K/128)]`` / ``[N, K/32]``).

:func:`load_checkpoint` builds the model abstractly (``nnx.eval_shape``: no weights are
allocated), checks the checkpoint's headers against the layout (no data read), then streams
tensor by tensor from the memory-mapped shards: each tensor's pages are dropped from the
resident set once it is placed and a shard's mapping is closed once all its tensors are, so
host memory holds the model (on the CPU backend, where it lives on the host) plus about one
tensor / one expert chunk. Measured on the CPU backend (2 cores): a 2-layer V4-Flash-shaped
synthetic checkpoint (8.6 GiB, 256 experts a layer, 3.2 GiB of FP4 experts a layer) loads into
an 8.86 GiB model with a peak RSS of 10.5 GiB (9.3 GiB resident after the load).
Placement: one device by default; with ``mesh``, the routed experts are sharded ``P(axis)`` on
their expert dimension (``axis``: the mesh's ``"ep"`` axis, or its only axis), as
:func:`jax_megamoe.parallel.ep_moe` expects, every other parameter is replicated, and the MoE
blocks are given the mesh (``mesh``/``ep_axis``) so they run expert-parallel. The MTP blocks
(``model.mtp[k]``) load from ``mtp.k.*`` like the layers; a model built without them
(``num_nextn_predict_layers=0``) skips those tensors (logged).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_megamoe._src.io.safetensors_reader import (
    SAFETENSORS_DTYPES,
    Checkpoint,
    CheckpointError,
    safetensors_dtype,
)
from jax_megamoe._src.io.v4_checkpoint import dequantize_fp4_numpy
from jax_megamoe._src.io.v4_model_checkpoint import (
    CheckpointTensors,
    check_checkpoint_layout,
    fp8_scale_shape,
    is_ignored_tensor,
    read_config,
    tensor_kind,
)
from jax_megamoe._src.kernels import parallel
from jax_megamoe._src.models.deepseek_v4 import model as _model
from jax_megamoe._src.models.deepseek_v4.moe import DeepseekV4MoE
from jax_megamoe._src.numerics import quant
from jax_megamoe._src.numerics.layout import MoEWeights, nan_scale_message
from jax_megamoe._src.numerics.progress import ProgressArg, make_progress
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

__all__ = ["EXPERTS", "load_checkpoint", "load_state_dict"]

log = logging.getLogger("jax_megamoe.checkpoint")

#: What ``experts=`` of :func:`load_checkpoint` may be.
EXPERTS = ("quantized", "exact")
_FLOAT_DT = ("BF16", "F32", "F16")


# ---------------------------------------------------------------------------------------------
# Tensor access (a plain mapping or a lazy CheckpointTensors)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where loaded arrays go: ``mesh`` (experts ``P(axis)``, the rest replicated) or ``device``."""

    mesh: Mesh | None = None
    axis: str = "ep"
    device: Any = None

    def put(self, x: Any) -> jax.Array:
        """``x`` placed (replicated over the mesh), in buffers of its own: where the CPU backend
        aliased a host array (zero-copy ``device_put`` of a memory-mapped view), the buffer is
        copied, so no parameter lives in (or keeps open) the read-only file mapping."""
        if self.mesh is not None:
            y = jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))
        else:
            y = jax.device_put(x, self.device if self.device is not None else jax.devices()[0])
        if isinstance(x, np.ndarray) and x.nbytes and _aliases(y, x):
            y = jnp.copy(y)
        return y

    def put_experts(self, w: MoEWeights) -> MoEWeights:
        if self.mesh is not None:
            return parallel.shard_weights(w, self.mesh, self.axis)
        dev = self.device if self.device is not None else jax.devices()[0]
        return jax.tree.map(lambda a: jax.device_put(a, dev), w)

    def _expert_sharding(self) -> Any:
        if self.mesh is not None:
            return NamedSharding(self.mesh, PartitionSpec(self.axis))
        return jax.sharding.SingleDeviceSharding(self.device if self.device is not None else jax.devices()[0])

    def zeros_sharded(self, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """A zero ``[E, ...]`` buffer created where the routed experts live (never on the host)."""
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self._expert_sharding())()

    def put_sharded_like(self, x: Any, like: jax.Array) -> jax.Array:
        """A chunk of experts on the devices of ``like`` (replicated over the mesh: it is small)."""
        return self.put(x)

    def put_sharded(self, x: Any) -> jax.Array:
        """A dense expert array ``[E, ...]`` placed like the routed experts."""
        if self.mesh is not None:
            return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec(self.axis)))
        return self.put(x)


def _aliases(y: jax.Array, x: np.ndarray) -> bool:
    lo = x.__array_interface__["data"][0]
    hi = lo + x.nbytes
    try:
        return any(lo <= s.data.unsafe_buffer_pointer() < hi for s in y.addressable_shards)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):  # no buffer pointers: no aliasing
        return False


class _Source:
    """Uniform access to ``tensors``: dtype string and shape without reading, the array, the file."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors: expected a mapping of tensor names to arrays, got {type(tensors).__name__}")
        self.t = tensors
        self.lazy = isinstance(tensors, CheckpointTensors)
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.t

    def where(self, name: str) -> str:
        return f"tensor {name!r} in {self.t.where(name)}" if self.lazy else f"tensor {name!r}"

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        if self.lazy:
            ti = self.t.info(name)
            return ti.dtype, tuple(ti.shape)
        a = self.t[name]
        if not hasattr(a, "dtype") or not hasattr(a, "shape"):
            a = np.asarray(a)
        try:
            dt = safetensors_dtype(np.dtype(a.dtype))
        except ValueError as e:
            raise CheckpointError(f"tensor {name!r}: {e}") from None
        return dt, tuple(int(d) for d in a.shape)

    def get(self, name: str) -> Any:
        self.used.add(name)
        return self.t[name]

    def nbytes(self, name: str) -> int:
        dt, shape = self.meta(name)
        return math.prod(shape) * SAFETENSORS_DTYPES[dt].itemsize

    def release(self, name: str) -> None:
        if self.lazy:
            self.t.release(name)


def _check_dtype(src: _Source, name: str, dtypes: tuple[str, ...], what: str) -> str:
    dt, _ = src.meta(name)
    if dt not in dtypes:
        raise CheckpointError(
            f"{src.where(name)}: dtype {dt} is not supported for {what}; expected {' or '.join(dtypes)}"
        )
    return dt


def _check_shape(src: _Source, name: str, want: tuple[int, ...], what: str) -> None:
    _, shape = src.meta(name)
    if tuple(shape) != tuple(want):
        raise CheckpointError(f"{src.where(name)}: shape {list(shape)} does not match {what} {list(want)}")


def _e8m0_to_f32(s: Any) -> np.ndarray:
    b = np.asarray(s).view(np.uint8)
    return np.ldexp(np.float32(1.0), b.astype(np.int32) - 127).astype(np.float32)


def _scale_of(src: _Source, name: str) -> str:
    base = name.removesuffix(".weight")
    for cand in (f"{base}.scale", f"{base}.weight_scale_inv"):
        if cand in src:
            return cand
    raise CheckpointError(f"tensor {base}.scale is missing: {name} is FP8 and needs its 128x128 block scale")


def _fp8_scale_f32(src: _Source, sname: str, shape: tuple[int, int], allow_nan: bool) -> np.ndarray:
    dt = _check_dtype(src, sname, ("F8_E8M0", "F32", "U8"), "a 128x128 block scale")
    _check_shape(src, sname, fp8_scale_shape(shape), "the expected [ceil(N/128), ceil(K/128)]")
    s = src.get(sname)
    if dt == "F32":
        return np.asarray(s, np.float32)
    if not allow_nan:
        msg = nan_scale_message(src.where(sname), s, ("row", "col"))
        if msg is not None:
            raise CheckpointError(msg)
    return _e8m0_to_f32(s)


# ---------------------------------------------------------------------------------------------
# One ordinary parameter
# ---------------------------------------------------------------------------------------------


def _load_param(src: _Source, name: str, var: nnx.Variable, place: _Placement, opts: _Options) -> None:
    cur = var.get_value()
    pshape, pdt = tuple(cur.shape), np.dtype(cur.dtype)
    kind, dtypes = tensor_kind(name)
    if kind == "fp4":  # an expert weight on an ordinary parameter: not a V4 layout
        dtypes = _FLOAT_DT
    dt = _check_dtype(src, name, dtypes, f"{kind} tensors")
    _, shape = src.meta(name)
    if tuple(shape) != pshape:
        raise CheckpointError(
            f"{src.where(name)}: shape {list(shape)} does not match the model's parameter {opts.path_of(var)} "
            f"{pdt.name}{list(pshape)}"
        )
    if dt == "F8_E4M3":
        if len(shape) != 2:
            raise CheckpointError(f"{src.where(name)}: an FP8 weight must be [N, K], got {list(shape)}")
        sname = _scale_of(src, name)
        s = _fp8_scale_f32(src, sname, shape, opts.allow_nan_scales)
        q = place.put(np.asarray(src.get(name)))
        value = quant.dequantize_fp8_block128(q, place.put(s)).astype(pdt)
        src.release(sname)
    elif kind == "int":
        a = np.asarray(src.get(name))
        hi = opts.num_experts_of(var)
        bad = (a < 0) | (a >= hi) if hi else (a < 0)
        if bad.any():
            r = tuple(int(v) for v in np.argwhere(bad)[0])
            raise CheckpointError(
                f"{src.where(name)}: expert id {int(a[r])} at {list(r)} is outside [0, {hi or 'E'}) "
                f"({int(bad.sum())} such entries)"
            )
        value = place.put(a.astype(pdt))
    else:
        value = place.put(np.asarray(src.get(name))).astype(pdt)
    var.set_value(value)
    src.release(name)


# ---------------------------------------------------------------------------------------------
# Routed experts
# ---------------------------------------------------------------------------------------------

_PROJ = (("w1", 0), ("w3", 1), ("w2", None))  # w1 -> gate rows, w3 -> up rows of w13; w2 separate


def _expert_format(src: _Source, pre: str) -> str:
    first = f"{pre}.0.w1.weight"
    if first not in src:
        raise CheckpointError(f"tensor {first!r} is missing: no routed experts under {pre}")
    dt, _ = src.meta(first)
    if dt in ("I8", "U8"):
        return "fp4"
    if dt == "F8_E4M3":
        return "fp8"
    if dt in _FLOAT_DT:
        return "float"
    raise CheckpointError(
        f"{src.where(first)}: dtype {dt} is not a routed-expert format (I8/U8 FP4, F8_E4M3, BF16/F32)"
    )


def _read_fp4_experts(
    src: _Source, pre: str, experts: range, h: int, i: int, opts: _Options, bar: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checkpoint-format ``w13 [n, 2I, H/2]``, ``s13 [n, 2I, H/32]``, ``w2``, ``s2`` (uint8) of ``experts``."""
    e = len(experts)
    w13 = np.empty((e, 2 * i, h // 2), np.uint8)
    s13 = np.empty((e, 2 * i, h // 32), np.uint8)
    w2 = np.empty((e, h, i // 2), np.uint8)
    s2 = np.empty((e, h, i // 32), np.uint8)
    for k, ex in enumerate(experts):
        for proj, half in _PROJ:
            base = f"{pre}.{ex}.{proj}"
            rows, cols = (i, h) if half is not None else (h, i)
            wn, sn = f"{base}.weight", f"{base}.scale"
            for n in (wn, sn):
                if n not in src:
                    raise CheckpointError(f"tensor {n!r} is missing (routed expert {ex} of {pre})")
            sv = _fp4_expert_scale(src, wn, sn, (rows, cols), opts.allow_nan_scales).view(np.uint8)
            wv = np.asarray(src.get(wn)).view(np.uint8)
            if half is None:
                w2[k], s2[k] = wv, sv
            else:
                w13[k, half * i : (half + 1) * i], s13[k, half * i : (half + 1) * i] = wv, sv
            for n in (wn, sn):
                opts.tick(src, n, bar)
                src.release(n)
    return w13, s13, w2, s2


def _fp4_expert_scale(src: _Source, wn: str, sn: str, rows_cols: tuple[int, int], allow_nan_scales: bool) -> np.ndarray:
    """The UE8M0 scale of one FP4 routed-expert projection ``[rows, K]``, once the packed weight
    ``wn`` and the scale ``sn`` have the checkpoint's dtypes and shapes (and, unless allowed, no
    0xFF scale byte); both FP4 readers (kernel layout and dense) check the pair here."""
    rows, cols = rows_cols
    _check_dtype(src, wn, ("I8", "U8"), "packed FP4 routed-expert weights")
    _check_shape(src, wn, (rows, cols // 2), "the expected [rows, K/2]")
    _check_dtype(src, sn, ("F8_E8M0", "U8"), "UE8M0 routed-expert scales")
    _check_shape(src, sn, (rows, cols // 32), "the expected [rows, K/32]")
    sv = np.asarray(src.get(sn))
    if not allow_nan_scales:
        msg = nan_scale_message(src.where(sn), sv, ("row", "col"))
        if msg is not None:
            raise CheckpointError(msg)
    return sv


def _read_fp8_experts(
    src: _Source, pre: str, experts: range, h: int, i: int, opts: _Options, bar: Any
) -> tuple[np.ndarray, ...]:
    e4m3 = np.dtype(jnp.float8_e4m3fn)
    e = len(experts)
    w13 = np.empty((e, 2 * i, h), e4m3)
    s13 = np.empty((e, 2 * i // 128, h // 128), np.float32)
    w2 = np.empty((e, h, i), e4m3)
    s2 = np.empty((e, h // 128, i // 128), np.float32)
    for k, ex in enumerate(experts):
        for proj, half in _PROJ:
            wn = f"{pre}.{ex}.{proj}.weight"
            rows, cols = (i, h) if half is not None else (h, i)
            if wn not in src:
                raise CheckpointError(f"tensor {wn!r} is missing (routed expert {ex} of {pre})")
            _check_dtype(src, wn, ("F8_E4M3",), "FP8 routed-expert weights")
            _check_shape(src, wn, (rows, cols), "the expected [rows, K]")
            sn = _scale_of(src, wn)
            s = _fp8_scale_f32(src, sn, (rows, cols), opts.allow_nan_scales)
            w = np.asarray(src.get(wn))
            if half is None:
                w2[k], s2[k] = w, s
            else:
                r0, r1 = half * i, (half + 1) * i
                w13[k, r0:r1], s13[k, r0 // 128 : r1 // 128] = w, s
            for n in (wn, sn):
                opts.tick(src, n, bar)
                src.release(n)
    return w13, s13, w2, s2


#: Routed experts are read and converted this many checkpoint bytes at a time (a whole number of
#: experts), so host memory holds one chunk, not a layer (V4-Flash: 3.2 GiB a layer).
EXPERT_CHUNK_BYTES = 256 << 20


@functools.partial(jax.jit, donate_argnums=0)
def _set_rows(buf: jax.Array, part: jax.Array, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buf, part.astype(buf.dtype), start, 0)


def _load_routed(src: _Source, pre: str, var: nnx.Variable, place: _Placement, opts: _Options, bar: Any) -> None:
    """The block's ``MoEWeights`` (its mode), built a chunk of experts at a time into
    preallocated (placed) leaves with the existing builder (``MoEWeights.from_checkpoint_with_report``
    / ``from_fp8``: every leaf is per expert, so chunks give the same bits as one call)."""
    mw = var.get_value()
    e, h, i, mode = int(mw.num_experts), int(mw.hidden), int(mw.intermediate), str(mw.mode)
    fmt = _expert_format(src, pre)
    first = f"{pre}.0.w1.weight"
    if fmt == "float":
        raise CheckpointError(
            f"{src.where(first)}: the routed experts are stored dense ({src.meta(first)[0]}); quantized experts "
            "need the FP4 (or FP8) checkpoint, or build the model with experts='exact'"
        )
    if fmt == "fp8" and mode != "fp8":
        raise CheckpointError(
            f"{src.where(first)}: FP8 routed experts only run in mode 'fp8' (sm_90); the model's experts are mode "
            f"{mode!r} (requantizing FP8 to FP4 is lossy and not supported)"
        )
    per_expert = 3 * h * i if fmt == "fp8" else 3 * h * i // 2 + 3 * h * i // 32
    step = max(1, min(e, EXPERT_CHUNK_BYTES // max(per_expert, 1)))
    bufs: list[jax.Array] | None = None
    report = None
    for e0 in range(0, e, step):
        experts = range(e0, min(e, e0 + step))
        if fmt == "fp8":
            part = MoEWeights.from_fp8(*_read_fp8_experts(src, pre, experts, h, i, opts, bar))
            rep = None
        else:
            args = _read_fp4_experts(src, pre, experts, h, i, opts, bar)
            part, rep = MoEWeights.from_checkpoint_with_report(*args, mode=mode, allow_nan_scales=opts.allow_nan_scales)
            del args
        if rep is not None:
            report = rep if report is None else report.merge(rep)
        leaves = (part.l1, part.l1_sf, part.l2, part.l2_sf)
        if bufs is None:
            bufs = [place.zeros_sharded((e, *leaf.shape[1:]), leaf.dtype) for leaf in leaves]
        bufs = [_set_rows(b, place.put_sharded_like(leaf, b), jnp.int32(e0)) for b, leaf in zip(bufs, leaves)]
        del part, leaves
    assert bufs is not None
    weights = MoEWeights(
        l1=bufs[0], l1_sf=bufs[1], l2=bufs[2], l2_sf=bufs[3], mode=mode, hidden=h, intermediate=i, num_experts=e
    )
    if report is not None:
        report = dataclasses.replace(report, num_experts=e)
        (log.info if report.lossless else log.warning)("%s: %s", pre, report.summary())
    var.set_value(place.put_experts(weights))


def _load_dense_experts(
    src: _Source, pre: str, w13v: nnx.Variable, w2v: nnx.Variable, place: _Placement, opts: _Options, bar: Any
) -> None:
    """Exact path: ``w13 [E, 2I, H]`` (gate rows then up rows) and ``w2 [E, H, I]`` in the params' dtype."""
    c13, c2 = w13v.get_value(), w2v.get_value()
    e, two_i, h = (int(d) for d in c13.shape)
    i = two_i // 2
    if tuple(c2.shape) != (e, h, i):
        raise CheckpointError(f"model: {opts.path_of(w2v)} is {list(c2.shape)}, expected [E, H, I] = {[e, h, i]}")
    fmt = _expert_format(src, pre)
    d13 = np.empty((e, two_i, h), np.dtype(c13.dtype))
    d2 = np.empty((e, h, i), np.dtype(c2.dtype))
    for ex in range(e):
        for proj, half in _PROJ:
            base = f"{pre}.{ex}.{proj}"
            rows, cols = (i, h) if half is not None else (h, i)
            wn = f"{base}.weight"
            if wn not in src:
                raise CheckpointError(f"tensor {wn!r} is missing (routed expert {ex} of {pre})")
            names = [wn]
            if fmt == "fp4":
                sn = f"{base}.scale"
                if sn not in src:
                    raise CheckpointError(f"tensor {sn!r} is missing (routed expert {ex} of {pre})")
                sv = _fp4_expert_scale(src, wn, sn, (rows, cols), opts.allow_nan_scales)
                w = dequantize_fp4_numpy(np.asarray(src.get(wn)), sv)
                names.append(sn)
            elif fmt == "fp8":
                _check_dtype(src, wn, ("F8_E4M3",), "FP8 routed-expert weights")
                _check_shape(src, wn, (rows, cols), "the expected [rows, K]")
                sn = _scale_of(src, wn)
                s = _fp8_scale_f32(src, sn, (rows, cols), opts.allow_nan_scales)
                s = np.repeat(np.repeat(s, 128, 0), 128, 1)[:rows, :cols]
                w = np.asarray(src.get(wn)).astype(np.float32) * s
                names.append(sn)
            else:
                _check_dtype(src, wn, _FLOAT_DT, "dense routed-expert weights")
                _check_shape(src, wn, (rows, cols), "the expected [rows, K]")
                w = np.asarray(src.get(wn))
            if half is None:
                d2[ex] = w
            else:
                d13[ex, half * i : (half + 1) * i] = w
            for n in names:
                opts.tick(src, n, bar)
                src.release(n)
    w13v.set_value(place.put_sharded(d13))
    del d13
    w2v.set_value(place.put_sharded(d2))


# ---------------------------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Options:
    strict: bool = True
    allow_nan_scales: bool = False
    paths: dict[int, str] = dataclasses.field(default_factory=dict)
    by_path: dict[str, nnx.Variable] = dataclasses.field(default_factory=dict)
    model: Any = None
    done: int = 0
    skip_prefixes: tuple[str, ...] = ()

    def path_of(self, var: nnx.Variable) -> str:
        return self.paths.get(id(var), "?")

    def num_experts_of(self, var: nnx.Variable) -> int | None:
        p = self.path_of(var)
        w = self.by_path.get(p.rsplit(".", 1)[0] + ".weight")
        return int(w.get_value().shape[0]) if w is not None else None

    def layer_of(self, pre: str) -> int:
        parts = pre.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    def config_of(self, var: nnx.Variable) -> Any:
        cfg = getattr(self.model, "config", None)
        return cfg if isinstance(cfg, DeepseekV4Config) else None

    def tick(self, src: _Source, name: str, bar: Any) -> None:
        self.done += src.nbytes(name)
        if bar is not None:
            bar(self.done)


def _variables(model: Any) -> list[tuple[str, nnx.Variable]]:
    out, seen = [], set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and id(node) not in seen:
            seen.add(id(node))
            out.append((".".join(str(p) for p in path), node))
    return out


def _is_experts_module_param(path: str) -> tuple[str, str] | None:
    """``("...ffn.experts", "w13"|"w2")`` for the exact path's dense expert parameters."""
    head, _, leaf = path.rpartition(".")
    if leaf in ("w13", "w2") and head.endswith("experts") and not head.endswith("shared_experts"):
        return head, leaf
    return None


def _load(model: Any, src: _Source, place: _Placement, opts: _Options, progress: ProgressArg) -> Any:
    variables = _variables(model)
    opts.model = model
    opts.paths = {id(v): p for p, v in variables}
    opts.by_path = dict(variables)
    # Plan: which tensor feeds which variable (checked for presence first: missing names are
    # reported before anything is read).
    jobs: list[tuple[str, Any]] = []
    dense: dict[str, dict[str, nnx.Variable]] = {}
    missing: list[str] = []
    for path, var in variables:
        val = var.get_value()
        if isinstance(val, MoEWeights):
            jobs.append(("routed", (path, var)))
            continue
        dk = _is_experts_module_param(path)
        if dk is not None:
            dense.setdefault(dk[0], {})[dk[1]] = var
            continue
        if path in src:
            jobs.append(("param", (path, var)))
        elif f"{path}.weight" in src:
            jobs.append(("param", (f"{path}.weight", var)))
        else:
            missing.append(path)
    for pre, d in dense.items():
        if set(d) != {"w13", "w2"}:
            raise CheckpointError(
                f"model: the dense experts at {pre} need both w13 and w2 parameters, found {sorted(d)}"
            )
        jobs.append(("dense", (pre, d["w13"], d["w2"])))
    if missing:
        more = (
            f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})"
            if len(missing) > 1
            else ""
        )
        raise CheckpointError(
            f"tensor {missing[0]!r} is missing: the model's parameter {missing[0]} has no tensor{more}"
        )
    names = list(src.t.keys())
    total = sum(src.nbytes(n) for n in names if not n.startswith(opts.skip_prefixes) and not is_ignored_tensor(n))
    bar = make_progress(progress, total, "load checkpoint", "B")
    for kind, job in jobs:
        if kind == "param":
            name, var = job
            nb = src.nbytes(name)
            has_scale = name.endswith(".weight") and src.meta(name)[0] == "F8_E4M3"
            sname = _scale_of(src, name) if has_scale else None
            _load_param(src, name, var, place, opts)
            opts.done += nb + (src.nbytes(sname) if sname else 0)
            if sname:
                src.used.add(sname)
            if bar is not None:
                bar(opts.done)
        elif kind == "routed":
            path, var = job
            _load_routed(src, path, var, place, opts, bar)
        else:
            pre, w13v, w2v = job
            _load_dense_experts(src, pre, w13v, w2v, place, opts, bar)
    gc.collect()  # views of the file mappings caught in reference cycles: drop them now
    if bar is not None:
        if opts.done < total:
            bar(total)
        bar.close()
    if opts.strict:
        extra = [
            n for n in names if n not in src.used and not is_ignored_tensor(n) and not n.startswith(opts.skip_prefixes)
        ]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(
                f"{src.where(extra[0])}: no parameter of the model takes this tensor{more} (strict=True)"
            )
    return model


def load_state_dict(
    model: Any,
    tensors: Mapping[str, Any],
    *,
    strict: bool = True,
    progress: ProgressArg = None,
    mesh: Mesh | None = None,
) -> Any:
    """Set every parameter of ``model`` from ``tensors`` (official DeepSeek V4 names); returns ``model``.

    ``tensors``: ``{name: array}`` (numpy, ``jax.Array``, memory-mapped views) with the names of
    the official checkpoint relative to ``model`` (a whole ``DeepseekV4ForCausalLM``, or any NNX
    module whose attribute paths mirror the names, e.g. a ``DeepseekV4MoE`` with ``gate.weight``,
    ``experts.{e}.w1.weight``, ...). FP8 block-scaled weights are dequantized to the parameter's
    dtype; routed experts go into the block's ``MoEWeights`` (its mode) or the dense exact
    parameters; see the module docstring. ``strict``: a tensor no parameter takes is an error
    (a parameter with no tensor always is). ``progress``: bytes loaded (None/False, True, "text",
    or ``progress(done, total)``). ``mesh``: place as :func:`load_checkpoint` does.
    Errors: :class:`~jax_megamoe.checkpoint.CheckpointError` (a ValueError) naming the tensor.
    """
    place = _placement(mesh)
    return _load(model, _Source(tensors), place, _Options(strict=bool(strict)), progress)


def _placement(mesh: Mesh | None) -> _Placement:
    if mesh is None:
        return _Placement()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if "ep" in names:
        axis = "ep"
    elif len(names) == 1:
        axis = names[0]
    else:
        raise ValueError(
            f"mesh: axes {names} have no 'ep' axis to shard the routed experts over (or use a 1-axis mesh)"
        )
    return _Placement(mesh=mesh, axis=axis)


def _give_mesh(model: Any, place: _Placement) -> None:
    """Tell the MoE blocks to run expert-parallel over ``place.mesh``."""
    if place.mesh is None:
        return
    for _, node in nnx.iter_graph(model):
        if isinstance(node, DeepseekV4MoE):
            node.mesh = place.mesh
            node.ep_axis = place.axis


def _load_into(
    build: Callable[[], Any], ck: Checkpoint, place: _Placement, progress: ProgressArg, config: DeepseekV4Config | None
) -> Any:
    """Abstract model from ``build`` (``nnx.eval_shape``), checked layout, streamed load."""
    model = nnx.eval_shape(build)
    has_mtp = len(getattr(model, "mtp", ())) > 0
    if config is not None:
        check_checkpoint_layout(ck, config, include_mtp=has_mtp)
    skip = () if has_mtp else ("mtp.",)
    if not has_mtp and any(n.startswith("mtp.") for n in ck.names()):
        log.info("%s: the model has no MTP block; the mtp.* tensors are not loaded", ck.source)
    src = _Source(CheckpointTensors(ck))
    _load(model, src, place, _Options(strict=True, skip_prefixes=skip), progress)
    _give_mesh(model, place)
    return model


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    config: DeepseekV4Config | None = None,
    mesh: Mesh | None = None,
    mode: str | None = None,
    experts: str = "quantized",
    param_dtype: Any = jnp.bfloat16,
    progress: ProgressArg = True,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """A ``DeepseekV4ForCausalLM`` with every parameter loaded from a DeepSeek V4 checkpoint folder.

    ``config``: None reads the folder's ``config.json``. ``mode``: the routed experts' kernel mode
    (None: the device's / policy's, as the MoE block resolves it). ``experts``: ``"quantized"``
    (``MoEWeights``) or ``"exact"`` (dense, dequantized exactly). ``param_dtype``: the dtype of the
    other parameters (FP8 weights are dequantized to it). ``mesh``: routed experts sharded over its
    ``"ep"`` axis (or its only axis), everything else replicated; None: one device. ``progress``:
    bytes loaded on stderr (True), or see :func:`load_state_dict`. ``model_kwargs``: more keyword
    arguments of the model's constructor (``backend=``, ...). The model is built with
    ``nnx.eval_shape`` and filled tensor by tensor from the memory-mapped shards: host memory
    holds about one tensor (one chunk of routed experts) beyond the loaded model.
    """
    if experts not in EXPERTS:
        raise ValueError(f"experts: {experts!r} is not one of {', '.join(EXPERTS)}")
    if config is None:
        config = read_config(path)
    elif not isinstance(config, DeepseekV4Config):
        raise TypeError(f"config: expected a DeepseekV4Config or None, got {type(config).__name__}")

    cls = _model.DeepseekV4ForCausalLM
    kw: dict[str, Any] = dict(model_kwargs or {})
    params = inspect.signature(cls).parameters
    kw.setdefault("experts", experts)
    kw.setdefault("param_dtype", param_dtype)
    if mode is not None or "mode" in params:
        kw.setdefault("mode", mode)
    place = _placement(mesh)
    if mesh is not None and "mesh" in params:
        kw.setdefault("mesh", mesh)

    def build() -> Any:
        return cls(config, rngs=nnx.Rngs(0), **kw)

    with Checkpoint(path) as ck:
        return _load_into(build, ck, place, progress, config)
