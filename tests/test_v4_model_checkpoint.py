"""Whole DeepSeek V4 checkpoints: layout, synthetic writer, loading into NNX params.

Tiny config (hidden 512 so the MoE block is valid in every kernel mode); layers of every
attention kind (sliding 0, CSA 4, HCA 128) plus an MTP block (ratio 4), one hash layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jax_megamoe import checkpoint as public_ckpt
from jax_megamoe._src.io import v4_model_checkpoint as vmc
from jax_megamoe._src.io.safetensors_reader import (
    INDEX_NAME,
    Checkpoint,
    CheckpointError,
)
from jax_megamoe._src.models.deepseek_v4 import loading
from jax_megamoe._src.models.deepseek_v4.model import DeepseekV4ForCausalLM, forward
from jax_megamoe._src.models.deepseek_v4.moe import DeepseekV4MoE, MoEBlockOptions
from jax_megamoe._src.numerics.layout import MoEWeights
from jax_megamoe._src.numerics.v4_config import DeepseekV4Config

CFG = DeepseekV4Config.tiny(
    num_hidden_layers=3,
    compress_ratios=(0, 4, 128, 4),
    num_attention_heads=4,
    head_dim=128,
    q_lora_rank=128,
    qk_rope_head_dim=64,
    o_groups=2,
    o_lora_rank=128,
    index_n_heads=4,
    index_head_dim=64,
    hc_mult=2,
    num_nextn_predict_layers=1,
)
MODE = "fp8xfp4"
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("v4_official"))
    specs = vmc.write_synthetic_checkpoint(d, CFG, seed=7, shard_size=3 << 20)
    return d, specs


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("v4_dense"))
    specs = vmc.write_synthetic_checkpoint(d, CFG, seed=8, float_weights=True, shard_size=8 << 20, include_mtp=False)
    return d, specs


# ------------------------------------------------------------------------------------------------
# Reference helpers (numpy only)
# ------------------------------------------------------------------------------------------------


def e8m0(b):
    return np.ldexp(np.float32(1), np.asarray(b).view(np.uint8).astype(np.int32) - 127).astype(np.float32)


def dequant_fp8(w, s):
    n, k = w.shape
    sf = e8m0(s) if np.asarray(s).dtype != np.float32 else np.asarray(s)
    return np.asarray(w).astype(np.float32) * np.repeat(np.repeat(sf, 128, 0), 128, 1)[:n, :k]


def dequant_fp4(p, s):
    lut = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    u = np.asarray(p).view(np.uint8)
    v = np.stack([lut[u & 15], lut[u >> 4]], -1).reshape(u.shape[0], -1)
    return v * np.repeat(e8m0(s), 32, axis=1)


def _shared(ffn, proj):
    """The shared expert's ``w1``/``w2``/``w3`` value (a Linear's ``weight``, or a bare Param)."""
    v = getattr(ffn.shared_experts, proj)
    return getattr(v, "weight", v).get_value()


def routed_truth(ck, pre, e):
    """Checkpoint-format w13/s13/w2/s2 of one layer, assembled independently of the loader."""

    def get(n):
        return np.asarray(ck.get(n)).view(np.uint8)

    w13 = np.stack([np.concatenate([get(f"{pre}.{x}.w1.weight"), get(f"{pre}.{x}.w3.weight")]) for x in range(e)])
    s13 = np.stack([np.concatenate([get(f"{pre}.{x}.w1.scale"), get(f"{pre}.{x}.w3.scale")]) for x in range(e)])
    w2 = np.stack([get(f"{pre}.{x}.w2.weight") for x in range(e)])
    s2 = np.stack([get(f"{pre}.{x}.w2.scale") for x in range(e)])
    return w13, s13, w2, s2


# ------------------------------------------------------------------------------------------------
# A stand-in model whose attribute paths mirror the names (the real model is the model helper's)
# ------------------------------------------------------------------------------------------------


def _tree_from_specs(specs, param_dtype):
    tree: dict = {}
    for name, spec in specs.items():
        if spec.kind in ("fp8_scale", "fp4_scale") or ".ffn." in f".{name}":
            continue
        parts = name.split(".")
        shape = spec.shape
        f32 = name.endswith("norm.weight") or spec.dtypes[0] == "F32"
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = nnx.Param(jnp.zeros(shape, jnp.float32 if f32 else param_dtype))
    return tree


def _to_nnx(node):
    if isinstance(node, dict):
        if node and all(k.isdigit() for k in node):
            return nnx.List([_to_nnx(node[str(i)]) for i in range(len(node))])
        return nnx.Dict({k: _to_nnx(v) for k, v in node.items()})
    return node


class Standin(nnx.Module):
    """Every non-MoE tensor as a Param at its name; ``ffn`` a real ``DeepseekV4MoE`` (or ExactMoE)."""

    def __init__(self, cfg, *, experts="quantized", param_dtype=jnp.bfloat16, include_mtp=True, rngs):
        self.config = cfg
        specs = vmc.expected_tensors(cfg, include_mtp=include_mtp)
        tree = _tree_from_specs(specs, param_dtype)
        groups = [("layers", i, i, False) for i in range(cfg.num_hidden_layers)]
        if include_mtp:
            groups += [("mtp", k, cfg.num_hidden_layers + k, True) for k in range(cfg.num_nextn_predict_layers)]
        for top, k, layer_idx, is_mtp in groups:
            if experts == "quantized":
                ffn = DeepseekV4MoE(
                    cfg, layer_idx, mode=MODE, backend="reference", rngs=rngs, options=MoEBlockOptions(is_mtp=is_mtp)
                )
            else:
                ffn = DeepseekV4MoE(
                    cfg,
                    layer_idx,
                    experts="exact",
                    param_dtype=param_dtype,
                    rngs=rngs,
                    options=MoEBlockOptions(is_mtp=is_mtp),
                )
            tree[top][str(k)]["ffn"] = ffn
        for key, value in tree.items():
            setattr(self, key, _to_nnx(value))


def _abstract_standin(**kw):
    return nnx.eval_shape(lambda: Standin(CFG, rngs=nnx.Rngs(0), **kw))


# ------------------------------------------------------------------------------------------------
# Layout and writer
# ------------------------------------------------------------------------------------------------


def test_expected_tensors_cover_every_layer_kind():
    ex = vmc.expected_tensors(CFG)
    assert "layers.0.attn.compressor.ape" not in ex  # ratio 0: sliding window only
    assert ex["layers.1.attn.compressor.ape"].shape == (4, 2 * 128)  # CSA: overlapping, c = 2
    assert ex["layers.1.attn.indexer.compressor.wkv.weight"].shape == (2 * 64, 512)
    assert ex["layers.2.attn.compressor.ape"].shape == (128, 128)  # HCA: c = 1
    assert "layers.2.attn.indexer.wq_b.weight" not in ex
    assert ex["layers.0.ffn.gate.tid2eid"] == vmc.TensorSpec((1000, 4), ("I64", "I32"), "int")
    assert "layers.0.ffn.gate.bias" not in ex and "layers.1.ffn.gate.bias" in ex
    assert "mtp.0.ffn.gate.bias" in ex and "mtp.0.attn.indexer.wq_b.weight" in ex  # MTP: ratio 4, never hash
    assert ex["layers.1.attn.wo_a.weight"] == vmc.TensorSpec((2 * 128, 4 * 128 // 2), ("F8_E4M3",), "fp8")
    assert ex["layers.1.attn.wo_a.scale"].shape == (2, 2)
    assert ex["layers.1.ffn.experts.15.w2.weight"] == vmc.TensorSpec((512, 128), ("I8", "U8"), "fp4")
    assert ex["layers.1.ffn.experts.15.w2.scale"].shape == (512, 8)
    assert ex["hc_head_fn"].shape == (2, 1024) and ex["layers.0.hc_ffn_fn"].shape == ((2 + 2) * 2, 1024)
    assert not any(k.startswith("mtp.") for k in vmc.expected_tensors(CFG, include_mtp=False))
    fw = vmc.expected_tensors(CFG, float_weights=True)
    assert not any(s.kind in ("fp8", "fp8_scale", "fp4", "fp4_scale") for s in fw.values())
    assert fw["layers.1.ffn.experts.0.w1.weight"].shape == (256, 512)
    # kinds from names alone agree with the layout's
    for name, spec in ex.items():
        kind, dtypes = vmc.tensor_kind(name)
        assert kind == spec.kind and spec.dtypes[0] in dtypes, name


def test_expected_tensors_match_deepseek_reference_module():
    """Names and shapes equal DeepSeek's own inference module's state_dict (built on the meta device)."""
    torch = pytest.importorskip("torch")
    ref = "/work/ref/deepseek_v4_inference_model.py"
    if not os.path.exists(ref):
        pytest.skip("DeepSeek's inference/model.py is not on this machine")
    import importlib.util
    import sys
    import types

    k = types.ModuleType("kernel")
    for f in ("act_quant", "fp4_act_quant", "fp8_gemm", "fp4_gemm", "sparse_attn", "hc_split_sinkhorn"):
        setattr(k, f, None)
    old = sys.modules.get("kernel")
    sys.modules["kernel"] = k
    try:
        spec = importlib.util.spec_from_file_location("_ds_v4_ref", ref)
        dm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(dm)
    finally:
        if old is None:
            sys.modules.pop("kernel", None)
        else:
            sys.modules["kernel"] = old
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        args = dm.ModelArgs(
            max_batch_size=1, max_seq_len=256, vocab_size=1000, dim=512, moe_inter_dim=256, n_layers=3,
            n_hash_layers=1, n_heads=4, n_routed_experts=16, n_activated_experts=4, q_lora_rank=128, head_dim=128,
            rope_head_dim=64, o_groups=2, o_lora_rank=128, compress_ratios=(0, 4, 128, 4), index_n_heads=4,
            index_head_dim=64, hc_mult=2,
        )  # fmt: skip
        with torch.device("meta"):
            model = dm.Transformer(args)
    finally:
        torch.set_default_dtype(prev)
    sd = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    ex = vmc.expected_tensors(CFG)
    # DeepSeek's module shares the embedding/head with the MTP block; the release stores wo_a in
    # FP8 (+ scale), which its convert.py dequantizes to the bf16 the module holds.
    assert set(sd) - set(ex) == {"mtp.0.embed.weight", "mtp.0.head.weight"}
    assert all(vmc.is_ignored_tensor(n) for n in set(sd) - set(ex))
    assert set(ex) - set(sd) == {f"{p}.attn.wo_a.scale" for p in ("layers.0", "layers.1", "layers.2", "mtp.0")}
    for n in set(sd) & set(ex):
        assert sd[n] == ex[n].shape, n


def test_synthetic_checkpoint_round_trips_every_tensor_bit_for_bit(official):
    d, specs = official
    with open(os.path.join(d, INDEX_NAME)) as f:
        wm = json.load(f)["weight_map"]
    assert set(wm) == set(specs) and len(set(wm.values())) >= 4  # sharded
    with Checkpoint(d) as ck:
        vmc.check_checkpoint_layout(ck, CFG)
        for name, spec in specs.items():
            ti = ck.info(name)
            assert (ti.dtype, ti.shape) == (spec.dtypes[0], spec.shape), name
            raw = np.asarray(ck.raw(name))
            want = np.concatenate([c.reshape(-1).view(np.uint8) for c in vmc.synthetic_tensor(name, spec, CFG, 7)])
            np.testing.assert_array_equal(raw, want, err_msg=name)
            assert raw.any(), f"{name} is all zero"
            if spec.dtypes[0] in ("F8_E4M3", "BF16", "F32"):
                assert np.isfinite(np.asarray(ck.get(name), np.float32)).all(), name
            if spec.kind in ("fp8_scale", "fp4_scale"):
                assert raw.max() < 0xFF, name
    # an independent parser: the safetensors package, for the dtypes numpy has
    st = pytest.importorskip("safetensors")
    checked = 0
    with Checkpoint(d) as ck:
        for fn in sorted(set(wm.values())):
            with st.safe_open(os.path.join(d, fn), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if specs[name].dtypes[0] in ("F32", "I64", "I8"):
                        arr = f.get_tensor(name)
                        np.testing.assert_array_equal(np.asarray(ck.get(name)), arr, err_msg=name)
                        checked += 1
    assert checked > 100


def test_seed_and_layers(tmp_path):
    a = vmc.write_synthetic_checkpoint(tmp_path / "a", CFG, seed=1, layers=2, include_mtp=False)
    assert not any(n.startswith(("layers.2.", "mtp.")) for n in a)
    cfg2 = vmc.read_config(tmp_path / "a")
    assert cfg2.num_hidden_layers == 2 and cfg2.compress_ratios[:2] == (0, 4)
    vmc.write_synthetic_checkpoint(tmp_path / "b", CFG, seed=2, layers=2, include_mtp=False)
    with Checkpoint(tmp_path / "a") as ca, Checkpoint(tmp_path / "b") as cb:
        for n in ("layers.1.attn.wq_a.weight", "layers.1.ffn.experts.3.w1.weight", "embed.weight"):
            assert not np.array_equal(np.asarray(ca.raw(n)), np.asarray(cb.raw(n))), n


def test_config_json_round_trip_and_hf(official):
    d, _ = official
    assert vmc.read_config(d) == CFG
    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    assert raw["quantization_config"]["weight_block_size"] == [128, 128]
    assert raw["compress_ratios"] == [0, 4, 128, 4]
    tr = pytest.importorskip("transformers")
    hf = tr.AutoConfig.from_pretrained(d)
    assert hf.layer_types == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    assert hf.mlp_layer_types == ["hash_moe", "moe", "moe"]
    assert hf.qk_rope_head_dim == 64 and hf.hidden_size == 512 and hf.o_groups == 2
    assert hf.rope_parameters["compress"]["factor"] == 16.0
    # HF keeps one layer type per decoder layer (the MTP block's entry is dropped)
    import dataclasses

    assert DeepseekV4Config.from_hf_config(hf.to_dict()) == dataclasses.replace(CFG, compress_ratios=(0, 4, 128))


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _check_loaded(model, ck, **_):
    """Every variable of ``model`` equals its tensor(s), dequantized independently (numpy)."""
    n = 0
    for path, var in loading._variables(model):
        got = var.get_value()
        if isinstance(got, MoEWeights):
            ref = MoEWeights.from_checkpoint(*routed_truth(ck, path, got.num_experts), mode=got.mode)
            for leaf in ("l1", "l1_sf", "l2", "l2_sf"):
                np.testing.assert_array_equal(
                    np.asarray(getattr(got, leaf)), np.asarray(getattr(ref, leaf)), err_msg=path
                )
            n += 1
            continue
        got = np.asarray(got)
        head, _, leaf = path.rpartition(".")
        if leaf in ("w13", "w2") and head.endswith(".ffn.experts"):
            for x in range(got.shape[0]):
                parts = ("w1", "w3") if leaf == "w13" else ("w2",)
                want = np.concatenate(
                    [dequant_fp4(ck.get(f"{head}.{x}.{p}.weight"), ck.get(f"{head}.{x}.{p}.scale")) for p in parts]
                )
                np.testing.assert_array_equal(
                    got[x].astype(np.float32), want.astype(got.dtype).astype(np.float32), err_msg=path
                )
            n += 1
            continue
        name = path if path in ck else f"{path}.weight"
        raw = ck.get(name)
        want = dequant_fp8(raw, ck.get(vmc.scale_name(name))) if raw.dtype == E4M3 else np.asarray(raw)
        if got.dtype.kind in "iu":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_array_equal(
                got.astype(np.float32), want.astype(got.dtype).astype(np.float32), err_msg=name
            )
        n += 1
    assert n > 50


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_load_state_dict_gives_the_dequantized_values(official, param_dtype):
    d, _ = official
    model = Standin(CFG, param_dtype=param_dtype, rngs=nnx.Rngs(1))
    with Checkpoint(d) as ck:
        loading.load_state_dict(model, vmc.CheckpointTensors(ck))
        _check_loaded(model, ck, param_dtype=param_dtype)
        assert model.layers[1].attn.wq_b.weight.get_value().dtype == param_dtype
        assert model.layers[1].attn_norm.weight.get_value().dtype == jnp.float32


def test_load_into_abstract_model_streams_and_places(official, capsys):
    d, _ = official
    seen = []
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    with Checkpoint(d) as ck:
        model = loading._load_into(
            lambda: Standin(CFG, rngs=nnx.Rngs(0)), ck, loading._placement(mesh), lambda a, b: seen.append((a, b)), CFG
        )
        assert not any(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in loading._variables(model))
        # every mapping was dropped once its shard was read
        assert len(ck._files) >= 4 and all(sf._mm is None for sf in ck._files.values())
        _check_loaded(model, ck, param_dtype=jnp.bfloat16)
    total = seen[-1][1]
    data = 0
    for fn in os.listdir(d):
        if fn.endswith(".safetensors"):
            with open(os.path.join(d, fn), "rb") as f:
                data += os.path.getsize(os.path.join(d, fn)) - 8 - struct.unpack("<Q", f.read(8))[0]
    assert seen[-1][0] == total == data
    assert [a for a, _ in seen] == sorted(a for a, _ in seen)
    ex = model.layers[1].ffn.moe_weights
    P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    assert ex.l1.sharding.is_equivalent_to(NS(mesh, P("ep")), 3)
    assert model.layers[1].attn.wq_a.weight.get_value().sharding.is_equivalent_to(NS(mesh, P()), 2)
    assert model.layers[1].ffn.mesh is mesh
    # the text bar
    with Checkpoint(d) as ck:
        loading._load_into(lambda: Standin(CFG, rngs=nnx.Rngs(0)), ck, loading._placement(None), "text", CFG)
    err = capsys.readouterr().err
    assert "load checkpoint" in err and "100%" in err


def test_exact_experts_from_fp4_and_dense(official, dense):
    d, _ = official
    model = Standin(CFG, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with Checkpoint(d) as ck:
        loading.load_state_dict(model, vmc.CheckpointTensors(ck))
        w13 = np.asarray(model.layers[2].ffn.experts.w13.get_value())
        w2 = np.asarray(model.layers[2].ffn.experts.w2.get_value())
        for x in (0, 9):
            p = f"layers.2.ffn.experts.{x}"
            want13 = np.concatenate([dequant_fp4(ck.get(f"{p}.w1.weight"), ck.get(f"{p}.w1.scale")),
                                     dequant_fp4(ck.get(f"{p}.w3.weight"), ck.get(f"{p}.w3.scale"))])  # fmt: skip
            np.testing.assert_array_equal(w13[x], want13)
            np.testing.assert_array_equal(w2[x], dequant_fp4(ck.get(f"{p}.w2.weight"), ck.get(f"{p}.w2.scale")))
    dd, _ = dense
    model = Standin(CFG, experts="exact", param_dtype=jnp.float32, include_mtp=False, rngs=nnx.Rngs(0))
    with Checkpoint(dd) as ck:
        vmc.check_checkpoint_layout(ck, CFG, include_mtp=False)
        loading.load_state_dict(model, vmc.CheckpointTensors(ck))
        np.testing.assert_array_equal(
            np.asarray(model.layers[1].attn.wq_b.weight.get_value()),
            np.asarray(ck.get("layers.1.attn.wq_b.weight"), np.float32),
        )
        np.testing.assert_array_equal(
            np.asarray(model.layers[1].ffn.experts.w2.get_value())[5],
            np.asarray(ck.get("layers.1.ffn.experts.5.w2.weight"), np.float32),
        )
        quantized = Standin(CFG, include_mtp=False, rngs=nnx.Rngs(0))
        with pytest.raises(CheckpointError, match=r"layers\.0\.ffn\.experts\.0\.w1\.weight.*experts='exact'"):
            loading.load_state_dict(quantized, vmc.CheckpointTensors(ck))


def test_moe_block_alone_with_relative_names(official):
    """Any module whose paths mirror the names: a DeepseekV4MoE block takes ``layers.1.ffn.*``."""
    d, _ = official
    blk = DeepseekV4MoE(CFG, 1, mode=MODE, backend="reference", rngs=nnx.Rngs(3))
    with Checkpoint(d) as ck:
        pre = "layers.1.ffn."
        sub = {n[len(pre) :]: np.asarray(ck.get(n)) for n in ck.names() if n.startswith(pre)}
        loading.load_state_dict(blk, sub)
        ref = DeepseekV4MoE.from_checkpoint(d, 1, mode=MODE, backend="reference")
    for leaf in ("l1", "l1_sf", "l2", "l2_sf"):
        np.testing.assert_array_equal(
            np.asarray(getattr(blk.moe_weights, leaf)), np.asarray(getattr(ref.moe_weights, leaf))
        )
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(
            np.asarray(getattr(blk.gate, name).get_value()), np.asarray(getattr(ref.gate, name).get_value())
        )
    for proj in ("w1", "w2", "w3"):
        np.testing.assert_array_equal(np.asarray(_shared(blk, proj)), np.asarray(_shared(ref, proj)))


@pytest.mark.parametrize("mode", ["fp8xfp4", "mxf4xmxf4", "fp8"])
def test_routed_experts_in_chunks_equal_one_build(official, monkeypatch, caplog, mode):
    """Chunks of 5 experts (5 + 5 + 5 + 1) build the same leaves as one call of the builder."""
    d, _ = official
    one = 3 * 512 * 256 // 2 + 3 * 512 * 256 // 32
    monkeypatch.setattr(loading, "EXPERT_CHUNK_BYTES", 5 * one)
    blk = DeepseekV4MoE(CFG, 2, mode=mode, backend="reference", rngs=nnx.Rngs(0))
    pre = "layers.2.ffn."
    with Checkpoint(d) as ck, caplog.at_level("INFO", logger="jax_megamoe.checkpoint"):
        loading.load_state_dict(blk, {n[len(pre) :]: ck.get(n) for n in ck.names() if n.startswith(pre)})
        ref, rep = MoEWeights.from_checkpoint_with_report(*routed_truth(ck, "layers.2.ffn.experts", 16), mode=mode)
    for leaf in ("l1", "l1_sf", "l2", "l2_sf"):
        np.testing.assert_array_equal(
            np.asarray(getattr(blk.moe_weights, leaf)), np.asarray(getattr(ref, leaf)), err_msg=leaf
        )
    assert blk.moe_weights.num_experts == 16 and blk.moe_weights.mode == mode
    if mode == "fp8":  # the merged report of the chunks is the report of the whole layer
        assert f"experts: {rep.summary()}" in caplog.text


# ------------------------------------------------------------------------------------------------
# The real model (DeepseekV4ForCausalLM, with its MTP block)
# ------------------------------------------------------------------------------------------------


def test_load_checkpoint_real_model_quantized(tmp_path, caplog):
    cfg = DeepseekV4Config.tiny(num_nextn_predict_layers=1, compress_ratios=(0, 4, 128, 4, 4))
    d = str(tmp_path / "q")
    vmc.write_synthetic_checkpoint(d, cfg, seed=11, shard_size=2 << 20)
    with caplog.at_level("INFO", logger="jax_megamoe.checkpoint"):
        model = loading.load_checkpoint(d, mode=MODE, progress=False, model_kwargs={"backend": "reference"})
    assert isinstance(model, DeepseekV4ForCausalLM) and model.config == cfg
    assert "no MTP block" not in caplog.text
    # the MTP block's tensors round-trip bit for bit too (_check_loaded walks every variable)
    assert len(model.mtp) == 1 and model.mtp[0].attn.compress_ratio == 4 and not model.mtp[0].ffn.gate.is_hash_layer
    with Checkpoint(d) as ck:
        _check_loaded(model, ck)
        np.testing.assert_array_equal(
            np.asarray(model.mtp[0].e_proj.weight.get_value()).astype(np.float32),
            dequant_fp8(ck.get("mtp.0.e_proj.weight"), ck.get("mtp.0.e_proj.scale"))
            .astype(jnp.bfloat16)
            .astype(np.float32),
        )
        np.testing.assert_array_equal(np.asarray(model.mtp[0].hc_head_fn.get_value()), ck.get("mtp.0.hc_head_fn"))
    assert model.layers[1].attn.wq_a.weight.get_value().dtype == jnp.bfloat16
    assert model.layers[1].ffn.moe_weights.mode == MODE
    assert model.mtp[0].ffn.moe_weights.mode == MODE
    # opting out: a config without MTP blocks builds none and skips mtp.* (logged)
    caplog.clear()
    lean = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    with caplog.at_level("INFO", logger="jax_megamoe.checkpoint"):
        model = loading.load_checkpoint(
            d, config=lean, mode=MODE, progress=False, model_kwargs={"backend": "reference"}
        )
    assert len(model.mtp) == 0 and "no MTP block" in caplog.text


def test_bad_mtp_tensor_names_it(tmp_path):
    cfg = DeepseekV4Config.tiny_model(num_hidden_layers=2, compress_ratios=(0, 4, 0), num_nextn_predict_layers=1)
    d = str(tmp_path / "m")
    vmc.write_synthetic_checkpoint(d, cfg, seed=3, float_weights=True, shard_size=1 << 20)
    model = DeepseekV4ForCausalLM(cfg, experts="exact", param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with Checkpoint(d) as ck:
        t = {n: np.array(ck.get(n)) for n in ck.names()}
    loading.load_state_dict(model, t)
    np.testing.assert_array_equal(np.asarray(model.mtp[0].h_proj.weight.get_value()), t["mtp.0.h_proj.weight"])
    bad = dict(t)
    bad["mtp.0.h_proj.weight"] = bad["mtp.0.h_proj.weight"][:, :-1]
    with pytest.raises(CheckpointError, match=r"mtp\.0\.h_proj\.weight.*shape"):
        loading.load_state_dict(model, bad)
    bad = dict(t)
    del bad["mtp.0.enorm.weight"]
    with pytest.raises(CheckpointError, match=r"mtp\.0\.enorm"):
        loading.load_state_dict(model, bad)


# ------------------------------------------------------------------------------------------------


#: Three layers (sliding, CSA, HCA; one hash layer) keep the HF comparison's compile short.
TINY3 = DeepseekV4Config.tiny_model(num_hidden_layers=3, compress_ratios=(0, 4, 128), num_hash_layers=1)


def test_load_checkpoint_over_a_two_device_mesh(tmp_path):
    """Experts sharded P('ep') (E/2 per device), the rest replicated, the MoE blocks expert-parallel
    with the single-device bits (a child process with two host devices)."""
    import subprocess
    import sys

    cfg = DeepseekV4Config.tiny(num_hidden_layers=2, compress_ratios=(0, 4))
    d = str(tmp_path / "m")
    vmc.write_synthetic_checkpoint(d, cfg, seed=13, shard_size=2 << 20)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=root)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "v4_mesh_load_worker.py")
    proc = subprocess.run(
        [sys.executable, worker, d, MODE], check=False, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_dense"))
    vmc.write_synthetic_checkpoint(d, TINY3, seed=5, float_weights=True, shard_size=1 << 20)
    return d


def test_load_checkpoint_real_model_exact_official(tmp_path):
    cfg = DeepseekV4Config.tiny_model()
    d = str(tmp_path / "o")
    vmc.write_synthetic_checkpoint(d, cfg, seed=12, shard_size=1 << 20)
    model = loading.load_checkpoint(d, experts="exact", param_dtype=jnp.float32, progress=None)
    with Checkpoint(d) as ck:
        _check_loaded(model, ck)


def test_dense_checkpoint_gives_hf_logits(tiny_dense):
    """The same folder through Hugging Face's own loader (its deepseek_v4 key renames of the
    official names) and through load_checkpoint: no missing/unexpected keys, equal logits."""
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    cfg = TINY3
    hf, info = tr.AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tok = (np.arange(20) * 7 % cfg.vocab_size).reshape(1, 20)
    with torch.no_grad():
        ref = hf(torch.tensor(tok)).logits.numpy()
    model = loading.load_checkpoint(tiny_dense, experts="exact", param_dtype=jnp.float32, progress=None)
    got, _ = forward(model, None, jnp.asarray(tok, jnp.int32), jnp.arange(20, dtype=jnp.int32)[None])
    got = np.asarray(got)
    assert float(np.abs(ref).max()) > 0.5
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * float(np.abs(ref).max()))


# ------------------------------------------------------------------------------------------------
# Bad checkpoints
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tensors(official):
    """The official tensors of layer 1's MoE block as an in-memory dict (for corruption)."""
    d, _ = official
    pre = "layers.1.ffn."
    with Checkpoint(d) as ck:
        return {n[len(pre) :]: np.array(ck.get(n)) for n in ck.names() if n.startswith(pre)}


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"'gate\.bias' is missing"),
        ("missing_expert", r"'experts\.3\.w2\.scale' is missing"),
        ("missing_scale", r"shared_experts\.w1\.scale is missing"),
        ("extra", r"'experts\.99\.w1\.weight'.*no parameter"),
        ("shape", r"'shared_experts\.w2\.weight'.*shape \[512, 255\]"),
        ("expert_shape", r"'experts\.4\.w3\.weight'.*shape \[256, 512\]"),
        ("dtype", r"'gate\.weight'.*dtype I32"),
        ("scale_dtype", r"'experts\.2\.w1\.scale'.*dtype F32"),
        ("nan_scale", r"'shared_experts\.w3\.scale'.*0xFF"),
        ("tid", r"expert id"),
    ],
)
def test_bad_tensors_name_the_tensor(small_tensors, case, match):
    t = dict(small_tensors)
    if case == "missing":
        del t["gate.bias"]
    elif case == "missing_expert":
        del t["experts.3.w2.scale"]
    elif case == "missing_scale":
        del t["shared_experts.w1.scale"]
    elif case == "extra":
        t["experts.99.w1.weight"] = t["experts.0.w1.weight"]
    elif case == "shape":
        t["shared_experts.w2.weight"] = t["shared_experts.w2.weight"][:, :255]
    elif case == "expert_shape":
        t["experts.4.w3.weight"] = np.concatenate([t["experts.4.w3.weight"]] * 2, axis=1)
    elif case == "dtype":
        t["gate.weight"] = t["gate.weight"].astype(np.float32).astype(np.int32)
    elif case == "scale_dtype":
        t["experts.2.w1.scale"] = e8m0(t["experts.2.w1.scale"])
    elif case == "nan_scale":
        s = t["shared_experts.w3.scale"].view(np.uint8).copy()
        s[1, 2] = 0xFF
        t["shared_experts.w3.scale"] = s.view(ml_dtypes.float8_e8m0fnu)
    elif case == "tid":
        # layer 1 is not a hash layer: use the hash block of layer 0 with a bad table
        t = None
    if t is None:
        blk = DeepseekV4MoE(CFG, 0, mode=MODE, backend="reference", rngs=nnx.Rngs(0))
        t = dict(small_tensors)
        del t["gate.bias"]
        tid = np.tile(np.arange(4, dtype=np.int64), (1000, 1))
        tid[7, 1] = 16
        t["gate.tid2eid"] = tid
    else:
        blk = DeepseekV4MoE(CFG, 1, mode=MODE, backend="reference", rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=match):
        loading.load_state_dict(blk, t)


