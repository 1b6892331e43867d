"""Convert DeepSeek V4 MoE layers to kernel layout on disk, so serving starts without conversion.

Command line::

    python -m jax_megamoe.convert CHECKPOINT_DIR --layers 3-5 --target sm90|sm100 \\
        [--mode mxf4xmxf4|fp8xfp4] --out DIR [--nibble-order low_even|high_even] \\
        [--config CONFIG.json] [--force] [--verify] [--quiet]

``--layers``: ``all``, or indices and inclusive ranges (``3-5``, ``0,2,7-9``). ``--target sm90``
gives mode ``fp8`` (FP4 experts converted to FP8 128x128; the conversion report is printed and
stored); ``--target sm100`` gives ``--mode`` (default ``fp8xfp4``, W4A8). ``--config`` supplies
DeepseekV4Config fields (JSON object) for checkpoints without a ``config.json``.
``--verify`` re-hashes existing outputs before skipping them. Exit status: 0 on success, 1 when a
layer could not be read or written (the message names the tensor and the file), 2 for bad
arguments.

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
                            fingerprint of the source tensors' header entries and shard sizes).

A layer counts as converted only when its manifest exists and agrees with the requested mode,
nibble order, config and source fingerprint, and the data file has the recorded size and
tensors (``--verify``: and hash). Re-running skips such layers. Every file is written to a
temporary name in the output folder (``.layer_NNN.*.<pid>.tmp``), fsynced, and renamed over the
final name with ``os.replace``; a layer's old manifest is deleted before its data file is
replaced and the new manifest is written last, so an interrupted run leaves complete layers
intact and never a manifest that points at other data. A failed write removes its temporary file;
temporary files of dead processes (e.g. after a kill) are removed at the next start.

Load a converted layer with :func:`load_converted` (or ``DeepseekV4MoE.from_checkpoint(DIR,
layer_idx)``, which recognises converted folders).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_megamoe import checkpoint as _ck
from jax_megamoe.checkpoint import CheckpointError, MoELayer, SafetensorsFile

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TARGETS",
    "layer_file_names",
    "parse_layers",
    "write_safetensors",
    "write_converted_layer",
    "check_converted",
    "is_converted_dir",
    "load_converted",
    "main",
]

FORMAT = "jax_megamoe.converted_moe_layer"
FORMAT_VERSION = 1
#: ``--target`` -> (allowed modes, default mode).
TARGETS = {"sm90": (("fp8",), "fp8"), "sm100": (("fp8xfp4", "mxf4xmxf4"), "fp8xfp4")}
_CHUNK = 64 << 20
_TMP_RE = re.compile(r"^\.(layer_\d+\.(?:safetensors|json))\.(\d+)\.tmp$")


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
        header[name] = {"dtype": _ck.safetensors_dtype(a.dtype), "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
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
    import ml_dtypes

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
        os.path.join(out_dir, data_name), tensors, {"format": FORMAT, "layer_idx": str(layer.layer_idx), "mode": layer.mode}
    )
    w = layer.weights
    from jax_megamoe import __version__
    from jax_megamoe import config as _cfg

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layer_idx": layer.layer_idx,
        "mode": layer.mode,
        "target": target or ("sm90" if _cfg.arch_of_mode(layer.mode) == 9 else "sm100"),
        "is_hash_layer": layer.is_hash_layer,
        "config": dataclasses.asdict(layer.config),
        "weights": {"hidden": w.hidden, "intermediate": w.intermediate, "num_experts": w.num_experts},
        "tensors": {k: {"dtype": _ck.safetensors_dtype(a.dtype), "shape": list(a.shape)} for k, a in tensors.items()},
        "file": {"name": data_name, "size": size, "sha256": digest},
        "conversion_report": _report_dict(layer.report),
        "source": {"path": layer.source, **_source_key(layer.expert_format, layer.nibble_order, fingerprint)},
        "jax_megamoe_version": __version__,
        "created_unix": time.time(),
    }
    _write_json(man_path, manifest)
    return manifest


def _read_manifest(out_dir: str, layer_idx: int) -> tuple[dict[str, Any], str]:
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
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise CheckpointError(f"{man_path}: not a {FORMAT} manifest")
    if man.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{man_path}: manifest version {man.get('version')!r}, this library reads {FORMAT_VERSION}")
    if man.get("layer_idx") != layer_idx:
        raise CheckpointError(f"{man_path}: the manifest is for layer {man.get('layer_idx')!r}, not {layer_idx}")
    return man, man_path


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _open_data(out_dir: str, man: dict[str, Any], man_path: str, verify: bool) -> SafetensorsFile:
    fi = man.get("file") or {}
    data_path = os.path.join(out_dir, str(fi.get("name")))
    if not os.path.isfile(data_path):
        raise CheckpointError(f"{data_path}: missing (listed by {man_path})")
    size = os.path.getsize(data_path)
    if size != fi.get("size"):
        raise CheckpointError(f"{data_path}: {size} bytes but {man_path} records {fi.get('size')} (truncated or replaced)")
    if verify and _sha256_file(data_path) != fi.get("sha256"):
        raise CheckpointError(f"{data_path}: SHA-256 differs from the one in {man_path} (corrupt or replaced)")
    sf = SafetensorsFile(data_path)
    tensors = man.get("tensors") or {}
    for name, spec in tensors.items():
        if name not in sf:
            raise CheckpointError(f"tensor {name!r} is missing from {data_path} (listed by {man_path})")
        ti = sf.check(name)
        if ti.dtype != spec.get("dtype") or list(ti.shape) != list(spec.get("shape", [])):
            raise CheckpointError(
                f"tensor {name!r} in {data_path}: {ti.dtype}{list(ti.shape)} but {man_path} records "
                f"{spec.get('dtype')}{spec.get('shape')}"
            )
    return sf


def check_converted(
    out_dir: str | os.PathLike,
    layer_idx: int,
    *,
    mode: str | None = None,
    nibble_order: str | None = None,
    fingerprint: str | None = None,
    expert_format: str | None = None,
    config: Any = None,
    verify: bool = False,
) -> tuple[bool, str]:
    """``(True, "")`` when layer ``layer_idx`` is completely converted in ``out_dir`` and agrees
    with every given expectation; else ``(False, reason)``."""
    out_dir = os.fspath(out_dir)
    try:
        man, man_path = _read_manifest(out_dir, layer_idx)
        src = man.get("source") or {}
        for what, want, have in (
            ("mode", mode, man.get("mode")),
            ("nibble order", nibble_order, src.get("nibble_order")),
            ("expert format", expert_format, src.get("expert_format")),
            ("source fingerprint", fingerprint, src.get("fingerprint")),
            ("config", None if config is None else dataclasses.asdict(config), man.get("config")),
        ):
            if want is not None and want != have:
                return False, f"{what} differs ({have!r} on disk, {want!r} wanted)"
        _open_data(out_dir, man, man_path, verify).close()
    except CheckpointError as e:
        return False, str(e)
    return True, ""


def is_converted_dir(path: Any, layer_idx: int) -> bool:
    """True when ``path`` is a folder holding a converted layer's manifest."""
    if isinstance(path, _ck.Checkpoint):
        return False
    p = os.fspath(path)
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, layer_file_names(layer_idx)[1]))


