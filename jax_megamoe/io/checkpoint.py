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
import json
import logging
import math
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "SafetensorsFile",
    "Checkpoint",
    "read_safetensors_header",
    "MoELayerTensors",
    "MoELayer",
    "read_moe_layer",
    "load_moe_layer",
    "build_moe_layer",
    "load_moe_block",
    "load_converted",
    "infer_config",
    "layer_prefix",
    "list_moe_layers",
    "dequantize_fp4_numpy",
    "swap_nibbles",
    "check_nibble_order",
    "check_checkpoint_nibble_order",
    "NIBBLE_ORDERS",
    "SAFETENSORS_DTYPES",
    "make_progress",
]

log = logging.getLogger("jax_megamoe.checkpoint")  # the logger name users configure (stable across the re-layering)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: Largest header accepted (the ``safetensors`` package's own limit).
MAX_HEADER_BYTES = 100_000_000
NIBBLE_ORDERS = ("low_even", "high_even")

#: safetensors dtype strings -> numpy dtypes (ml_dtypes for BF16 / FP8).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_NP_TO_ST = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint (or converted output) that cannot be read as asked; the message names the
    tensor and the file."""


def safetensors_dtype(dtype: Any) -> str:
    """The safetensors dtype string of a numpy dtype (``uint8`` -> ``"U8"``)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        raise ValueError(f"dtype {dt}: big-endian arrays cannot be stored in safetensors")
    try:
        return _NP_TO_ST[dt.newbyteorder("<") if dt.byteorder == "=" else dt]
    except KeyError:
        raise ValueError(f"dtype {dt.name} has no safetensors equivalent") from None