def test_fp8_routed_experts_for_mode_fp8(small_tensors):
    """FP8 routed experts (re-packaged checkpoints: E4M3 + 128x128 F32 scale) -> MoEWeights.from_fp8."""
    rng = np.random.default_rng(0)
    t = {n: v for n, v in small_tensors.items() if not n.startswith("experts.")}
    w13, s13, w2, s2 = [], [], [], []
    for x in range(16):
        for proj, (r, c) in (("w1", (256, 512)), ("w3", (256, 512)), ("w2", (512, 256))):
            w = (rng.standard_normal((r, c)) * 0.5).astype(E4M3)
            s = np.ldexp(1.0, rng.integers(-8, -4, (r // 128, c // 128))).astype(np.float32)
            t[f"experts.{x}.{proj}.weight"], t[f"experts.{x}.{proj}.scale"] = w, s
        w13.append(np.concatenate([t[f"experts.{x}.w1.weight"], t[f"experts.{x}.w3.weight"]]))
        s13.append(np.concatenate([t[f"experts.{x}.w1.scale"], t[f"experts.{x}.w3.scale"]]))
        w2.append(t[f"experts.{x}.w2.weight"])
        s2.append(t[f"experts.{x}.w2.scale"])
    blk = DeepseekV4MoE(CFG, 1, mode="fp8", backend="reference", rngs=nnx.Rngs(0))
    loading.load_state_dict(blk, t)
    ref = MoEWeights.from_fp8(np.stack(w13), np.stack(s13), np.stack(w2), np.stack(s2))
    for leaf in ("l1", "l1_sf", "l2", "l2_sf"):
        np.testing.assert_array_equal(
            np.asarray(getattr(blk.moe_weights, leaf)), np.asarray(getattr(ref, leaf)), err_msg=leaf
        )
    other = DeepseekV4MoE(CFG, 1, mode=MODE, backend="reference", rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"experts\.0\.w1\.weight.*only run in mode 'fp8'"):
        loading.load_state_dict(other, t)


def test_non_strict_ignores_extra(small_tensors):
    t = dict(small_tensors, **{"something.else": np.ones(3, np.float32)})
    blk = DeepseekV4MoE(CFG, 1, mode=MODE, backend="reference", rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="'something.else'"):
        loading.load_state_dict(blk, t)
    loading.load_state_dict(blk, t, strict=False)
    np.testing.assert_array_equal(np.asarray(blk.gate.bias.get_value()), t["gate.bias"])


def _rewrite_index(d, fn):
    p = os.path.join(d, INDEX_NAME)
    with open(p) as f:
        idx = json.load(f)
    fn(idx["weight_map"])
    with open(p, "w") as f:
        json.dump(idx, f)


def _copy(official, tmp_path):
    d = str(tmp_path / "ck")
    shutil.copytree(official[0], d)
    return d


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"'layers\.2\.attn\.compressor\.ape' is missing"),
        ("extra", r"'layers\.0\.attn\.indexer\.wq_b\.weight'.* not part of"),
        ("shard", r"'layers\.1\.attn\.wq_a\.weight': its shard .*nope\.safetensors.* does not exist"),
        ("shape_dtype", r"'layers\.1\.attn\.wkv\.weight' in .*model-0000\d-of.*: dtype I16"),
    ],
)
def test_bad_checkpoint_folders(official, tmp_path, case, match):
    d = _copy(official, tmp_path)
    if case == "missing":
        _rewrite_index(d, lambda wm: wm.pop("layers.2.attn.compressor.ape"))
    elif case == "extra":
        _rewrite_index(
            d, lambda wm: wm.__setitem__("layers.0.attn.indexer.wq_b.weight", wm["layers.1.attn.indexer.wq_b.weight"])
        )
    elif case == "shard":
        _rewrite_index(d, lambda wm: wm.__setitem__("layers.1.attn.wq_a.weight", "nope.safetensors"))
    else:  # rewrite one header entry: the FP8 weight claims I16 with half the rows (same bytes)
        with open(os.path.join(d, INDEX_NAME)) as f:
            fn = os.path.join(d, json.load(f)["weight_map"]["layers.1.attn.wkv.weight"])
        with open(fn, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            rest = f.read()
        header["layers.1.attn.wkv.weight"]["dtype"] = "I16"
        header["layers.1.attn.wkv.weight"]["shape"][0] //= 2
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        with open(fn, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb + rest)
    with Checkpoint(d) as ck, pytest.raises(CheckpointError, match=match):
        vmc.check_checkpoint_layout(ck, CFG)
    if case in ("missing", "shard"):  # the walk reports them too, naming the tensor
        with Checkpoint(d) as ck, pytest.raises(CheckpointError, match=match.split(":")[0].split(" is")[0]):
            loading._load_into(lambda: Standin(CFG, rngs=nnx.Rngs(0)), ck, loading._placement(None), None, None)


def test_public_names(tmp_path):
    from jax_megamoe.models import deepseek_v4 as dsv4

    assert public_ckpt.expected_tensors is vmc.expected_tensors
    assert public_ckpt.write_synthetic_checkpoint is vmc.write_synthetic_checkpoint
    assert dsv4.load_checkpoint is loading.load_checkpoint and dsv4.load_state_dict is loading.load_state_dict
    with pytest.raises(ValueError, match="experts: 'fp4'"):
        loading.load_checkpoint("/nonexistent", experts="fp4")
    with pytest.raises(CheckpointError, match="no config.json"):
        loading.load_checkpoint(str(tmp_path))
