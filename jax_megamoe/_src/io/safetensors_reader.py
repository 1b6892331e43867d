"""Safetensors files and sharded checkpoint folders, parsed here (not by the ``safetensors`` package).

A shard's header (8-byte little-endian length + JSON) is parsed and checked against the official
layout (:class:`SafetensorsFile`: no overlapping or aliased offsets, no gaps, no hidden trailing
data; JSON key order is free), so ``F8_E8M0`` and I8-packed FP4 read the same everywhere. A shard is
memory-mapped once (``np.memmap``) and a tensor is a read-only view of its byte range.
:class:`Checkpoint` opens a folder (``model.safetensors.index.json`` + shards, a single
``model.safetensors``, un-indexed shards) or one file lazily. Knows nothing of DeepSeek V4 (that is
:mod:`jax_megamoe._src.io.v4_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: Largest header accepted (the ``safetensors`` package's own limit).
MAX_HEADER_BYTES = 100_000_000


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


def safetensors_dtype(dtype: npt.DTypeLike) -> str:
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

    def __init__(self, path: str | os.PathLike[str]) -> None:
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
            raise CheckpointError(
                f"{where}: dtype {ti.dtype!r} is not supported (known: {', '.join(SAFETENSORS_DTYPES)})"
            )
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

    def __init__(self, path: str | os.PathLike[str]) -> None:
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
            raise CheckpointError(
                f"tensor {name!r}: {self.source} places it in {path}, whose header has no such tensor"
            )
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
        h = hashlib.sha256()
        for n in sorted(names):
            sf = self.file_of(n)
            ti = sf.info(n)
            h.update(
                json.dumps([n, os.path.basename(sf.path), sf.size, ti.dtype, list(ti.shape), ti.begin, ti.end]).encode()
            )
        return h.hexdigest()

    def close(self) -> None:
        for sf in self._files.values():
            sf.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: Where tensors are read from: a checkpoint folder, one ``.safetensors`` file, or an open :class:`Checkpoint`.
CheckpointSource = str | os.PathLike[str] | Checkpoint


def _as_checkpoint(path: CheckpointSource) -> tuple[Checkpoint, bool]:
    if isinstance(path, Checkpoint):
        return path, False
    return Checkpoint(path), True