# ---------------------------------------------------------------------------------------------
# One safetensors file
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One header entry: ``begin``/``end`` are the ``data_offsets`` (relative to the data section)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file: str

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def np_dtype(self) -> np.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_file_scale(ck: Checkpoint, name: str, scale: np.ndarray, lead: str, allow_nan_scales: bool) -> None:
    """:func:`jax_megamoe.layout.nan_scale_message` on the ``[rows, cols]`` tensor ``name`` as a :class:`CheckpointError`."""
    if allow_nan_scales:
        return
    from jax_megamoe.numerics.layout import nan_scale_message

    msg = nan_scale_message(f"tensor {name!r} in {ck.info(name).file}", scale, ("row", "col"), lead=lead)
    if msg is not None:
        raise CheckpointError(msg)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int, int]:
    """Parse a safetensors header: returns ``(header dict, data_start, file_size)``.

    Checks the 8-byte length against the file size and that the header is a JSON object; the
    entries themselves are checked by :class:`SafetensorsFile`.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: the file is {size} bytes, shorter than the 8-byte header length of a "
                    "safetensors file (truncated or not a safetensors file)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes "
                    "(corrupt header length or not a safetensors file)"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} runs past the end of the {size}-byte file "
                    "(truncated or corrupt header length)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the {n}-byte header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is JSON but not an object (got {type(header).__name__})")
    return header, 8 + n, size


def _span(t: TensorInfo) -> str:
    return f"{t.name!r} data_offsets [{t.begin}, {t.end}]"


class SafetensorsFile:
    """A parsed safetensors file whose tensors are read-only views of one ``np.memmap``.

    The header is parsed and its entries are checked for structure at construction, and so is
    the layout of the data section (:meth:`_check_layout`): sorted by ``(begin, end)``, the
    tensors must tile it from offset 0 with no overlap (two names for the same bytes would load
    as if they were different tensors) and no gap (bytes no tensor owns), and the file must not
    run on past the last tensor (hidden trailing data) -- the rule the official ``safetensors``
    reader applies ("file not fully covered"). The order of the JSON keys carries no meaning
    (that reader sorts entries by offsets too); "out of order" offsets means ``begin > end``.
    Zero-byte tensors may sit at any tensor boundary. Unlike the official reader, a file
    *shorter* than the last tensor's end is accepted here: a tensor's offsets are checked
    against the file size when it is accessed (:meth:`check`, :meth:`get`), so a truncated
    shard still serves the tensors that lie before the cut.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        header, self.data_start, self.size = read_safetensors_header(self.path)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                if not isinstance(entry, dict):
                    raise CheckpointError(f"{self.path}: __metadata__ must be a JSON object")
                self.metadata = entry
                continue
            self.tensors[name] = self._parse_entry(name, entry)
        self._check_layout()
        self._mm: np.memmap | None = None

    def _check_layout(self) -> None:
        """Sorted by ``(begin, end)``, every tensor must start where the bytes owned so far end
        (offset 0 first), and the data section must end there too unless the file is short."""
        cursor, owner = 0, None  # owner: the last non-empty tensor, which ends at cursor
        for ti in sorted(self.tensors.values(), key=lambda t: (t.begin, t.end)):
            if ti.begin < cursor:
                assert owner is not None  # cursor > 0 only once a non-empty tensor was seen
                both = (
                    f"bytes [{ti.begin}, {min(ti.end, cursor)}) are claimed by both"
                    if ti.end > ti.begin
                    else f"the empty {ti.name!r} sits inside {owner.name!r}"
                )
                raise CheckpointError(
                    f"{self.path}: tensors {_span(owner)} and {_span(ti)} overlap ({both}); aliased or "
                    "overlapping tensors are not allowed: the header is corrupt"
                )
            if ti.begin > cursor:
                left = f"the end of tensor {_span(owner)}" if owner is not None else "the start of the data section"
                raise CheckpointError(
                    f"{self.path}: {ti.begin - cursor} bytes [{cursor}, {ti.begin}) between {left} and tensor "
                    f"{_span(ti)} belong to no tensor (a gap that could hide data): the header is corrupt"
                )
            if ti.end > ti.begin:
                cursor, owner = ti.end, ti
        if self.data_size > cursor:
            last = f"tensor {_span(owner)}" if owner is not None else "a header listing no data"
            raise CheckpointError(
                f"{self.path}: {self.data_size - cursor} bytes of hidden trailing data after {last}: the data "
                f"section holds {self.data_size} bytes but its tensors end at {cursor} (the file is {self.size} "
                "bytes); a safetensors file must be exactly covered by its tensors"
            )

    def _parse_entry(self, name: str, entry: Any) -> TensorInfo:
        where = f"tensor {name!r} in {self.path}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not a JSON object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise CheckpointError(f"{where}: header entry has no {key!r}")
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise CheckpointError(f"{where}: dtype {dtype!r} is not a string")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(_is_int(o) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CheckpointError(f"{where}: data_offsets {offs!r} are not two integers 0 <= begin <= end")
        return TensorInfo(name, dtype, tuple(shape), offs[0], offs[1], self.path)

    @property
    def data_size(self) -> int:
        return self.size - self.data_start

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in {self.path}") from None

    def check(self, name: str) -> TensorInfo:
        """The entry of ``name`` after checking its dtype is known and its bytes lie in the file."""
        ti = self.info(name)
        where = f"tensor {name!r} in {self.path}"
        dt = ti.np_dtype
        if dt is None:
            raise CheckpointError(f"{where}: dtype {ti.dtype!r} is not supported (known: {', '.join(SAFETENSORS_DTYPES)})")
        want = math.prod(ti.shape) * dt.itemsize
        if ti.nbytes != want:
            raise CheckpointError(
                f"{where}: data_offsets [{ti.begin}, {ti.end}] span {ti.nbytes} bytes but "
                f"{ti.dtype}{list(ti.shape)} needs {want}"
            )
        if ti.end > self.data_size:
            raise CheckpointError(
                f"{where}: data_offsets [{ti.begin}, {ti.end}] lie past the end of the file (its data "
                f"section holds {self.data_size} bytes; the file is {self.size} bytes): the shard is "
                "truncated or its header is corrupt"
            )
        return ti

    def _map(self) -> np.memmap:
        if self._mm is None:
            try:
                self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.path}: cannot memory-map the file ({e})") from e
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only ``uint8`` view into the mapped file (checked)."""
        ti = self.check(name)
        if ti.nbytes == 0:
            z = np.zeros((0,), np.uint8)
            z.flags.writeable = False
            return z
        start = self.data_start + ti.begin
        return self._map()[start : start + ti.nbytes]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only array view of its declared dtype and shape (no copy)."""
        ti = self.check(name)
        return self.raw(name).view(ti.np_dtype).reshape(ti.shape)

    def close(self) -> None:
        """Drop this object's mapping (views already handed out keep it alive until freed)."""
        self._mm = None


# ---------------------------------------------------------------------------------------------
# A checkpoint folder
# ---------------------------------------------------------------------------------------------


