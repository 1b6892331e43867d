"""Integrity of what the checkpoint reader accepts (jax_megamoe.checkpoint, jax_megamoe.layout).

* Safetensors layout: sorted by offsets, the tensors must tile the data section exactly (no
  overlap or alias, no gap, no hidden trailing data), as the official ``safetensors`` reader
  demands; every hand-made case is also checked against that reader. A truncated shard keeps
  serving the tensors before the cut (the one place where this reader is deliberately looser).
* UE8M0 scale byte 0xFF (NaN in E8M0) is refused in files and in ``MoEWeights`` arguments, with
  the ``allow_nan_scales=True`` opt-out.
* Properties (hypothesis): a mutated header byte (or a scale byte set to 0xFF) either raises or
  leaves the layer exactly as it was; a changed data byte is read back exactly as stored (a
  source checkpoint has no checksum, so faithful reading is all that can be promised).

Synthetic V4 checkpoints come from the helpers of ``test_checkpoint.py``.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jax_megamoe import checkpoint as ckpt
from jax_megamoe.checkpoint import CheckpointError
from jax_megamoe.layout import MoEWeights

sys.path.insert(0, os.path.dirname(__file__))
from test_checkpoint import SHARDS, E, I, synth_checkpoint, write_safetensors_raw  # noqa: E402
from test_layout import random_checkpoint  # noqa: E402

safetensors = pytest.importorskip("safetensors")
from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def write_with_offsets(path, entries: dict, data: bytes, *, pad: int = 0) -> None:
    """A safetensors file with the ``data_offsets`` given as they are (``entries``: name ->
    ``(begin, end)`` of U8 tensors), ``pad`` spaces after the JSON, then ``data``."""
    header = {n: {"dtype": "U8", "shape": [e - b], "data_offsets": [b, e]} for n, (b, e) in entries.items()}
    hb = json.dumps(header).encode() + b" " * pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)


def official_accepts(path) -> bool:
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
        return True
    except SafetensorError:
        return False


def spans(path: str) -> dict[str, tuple[int, int]]:
    """``{tensor: (absolute file offset, nbytes)}`` of one shard, parsed independently of the library."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {
        k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
        for k, v in header.items()
        if k != "__metadata__"
    }


class poke:  # noqa: N801 - a context manager used like a function
    """Set byte ``pos`` of ``path`` to ``value`` for the duration of a ``with`` block."""

    def __init__(self, path: str, pos: int, value: int):
        self.path, self.pos, self.value = path, pos, value

    def __enter__(self) -> int:
        with open(self.path, "r+b") as f:
            f.seek(self.pos)
            self.old = f.read(1)[0]
            f.seek(self.pos)
            f.write(bytes([self.value]))
        return self.old

    def __exit__(self, *exc) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.pos)
            f.write(bytes([self.old]))


def layer_arrays(t: ckpt.MoELayerTensors) -> dict[str, np.ndarray]:
    d = {k: getattr(t, k) for k in ("w13", "w13_scale", "w2", "w2_scale", "gate_weight", "gate_bias", "tid2eid")}
    d.update({f"shared.{k}": v for k, v in (t.shared or {}).items()})
    return d


def assert_same_layer(got: ckpt.MoELayerTensors, want: ckpt.MoELayerTensors) -> None:
    assert (got.config, got.is_hash_layer, got.expert_format) == (want.config, want.is_hash_layer, want.expert_format)
    a, b = layer_arrays(got), layer_arrays(want)
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert (x is None) == (y is None), k
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, k
            np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8), err_msg=k)


