"""Convert DeepSeek V4 MoE layers to kernel layout on disk, so serving starts without conversion.

Command line::

    python -m jax_megamoe.convert CHECKPOINT_DIR --layers 3-5 --target sm90|sm100 \\
        [--mode mxf4xmxf4|fp8xfp4] --out DIR [--nibble-order low_even|high_even] \\
        [--config CONFIG.json] [--force] [--no-verify] [--quiet]

``--layers``: ``all``, or indices and inclusive ranges (``3-5``, ``0,2,7-9``). ``--target sm90``
gives mode ``fp8`` (FP4 experts converted to FP8 128x128; the conversion report is printed and
stored); ``--target sm100`` gives ``--mode`` (default ``fp8xfp4``, W4A8). ``--config`` supplies
DeepseekV4Config fields (JSON object) for checkpoints without a ``config.json``.
Existing outputs are re-hashed against their manifests before they are skipped (``--no-verify``:
only their size, header and metadata are checked). Exit status: 0 on success, 1 when a layer
could not be read or written (one line naming the tensor, field or file; no traceback), 2 for
bad arguments.

Output folder, per converted layer ``i`` (``NNN`` = ``i`` zero-padded to 3 digits)::

    layer_NNN.safetensors   the layer's tensors (safetensors, readable by any safetensors reader
                            that knows F8_E4M3 / F8_E8M0):
        experts.l1, experts.l1_sf, experts.l2, experts.l2_sf
                            MoEWeights leaves in the kernel layout of the manifest's mode
                            (see jax_megamoe.layout): U8/I32 for mxf4xmxf4 and fp8xfp4,
                            F8_E4M3/F32 for fp8
        gate.weight         BF16 [E, H]
        gate.bias           F32 [E]            (non-hash layers)
        gate.tid2eid        I32 [vocab, K]     (hash layers)
        shared_experts.{w1,w2,w3}.weight   F8_E4M3, as in the checkpoint
        shared_experts.{w1,w2,w3}.scale    F8_E8M0 (or F32), 128x128 blocks, as in the checkpoint
    layer_NNN.json          the manifest, written last: format/version, layer index, mode and
                            target, the DeepseekV4Config, whether the layer is hash-routed, the
                            kernel dimensions, every tensor's dtype and shape, the data file's
                            name, size and SHA-256, the FP4 -> FP8 ConversionReport (or null),
                            and the source (checkpoint path, expert format, nibble order and a
                            fingerprint of the source tensors' header entries and shard sizes);
                            version 2 adds ``manifest_sha256``, the SHA-256 of the manifest's
                            other fields (canonical JSON: sorted keys, no spaces), so an edited or
                            damaged manifest is caught while JSON whitespace is not significant.

The data file's safetensors ``__metadata__`` binds it to its manifest: ``format``, ``layer_idx``,
``mode`` and (version 2) the source ``fingerprint`` ("" when none was given). These are compared
with the manifest on every load and check, also with ``verify=False``, so another layer's (or
another conversion's) file copied over this one is refused without reading its data.

Integrity: by default (``verify=True``) :func:`load_converted` reads the data file once,
sequentially, into freshly allocated arrays while hashing it, and compares the SHA-256 with the
manifest before it returns anything; :func:`check_converted` and the CLI re-hash what they would
skip. ``verify=False`` / ``--no-verify`` trusts the data (memory-mapped load; the manifest schema,
sizes, tensor table and the metadata binding are still checked). Version-1 outputs (written before
the binding) are still read: their data file is bound by ``layer_idx`` and ``mode`` only and the
manifest has no digest, so only ``verify=True`` (the file's SHA-256) covers the rest; the CLI
keeps them (they verify) and ``--force`` rewrites them as version 2. Every manifest field the
loader uses is checked first (:func:`validate_manifest`); a malformed one is a
:class:`~jax_megamoe.checkpoint.CheckpointError` naming the field.

A layer counts as converted only when its manifest exists and agrees with the requested mode,
nibble order, config and source fingerprint, and the data file has the recorded size, tensors,
binding metadata and (unless ``--no-verify``) hash. Re-running skips such layers. Every file is
written to a temporary name in the output folder (``.layer_NNN.*.<pid>.tmp``), fsynced, and renamed over the
final name with ``os.replace``; a layer's old manifest is deleted before its data file is
replaced and the new manifest is written last, so an interrupted run leaves complete layers
intact and never a manifest that points at other data. A failed write removes its temporary file;
temporary files of dead processes (e.g. after a kill) are removed at the next start.

Load a converted layer with :func:`load_converted` (or ``DeepseekV4MoE.from_checkpoint(DIR,
layer_idx)``, which recognises converted folders).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_megamoe._src.io.build import build_moe_layer
from jax_megamoe._src.io.safetensors_reader import (
    Checkpoint,
    CheckpointError,
    CheckpointSource,
    SafetensorsFile,
    read_safetensors_header,
    safetensors_dtype,
)  # fmt: skip
from jax_megamoe._src.io.v4_checkpoint import (
    NIBBLE_ORDERS,
    MoELayer,
    _derive_dims,
    infer_config,
    layer_prefix,
    list_moe_layers,
    read_moe_layer,
)  # fmt: skip
from jax_megamoe._src.numerics import config as _cfg
from jax_megamoe._src.numerics.config import MODES
from jax_megamoe._src.numerics.layout import ConversionReport, MoEWeights
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config
from jax_megamoe._version import __version__

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TARGETS",
    "layer_file_names",
    "parse_layers",
    "write_safetensors",
    "write_converted_layer",
    "validate_manifest",
    "check_converted",
    "is_converted_dir",
    "load_converted",
    "main",
]

FORMAT = "jax_megamoe.converted_moe_layer"
FORMAT_VERSION = 2
#: Manifest versions this library reads (1: no fingerprint in the data file's metadata, no
#: ``manifest_sha256``).
READ_VERSIONS = (1, 2)
#: ``--target`` -> (allowed modes, default mode).
TARGETS = {"sm90": (("fp8",), "fp8"), "sm100": (("fp8xfp4", "mxf4xmxf4"), "fp8xfp4")}
_CHUNK = 64 << 20
_TMP_RE = re.compile(r"^\.(layer_\d+\.(?:safetensors|json))\.(\d+)\.tmp$")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
#: Hash in a worker thread while the next chunk is read (measured: benchmarks/convert_verify_cost.py).
_HASH_IN_THREAD = True


def layer_file_names(layer_idx: int) -> tuple[str, str]:
    """``(data file, manifest)`` names of a converted layer: ``layer_NNN.safetensors``, ``layer_NNN.json``."""
    return f"layer_{int(layer_idx):03d}.safetensors", f"layer_{int(layer_idx):03d}.json"


def parse_layers(spec: str, available: Sequence[int] | None = None) -> list[int]:
    """``"all"`` or ``"3-5"``, ``"0,2,7-9"`` -> sorted unique indices (checked against ``available``)."""
    spec = spec.strip()
    if spec == "all":
        if available is None:
            raise ValueError("--layers all: the available layers are unknown")
        return sorted(set(available))
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--layers: {part!r} is not an index or a range a-b")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"--layers: range {part!r} is empty")
        out.update(range(lo, hi + 1))
    layers = sorted(out)
    if available is not None:
        missing = [i for i in layers if i not in set(available)]
        if missing:
            raise ValueError(
                f"--layers: {missing} have no MoE layer in the checkpoint (available: {_ranges(sorted(set(available)))})"
            )
    return layers


def _ranges(xs: list[int]) -> str:
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts) or "none"


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _write_chunk(f: Any, data: Any) -> None:
    """Write one piece of a file (a seam for tests that simulate a failing disk)."""
    f.write(data)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def _atomic_write(path: str, pieces: Any) -> tuple[int, str]:
    """Write the byte pieces to a temporary file next to ``path``, fsync, ``os.replace``; returns
    ``(size, sha256)``. On any failure the temporary file is removed and ``path`` is untouched."""
    tmp = _tmp_name(path)
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as f:
            for piece in pieces:
                mv = memoryview(piece).cast("B")
                _write_chunk(f, mv)
                h.update(mv)
                size += mv.nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(os.path.dirname(path) or ".")
    return size, h.hexdigest()


def _array_pieces(a: np.ndarray) -> Any:
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    for s in range(0, flat.size, _CHUNK):
        yield flat[s : s + _CHUNK]


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> tuple[int, str]:
    """Write ``tensors`` (name -> array, insertion order) as a safetensors file, atomically.

    The header is padded with spaces to a multiple of 8 bytes. Returns ``(size, sha256)``.
    """
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    header: dict[str, Any] = {}
    off = 0
    for name, a in arrays.items():
        header[name] = {
            "dtype": safetensors_dtype(a.dtype),
            "shape": list(a.shape),
            "data_offsets": [off, off + a.nbytes],
        }
        off += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)

    def pieces() -> Any:
        yield struct.pack("<Q", len(hb))
        yield hb
        for a in arrays.values():
            yield from _array_pieces(a)

    return _atomic_write(os.fspath(path), pieces())


def _write_json(path: str, obj: Any) -> None:
    _atomic_write(path, [json.dumps(obj, indent=1, sort_keys=False).encode() + b"\n"])


def _clean_stale_tmp(out_dir: str) -> list[str]:
    removed = []
    for fn in os.listdir(out_dir):
        m = _TMP_RE.match(fn)
        if not m:
            continue
        pid = int(m.group(2))
        alive = True
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
        if not alive:
            try:
                os.unlink(os.path.join(out_dir, fn))
                removed.append(fn)
            except FileNotFoundError:
                pass
    return removed


# ---------------------------------------------------------------------------------------------
# Converted layers
# ---------------------------------------------------------------------------------------------


def _layer_tensors(layer: MoELayer) -> dict[str, np.ndarray]:
    w = layer.weights
    out = {f"experts.{k}": np.asarray(getattr(w, k)) for k in ("l1", "l1_sf", "l2", "l2_sf")}
    out["gate.weight"] = np.asarray(layer.gate_weight)
    if layer.is_hash_layer:
        out["gate.tid2eid"] = np.asarray(layer.tid2eid, np.int32)
    else:
        out["gate.bias"] = np.asarray(layer.gate_bias, np.float32)
    if layer.shared is not None:
        for proj in ("w1", "w2", "w3"):
            out[f"shared_experts.{proj}.weight"] = np.asarray(layer.shared[proj])
            s = np.asarray(layer.shared[f"{proj}_scale"])
            out[f"shared_experts.{proj}.scale"] = s.view(ml_dtypes.float8_e8m0fnu) if s.dtype == np.uint8 else s
    return out


def _report_dict(rep: Any) -> dict[str, Any] | None:
    if rep is None:
        return None
    d = dataclasses.asdict(rep)
    d["lossy_experts"] = list(d["lossy_experts"])
    return d


def _source_key(layer_format: str, nibble_order: str, fingerprint: str | None) -> dict[str, Any]:
    return {"expert_format": layer_format, "nibble_order": nibble_order, "fingerprint": fingerprint}


def _binding(layer_idx: int, mode: str, fingerprint: str | None) -> dict[str, str]:
    """The data file's ``__metadata__``: what ties it to its manifest (checked on every load)."""
    return {"format": FORMAT, "layer_idx": str(layer_idx), "mode": mode, "fingerprint": fingerprint or ""}