class Checkpoint:
    """A safetensors checkpoint opened lazily: the index is parsed at once, a shard's header only
    when one of its tensors is first needed.

    ``path``: a folder holding ``model.safetensors.index.json`` (+ shards), or a single
    ``model.safetensors``, or un-indexed ``*.safetensors`` files (their headers are read to build
    the map); or the path of an index JSON or of one ``.safetensors`` file.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such checkpoint folder or file")
        self._files: dict[str, SafetensorsFile] = {}
        if os.path.isdir(path):
            self.folder = path
            index = os.path.join(path, INDEX_NAME)
            if os.path.isfile(index):
                self.index_path: str | None = index
                self.weight_map = self._read_index(index)
            else:
                self.index_path = None
                names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
                if not names:
                    raise CheckpointError(f"{path}: no {INDEX_NAME} and no *.safetensors files")
                self.weight_map = self._scan(names)
        elif path.endswith(".json"):
            self.folder = os.path.dirname(path) or "."
            self.index_path = path
            self.weight_map = self._read_index(path)
        else:
            self.folder = os.path.dirname(path) or "."
            self.index_path = None
            self.weight_map = self._scan([os.path.basename(path)])

    def _read_index(self, index: str) -> dict[str, str]:
        try:
            with open(index, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except OSError as e:
            raise CheckpointError(f"{index}: cannot read the index ({e})") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: the index is not valid JSON ({e})") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object mapping tensor names to shard files")
        return dict(wm)

    def _scan(self, names: list[str]) -> dict[str, str]:
        wm: dict[str, str] = {}
        for fn in names:
            sf = self._open(fn)
            for t in sf.tensors:
                if t in wm:
                    raise CheckpointError(f"tensor {t!r} is in both {wm[t]} and {fn} under {self.folder}")
                wm[t] = fn
        return wm

    @property
    def source(self) -> str:
        """Where names are looked up (the index file, or the folder)."""
        return self.index_path or self.folder

    def _open(self, fn: str) -> SafetensorsFile:
        sf = self._files.get(fn)
        if sf is None:
            sf = SafetensorsFile(os.path.join(self.folder, fn))
            self._files[fn] = sf
        return sf

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> Iterable[str]:
        return self.weight_map.keys()

    def file_of(self, name: str) -> SafetensorsFile:
        fn = self.weight_map.get(name)
        if fn is None:
            raise CheckpointError(f"tensor {name!r} is missing: not listed in {self.source}")
        path = os.path.join(self.folder, fn)
        if fn not in self._files and not os.path.isfile(path):
            raise CheckpointError(f"tensor {name!r}: its shard {path} (from {self.source}) does not exist")
        try:
            sf = self._open(fn)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (while reading tensor {name!r})") from None
        if name not in sf:
            raise CheckpointError(f"tensor {name!r}: {self.source} places it in {path}, whose header has no such tensor")
        return sf

    def info(self, name: str) -> TensorInfo:
        return self.file_of(name).info(name)

    def get(self, name: str) -> np.ndarray:
        return self.file_of(name).get(name)

    def raw(self, name: str) -> np.ndarray:
        return self.file_of(name).raw(name)

    def expect(
        self,
        name: str,
        dtypes: Iterable[str],
        shape: tuple[int, ...] | None,
        what: str = "",
        dims: str = "",
    ) -> TensorInfo:
        """The entry of ``name`` after checking dtype, shape and offsets (errors name file and tensor)."""
        sf = self.file_of(name)
        ti = sf.info(name)
        dtypes = tuple(dtypes)
        where = f"tensor {name!r} in {sf.path}"
        if ti.dtype not in dtypes:
            what_s = f" for {what}" if what else ""
            raise CheckpointError(f"{where}: dtype {ti.dtype} is not supported{what_s}; expected {' or '.join(dtypes)}")
        if shape is not None and ti.shape != tuple(shape):
            dims_s = f" = {dims}" if dims else ""
            raise CheckpointError(f"{where}: shape {list(ti.shape)} does not match the expected {list(shape)}{dims_s}")
        return sf.check(name)

    def config_json(self) -> dict[str, Any] | None:
        """The folder's ``config.json`` as a dict, None when there is none."""
        p = os.path.join(self.folder, CONFIG_NAME)
        if not os.path.isfile(p):
            return None
        try:
            with open(p, "rb") as f:
                cfg = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: cannot read the model config ({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{p}: the model config is not a JSON object")
        return cfg

    def fingerprint(self, names: Iterable[str]) -> str:
        """A hash of the header entries of ``names`` and the sizes of their files (no data read)."""
        import hashlib

        h = hashlib.sha256()
        for n in sorted(names):
            sf = self.file_of(n)
            ti = sf.info(n)
            h.update(json.dumps([n, os.path.basename(sf.path), sf.size, ti.dtype, list(ti.shape), ti.begin, ti.end]).encode())
        return h.hexdigest()

    def close(self) -> None:
        for sf in self._files.values():
            sf.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _as_checkpoint(path: Any) -> tuple[Checkpoint, bool]:
    if isinstance(path, Checkpoint):
        return path, False
    return Checkpoint(path), True


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class _TextBar:
    def __init__(self, total: int, desc: str, unit: str, stream: Any = None, width: int = 30):
        self.total, self.desc, self.unit, self.width = max(int(total), 1), desc, unit, width
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.perf_counter()
        self.last = -1

    def __call__(self, done: int) -> None:
        pct = 100 * done // self.total
        if pct == self.last and done < self.total:
            return
        self.last = pct
        n = self.width * done // self.total
        el = time.perf_counter() - self.t0
        self.stream.write(f"\r{self.desc} [{'#' * n}{'.' * (self.width - n)}] {done}/{self.total} {self.unit} {el:.1f}s")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class _TqdmBar:
    def __init__(self, total: int, desc: str, unit: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True)
        self.n = 0

    def __call__(self, done: int) -> None:
        if done > self.n:
            self.bar.update(done - self.n)
            self.n = done

    def close(self) -> None:
        self.bar.close()


class _CallbackBar:
    def __init__(self, fn: Callable[[int, int], None], total: int):
        self.fn, self.total = fn, total

    def __call__(self, done: int) -> None:
        self.fn(done, self.total)

    def close(self) -> None:
        pass


def make_progress(progress: Any, total: int, desc: str, unit: str = "it") -> Any:
    """A progress sink ``bar(done)`` + ``bar.close()``, or None.

    ``progress``: None/False (none), True (tqdm on stderr if installed, else a text bar on
    stderr), ``"text"`` (the text bar), or a callable ``progress(done, total)``.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        try:
            return _TqdmBar(total, desc, unit)
        except ImportError:
            return _TextBar(total, desc, unit)
    if progress == "text":
        return _TextBar(total, desc, unit)
    if callable(progress):
        return _CallbackBar(progress, total)
    raise TypeError(f"progress: expected None, a bool, 'text' or a callable(done, total), got {type(progress).__name__}")


@dataclasses.dataclass(frozen=True, eq=False)
class _Relay:
    """A fixed, hashable progress callable for the jitted FP4 -> FP8 conversion (its identity is a
    static argument of the jit, so one relay object avoids a recompilation per call); the sink it
    forwards to is swapped per call."""

    target: list

    def __call__(self, done: int, total: int) -> None:
        if self.target and self.target[0] is not None:
            self.target[0](done, total)


_CONVERT_RELAY = _Relay([None])
_CONVERT_LOCK = threading.Lock()  # one conversion at a time uses the relay


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


def swap_nibbles(packed: Any) -> np.ndarray:
    """Packed FP4 bytes with their two nibbles exchanged (``high_even`` <-> ``low_even``)."""
    return _SWAP_LUT[_u8("packed", packed)]


def dequantize_fp4_numpy(packed: Any, scale: Any, nibble_order: str = "low_even") -> np.ndarray:
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


def nibble_order_errors(packed: Any, scale: Any, reference: Any) -> dict[str, float]:
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


def check_nibble_order(packed: Any, scale: Any, reference: Any, *, margin: float = 0.5) -> str:
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
    path: Any,
    layer_idx: int,
    reference: Any,
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


def list_moe_layers(path: Any) -> list[int]:
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
        raise CheckpointError(f"tensor {gname!r} in {g.file}: expected a rank-2 [E, H] router weight, got {list(g.shape)}")
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


def infer_config(path: Any, layer_idx: int, config: Any = None, *, prefix: str | None = None) -> Any:
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


def _infer_config(ck: Checkpoint, layer_idx: int, pre: str, config: Any, d: _Dims) -> Any:
    from jax_megamoe.models.deepseek_v4 import DeepseekV4Config

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
        raise mismatch("moe_intermediate_size", d.intermediate, cfg.moe_intermediate_size, f"{pre}ffn.experts.0.w1.weight")
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
    config: Any
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
        raise CheckpointError(f"tensor {base}.scale is missing: neither it nor {base}.weight_scale_inv is listed in {ck.source}")
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
    path: Any,
    layer_idx: int,
    *,
    config: Any = None,
    nibble_order: str = "low_even",
    progress: Any = None,
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
                raise CheckpointError(f"{pre}ffn.experts.0.w1.weight: I = {i} is not a multiple of 128 (FP8 128x128 blocks)")
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
    config: Any
    mode: str
    weights: Any
    report: Any
    is_hash_layer: bool
    gate_weight: np.ndarray
    gate_bias: np.ndarray | None
    tid2eid: np.ndarray | None
    shared: dict[str, np.ndarray] | None
    expert_format: str = "fp4"
    nibble_order: str = "low_even"
    source: str = ""

    def apply_to(self, block: Any) -> Any:
        """Set ``block``'s gate and shared-expert parameters to this layer's (returns ``block``)."""
        import jax.numpy as jnp

        gate = block.gate
        if bool(gate.is_hash_layer) != self.is_hash_layer:
            raise ValueError(
                f"block: layer {block.layer_idx} is {'' if gate.is_hash_layer else 'not '}hash-routed but the loaded "
                f"layer {self.layer_idx} is {'' if self.is_hash_layer else 'not '}hash-routed"
            )

        def put(var: Any, value: np.ndarray, what: str) -> None:
            cur = var.get_value()
            if tuple(cur.shape) != tuple(value.shape) or np.dtype(cur.dtype) != value.dtype:
                raise ValueError(
                    f"block: {what} is {np.dtype(cur.dtype).name}{list(cur.shape)} but the checkpoint gives "
                    f"{value.dtype.name}{list(value.shape)}"
                )
            var.set_value(jnp.asarray(value))

        put(gate.weight, self.gate_weight, "gate.weight")
        if self.is_hash_layer:
            put(gate.tid2eid, self.tid2eid, "gate.tid2eid")
        else:
            put(gate.bias, self.gate_bias, "gate.bias")
        if self.shared is not None:
            if block.shared_experts is None:
                raise ValueError("block: has no shared expert but the checkpoint layer has one")
            s = self.shared
            block.shared_experts.load_fp8(s["w1"], s["w1_scale"], s["w2"], s["w2_scale"], s["w3"], s["w3_scale"])
        elif block.shared_experts is not None:
            raise ValueError("block: has a shared expert but the checkpoint layer has none")
        return block


def _device_arch() -> int | None:
    from jax_megamoe.models.deepseek_v4 import _device_arch as arch

    return arch()


def _resolve_mode(mode: str | None) -> str:
    from jax_megamoe.numerics import config as _cfg

    return _cfg.resolve_mode(mode, _device_arch() if mode is None else None)


def build_moe_layer(
    tensors: MoELayerTensors,
    *,
    mode: str | None = None,
    progress: Any = None,
    experts_per_step: int = 1,
    allow_nan_scales: bool = False,
) -> MoELayer:
    """Kernel-layout :class:`MoELayer` from checkpoint-format tensors (see :func:`load_moe_layer`;
    ``allow_nan_scales`` goes to :meth:`~jax_megamoe.layout.MoEWeights.from_checkpoint_with_report`)."""
    from jax_megamoe.numerics.layout import MoEWeights

    mode = _resolve_mode(mode)
    t = tensors
    report = None
    if t.expert_format == "fp8":
        if mode != "fp8":
            raise CheckpointError(
                f"{t.source}: layer {t.layer_idx} has FP8 routed experts, which only run in mode 'fp8' (sm_90); "
                f"mode {mode!r} needs MXFP4 experts (requantizing FP8 to FP4 is lossy and not supported)"
            )
        weights = MoEWeights.from_fp8(t.w13, t.w13_scale, t.w2, t.w2_scale)
    else:
        bar = None
        if mode == "fp8":
            bar = make_progress(progress, 2 * t.config.n_routed_experts, f"layer {t.layer_idx}: FP4 -> FP8", "tensor")
        args = (t.w13, t.w13_scale, t.w2, t.w2_scale)
        if bar is None:
            weights, report = MoEWeights.from_checkpoint_with_report(
                *args, mode=mode, experts_per_step=experts_per_step, allow_nan_scales=allow_nan_scales
            )
        else:
            with _CONVERT_LOCK:
                _CONVERT_RELAY.target[0] = lambda done, total: bar(done)
                try:
                    weights, report = MoEWeights.from_checkpoint_with_report(
                        *args,
                        mode=mode,
                        progress=_CONVERT_RELAY,
                        experts_per_step=experts_per_step,
                        allow_nan_scales=allow_nan_scales,
                    )
                finally:
                    _CONVERT_RELAY.target[0] = None
                    bar.close()
        if report is not None:
            msg = f"layer {t.layer_idx}: {report.summary()}"
            (log.info if report.lossless else log.warning)(msg)
    return MoELayer(
        layer_idx=t.layer_idx,
        config=t.config,
        mode=mode,
        weights=weights,
        report=report,
        is_hash_layer=t.is_hash_layer,
        gate_weight=t.gate_weight,
        gate_bias=t.gate_bias,
        tid2eid=t.tid2eid,
        shared=t.shared,
        expert_format=t.expert_format,
        nibble_order=t.nibble_order,
        source=t.source,
    )


def load_moe_layer(
    path: Any,
    layer_idx: int,
    *,
    mode: str | None = None,
    config: Any = None,
    nibble_order: str = "low_even",
    progress: Any = None,
    prefix: str | None = None,
    experts_per_step: int = 1,
    allow_nan_scales: bool = False,
) -> MoELayer:
    """Read one MoE layer of a checkpoint and build its kernel-layout weights.

    ``mode``: ``"mxf4xmxf4"`` / ``"fp8xfp4"`` (sm_100) or ``"fp8"`` (sm_90); None picks the
    device's (``fp8`` on sm_90, else the environment's sm_100 mode). For ``fp8`` from an FP4
    checkpoint the result's ``report`` tells what the FP4 -> FP8 conversion lost (also logged,
    as a warning when any block is lossy). Other arguments: :func:`read_moe_layer`.
    """
    mode = _resolve_mode(mode)
    t = read_moe_layer(
        path,
        layer_idx,
        config=config,
        nibble_order=nibble_order,
        progress=progress,
        prefix=prefix,
        allow_nan_scales=allow_nan_scales,
    )
    return build_moe_layer(
        t, mode=mode, progress=progress, experts_per_step=experts_per_step, allow_nan_scales=allow_nan_scales
    )


def load_converted(out_dir: Any, layer_idx: int, *, verify: bool = True) -> MoELayer:
    """A layer written by ``python -m jax_megamoe.convert``, its SHA-256 checked unless ``verify=False``
    (see :func:`jax_megamoe.convert.load_converted`)."""
    from jax_megamoe.io import convert

    return convert.load_converted(out_dir, layer_idx, verify=verify)


def load_moe_block(
    cls: Any,
    path: Any,
    layer_idx: int,
    *,
    backend: str = "auto",
    mode: str | None = None,
    config: Any = None,
    progress: Any = None,
    nibble_order: str = "low_even",
    rngs: Any = None,
    verify: bool = True,
    allow_nan_scales: bool = False,
    **block_kwargs: Any,
) -> Any:
    """``cls(config, layer_idx, backend=..., mode=..., weights=...)`` with every parameter loaded.

    ``path`` is a checkpoint (see :func:`load_moe_layer`) or a folder written by
    ``python -m jax_megamoe.convert`` (recognised by its per-layer manifest; its mode must match
    ``mode`` when one is given; ``verify=False`` skips its SHA-256 check; ``allow_nan_scales`` as
    in :func:`load_moe_layer`). Extra keyword arguments go to the block's constructor.
    """
    from flax import nnx

    from jax_megamoe.io import convert

    if convert.is_converted_dir(path, layer_idx):
        layer = convert.load_converted(path, layer_idx, verify=verify)
        if mode is not None and mode != layer.mode:
            raise CheckpointError(
                f"{path}: layer {layer_idx} was converted for mode {layer.mode!r}, mode {mode!r} was requested; "
                "convert it again with that mode"
            )
        if config is not None and not isinstance(config, Mapping) and config != layer.config:
            raise CheckpointError(f"{path}: layer {layer_idx} was converted with config {layer.config}, not {config}")
    else:
        layer = load_moe_layer(
            path, layer_idx, mode=mode, config=config, nibble_order=nibble_order, progress=progress,
            allow_nan_scales=allow_nan_scales,
        )
    block = cls(
        layer.config,
        layer_idx,
        backend=backend,
        mode=layer.mode,
        rngs=nnx.Rngs(0) if rngs is None else rngs,
        weights=layer.weights,
        **block_kwargs,
    )
    return layer.apply_to(block)