def tensor_bytes(t: ckpt.MoELayerTensors, name: str) -> np.ndarray:
    """The flat uint8 view, inside ``t``, of checkpoint tensor ``name`` of layer 1."""
    rest = name.removeprefix("layers.1.ffn.")
    if rest.startswith("experts."):
        _, e, proj, kind = rest.split(".")
        e = int(e)
        if proj == "w2":
            a = (t.w2 if kind == "weight" else t.w2_scale)[e]
        else:
            a = (t.w13 if kind == "weight" else t.w13_scale)[e]
            a = a[:I] if proj == "w1" else a[I:]
    elif rest.startswith("shared_experts."):
        _, proj, kind = rest.split(".")
        a = t.shared[proj if kind == "weight" else f"{proj}_scale"]
    else:
        a = {"gate.weight": t.gate_weight, "gate.bias": t.gate_bias}[rest]
    assert a.flags.c_contiguous
    return a.reshape(-1).view(np.uint8)


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """A 2-layer synthetic checkpoint (layer 1 spans both shards), the clean read of layer 1, and
    where each tensor of layer 1 lies."""
    path, _ = synth_checkpoint(tmp_path_factory.mktemp("integrity") / "ckpt", 2, seed=7)
    where = {}
    for fn in SHARDS:
        for name, (start, n) in spans(os.path.join(path, fn)).items():
            where[name] = (os.path.join(path, fn), start, n)
    return path, ckpt.read_moe_layer(path, 1), where


# ------------------------------------------------------------------------------------------------
# data_offsets layout
# ------------------------------------------------------------------------------------------------

DATA = bytes(range(16))

