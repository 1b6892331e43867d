"""Loading DeepSeek V4 MoE layers from safetensors checkpoints (jax_megamoe.checkpoint).

The checkpoints here are synthetic but use the exact V4 tensor names, dtypes (I8 packed FP4,
F8_E8M0 scales, F8_E4M3 shared expert, BF16 gate, F32 bias, I64 tid2eid) and shape rules, scaled
down (H=512, I=256, E=8, K=4, vocab 64), sharded into two files with an index. The safetensors files
are written by :func:`write_safetensors_raw` below (header + raw bytes), not by the library, so the
dtypes on disk are exactly the ones V4 uses; the writer itself is checked against the
``safetensors`` package for the dtypes that package handles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jax_megamoe import checkpoint as ckpt
from jax_megamoe._src.io import safetensors_reader as _st
from jax_megamoe._src.io import v4_checkpoint as _v4
from jax_megamoe._src.numerics import progress as _progress
from jax_megamoe.checkpoint import CheckpointError
from jax_megamoe.layout import MoEWeights
from jax_megamoe.models import deepseek_v4 as dsv4
from jax_megamoe.models.deepseek_v4 import DeepseekV4Config, DeepseekV4MoE, MoEBlockOptions

E, H, I, K, VOCAB = 8, 512, 256, 4, 64
CFG = DeepseekV4Config(
    hidden_size=H,
    moe_intermediate_size=I,
    n_routed_experts=E,
    num_experts_per_tok=K,
    n_shared_experts=1,
    routed_scaling_factor=1.5,
    swiglu_limit=10.0,
    num_hash_layers=1,
    vocab_size=VOCAB,
)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
BF16 = np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------------------------------------
# Synthetic V4 checkpoints
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerTruth:
    """What one layer holds, canonical (low nibble = even K); FP8 experts when ``fp8`` is set."""

    w13: np.ndarray
    w13_scale: np.ndarray
    w2: np.ndarray
    w2_scale: np.ndarray
    gate_weight: np.ndarray
    bias: np.ndarray | None
    tid2eid: np.ndarray | None
    shared: dict
    fp8: dict | None = None  # {"w13", "w13_scale", "w2", "w2_scale"} float8 / f32 (FP8 experts)


def _fp8_block(rng, n, k):
    q = (rng.standard_normal((n, k)) * 40).astype(E4M3)
    s = rng.integers(115, 125, (n // 128, k // 128)).astype(np.uint8)
    return q, s


def synth_layers(
    num_layers: int, seed: int = 0, *, cfg: DeepseekV4Config = CFG, expert_format: str = "fp4"
) -> list[LayerTruth]:
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(num_layers):
        ck = dsv4.random_moe_checkpoint(cfg, 100 + seed * 10 + layer)
        gw = (rng.standard_normal((E, H)) / np.sqrt(H)).astype(BF16)
        if cfg.is_hash_layer(layer):
            tid = np.stack([rng.permutation(E)[:K] for _ in range(VOCAB)]).astype(np.int64)
            bias = None
        else:
            tid = None
            bias = (rng.standard_normal(E) * 0.3).astype(np.float32)
        si = cfg.shared_intermediate_size
        shared = {}
        for proj, shape in (("w1", (si, H)), ("w2", (H, si)), ("w3", (si, H))):
            shared[proj], shared[f"{proj}_scale"] = _fp8_block(rng, *shape)
        fp8 = None
        if expert_format == "fp8":
            w13, s13 = zip(*(_fp8_block(rng, 2 * I, H) for _ in range(E)))
            w2, s2 = zip(*(_fp8_block(rng, H, I) for _ in range(E)))
            f = lambda s: np.ldexp(np.float32(1), np.stack(s).astype(np.int32) - 127).astype(np.float32)  # noqa: E731
            fp8 = dict(w13=np.stack(w13), w13_scale=f(s13), w2=np.stack(w2), w2_scale=f(s2))
        out.append(LayerTruth(*ck, gw, bias, tid, shared, fp8))
    return out


def layer_tensors(t: LayerTruth, idx: int, *, nibble_order: str = "low_even") -> dict:
    """``{name: (safetensors dtype, array)}`` with the exact V4 names of layer ``idx``."""
    p = f"layers.{idx}."
    d = {p + "attn_norm.weight": ("BF16", np.ones(H, BF16)), p + "ffn.gate.weight": ("BF16", t.gate_weight)}
    if t.tid2eid is not None:
        d[p + "ffn.gate.tid2eid"] = ("I64", t.tid2eid)
    else:
        d[p + "ffn.gate.bias"] = ("F32", t.bias)
    for e in range(E):
        b = f"{p}ffn.experts.{e}."
        if t.fp8 is not None:
            w13, s13, w2, s2 = (t.fp8[k][e] for k in ("w13", "w13_scale", "w2", "w2_scale"))
            d[b + "w1.weight"], d[b + "w1.scale"] = ("F8_E4M3", w13[:I]), ("F32", s13[: I // 128])
            d[b + "w3.weight"], d[b + "w3.scale"] = ("F8_E4M3", w13[I:]), ("F32", s13[I // 128 :])
            d[b + "w2.weight"], d[b + "w2.weight_scale_inv"] = ("F8_E4M3", w2), ("F32", s2)
            continue
        pk = (lambda a: ckpt.swap_nibbles(a)) if nibble_order == "high_even" else (lambda a: a)
        d[b + "w1.weight"] = ("I8", pk(t.w13[e, :I]).view(np.int8))
        d[b + "w1.scale"] = ("F8_E8M0", t.w13_scale[e, :I])
        d[b + "w3.weight"] = ("I8", pk(t.w13[e, I:]).view(np.int8))
        d[b + "w3.scale"] = ("F8_E8M0", t.w13_scale[e, I:])
        d[b + "w2.weight"] = ("I8", pk(t.w2[e]).view(np.int8))
        d[b + "w2.scale"] = ("F8_E8M0", t.w2_scale[e])
    for proj in ("w1", "w2", "w3"):
        d[f"{p}ffn.shared_experts.{proj}.weight"] = ("F8_E4M3", t.shared[proj])
        d[f"{p}ffn.shared_experts.{proj}.scale"] = ("F8_E8M0", t.shared[f"{proj}_scale"])
    return d


def write_safetensors_raw(path, entries: dict, *, metadata: dict | None = None) -> None:
    """Header (8-byte little-endian length + JSON, space-padded to 8) + raw bytes, by hand.

    ``entries``: ``{name: (dtype string, array)}`` or ``(dtype string, shape, raw bytes)``.
    """
    header, blobs, off = {}, [], 0
    for name, ent in entries.items():
        if len(ent) == 2:
            dt, a = ent
            raw, shape = np.ascontiguousarray(a).tobytes(), list(np.shape(a))
        else:
            dt, shape, raw = ent
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


def config_json(cfg: DeepseekV4Config = CFG, num_layers: int = 3) -> dict:
    d = {k: getattr(cfg, k) for k in _v4.CONFIG_KEYS}
    d.update(
        model_type="deepseek_v4",
        num_hidden_layers=num_layers,
        expert_dtype="fp4",
        topk_method="noaux_tc",
        quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
    )
    return d


def write_checkpoint(
    folder, tensors: dict, *, config: dict | None = None, split_at: str | None = None, index_extra=None
):
    """Two shards + ``model.safetensors.index.json`` (+ ``config.json``); ``split_at``: the first
    tensor of the second shard. ``head.weight`` is listed in a third shard that does not exist,
    which any read of a tensor outside the requested layer would hit."""
    os.makedirs(folder, exist_ok=True)
    names = list(tensors)
    cut = names.index(split_at) if split_at else len(names) // 2
    parts = ({n: tensors[n] for n in names[:cut]}, {n: tensors[n] for n in names[cut:]})
    wm = {}
    for fn, part in zip(SHARDS, parts):
        write_safetensors_raw(os.path.join(folder, fn), part, metadata={"format": "pt"})
        wm.update({n: fn for n in part})
    wm["head.weight"] = "model-extra-00003.safetensors"  # never read
    wm.update(index_extra or {})
    with open(os.path.join(folder, _st.INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    if config is not None:
        with open(os.path.join(folder, _st.CONFIG_NAME), "w") as f:
            json.dump(config, f)
    return str(folder)


def model_tensors(truths: list[LayerTruth], *, nibble_order: str = "low_even") -> dict:
    d = {"embed.weight": ("BF16", np.zeros((VOCAB, H), BF16))}
    for i, t in enumerate(truths):
        d.update(layer_tensors(t, i, nibble_order=nibble_order))
    return d


def synth_checkpoint(
    folder,
    num_layers: int = 3,
    *,
    seed: int = 0,
    nibble_order: str = "low_even",
    expert_format: str = "fp4",
    config: bool = True,
):
    """Write a synthetic V4 checkpoint; returns ``(path, truths)``. Layer 1 spans both shards."""
    truths = synth_layers(num_layers, seed, expert_format=expert_format)
    tensors = model_tensors(truths, nibble_order=nibble_order)
    path = write_checkpoint(
        folder,
        tensors,
        config=config_json(num_layers=num_layers) if config else None,
        split_at=f"layers.1.ffn.experts.{E // 2}.w1.weight",
    )
    return path, truths


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    return synth_checkpoint(tmp_path_factory.mktemp("v4") / "ckpt", 3)


# ------------------------------------------------------------------------------------------------
# Helpers for comparisons
# ------------------------------------------------------------------------------------------------


def leaves_equal(a: MoEWeights, b: MoEWeights) -> None:
    assert (a.mode, a.hidden, a.intermediate, a.num_experts) == (b.mode, b.hidden, b.intermediate, b.num_experts)
    for k in ("l1", "l1_sf", "l2", "l2_sf"):
        x, y = np.asarray(getattr(a, k)), np.asarray(getattr(b, k))
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=k)


def params_equal(layer: ckpt.MoELayer, t: LayerTruth) -> None:
    np.testing.assert_array_equal(layer.gate_weight.view(np.uint16), t.gate_weight.view(np.uint16))
    if t.tid2eid is not None:
        assert layer.is_hash_layer and layer.gate_bias is None
        assert layer.tid2eid.dtype == np.int32
        np.testing.assert_array_equal(layer.tid2eid, t.tid2eid)
    else:
        assert not layer.is_hash_layer and layer.tid2eid is None
        np.testing.assert_array_equal(layer.gate_bias, t.bias)
    for k, v in t.shared.items():
        np.testing.assert_array_equal(np.asarray(layer.shared[k]).view(np.uint8), v.view(np.uint8), err_msg=k)


def set_params_in_memory(block: DeepseekV4MoE, t: LayerTruth) -> None:
    block.gate.weight.set_value(jnp.asarray(t.gate_weight))
    if t.tid2eid is not None:
        block.gate.tid2eid.set_value(jnp.asarray(t.tid2eid, jnp.int32))
    else:
        block.gate.bias.set_value(jnp.asarray(t.bias))
    s = t.shared
    block.shared_experts.load_fp8(s["w1"], s["w1_scale"], s["w2"], s["w2_scale"], s["w3"], s["w3_scale"])


# ------------------------------------------------------------------------------------------------
# The safetensors reader
# ------------------------------------------------------------------------------------------------


def test_reader_reads_every_dtype_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "i8": ("I8", rng.integers(-128, 128, (3, 5), dtype=np.int8)),
        "u8": ("U8", rng.integers(0, 256, (7,), dtype=np.uint8)),
        "e8m0": ("F8_E8M0", rng.integers(0, 255, (4, 4), dtype=np.uint8).view(E8M0)),
        "e4m3": ("F8_E4M3", rng.standard_normal((2, 6)).astype(E4M3)),
        "bf16": ("BF16", rng.standard_normal((3, 3)).astype(BF16)),
        "f32": ("F32", rng.standard_normal(5).astype(np.float32)),
        "i64": ("I64", rng.integers(-(2**40), 2**40, (2, 3))),
        "i32": ("I32", rng.integers(-5, 5, (4,), dtype=np.int32)),
        "empty": ("F32", np.zeros((0, 4), np.float32)),
        "scalar": ("F32", np.float32(3.5)),
    }
    p = tmp_path / "all.safetensors"
    write_safetensors_raw(p, arrays, metadata={"format": "pt"})
    sf = ckpt.SafetensorsFile(p)
    assert sf.metadata == {"format": "pt"}
    for name, (dt, a) in arrays.items():
        got = sf.get(name)
        assert sf.info(name).dtype == dt and got.dtype == np.asarray(a).dtype and got.shape == np.shape(a), name
        flat = lambda v: np.asarray(v).reshape(-1).view(np.uint8)  # noqa: E731
        np.testing.assert_array_equal(flat(got), flat(a), err_msg=name)
        assert not got.flags.writeable
    # The hand-written files are real safetensors: the safetensors package reads them (for the
    # dtypes it maps to numpy), and files it writes read back through our header parser.
    st = pytest.importorskip("safetensors.numpy")
    sub = {k: arrays[k] for k in ("i8", "u8", "f32", "i64", "i32")}
    write_safetensors_raw(tmp_path / "sub.safetensors", sub)
    back = st.load_file(str(tmp_path / "sub.safetensors"))
    for k, (_, a) in sub.items():
        np.testing.assert_array_equal(back[k], a)
    st.save_file({k: a for k, (_, a) in sub.items()}, str(tmp_path / "lib.safetensors"))
    lib = ckpt.SafetensorsFile(tmp_path / "lib.safetensors")
    for k, (_, a) in sub.items():
        np.testing.assert_array_equal(lib.get(k), a)


# ------------------------------------------------------------------------------------------------
# Loading layers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fp8xfp4", "mxf4xmxf4"])
def test_load_fp4_layers_bit_exact(v4, mode):
    path, truths = v4
    for li in (0, 1):  # hash layer (one shard) and biased layer (spans both shards)
        t = truths[li]
        calls = []
        layer = ckpt.load_moe_layer(path, li, mode=mode, progress=lambda d, n: calls.append((d, n)))
        assert calls == [(e + 1, E) for e in range(E)]  # one step per expert
        assert layer.mode == mode and layer.report is None and layer.config == CFG
        back = layer.weights.to_checkpoint()
        for got, want in zip(back, (t.w13, t.w13_scale, t.w2, t.w2_scale)):
            np.testing.assert_array_equal(np.asarray(got), want)
        leaves_equal(layer.weights, MoEWeights.from_checkpoint(t.w13, t.w13_scale, t.w2, t.w2_scale, mode=mode))
        params_equal(layer, t)
    # The dequantized values are what was written (independent numpy decode).
    w13, w2 = layer.weights.dequantize_expert(3)
    np.testing.assert_array_equal(np.asarray(w13), ckpt.dequantize_fp4_numpy(t.w13[3], t.w13_scale[3]))
    np.testing.assert_array_equal(np.asarray(w2), ckpt.dequantize_fp4_numpy(t.w2[3], t.w2_scale[3]))


def test_load_fp8_mode_is_the_conversion_of_the_same_values(v4, caplog):
    path, truths = v4
    t = truths[2]
    with caplog.at_level(logging.INFO, logger="jax_megamoe.checkpoint"):
        layer = ckpt.load_moe_layer(path, 2, mode="fp8")
    want, rep = MoEWeights.from_checkpoint_with_report(t.w13, t.w13_scale, t.w2, t.w2_scale, mode="fp8")
    leaves_equal(layer.weights, want)
    assert layer.report == rep and layer.report.num_experts == E
    assert any("FP4 -> FP8" in r.getMessage() and "layer 2" in r.getMessage() for r in caplog.records)
    params_equal(layer, t)


@pytest.mark.parametrize("layer_idx,mode", [(0, "fp8xfp4"), (1, "fp8xfp4"), (2, "fp8")])
def test_block_from_checkpoint_matches_in_memory_block(v4, layer_idx, mode):
    path, truths = v4
    t = truths[layer_idx]
    block = DeepseekV4MoE.from_checkpoint(path, layer_idx, mode=mode, backend="reference")
    assert block.mode == mode and block.config == CFG and block.is_hash_layer == (layer_idx == 0)
    weights = MoEWeights.from_checkpoint(t.w13, t.w13_scale, t.w2, t.w2_scale, mode=mode)
    ref = DeepseekV4MoE(
        CFG, layer_idx, mode=mode, backend="reference", rngs=nnx.Rngs(7), options=MoEBlockOptions(weights=weights)
    )
    set_params_in_memory(ref, t)
    x = jnp.asarray(np.random.default_rng(layer_idx).standard_normal((16, H)) * 3, jnp.bfloat16)
    tid = jnp.asarray(np.random.default_rng(9).integers(0, VOCAB, 16), jnp.int32)
    y, y_ref = block(x, tid), ref(x, tid)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    assert float(jnp.abs(y.astype(jnp.float32)).sum()) > 0


def test_fp8_expert_checkpoint(tmp_path):
    path, truths = synth_checkpoint(tmp_path / "fp8", 2, expert_format="fp8")
    t = truths[1]
    layer = ckpt.load_moe_layer(path, 1, mode="fp8")
    assert layer.expert_format == "fp8" and layer.report is None
    f = t.fp8
    leaves_equal(layer.weights, MoEWeights.from_fp8(f["w13"], f["w13_scale"], f["w2"], f["w2_scale"]))
    params_equal(layer, t)
    with pytest.raises(CheckpointError, match="FP8 routed experts.*mode 'fp8xfp4'"):
        ckpt.load_moe_layer(path, 1, mode="fp8xfp4")


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def _no_config_copy(src, dst):
    os.makedirs(dst)
    for fn in (*SHARDS, _st.INDEX_NAME):
        os.symlink(os.path.join(src, fn), os.path.join(dst, fn))
    return str(dst)


def test_config_from_json_shapes_or_explicit(v4, tmp_path):
    path, _ = v4
    assert ckpt.infer_config(path, 1) == CFG
    assert ckpt.list_moe_layers(path) == [0, 1, 2]
    bare = _no_config_copy(path, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="routed_scaling_factor, swiglu_limit cannot be derived"):
        ckpt.infer_config(bare, 1)
    # Shapes give H, I, E, K, vocab, n_shared, num_hash_layers; the rest is passed in.
    assert ckpt.infer_config(bare, 2, {"routed_scaling_factor": 1.5, "swiglu_limit": 10.0}) == CFG
    assert ckpt.infer_config(bare, 1, CFG) == CFG
    for bad, msg in (
        (
            dataclasses.replace(CFG, hidden_size=1024),
            r"hidden_size = 1024 but layers.1.ffn.gate.weight \[8, 512\] gives 512",
        ),
        (
            dataclasses.replace(CFG, moe_intermediate_size=128),
            "moe_intermediate_size = 128 but layers.1.ffn.experts.0.w1.weight gives 256",
        ),
        (dataclasses.replace(CFG, num_hash_layers=2), "makes layer 1 a hash layer, but .* has layers.1.ffn.gate.bias"),
        (dataclasses.replace(CFG, n_shared_experts=2), "n_shared_experts = 2"),
    ):
        with pytest.raises(CheckpointError, match=msg):
            ckpt.read_moe_layer(path, 1, config=bad)
    with pytest.raises(
        CheckpointError, match=r"num_experts_per_tok = 6 but layers.0.ffn.gate.tid2eid \[64, 4\] gives 4"
    ):
        ckpt.read_moe_layer(path, 0, config=dataclasses.replace(CFG, num_experts_per_tok=6))


# ------------------------------------------------------------------------------------------------
# Corrupt checkpoints: every error names the tensor and the file
# ------------------------------------------------------------------------------------------------

T_W1 = "layers.1.ffn.experts.5.w1.weight"  # in the second shard
T_S3 = "layers.1.ffn.experts.6.w3.scale"
T_S2 = "layers.1.ffn.experts.3.w2.scale"  # in the first shard


def _corrupt(kind, tensors, folder):
    """Write a checkpoint with one defect; returns (path, regex the error must match, names the
    message must contain)."""
    tensors = dict(tensors)
    split = "layers.1.ffn.experts.4.w1.weight"
    s1, s2 = (os.path.join(str(folder), fn) for fn in SHARDS)
    extra = None
    if kind == "wrong_dtype":
        tensors[T_S2] = ("F32", tensors[T_S2][1].astype(np.float32))
    elif kind == "wrong_shape":
        tensors[T_W1] = ("I8", tensors[T_W1][1][:, :-16])
    elif kind == "bad_e8m0_as_i8":
        tensors[T_S3] = ("I8", tensors[T_S3][1].view(np.int8))
    elif kind == "size_mismatch":
        dt, a = tensors[T_W1]
        tensors[T_W1] = (dt, [I, H // 2], a.tobytes()[:-10])
    elif kind == "missing_tensor":
        del tensors[T_S3]
    elif kind == "unknown_dtype":
        dt, a = tensors[T_W1]
        tensors[T_W1] = ("F4", [I, H], a.tobytes())
    elif kind == "tid2eid_range":
        t = tensors["layers.0.ffn.gate.tid2eid"][1].copy()
        t[5, 2] = E
        tensors["layers.0.ffn.gate.tid2eid"] = ("I64", t)
    elif kind == "missing_shard":
        extra = {T_S3: "model-00009-of-00009.safetensors"}
    path = write_checkpoint(folder, tensors, config=config_json(), split_at=split, index_extra=extra)
    if kind == "missing_in_header":
        with open(os.path.join(path, _st.INDEX_NAME)) as f:
            idx = json.load(f)
        idx["weight_map"][T_S3] = SHARDS[0]  # the index says shard 1, the tensor is in shard 2
        with open(os.path.join(path, _st.INDEX_NAME), "w") as f:
            json.dump(idx, f)
    elif kind == "truncated":
        size = os.path.getsize(s2)
        with open(s2, "r+b") as f:
            f.truncate(size - 1000)
    elif kind == "header_len":
        with open(s2, "r+b") as f:
            f.write(struct.pack("<Q", os.path.getsize(s2) + 5))
    elif kind == "huge_header_len":
        with open(s2, "r+b") as f:
            f.write(struct.pack("<Q", 2**62))
    elif kind == "json_garbage":
        with open(s2, "r+b") as f:
            f.seek(8)
            f.write(b"{\x00\xffgarbage[[[")
    elif kind == "not_object":
        hb = b"[1, 2, 3]     "
        with open(s2, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
    elif kind == "short_file":
        with open(s2, "wb") as f:
            f.write(b"\x01\x02\x03")
    idx_path = os.path.join(path, _st.INDEX_NAME)
    return {
        "wrong_dtype": ("dtype F32 is not supported for UE8M0 routed-expert scales", [T_S2, s1]),
        "wrong_shape": (r"shape \[256, 240\] does not match the expected \[256, 256\] = \[I, H/2\]", [T_W1, s2]),
        "bad_e8m0_as_i8": ("dtype I8 is not supported for UE8M0", [T_S3, s2]),
        "size_mismatch": (r"span 65526 bytes but I8\[256, 256\] needs 65536", [T_W1, s2]),
        "missing_tensor": ("is missing: not listed in", [T_S3, idx_path]),
        "unknown_dtype": ("dtype F4 is not supported", [T_W1, s2]),
        "tid2eid_range": (r"expert id 8 at \[5, 2\] is outside \[0, 8\)", ["layers.0.ffn.gate.tid2eid", s1]),
        "missing_shard": ("does not exist", [T_S3, "model-00009-of-00009.safetensors", idx_path]),
        "missing_in_header": ("whose header has no such tensor", [T_S3, s1, idx_path]),
        "truncated": ("lie past the end of the file.*truncated", [s2, "layers.1.ffn"]),
        "header_len": ("header length .* runs past the end", [s2, "(while reading tensor 'layers.1.ffn."]),
        "huge_header_len": ("exceeds the limit", [s2, "(while reading tensor 'layers.1.ffn."]),
        "json_garbage": ("header is not valid JSON", [s2, "(while reading tensor 'layers.1.ffn."]),
        "not_object": ("not an object", [s2]),
        "short_file": ("shorter than the 8-byte header length", [s2, "(while reading tensor 'layers.1.ffn."]),
    }[kind] + (path,)


@pytest.mark.parametrize(
    "kind",
    [
        "wrong_dtype",
        "wrong_shape",
        "bad_e8m0_as_i8",
        "size_mismatch",
        "missing_tensor",
        "unknown_dtype",
        "tid2eid_range",
        "missing_shard",
        "missing_in_header",
        "truncated",
        "header_len",
        "huge_header_len",
        "json_garbage",
        "not_object",
        "short_file",
    ],
)
def test_corrupt_checkpoint_errors_name_tensor_and_file(tmp_path, kind):
    tensors = model_tensors(_TRUTHS2())
    msg, names, path = _corrupt(kind, tensors, tmp_path / kind)
    layer = 0 if kind == "tid2eid_range" else 1
    with pytest.raises(CheckpointError, match=msg) as ei:
        ckpt.read_moe_layer(path, layer)
    assert isinstance(ei.value, ValueError)
    for n in names:
        assert n in str(ei.value), (n, str(ei.value))
    # Layer 0 lives entirely in the first shard and stays readable when only shard 2 is damaged.
    if kind in ("truncated", "header_len", "json_garbage", "short_file", "wrong_shape"):
        ckpt.read_moe_layer(path, 0)


_T2: list = []


def _TRUTHS2():  # noqa: N802 - a cached 2-layer truth shared by the corruption cases
    if not _T2:
        _T2.append(synth_layers(2, seed=5))
    return _T2[0]


def test_fp8_block_size_other_than_128_is_refused(tmp_path):
    truths = synth_layers(2, 3, expert_format="fp8")
    tensors = model_tensors(truths)
    name = "layers.1.ffn.experts.2.w2.weight_scale_inv"
    tensors[name] = ("F32", np.ones((H // 32, I // 32), np.float32))
    path = write_checkpoint(tmp_path / "c", tensors, config=config_json(num_layers=2))
    with pytest.raises(CheckpointError, match=r"32x32 blocks; only 128x128 blocks are supported") as ei:
        ckpt.read_moe_layer(path, 1)
    assert name in str(ei.value)


# ------------------------------------------------------------------------------------------------
# Nibble order
# ------------------------------------------------------------------------------------------------


def test_check_nibble_order_on_arrays():
    t = _TRUTHS2()[1]
    packed, scale = t.w13[0, :I], t.w13_scale[0, :I]
    exact = ckpt.dequantize_fp4_numpy(packed, scale)
    assert ckpt.check_nibble_order(packed, scale, exact) == "low_even"
    assert ckpt.check_nibble_order(ckpt.swap_nibbles(packed), scale, exact) == "high_even"
    # A BF16 reference the FP4 values were quantized from (FP4-sized noise) still decides.
    rng = np.random.default_rng(0)
    noisy = (exact + rng.standard_normal(exact.shape) * 0.15 * np.abs(exact).mean()).astype(BF16)
    assert ckpt.check_nibble_order(packed.view(np.int8), scale.view(E8M0), noisy) == "low_even"
    assert ckpt.check_nibble_order(ckpt.swap_nibbles(packed), scale, noisy) == "high_even"
    same = np.full_like(packed, 0x33)  # equal nibbles: both orders decode alike
    with pytest.raises(CheckpointError, match="cannot tell the orders apart"):
        ckpt.check_nibble_order(same, scale, ckpt.dequantize_fp4_numpy(same, scale))
    with pytest.raises(CheckpointError, match="neither order matches"):
        ckpt.check_nibble_order(packed, scale, rng.standard_normal(exact.shape))


def test_swapped_nibble_checkpoint_is_caught_and_loads_with_the_option(tmp_path):
    path, truths = synth_checkpoint(tmp_path / "swapped", 2, seed=5, nibble_order="high_even")
    t = truths[1]
    # A BF16 reference of one expert (e.g. from a dequantized release) decides the order.
    ref_dir = tmp_path / "bf16ref"
    os.makedirs(ref_dir)
    ref = ckpt.dequantize_fp4_numpy(t.w13[0, :I], t.w13_scale[0, :I]).astype(BF16)
    write_safetensors_raw(ref_dir / "model.safetensors", {"layers.1.ffn.experts.0.w1.weight": ("BF16", ref)})
    assert ckpt.check_checkpoint_nibble_order(path, 1, str(ref_dir)) == "high_even"
    assert ckpt.check_checkpoint_nibble_order(path, 1, ref) == "high_even"
    plain, _ = synth_checkpoint(tmp_path / "plain", 2, seed=5)
    assert ckpt.check_checkpoint_nibble_order(plain, 1, str(ref_dir)) == "low_even"
    good = ckpt.read_moe_layer(path, 1, nibble_order="high_even")
    for got, want in zip((good.w13, good.w13_scale, good.w2, good.w2_scale), (t.w13, t.w13_scale, t.w2, t.w2_scale)):
        np.testing.assert_array_equal(got, want)
    wrong = ckpt.read_moe_layer(path, 1)  # default order on a swapped checkpoint: different weights
    assert not np.array_equal(wrong.w13, t.w13)
    with pytest.raises(ValueError, match="nibble_order"):
        ckpt.read_moe_layer(path, 1, nibble_order="big")


def test_text_progress_and_tqdm(v4, capsys):
    path, _ = v4
    ckpt.read_moe_layer(path, 1, progress="text")
    err = capsys.readouterr().err
    assert "layer 1: read experts" in err and f"{E}/{E} expert" in err
    bar = _progress.make_progress(True, 3, "x")
    for i in range(1, 4):
        bar(i)
    bar.close()
    assert _progress.make_progress(None, 3, "x") is None
    with pytest.raises(TypeError):
        _progress.make_progress(3, 3, "x")