def _manifest_digest(man: dict[str, Any]) -> str:
    """SHA-256 of the manifest without ``manifest_sha256``, as canonical JSON (whitespace-free)."""
    body = {k: v for k, v in man.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_converted_layer(
    out_dir: str | os.PathLike,
    layer: MoELayer,
    *,
    target: str | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Write ``layer`` as ``layer_NNN.safetensors`` + manifest ``layer_NNN.json`` (see the module
    docstring); returns the manifest. The old manifest goes first, the new one is written last."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data_name, man_name = layer_file_names(layer.layer_idx)
    man_path = os.path.join(out_dir, man_name)
    try:
        os.unlink(man_path)
        _fsync_dir(out_dir)
    except FileNotFoundError:
        pass
    tensors = _layer_tensors(layer)
    size, digest = write_safetensors(
        os.path.join(out_dir, data_name), tensors, _binding(layer.layer_idx, layer.mode, fingerprint)
    )
    w = layer.weights
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layer_idx": layer.layer_idx,
        "mode": layer.mode,
        "target": target or ("sm90" if _cfg.arch_of_mode(layer.mode) == 9 else "sm100"),
        "is_hash_layer": layer.is_hash_layer,
        "config": dataclasses.asdict(layer.config),
        "weights": {"hidden": w.hidden, "intermediate": w.intermediate, "num_experts": w.num_experts},
        "tensors": {k: {"dtype": safetensors_dtype(a.dtype), "shape": list(a.shape)} for k, a in tensors.items()},
        "file": {"name": data_name, "size": size, "sha256": digest},
        "conversion_report": _report_dict(layer.report),
        "source": {"path": layer.source, **_source_key(layer.expert_format, layer.nibble_order, fingerprint)},
        "jax_megamoe_version": __version__,
        "created_unix": time.time(),
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    _write_json(man_path, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading converted layers: manifest schema, binding, verified streaming read
# ---------------------------------------------------------------------------------------------

_MISSING = object()
_REQUIRED_TENSORS = ("experts.l1", "experts.l1_sf", "experts.l2", "experts.l2_sf", "gate.weight")
_SHARED_TENSORS = tuple(f"shared_experts.{p}.{k}" for p in ("w1", "w2", "w3") for k in ("weight", "scale"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _shown(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def validate_manifest(man: Any, man_path: str, layer_idx: int | None = None) -> dict[str, Any]:
    """Check every manifest field the loader uses; returns ``man``.

    A wrong field is a :class:`CheckpointError` naming it (``<path>: field 'file.size' is 'abc'
    (str), expected a non-negative integer``), so a damaged or hand-edited manifest never reaches
    the loader as an ``AttributeError`` or a ``KeyError``.
    """
    if not isinstance(man, dict):
        raise CheckpointError(f"{man_path}: the manifest is a JSON {type(man).__name__}, expected an object")

    def field(parent: dict[str, Any], where: str, key: str, ok: Callable[[Any], bool], expected: str) -> Any:
        path = f"{where}.{key}" if where else key
        v = parent.get(key, _MISSING)
        if v is _MISSING:
            raise CheckpointError(f"{man_path}: field {path!r} is missing, expected {expected}")
        if not ok(v):
            raise CheckpointError(
                f"{man_path}: field {path!r} is {_shown(v)} ({type(v).__name__}), expected {expected}"
            )
        return v

    def mapping(parent: dict[str, Any], where: str, key: str) -> dict[str, Any]:
        return field(parent, where, key, lambda v: isinstance(v, dict), "a mapping (JSON object)")

    field(man, "", "format", lambda v: v == FORMAT, f"{FORMAT!r}")
    version = field(
        man,
        "",
        "version",
        lambda v: _is_int(v) and v in READ_VERSIONS,
        f"one of {READ_VERSIONS} (versions this library reads)",
    )
    idx = field(man, "", "layer_idx", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    if layer_idx is not None and idx != layer_idx:
        raise CheckpointError(f"{man_path}: the manifest is for layer {idx!r}, not {layer_idx}")
    field(man, "", "mode", lambda v: v in MODES, f"one of {', '.join(MODES)}")
    field(man, "", "target", lambda v: isinstance(v, str), "a string")
    is_hash = field(man, "", "is_hash_layer", lambda v: isinstance(v, bool), "true or false")
    mapping(man, "", "config")
    weights = mapping(man, "", "weights")
    for k in ("hidden", "intermediate", "num_experts"):
        field(weights, "weights", k, lambda v: _is_int(v) and v > 0, "a positive integer")
    tensors = mapping(man, "", "tensors")
    for name in tensors:
        spec = mapping(tensors, "tensors", name)
        field(spec, f"tensors.{name}", "dtype", lambda v: isinstance(v, str), "a safetensors dtype string")
        field(
            spec,
            f"tensors.{name}",
            "shape",
            lambda v: isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v),
            "a list of non-negative integers",
        )
    required = (*_REQUIRED_TENSORS, "gate.tid2eid" if is_hash else "gate.bias")
    shared = [n for n in _SHARED_TENSORS if n in tensors]
    missing = [n for n in required if n not in tensors] + (
        [n for n in _SHARED_TENSORS if n not in tensors] if shared else []
    )
    if missing:
        kind = "hash-routed" if is_hash else "biased"
        raise CheckpointError(f"{man_path}: field 'tensors' lacks {missing} (needed by a {kind} layer)")
    fi = mapping(man, "", "file")
    want_name = layer_file_names(idx)[0]
    field(fi, "file", "name", lambda v: v == want_name, f"{want_name!r} (the data file sits next to its manifest)")
    field(fi, "file", "size", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    field(
        fi,
        "file",
        "sha256",
        lambda v: isinstance(v, str) and _SHA_RE.fullmatch(v) is not None,
        "64 lowercase hex digits",
    )
    field(man, "", "conversion_report", lambda v: v is None or isinstance(v, dict), "null or a mapping")
    src = mapping(man, "", "source")
    for k in ("path", "fingerprint"):
        field(src, "source", k, _is_str_or_none, "a string or null")
    field(src, "source", "expert_format", lambda v: v in ("fp4", "fp8"), "'fp4' or 'fp8'")
    field(src, "source", "nibble_order", lambda v: v in NIBBLE_ORDERS, f"one of {', '.join(NIBBLE_ORDERS)}")
    if version >= 2:
        field(
            man,
            "",
            "manifest_sha256",
            lambda v: isinstance(v, str) and _SHA_RE.fullmatch(v) is not None,
            "64 lowercase hex digits",
        )
    return man


def _read_manifest(out_dir: str, layer_idx: int, *, verify: bool) -> tuple[dict[str, Any], str]:
    """The validated manifest of layer ``layer_idx``; ``verify`` also checks ``manifest_sha256``."""
    man_path = os.path.join(out_dir, layer_file_names(layer_idx)[1])
    try:
        with open(man_path, "rb") as f:
            man = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{man_path}: layer {layer_idx} has no manifest (not converted, or the conversion did not finish)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{man_path}: cannot read the manifest ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{man_path}: cannot read the manifest (nested too deeply)") from None
    validate_manifest(man, man_path, layer_idx)
    if verify and man["version"] >= 2 and _manifest_digest(man) != man["manifest_sha256"]:
        raise CheckpointError(
            f"{man_path}: the manifest's fields do not match its manifest_sha256 (corrupt or edited; convert the "
            "layer again, or load with verify=False / --no-verify to skip this check)"
        )
    return man, man_path


def _open_data(out_dir: str, man: dict[str, Any], man_path: str) -> SafetensorsFile:
    """The data file, after the cheap checks that run with or without ``verify``: its size, its
    binding metadata and its tensor table (the same names, dtypes and shapes as the manifest)."""
    fi = man["file"]
    data_path = os.path.join(out_dir, fi["name"])
    if not os.path.isfile(data_path):
        raise CheckpointError(f"{data_path}: missing (listed by {man_path})")
    size = os.path.getsize(data_path)
    if size != fi["size"]:
        raise CheckpointError(f"{data_path}: {size} bytes but {man_path} records {fi['size']} (truncated or replaced)")
    # The names first: a tensor dropped from the header would otherwise surface as the layout
    # check's "bytes ... belong to no tensor" (a gap), which does not say what is missing.
    header, _, _ = read_safetensors_header(data_path)
    missing = [n for n in man["tensors"] if n not in header]
    if missing:
        raise CheckpointError(
            f"tensor{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"{'are' if len(missing) > 1 else 'is'} missing from {data_path} (listed by {man_path})"
        )
    sf = SafetensorsFile(data_path)
    want = _binding(man["layer_idx"], man["mode"], man["source"]["fingerprint"])
    if man["version"] < 2:
        del want["fingerprint"]
    for k, v in want.items():
        have = sf.metadata.get(k)
        if have != v:
            raise CheckpointError(
                f"{data_path}: its metadata has {k} {have!r} but {man_path} records {v!r} (the file belongs to "
                "another layer or conversion: replaced?)"
            )
    tensors = man["tensors"]
    extra = sorted(set(sf.tensors) - set(tensors))
    if extra:
        raise CheckpointError(f"{data_path}: holds tensors {extra} that {man_path} does not list (replaced?)")
    for name, spec in tensors.items():
        if name not in sf:
            raise CheckpointError(f"tensor {name!r} is missing from {data_path} (listed by {man_path})")
        ti = sf.check(name)
        if ti.dtype != spec["dtype"] or list(ti.shape) != spec["shape"]:
            raise CheckpointError(
                f"tensor {name!r} in {data_path}: {ti.dtype}{list(ti.shape)} but {man_path} records "
                f"{spec['dtype']}{spec['shape']}"
            )
    return sf


def _digest_error(data_path: str, got: str, want: str, man_path: str) -> CheckpointError:
    return CheckpointError(
        f"{data_path}: SHA-256 {got[:16]}... differs from {want[:16]}... recorded in {man_path}: the file is corrupt "
        "or was replaced (convert the layer again; verify=False / --no-verify skips this check)"
    )


class _Hasher:
    """SHA-256 of byte buffers fed in order. ``threaded``: a worker thread hashes while the caller
    reads the next chunk (both ``readinto`` and ``hashlib`` release the GIL on large buffers), so a
    verified load costs about max(read, hash) instead of their sum. Buffers must stay unchanged
    until :meth:`hexdigest`; the loader's are chunks of the arrays it returns, so nothing is copied."""

    def __init__(self, threaded: bool):
        self._h = hashlib.sha256()
        self._q: queue.SimpleQueue[Any] | None = None
        if threaded:
            self._q = queue.SimpleQueue()
            self._t = threading.Thread(target=self._run, name="jax_megamoe.convert.sha256", daemon=True)
            self._t.start()

    def _run(self) -> None:
        assert self._q is not None
        while (buf := self._q.get()) is not None:
            self._h.update(buf)

    def update(self, buf: Any) -> None:
        if self._q is None:
            self._h.update(buf)
        else:
            self._q.put(buf)

    def close(self) -> None:
        """Wait for the worker (idempotent); called on every exit path so no thread is left behind."""
        if self._q is not None:
            self._q.put(None)
            self._t.join()
            self._q = None

    def hexdigest(self) -> str:
        self.close()
        return self._h.hexdigest()


def _readinto_exact(f: Any, mv: memoryview, path: str) -> None:
    while mv.nbytes:
        n = f.readinto(mv)
        if not n:
            raise CheckpointError(f"{path}: the file ended early while it was read (truncated or replaced meanwhile)")
        mv = mv[n:]


def _same_header(raw: bytes, sf: SafetensorsFile) -> bool:
    """Whether the header bytes read (and hashed) in the stream describe the tensors ``sf``
    parsed, so the offsets used to fill the arrays are the ones the digest covers."""
    try:
        hdr = json.loads(raw[8:].decode("utf-8"))
        entries = {n: (e["dtype"], e["shape"], e["data_offsets"]) for n, e in hdr.items() if n != "__metadata__"}
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
        return False
    return struct.unpack("<Q", raw[:8])[0] + 8 == sf.data_start and entries == {
        n: (ti.dtype, list(ti.shape), [ti.begin, ti.end]) for n, ti in sf.tensors.items()
    }


def _read_verified(
    sf: SafetensorsFile, want_sha: str, man_path: str, *, threaded: bool | None = None, chunk: int = _CHUNK
) -> dict[str, np.ndarray]:
    """Every tensor of ``sf`` as a fresh array, reading the file once, in order (header, tensors
    by offset, any gaps and tail), hashing each chunk as it lands; raises before returning
    anything when the SHA-256 is not ``want_sha``."""
    infos = sorted((sf.check(n) for n in sf.tensors), key=lambda ti: ti.begin)
    hasher = _Hasher(_HASH_IN_THREAD if threaded is None else threaded)
    out: dict[str, np.ndarray] = {}
    try:
        with open(sf.path, "rb", buffering=0) as f:
            raw = bytearray(sf.data_start)
            _readinto_exact(f, memoryview(raw), sf.path)
            hasher.update(raw)
            pos = sf.data_start
            for ti in infos:
                start = sf.data_start + ti.begin
                if start < pos:
                    raise CheckpointError(
                        f"tensor {ti.name!r} in {sf.path}: overlaps the tensor before it (corrupt header)"
                    )
                if start > pos:  # a gap: not written by this library, but covered by the digest
                    gap = bytearray(start - pos)
                    _readinto_exact(f, memoryview(gap), sf.path)
                    hasher.update(gap)
                a = np.empty(ti.shape, ti.np_dtype)
                flat = memoryview(a.reshape(-1).view(np.uint8))
                for s in range(0, ti.nbytes, chunk):
                    mv = flat[s : s + chunk]
                    _readinto_exact(f, mv, sf.path)
                    hasher.update(mv)
                out[ti.name] = a
                pos = start + ti.nbytes
            while tail := f.read(chunk):
                hasher.update(tail)
        got = hasher.hexdigest()
    finally:
        hasher.close()
    if got != want_sha:
        raise _digest_error(sf.path, got, want_sha, man_path)
    if not _same_header(bytes(raw), sf):
        raise CheckpointError(f"{sf.path}: the file changed while it was read (replaced meanwhile?); load it again")
    return out


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_converted(
    out_dir: str | os.PathLike,
    layer_idx: int,
    *,
    mode: str | None = None,
    nibble_order: str | None = None,
    fingerprint: str | None = None,
    expert_format: str | None = None,
    config: DeepseekV4Config | None = None,
    verify: bool = True,
) -> tuple[bool, str]:
    """``(True, "")`` when layer ``layer_idx`` is completely converted in ``out_dir`` and agrees
    with every given expectation; else ``(False, reason)``. ``verify`` (default) re-hashes the
    data file and the manifest, so a re-run never skips a damaged layer; without it the schema,
    size, tensor table and binding metadata are still checked."""
    out_dir = os.fspath(out_dir)
    try:
        man, man_path = _read_manifest(out_dir, layer_idx, verify=verify)
        src = man["source"]
        for what, want, have in (
            ("mode", mode, man["mode"]),
            ("nibble order", nibble_order, src["nibble_order"]),
            ("expert format", expert_format, src["expert_format"]),
            ("source fingerprint", fingerprint, src["fingerprint"]),
            ("config", None if config is None else dataclasses.asdict(config), man["config"]),
        ):
            if want is not None and want != have:
                return False, f"{what} differs ({have!r} on disk, {want!r} wanted)"
        sf = _open_data(out_dir, man, man_path)
        sf.close()
        if verify and (got := _sha256_file(sf.path)) != man["file"]["sha256"]:
            raise _digest_error(sf.path, got, man["file"]["sha256"], man_path)
    except CheckpointError as e:
        return False, str(e)
    except OSError as e:
        return False, f"cannot read layer {layer_idx} in {out_dir} ({e})"
    return True, ""


def is_converted_dir(path: CheckpointSource, layer_idx: int) -> bool:
    """True when ``path`` is a folder holding a converted layer's manifest."""
    if isinstance(path, Checkpoint):
        return False
    p = os.fspath(path)
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, layer_file_names(layer_idx)[1]))


def load_converted(out_dir: str | os.PathLike, layer_idx: int, *, verify: bool = True) -> MoELayer:
    """A converted layer as an :class:`~jax_megamoe.checkpoint.MoELayer` (the same weights, gate
    and shared-expert parameters that :func:`jax_megamoe.checkpoint.load_moe_layer` gives).

    ``verify`` (default): the data file is read once into fresh arrays while it is hashed and
    the SHA-256 (and ``manifest_sha256``) must match the manifest before anything is returned
    (the cost is in the README). ``verify=False`` trusts the data: it is memory-mapped and copied;
    the manifest schema, size, tensor table and binding metadata are checked either way.
    """
    out_dir = os.fspath(out_dir)
    man, man_path = _read_manifest(out_dir, layer_idx, verify=verify)
    with _manifest_errors(man_path):
        cfg = _config_of(man, man_path)  # before reading gigabytes
    sf = _open_data(out_dir, man, man_path)
    try:
        if verify:
            arrays = _read_verified(sf, man["file"]["sha256"], man_path)
        else:
            arrays = {n: np.array(sf.get(n)) for n in man["tensors"]}
    except OSError as e:
        raise CheckpointError(f"{sf.path}: cannot read the file ({e})") from e
    finally:
        sf.close()
    with _manifest_errors(man_path):
        return _build_layer(man, cfg, arrays, out_dir)


@contextlib.contextmanager
def _manifest_errors(man_path: str) -> Iterator[None]:
    """Errors that well-typed but wrong manifest contents raise in constructors (an unknown config
    field, a report without ``lossy_experts``, dimensions the arrays do not have) as a
    :class:`CheckpointError` naming the manifest."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{man_path}: inconsistent manifest or data ({type(e).__name__}: {e})") from None


def _config_of(man: dict[str, Any], man_path: str) -> Any:
    """The manifest's DeepseekV4Config, checked against its kernel dimensions."""
    cfg = DeepseekV4Config(**man["config"])
    dims = man["weights"]
    for f, c in (
        ("hidden", "hidden_size"),
        ("intermediate", "moe_intermediate_size"),
        ("num_experts", "n_routed_experts"),
    ):
        if dims[f] != getattr(cfg, c):
            raise CheckpointError(
                f"{man_path}: field 'weights.{f}' is {dims[f]} but field 'config.{c}' is {getattr(cfg, c)!r}"
            )
    return cfg


def _build_layer(man: dict[str, Any], cfg: Any, arrays: dict[str, np.ndarray], out_dir: str) -> MoELayer:
    """The :class:`MoELayer` of a validated manifest, its config and its tensors."""
    dims = man["weights"]
    weights = MoEWeights(
        *(jnp.asarray(arrays[f"experts.{k}"]) for k in ("l1", "l1_sf", "l2", "l2_sf")),
        mode=man["mode"],
        hidden=dims["hidden"],
        intermediate=dims["intermediate"],
        num_experts=dims["num_experts"],
    ).validate()
    rep = man["conversion_report"]
    report = None if rep is None else ConversionReport(**{**rep, "lossy_experts": tuple(rep["lossy_experts"])})
    is_hash = man["is_hash_layer"]
    shared = None
    if "shared_experts.w1.weight" in arrays:
        shared = {}
        for proj in ("w1", "w2", "w3"):
            shared[proj] = arrays[f"shared_experts.{proj}.weight"]
            s = arrays[f"shared_experts.{proj}.scale"]
            shared[f"{proj}_scale"] = s.view(np.uint8) if s.dtype.itemsize == 1 else s
    return MoELayer(
        layer_idx=man["layer_idx"],
        config=cfg,
        mode=man["mode"],
        weights=weights,
        report=report,
        is_hash_layer=is_hash,
        gate_weight=arrays["gate.weight"],
        gate_bias=None if is_hash else arrays["gate.bias"],
        tid2eid=arrays["gate.tid2eid"] if is_hash else None,
        shared=shared,
        expert_format=man["source"]["expert_format"],
        nibble_order=man["source"]["nibble_order"],
        source=out_dir,
    )


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jax_megamoe.convert",
        description="Convert DeepSeek V4 MoE layers (safetensors) to jax_megamoe kernel layout on disk.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors.index.json + shards) or file")
    p.add_argument("--layers", required=True, help="'all', or indices and inclusive ranges: 3-5 or 0,2,7-9")
    p.add_argument(
        "--target", required=True, choices=sorted(TARGETS), help="sm90 (H100/H200, FP8) or sm100 (B200, FP4)"
    )
    p.add_argument("--mode", choices=("mxf4xmxf4", "fp8xfp4", "fp8"), help="kernel mode (sm100: default fp8xfp4)")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--nibble-order", default="low_even", choices=NIBBLE_ORDERS, help="FP4 packing of the checkpoint")
    p.add_argument("--config", help="JSON file with DeepseekV4Config fields (for checkpoints without config.json)")
    p.add_argument("--force", action="store_true", help="convert again even when a layer is complete")
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="re-hash existing outputs against their manifests before skipping them (default; --no-verify: "
        "check their size, header and metadata only)",
    )
    p.add_argument(
        "--experts-per-step", type=int, default=1, help="experts converted per step for sm90 (memory vs speed)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (0 ok, 1 a layer failed, 2 bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    allowed, default = TARGETS[args.target]
    mode = args.mode or default
    if mode not in allowed:
        parser.error(f"--mode {mode} does not run on --target {args.target} (allowed: {', '.join(allowed)})")
    progress = None if args.quiet else True

    def say(msg: str) -> None:
        one_line = " ".join(str(msg).split("\n"))
        print(f"jax_megamoe.convert: {one_line}", file=sys.stderr, flush=True)

    try:
        config = None
        if args.config:
            with open(args.config, "rb") as f:
                config = json.loads(f.read().decode("utf-8"))
            if not isinstance(config, dict):
                raise CheckpointError(f"{args.config}: --config must hold a JSON object of DeepseekV4Config fields")
        os.makedirs(args.out, exist_ok=True)
        for fn in _clean_stale_tmp(args.out):
            say(f"removed stale temporary file {fn}")
        with Checkpoint(args.checkpoint) as ck:
            try:
                layers = parse_layers(args.layers, list_moe_layers(ck))
            except ValueError as e:
                parser.error(str(e))
            done = skipped = 0
            t_all = time.perf_counter()
            for n, i in enumerate(layers):
                head = f"[{n + 1}/{len(layers)}] layer {i}"
                pre = layer_prefix(i)
                names = [k for k in ck.names() if k.startswith(f"{pre}ffn.")]
                fp = ck.fingerprint(names)
                cfg = infer_config(ck, i, config)
                fmt = _derive_dims(ck, pre).expert_format
                ok, why = check_converted(
                    args.out,
                    i,
                    mode=mode,
                    nibble_order=args.nibble_order,
                    fingerprint=fp,
                    expert_format=fmt,
                    config=cfg,
                    verify=args.verify and not args.force,
                )
                if ok and not args.force:
                    say(f"{head}: already converted ({'verified' if args.verify else 'not re-hashed'}), skipping")
                    skipped += 1
                    continue
                say(f"{head}: converting to {mode} ({'--force' if ok else why})")
                t0 = time.perf_counter()
                layer = build_moe_layer(
                    read_moe_layer(ck, i, config=cfg, nibble_order=args.nibble_order, progress=progress),
                    mode=mode,
                    progress=progress,
                    experts_per_step=args.experts_per_step,
                )
                man = write_converted_layer(args.out, layer, target=args.target, fingerprint=fp)
                del layer
                mib = man["file"]["size"] / 2**20
                say(f"{head}: wrote {man['file']['name']} ({mib:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
                if man["conversion_report"] is not None:
                    rep = man["conversion_report"]
                    say(
                        f"{head}: {ConversionReport(**{**rep, 'lossy_experts': tuple(rep['lossy_experts'])}).summary()}"
                    )
                done += 1
            say(f"done: {done} converted, {skipped} skipped, {time.perf_counter() - t_all:.1f}s")
    except (CheckpointError, ValueError, OSError) as e:  # one line, no traceback
        say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