LAYOUT_CASES = {
    # name: (entries, data, regex of our error (None: accepted), names the message must hold)
    "alias": (
        {"a": (0, 8), "b": (0, 8), "c": (8, 16)},
        DATA,
        r"overlap \(bytes \[0, 8\) are claimed by both\)",
        ["'a' data_offsets [0, 8]", "'b' data_offsets [0, 8]"],
    ),
    "partial_overlap": (
        {"a": (0, 8), "b": (4, 16)},
        DATA,
        r"overlap \(bytes \[4, 8\) are claimed by both\)",
        ["'a' data_offsets [0, 8]", "'b' data_offsets [4, 16]"],
    ),
    "empty_inside": ({"a": (0, 8), "z": (3, 3), "b": (8, 16)}, DATA, r"the empty 'z' sits inside 'a'", ["'z'"]),
    "gap": (
        {"a": (0, 8), "b": (9, 16)},
        DATA,
        r"1 bytes \[8, 9\) between the end of tensor 'a' data_offsets \[0, 8\] "
        r"and tensor 'b' data_offsets \[9, 16\] belong to no tensor",
        [],
    ),
    "gap_at_start": (
        {"a": (2, 16)},
        DATA,
        r"2 bytes \[0, 2\) between the start of the data section and tensor 'a'",
        [],
    ),
    "empty_past_end": ({"a": (0, 16), "z": (20, 20)}, DATA, r"4 bytes \[16, 20\) between .*'a'.* and tensor 'z'", []),
    "trailing": (
        {"a": (0, 8), "b": (8, 12)},
        DATA,
        r"4 bytes of hidden trailing data after tensor 'b' data_offsets "
        r"\[8, 12\]: the data section holds 16 bytes",
        [],
    ),
    "no_tensors_but_data": ({}, DATA, r"16 bytes of hidden trailing data after a header listing no data", []),
    # accepted: JSON key order is free, zero-byte tensors at any boundary (start, middle, end)
    "keys_out_of_order": ({"b": (8, 16), "a": (0, 8)}, DATA, None, []),
    "empty_at_boundaries": (
        {"z0": (0, 0), "a": (0, 8), "z1": (8, 8), "z2": (8, 8), "b": (8, 16), "z3": (16, 16)},
        DATA,
        None,
        [],
    ),
    "empty_file": ({"z": (0, 0)}, b"", None, []),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layout_rules_match_the_official_reader(tmp_path, case):
    entries, data, msg, names = LAYOUT_CASES[case]
    p = tmp_path / f"{case}.safetensors"
    write_with_offsets(p, entries, data)
    assert official_accepts(p) == (msg is None), "the official safetensors reader disagrees"
    if msg is None:
        sf = ckpt.SafetensorsFile(p)
        for n, (b, e) in entries.items():
            assert sf.get(n).tobytes() == data[b:e], n
        return
    with pytest.raises(CheckpointError, match=msg) as ei:
        ckpt.SafetensorsFile(p)
    assert str(p) in str(ei.value) and ("corrupt" in str(ei.value) or "exactly covered" in str(ei.value))
    for n in names:
        assert n in str(ei.value), (n, str(ei.value))


def test_aliased_tensors_in_a_checkpoint_name_the_tensors_and_file(tmp_path):
    """Two expert scales pointing at the same bytes would load as two (equal) tensors."""
    p = tmp_path / "alias.safetensors"
    write_safetensors_raw(
        p, {"x.w1.scale": ("U8", np.arange(8, dtype=np.uint8)), "x.w3.scale": ("U8", np.arange(8, dtype=np.uint8))}
    )
    with open(p, "r+b") as f:  # point the second at the first one's bytes, same header length
        (n,) = struct.unpack("<Q", f.read(8))
        hb = f.read(n).replace(b'"data_offsets": [8, 16]', b'"data_offsets": [0,  8 ]')
        f.seek(8)
        f.write(hb)
    with pytest.raises(
        CheckpointError,
        match=r"tensors 'x.w1.scale' data_offsets \[0, 8\] and 'x.w3.scale' data_offsets \[0, 8\] overlap",
    ) as ei:
        ckpt.Checkpoint(str(p))
    assert str(p) in str(ei.value)
    assert not official_accepts(p)


def test_header_length_shrunk_into_its_padding_is_hidden_trailing_data(tmp_path):
    """A header length 3 short still parses (the padding spaces absorb it), but then every tensor
    would be read 3 bytes early; the 3 bytes left over at the end give it away."""
    p = tmp_path / "short_len.safetensors"
    write_with_offsets(p, {"a": (0, 8), "b": (8, 16)}, DATA, pad=5)
    with open(p, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(0)
        f.write(struct.pack("<Q", n - 3))
    with pytest.raises(CheckpointError, match=r"3 bytes of hidden trailing data after tensor 'b'"):
        ckpt.SafetensorsFile(p)
    assert not official_accepts(p)


def test_truncated_shard_still_serves_tensors_before_the_cut(tmp_path):
    p = tmp_path / "cut.safetensors"
    write_with_offsets(p, {"a": (0, 4), "b": (4, 8), "c": (8, 16)}, DATA)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 5)
    assert not official_accepts(p)  # the official reader refuses the whole file
    sf = ckpt.SafetensorsFile(p)
    assert sf.get("a").tobytes() == DATA[:4] and sf.get("b").tobytes() == DATA[4:8]
    with pytest.raises(
        CheckpointError, match=r"'c' in .*data_offsets \[8, 16\] lie past the end of the file.*truncated"
    ):
        sf.get("c")


def test_files_of_the_official_writer_load(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {  # names out of alphabetical and offset order, several dtypes, zero-size tensors
        "zz.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "aa.u8": rng.integers(0, 256, 7, dtype=np.uint8),
        "mm.empty_i64": np.zeros((0, 4), np.int64),
        "bb.f16": rng.standard_normal(9).astype(np.float16),
        "cc.i8": rng.integers(-128, 128, (2, 3), dtype=np.int8),
        "dd.bool": rng.random(5) > 0.5,
        "ee.empty_u8": np.zeros((0,), np.uint8),
        "ff.i32": rng.integers(-9, 9, (1, 1, 3), dtype=np.int32),
        "gg.scalar_f64": np.array(2.5, np.float64),
    }
    p = tmp_path / "lib.safetensors"
    save_file(arrays, str(p), metadata={"format": "np"})
    sf = ckpt.SafetensorsFile(p)
    assert sf.metadata == {"format": "np"} and set(sf.tensors) == set(arrays)
    for k, a in arrays.items():
        got = sf.get(k)
        assert got.dtype == np.asarray(a).dtype and got.shape == np.shape(a), k
        np.testing.assert_array_equal(got, a, err_msg=k)


def test_files_of_the_converter_writer_load(tmp_path):
    from jax_megamoe._src.io import convert

    rng = np.random.default_rng(1)
    arrays = {
        "experts.l1": rng.integers(0, 256, (2, 64, 32), dtype=np.uint8),
        "experts.l1_sf": rng.integers(-(2**31), 2**31, (2, 1, 64), dtype=np.int32),
        "empty": np.zeros((0, 3), np.float32),
        "shared.w": rng.standard_normal((4, 8)).astype(ml_dtypes.float8_e4m3fn),
        "shared.s": rng.integers(100, 130, (4,), dtype=np.uint8).view(E8M0),
    }
    p = tmp_path / "conv.safetensors"
    convert.write_safetensors(p, arrays, {"k": "v"})
    assert official_accepts(p)
    sf = ckpt.SafetensorsFile(p)
    for k, a in arrays.items():
        np.testing.assert_array_equal(sf.get(k).reshape(-1).view(np.uint8), a.reshape(-1).view(np.uint8), err_msg=k)


def test_synthetic_v4_shards_pass_the_official_reader(v4):
    path, _, _ = v4
    for fn in SHARDS:
        assert official_accepts(os.path.join(path, fn)), fn


# ------------------------------------------------------------------------------------------------
# UE8M0 0xFF (NaN) scales
# ------------------------------------------------------------------------------------------------


def _set_bytes(fpath: str, start: int, offsets: list[int], value: int) -> None:
    with open(fpath, "r+b") as f:
        for o in offsets:
            f.seek(start + o)
            f.write(bytes([value]))


@pytest.mark.parametrize("dtype", ["F8_E8M0", "U8"])
def test_nan_routed_scale_in_a_file_is_refused_with_its_position(tmp_path, dtype):
    path, truths = synth_checkpoint(tmp_path / "c", 2, seed=3)
    name = "layers.1.ffn.experts.6.w3.scale"  # [I, H/32] = [256, 16], in the second shard
    if dtype == "U8":  # re-declare every routed scale U8 (same bytes, same header length)
        for fn in SHARDS:
            fp = os.path.join(path, fn)
            with open(fp, "r+b") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                hb = f.read(n)
                f.seek(8)
                f.write(
                    hb.replace(b'"dtype": "F8_E8M0", "shape": [256, 16]', b'"dtype": "U8", "shape": [256, 16]     ')
                )
    fpath = os.path.join(path, SHARDS[1])
    start, _ = spans(fpath)[name]
    _set_bytes(fpath, start, [17 * 16 + 3, 40 * 16 + 1, 255 * 16 + 15], 0xFF)  # [17, 3] first in row-major order
    for load in (ckpt.read_moe_layer, lambda p, i: ckpt.load_moe_layer(p, i, mode="fp8xfp4")):
        with pytest.raises(CheckpointError) as ei:
            load(path, 1)
        msg = str(ei.value)
        for part in (
            repr(name),
            fpath,
            "3 UE8M0 scale bytes are 0xFF",
            "expert 6, row 17, col 3",
            "allow_nan_scales=True",
        ):
            assert part in msg, (part, msg)
    ckpt.read_moe_layer(path, 0)  # layer 0 is untouched
    # The opt-out loads the bytes exactly as stored.
    t = ckpt.read_moe_layer(path, 1, allow_nan_scales=True)
    assert t.w13_scale[6, I + 17, 3] == 0xFF and t.w13_scale[6, I + 255, 15] == 0xFF
    want = truths[1].w13_scale.copy()
    want[6, I + 17, 3] = want[6, I + 40, 1] = want[6, I + 255, 15] = 0xFF
    np.testing.assert_array_equal(t.w13_scale, want)
    layer = ckpt.load_moe_layer(path, 1, mode="mxf4xmxf4", allow_nan_scales=True)
    np.testing.assert_array_equal(np.asarray(layer.weights.to_checkpoint()[1]), want)


def test_nan_shared_block_scale_in_a_file_is_refused(tmp_path):
    path, _ = synth_checkpoint(tmp_path / "c", 2, seed=4)
    name = "layers.1.ffn.shared_experts.w2.scale"  # F8_E8M0 [H/128, I_s/128] = [4, 2]
    ((fpath, start, _),) = [
        (os.path.join(path, fn), *spans(os.path.join(path, fn))[name])
        for fn in SHARDS
        if name in spans(os.path.join(path, fn))
    ]
    _set_bytes(fpath, start, [2 * 2 + 1], 0xFF)
    with pytest.raises(
        CheckpointError, match=r"1 UE8M0 scale bytes are 0xFF .* the first at row 2, col 1; pass allow_nan_scales=True"
    ) as ei:
        ckpt.read_moe_layer(path, 1)
    assert repr(name) in str(ei.value) and fpath in str(ei.value)
    t = ckpt.read_moe_layer(path, 1, allow_nan_scales=True)
    assert t.shared["w2_scale"][2, 1] == 0xFF


@pytest.mark.parametrize("mode", ["fp8xfp4", "mxf4xmxf4", "fp8"])
@pytest.mark.parametrize("kind", ["numpy", "e8m0", "jax"])
def test_nan_scale_arguments_of_from_checkpoint_are_refused(mode, kind):
    h = 512 if mode == "fp8" else 256
    w13, s13, w2, s2 = random_checkpoint(np.random.default_rng(5), 2, h, 256, lo=110, hi=130)
    s2 = s2.copy()
    s2[1, 5, 2] = s2[1, 9, 0] = 0xFF
    conv = {"numpy": lambda a: a, "e8m0": lambda a: a.view(E8M0), "jax": jnp.asarray}[kind]
    args = (w13, conv(s13), w2, conv(s2))
    for build in (MoEWeights.from_checkpoint, lambda *a, **k: MoEWeights.from_checkpoint_with_report(*a, **k)[0]):
        with pytest.raises(
            ValueError,
            match=r"^w2_scale: 2 UE8M0 scale bytes are 0xFF \(NaN in E8M0.*the first at "
            r"expert 1, row 5, col 2; pass allow_nan_scales=True to MoEWeights.from_checkpoint",
        ):
            build(*args, mode=mode)
    w = MoEWeights.from_checkpoint(*args, mode=mode, allow_nan_scales=True)
    if mode != "fp8":
        np.testing.assert_array_equal(np.asarray(w.to_checkpoint()[3]), s2)
    # Under jit the scales are tracers: nothing to look at, so no check (documented).
    jax.jit(lambda *a: MoEWeights.from_checkpoint(*a, mode=mode))(w13, s13, w2, s2)


def test_validate_scans_numpy_scale_leaves():
    ck = random_checkpoint(np.random.default_rng(6), 2, 256, 256)
    w = MoEWeights.from_checkpoint(*ck, mode="fp8xfp4")
    host = jax.tree_util.tree_map(np.array, w)  # hand-built / host-side weights: numpy leaves
    assert host.validate() is host
    host.l2_sf.view(np.uint8).reshape(*host.l2_sf.shape, 4)[1, 0, 7, 2] = 0xFF
    with pytest.raises(
        ValueError,
        match=r"^weights.l2_sf: 1 UE8M0 scale bytes .* expert 1, K/128 word 0, MN row \(kernel order\) 7, byte 2",
    ):
        host.validate()
    with pytest.raises(ValueError, match=r"^weights.l2_sf"):
        host.validate_for("fp8xfp4", hidden=256)
    assert host.validate(allow_nan_scales=True) is host
    assert host.validate_for("fp8xfp4", allow_nan_scales=True) is host
    dev = jax.tree_util.tree_map(jnp.asarray, host)  # jax.Array leaves are not scanned (no sync per op call)
    assert dev.validate() is dev


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------

_PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPS
@given(data=st.data())
def test_header_mutation_is_refused_or_harmless(v4, data):
    """One changed byte: in the 8-byte length, anywhere in the JSON (biased to printable ASCII so
    that it often still parses), in a digit (offsets and shapes), in a space (often harmless), or
    a scale byte of the layer set to 0xFF (always refused)."""
    path, clean, where = v4
    kind = data.draw(st.sampled_from(["length", "byte", "digit", "digit", "space", "nan_scale"]), label="kind")
    if kind == "nan_scale":
        names = sorted(n for n in where if n.startswith("layers.1.") and n.endswith(".scale"))
        fpath, start, n = where[data.draw(st.sampled_from(names), label="tensor")]
        pos, value = start + data.draw(st.integers(0, n - 1), label="offset"), 0xFF
    else:
        fpath = os.path.join(path, data.draw(st.sampled_from(SHARDS), label="shard"))
        with open(fpath, "rb") as f:
            (hn,) = struct.unpack("<Q", f.read(8))
            header = f.read(hn)
        if kind == "length":
            pos, value = data.draw(st.integers(0, 7), label="pos"), data.draw(st.integers(0, 255), label="value")
        elif kind == "byte":
            pos = 8 + data.draw(st.integers(0, hn - 1), label="pos")
            value = data.draw(st.one_of(st.integers(32, 126), st.integers(0, 255)), label="value")
        else:
            sel, chars = (b"0123456789", b"0123456789") if kind == "digit" else (b" ", b" \t\n\r")
            at = [i for i, c in enumerate(header) if c in sel]
            pos = 8 + data.draw(st.sampled_from(at), label="pos")
            value = data.draw(st.sampled_from(list(chars)), label="value")
    with poke(fpath, pos, value) as old:
        try:
            got = ckpt.read_moe_layer(path, 1)
        except (CheckpointError, ValueError):
            event(f"{kind}: refused")
            return
    assert kind != "nan_scale", "a 0xFF scale byte was accepted"
    event(f"{kind}: harmless" + (" (unchanged byte)" if old == value else ""))
    assert_same_layer(got, clean)


@_PROPS
@given(data=st.data())
def test_data_byte_change_is_read_faithfully(v4, data):
    """No checksum protects a source checkpoint; what the reader promises is to return exactly
    the stored bytes (here: one changed data byte of any tensor of the layer shows up where it
    belongs and nowhere else)."""
    path, clean, where = v4
    names = sorted(n for n in where if n.startswith("layers.1.") and "attn_norm" not in n)
    name = data.draw(st.sampled_from(names), label="tensor")
    fpath, start, n = where[name]
    off = data.draw(st.integers(0, n - 1), label="offset")
    value = data.draw(st.integers(0, 254 if name.endswith(".scale") else 255), label="value")
    with poke(fpath, start + off, value):
        got = ckpt.read_moe_layer(path, 1)
        with open(fpath, "rb") as f:
            f.seek(start)
            stored = np.frombuffer(f.read(n), np.uint8)
    assert tensor_bytes(got, name).tobytes() == stored.tobytes()
    want = copy.deepcopy(clean)
    tensor_bytes(want, name)[off] = value
    assert_same_layer(got, want)


def test_from_checkpoint_passes_allow_nan_scales(tmp_path):
    """The model entry (DeepseekV4MoE.from_checkpoint -> load_moe_block) refuses 0xFF by default and
    forwards the opt-out."""
    from jax_megamoe.models.deepseek_v4 import BlockLoadOptions, DeepseekV4MoE

    path, _ = synth_checkpoint(tmp_path / "c", 2, seed=5)
    name = "layers.1.ffn.experts.2.w1.scale"
    fpath = next(os.path.join(path, fn) for fn in SHARDS if name in spans(os.path.join(path, fn)))
    _set_bytes(fpath, spans(fpath)[name][0], [5], 0xFF)
    with pytest.raises(CheckpointError, match=r"experts\.2\.w1\.scale.*0xFF.*allow_nan_scales=True"):
        DeepseekV4MoE.from_checkpoint(path, 1, mode="fp8xfp4")
    block = DeepseekV4MoE.from_checkpoint(path, 1, mode="fp8xfp4", load_options=BlockLoadOptions(allow_nan_scales=True))
    assert block.config.n_routed_experts == E