def load_converted(out_dir: str | os.PathLike, layer_idx: int, *, verify: bool = False) -> MoELayer:
    """A converted layer as an :class:`~jax_megamoe.checkpoint.MoELayer` (the same weights, gate
    and shared-expert parameters that :func:`jax_megamoe.checkpoint.load_moe_layer` gives).
    ``verify`` re-hashes the data file against the manifest first."""
    import jax.numpy as jnp

    from jax_megamoe.layout import ConversionReport, MoEWeights
    from jax_megamoe.models.deepseek_v4 import DeepseekV4Config

    out_dir = os.fspath(out_dir)
    man, man_path = _read_manifest(out_dir, layer_idx)
    sf = _open_data(out_dir, man, man_path, verify)
    try:
        def get(name: str) -> np.ndarray:
            return np.array(sf.get(name))

        try:
            cfg = DeepseekV4Config(**man["config"])
            dims = man["weights"]
            weights = MoEWeights(
                *(jnp.asarray(get(f"experts.{k}")) for k in ("l1", "l1_sf", "l2", "l2_sf")),
                mode=man["mode"],
                hidden=int(dims["hidden"]),
                intermediate=int(dims["intermediate"]),
                num_experts=int(dims["num_experts"]),
            ).validate()
            rep = man.get("conversion_report")
            report = None if rep is None else ConversionReport(**{**rep, "lossy_experts": tuple(rep["lossy_experts"])})
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{man_path}: inconsistent manifest or data ({e})") from None
        is_hash = bool(man.get("is_hash_layer"))
        shared = None
        if "shared_experts.w1.weight" in sf:
            shared = {}
            for proj in ("w1", "w2", "w3"):
                shared[proj] = get(f"shared_experts.{proj}.weight")
                s = get(f"shared_experts.{proj}.scale")
                shared[f"{proj}_scale"] = s.view(np.uint8) if s.dtype.itemsize == 1 else s
        src = man.get("source") or {}
        return MoELayer(
            layer_idx=layer_idx,
            config=cfg,
            mode=man["mode"],
            weights=weights,
            report=report,
            is_hash_layer=is_hash,
            gate_weight=get("gate.weight"),
            gate_bias=None if is_hash else get("gate.bias"),
            tid2eid=get("gate.tid2eid") if is_hash else None,
            shared=shared,
            expert_format=src.get("expert_format", "fp4"),
            nibble_order=src.get("nibble_order", "low_even"),
            source=out_dir,
        )
    finally:
        sf.close()


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
    p.add_argument("--target", required=True, choices=sorted(TARGETS), help="sm90 (H100/H200, FP8) or sm100 (B200, FP4)")
    p.add_argument("--mode", choices=("mxf4xmxf4", "fp8xfp4", "fp8"), help="kernel mode (sm100: default fp8xfp4)")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--nibble-order", default="low_even", choices=_ck.NIBBLE_ORDERS, help="FP4 packing of the checkpoint")
    p.add_argument("--config", help="JSON file with DeepseekV4Config fields (for checkpoints without config.json)")
    p.add_argument("--force", action="store_true", help="convert again even when a layer is complete")
    p.add_argument("--verify", action="store_true", help="re-hash existing outputs before skipping them")
    p.add_argument("--experts-per-step", type=int, default=1, help="experts converted per step for sm90 (memory vs speed)")
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
        print(f"jax_megamoe.convert: {msg}", file=sys.stderr, flush=True)

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
        with _ck.Checkpoint(args.checkpoint) as ck:
            try:
                layers = parse_layers(args.layers, _ck.list_moe_layers(ck))
            except ValueError as e:
                parser.error(str(e))
            done = skipped = 0
            t_all = time.perf_counter()
            for n, i in enumerate(layers):
                head = f"[{n + 1}/{len(layers)}] layer {i}"
                pre = _ck.layer_prefix(i)
                names = [k for k in ck.names() if k.startswith(f"{pre}ffn.")]
                fp = ck.fingerprint(names)
                cfg = _ck.infer_config(ck, i, config)
                fmt = _ck._derive_dims(ck, pre).expert_format
                ok, why = check_converted(
                    args.out, i, mode=mode, nibble_order=args.nibble_order, fingerprint=fp,
                    expert_format=fmt, config=cfg, verify=args.verify,
                )
                if ok and not args.force:
                    say(f"{head}: already converted, skipping")
                    skipped += 1
                    continue
                say(f"{head}: converting to {mode} ({'--force' if ok else why})")
                t0 = time.perf_counter()
                layer = _ck.load_moe_layer(
                    ck, i, mode=mode, config=cfg, nibble_order=args.nibble_order, progress=progress,
                    experts_per_step=args.experts_per_step,
                )
                man = write_converted_layer(args.out, layer, target=args.target, fingerprint=fp)
                del layer
                mib = man["file"]["size"] / 2**20
                say(f"{head}: wrote {man['file']['name']} ({mib:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
                if man["conversion_report"] is not None:
                    from jax_megamoe.layout import ConversionReport

                    rep = man["conversion_report"]
                    say(f"{head}: {ConversionReport(**{**rep, 'lossy_experts': tuple(rep['lossy_experts'])}).summary()}")
                done += 1
            say(f"done: {done} converted, {skipped} skipped, {time.perf_counter() - t_all:.1f}s")
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
