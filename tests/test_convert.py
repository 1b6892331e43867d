"""The converter CLI (``python -m jax_megamoe.convert``) and the converted-layer loader.

Synthetic 2-layer V4 checkpoints (layer 0 hash-routed, layer 1 biased and spanning both shards)
come from the helpers of ``test_checkpoint.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe import checkpoint as ckpt
from jax_megamoe._src.io import convert
from jax_megamoe.models.deepseek_v4 import DeepseekV4MoE

sys.path.insert(0, os.path.dirname(__file__))
from test_checkpoint import CFG, VOCAB, E, H, leaves_equal, params_equal, synth_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def v4_2(tmp_path_factory):
    return synth_checkpoint(tmp_path_factory.mktemp("v4c") / "ckpt", 2, seed=1)


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def same_layer(a: ckpt.MoELayer, b: ckpt.MoELayer) -> None:
    leaves_equal(a.weights, b.weights)
    assert a.mode == b.mode and a.config == b.config and a.is_hash_layer == b.is_hash_layer
    assert a.report == b.report
    for k in ("gate_weight", "gate_bias", "tid2eid"):
        x, y = getattr(a, k), getattr(b, k)
        assert (x is None) == (y is None), k
        if x is not None:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=k)
    assert a.shared.keys() == b.shared.keys()
    for k in a.shared:
        assert a.shared[k].dtype == b.shared[k].dtype
        np.testing.assert_array_equal(a.shared[k].view(np.uint8), b.shared[k].view(np.uint8), err_msg=k)


def run_main(argv, capsys) -> tuple[int, str]:
    rc = convert.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_convert_roundtrip_skip_and_repair(v4_2, tmp_path, capsys):
    path, truths = v4_2
    out = tmp_path / "out"
    rc, err = run_main([path, "--layers", "0-1", "--target", "sm100", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    assert listing(out) == ["layer_000.json", "layer_000.safetensors", "layer_001.json", "layer_001.safetensors"]
    assert "[1/2] layer 0: converting to fp8xfp4" in err and "done: 2 converted, 0 skipped" in err
    for i in (0, 1):
        got = convert.load_converted(out, i, verify=True)
        same_layer(got, ckpt.load_moe_layer(path, i, mode="fp8xfp4"))
        params_equal(got, truths[i])
        back = got.weights.to_checkpoint()
        for x, want in zip(back, (truths[i].w13, truths[i].w13_scale, truths[i].w2, truths[i].w2_scale)):
            np.testing.assert_array_equal(np.asarray(x), want)
    man = json.loads((out / "layer_001.json").read_text())
    assert man["mode"] == "fp8xfp4" and man["target"] == "sm100" and man["is_hash_layer"] is False
    assert man["config"]["n_routed_experts"] == E and man["conversion_report"] is None
    assert man["tensors"]["experts.l1_sf"] == {"dtype": "I32", "shape": [E, H // 128, 2 * CFG.moe_intermediate_size]}
    assert man["tensors"]["shared_experts.w1.scale"]["dtype"] == "F8_E8M0"
    assert man["file"]["size"] == os.path.getsize(out / "layer_001.safetensors")
    # The data file is plain safetensors.
    sf = ckpt.SafetensorsFile(out / "layer_001.safetensors")
    assert sf.metadata["format"] == convert.FORMAT and "gate.bias" in sf and "gate.tid2eid" not in sf
    assert sf.metadata["layer_idx"] == "1" and sf.metadata["fingerprint"] == man["source"]["fingerprint"] != ""
    assert man["version"] == 2 == convert.FORMAT_VERSION and len(man["manifest_sha256"]) == 64

    # Re-running skips complete layers and touches nothing.
    stamps = {f: os.stat(out / f).st_mtime_ns for f in listing(out)}
    rc, err = run_main([path, "--layers", "0-1", "--target", "sm100", "--out", out, "--quiet"], capsys)
    assert (
        rc == 0 and err.count("already converted (verified), skipping") == 2 and "done: 0 converted, 2 skipped" in err
    )
    rc, err = run_main([path, "--layers", "0-1", "--target", "sm100", "--out", out, "--quiet", "--no-verify"], capsys)
    assert rc == 0 and err.count("already converted (not re-hashed), skipping") == 2
    assert {f: os.stat(out / f).st_mtime_ns for f in listing(out)} == stamps

    # A damaged data file or another mode is not "complete": only that layer is redone.
    with open(out / "layer_001.safetensors", "r+b") as f:
        f.truncate(1000)
    rc, err = run_main([path, "--layers", "all", "--target", "sm100", "--out", out, "--quiet"], capsys)
    assert rc == 0 and "layer 0: already converted" in err and "layer 1: converting" in err and "truncated" in err
    same_layer(convert.load_converted(out, 1), ckpt.load_moe_layer(path, 1, mode="fp8xfp4"))
    rc, err = run_main(
        [path, "--layers", "1", "--target", "sm100", "--mode", "mxf4xmxf4", "--out", out, "--quiet"], capsys
    )
    assert rc == 0 and "mode differs ('fp8xfp4' on disk, 'mxf4xmxf4' wanted)" in err
    assert convert.load_converted(out, 1).mode == "mxf4xmxf4"
    ok, why = convert.check_converted(out, 1, mode="fp8xfp4")
    assert not ok and "mode differs" in why


def test_interrupted_conversion_leaves_no_partial_file(v4_2, tmp_path, capsys, monkeypatch):
    path, _ = v4_2
    out = tmp_path / "out"
    real = convert._write_chunk
    argv = [path, "--layers", "0-1", "--target", "sm100", "--out", out, "--quiet"]

    def failing_at(name):
        def write(f, data):
            if name in os.path.basename(f.name):
                real(f, bytes(data)[: len(data) // 2])  # part of a piece reaches the disk
                raise OSError(28, "No space left on device")
            real(f, data)

        return write

    # Disk full while writing layer 1's data file: layer 0 is complete, nothing else exists.
    monkeypatch.setattr(convert, "_write_chunk", failing_at("layer_001.safetensors"))
    rc, err = run_main(argv, capsys)
    assert rc == 1 and "No space left on device" in err
    assert listing(out) == ["layer_000.json", "layer_000.safetensors"]
    # Failing on layer 1's manifest: its data file is complete but without a manifest it does not count.
    monkeypatch.setattr(convert, "_write_chunk", failing_at("layer_001.json"))
    rc, _ = run_main(argv, capsys)
    assert rc == 1
    assert listing(out) == ["layer_000.json", "layer_000.safetensors", "layer_001.safetensors"]
    assert not convert.check_converted(out, 1)[0]
    with pytest.raises(ckpt.CheckpointError, match="has no manifest"):
        convert.load_converted(out, 1)
    # A temporary file left by a killed run (dead pid) is cleaned up; the rerun finishes the job.
    stale = out / ".layer_001.safetensors.999999999.tmp"
    stale.write_bytes(b"partial")
    monkeypatch.setattr(convert, "_write_chunk", real)
    rc, err = run_main(argv, capsys)
    assert rc == 0 and "removed stale temporary file" in err
    assert "layer 0: already converted" in err and "layer 1: converting" in err
    assert listing(out) == ["layer_000.json", "layer_000.safetensors", "layer_001.json", "layer_001.safetensors"]
    same_layer(convert.load_converted(out, 1), ckpt.load_moe_layer(path, 1, mode="fp8xfp4"))


def test_cli_subprocess_sm90_and_serving_from_converted(v4_2, tmp_path):
    path, _ = v4_2
    out = tmp_path / "sm90"
    proc = subprocess.run(
        [sys.executable, "-m", "jax_megamoe.convert", path, "--layers", "1", "--target", "sm90", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer 1: read experts" in proc.stderr and "FP4 -> FP8 128x128" in proc.stderr  # progress + report
    want = ckpt.load_moe_layer(path, 1, mode="fp8")
    got = convert.load_converted(out, 1)
    same_layer(got, want)
    assert got.report is not None and got.report.num_experts == E
    man = json.loads((out / "layer_001.json").read_text())
    assert man["mode"] == "fp8" and man["target"] == "sm90"
    assert man["tensors"]["experts.l1"]["dtype"] == "F8_E4M3" and man["conversion_report"]["num_experts"] == E
    # Serving: the block loads straight from the converted folder, same outputs as from the checkpoint.
    a = DeepseekV4MoE.from_checkpoint(out, 1, backend="reference")
    b = DeepseekV4MoE.from_checkpoint(path, 1, mode="fp8", backend="reference")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, H)) * 3, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(a(x), np.float32), np.asarray(b(x), np.float32))
    with pytest.raises(ckpt.CheckpointError, match="converted for mode 'fp8'"):
        DeepseekV4MoE.from_checkpoint(out, 1, mode="fp8xfp4")


def test_cli_nibble_order_and_argument_errors(tmp_path, capsys):
    path, truths = synth_checkpoint(tmp_path / "swapped", 2, seed=2, nibble_order="high_even")
    out = tmp_path / "out"
    rc, _ = run_main(
        [path, "--layers", "1", "--target", "sm100", "--out", out, "--quiet", "--nibble-order", "high_even"], capsys
    )
    assert rc == 0
    got = convert.load_converted(out, 1)
    assert got.nibble_order == "high_even"
    for x, want in zip(
        got.weights.to_checkpoint(), (truths[1].w13, truths[1].w13_scale, truths[1].w2, truths[1].w2_scale)
    ):
        np.testing.assert_array_equal(np.asarray(x), want)
    # The same folder asked for the other order is not complete.
    assert not convert.check_converted(out, 1, nibble_order="low_even")[0]
    for argv, msg in (
        (
            [path, "--layers", "1", "--target", "sm90", "--mode", "fp8xfp4", "--out", out],
            "does not run on --target sm90",
        ),
        ([path, "--layers", "5", "--target", "sm100", "--out", out], r"\[5\] have no MoE layer"),
        ([path, "--layers", "1-x", "--target", "sm100", "--out", out], "not an index or a range"),
    ):
        with pytest.raises(SystemExit) as ei:
            convert.main([str(a) for a in argv])
        assert ei.value.code == 2
        assert re.search(msg, capsys.readouterr().err)
    rc, err = run_main([tmp_path / "nowhere", "--layers", "1", "--target", "sm100", "--out", out], capsys)
    assert rc == 1 and "no such checkpoint" in err
    assert convert.parse_layers("0,2,4-6") == [0, 2, 4, 5, 6]
    assert VOCAB == truths[0].tid2eid.shape[0]
