"""Integrity of converted layers: verification by default, the data file's binding to its
manifest, manifest schema errors and the CLI's one-line errors.

The converted folders come from the synthetic V4 checkpoints of ``test_checkpoint.py`` (layer 0
hash-routed, layers 1 and 2 biased, so their converted files have the same size).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_megamoe import checkpoint as ckpt
from jax_megamoe._src.io import convert
from jax_megamoe.checkpoint import CheckpointError
from jax_megamoe.models.deepseek_v4 import BlockLoadOptions, DeepseekV4MoE

sys.path.insert(0, os.path.dirname(__file__))
from test_checkpoint import synth_checkpoint  # noqa: E402
from test_convert import run_main, same_layer  # noqa: E402

DATA1, MAN1 = convert.layer_file_names(1)
DATA2, _ = convert.layer_file_names(2)


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    """``(checkpoint, clean converted folder with layers 1 and 2 in fp8xfp4)``; tests copy it."""
    base = tmp_path_factory.mktemp("conv_integrity")
    path, _ = synth_checkpoint(base / "ckpt", 3, seed=3)
    out = base / "clean"
    assert convert.main([str(path), "--layers", "1-2", "--target", "sm100", "--out", str(out), "--quiet"]) == 0
    return path, out


@pytest.fixture
def out(conv, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(conv[1], dst)
    return dst


def flip(path, offset: int, xor: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ xor]))


def data_offset(path, name: str) -> int:
    """File offset of the first byte of tensor ``name``."""
    sf = ckpt.SafetensorsFile(path)
    return sf.data_start + sf.info(name).begin


def edit_manifest(folder, layer: int, fn) -> None:
    p = os.path.join(folder, convert.layer_file_names(layer)[1])
    with open(p) as f:
        man = json.load(f)
    man = fn(man) or man
    with open(p, "w") as f:
        json.dump(man, f)


# ------------------------------------------------------------------------------------------------
# Verification by default
# ------------------------------------------------------------------------------------------------


def test_flipped_data_byte_is_rejected_by_default(conv, out):
    clean = convert.load_converted(conv[1], 1)
    flip(out / DATA1, data_offset(out / DATA1, "experts.l2") + 12345)
    for load in (
        lambda: convert.load_converted(out, 1),
        lambda: convert.load_converted(out, 1),
        lambda: DeepseekV4MoE.from_checkpoint(out, 1, backend="reference"),
    ):
        with pytest.raises(CheckpointError, match="corrupt or was replaced") as ei:
            load()
        assert DATA1 in str(ei.value) and MAN1 in str(ei.value) and "verify=False" in str(ei.value)
    assert not convert.check_converted(out, 1)[0]
    # The explicit opt-out trusts the data: it loads, one byte off.
    got = convert.load_converted(out, 1, verify=False)
    diff = np.asarray(got.weights.l2).view(np.uint8) != np.asarray(clean.weights.l2).view(np.uint8)
    assert diff.sum() == 1
    DeepseekV4MoE.from_checkpoint(out, 1, backend="reference", load_options=BlockLoadOptions(verify=False))
    assert convert.check_converted(out, 1, verify=False) == (True, "")


def test_tensor_dropped_from_the_header_is_named(conv, out):
    """A data file whose header lost a tensor the manifest lists (same file size: the header is
    padded back) names that tensor, not the byte gap its data leaves behind."""
    path = out / DATA1
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    victim = "experts.l2_sf"
    assert victim in header
    del header[victim]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :])
    for verify in (True, False):
        with pytest.raises(CheckpointError) as ei:
            convert.load_converted(out, 1, verify=verify)
        msg = str(ei.value)
        assert repr(victim) in msg and "is missing from" in msg and MAN1 in msg, msg
        assert "gap" not in msg and "belong to no tensor" not in msg, msg


def test_verified_load_streams_once_without_mmap(conv, monkeypatch):
    """The verified load hashes while it reads: no separate hashing pass, no memory map."""

    def no(*a, **k):
        raise AssertionError("must not be called by a verified load")

    monkeypatch.setattr(convert, "_sha256_file", no)
    monkeypatch.setattr(ckpt.SafetensorsFile, "_map", no)
    got = convert.load_converted(conv[1], 1)
    monkeypatch.undo()
    same_layer(got, convert.load_converted(conv[1], 1, verify=False))


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("chunk", [4096, 1 << 26])
def test_streaming_read_threaded_or_not(conv, out, threaded, chunk):
    man = json.loads((out / MAN1).read_text())
    sf = ckpt.SafetensorsFile(out / DATA1)
    arrays = convert._read_verified(sf, man["file"]["sha256"], "m.json", threaded=threaded, chunk=chunk)
    assert list(arrays) == list(man["tensors"])
    for name, a in arrays.items():
        np.testing.assert_array_equal(a.view(np.uint8), np.asarray(sf.get(name)).view(np.uint8))
        assert a.flags.writeable and a.flags.owndata
    flip(out / DATA1, os.path.getsize(out / DATA1) - 1)
    with pytest.raises(CheckpointError, match="corrupt or was replaced"):
        convert._read_verified(
            ckpt.SafetensorsFile(out / DATA1), man["file"]["sha256"], "m.json", threaded=threaded, chunk=chunk
        )


# ------------------------------------------------------------------------------------------------
# Binding of the data file to its layer and conversion
# ------------------------------------------------------------------------------------------------


def test_other_layers_file_of_the_same_size_is_refused_even_without_verify(out):
    assert os.path.getsize(out / DATA1) == os.path.getsize(out / DATA2)
    shutil.copyfile(out / DATA2, out / DATA1)
    for verify in (False, True):
        with pytest.raises(CheckpointError, match=r"layer_idx '2' but .*layer_001\.json records '1'"):
            convert.load_converted(out, 1, verify=verify)
        ok, why = convert.check_converted(out, 1, verify=verify)
        assert not ok and "another layer" in why


def test_file_of_another_conversion_is_refused_by_its_fingerprint(conv, tmp_path):
    layer = convert.load_converted(conv[1], 1)
    a, b = tmp_path / "a", tmp_path / "b"
    convert.write_converted_layer(a, layer, fingerprint="a" * 64)
    convert.write_converted_layer(b, layer, fingerprint="b" * 64)
    assert os.path.getsize(a / DATA1) == os.path.getsize(b / DATA1)
    shutil.copyfile(b / DATA1, a / DATA1)
    with pytest.raises(CheckpointError, match=f"fingerprint '{'b' * 64}' but .* records '{'a' * 64}'"):
        convert.load_converted(a, 1, verify=False)


def test_cli_rerun_reconverts_a_corrupted_layer(conv, out, capsys):
    path = conv[0]
    argv = [path, "--layers", "1-2", "--target", "sm100", "--out", out, "--quiet"]
    flip(out / DATA1, data_offset(out / DATA1, "experts.l1") + 7)
    # The opt-out only checks size, header and binding: it keeps the damaged file.
    rc, err = run_main([*argv, "--no-verify"], capsys)
    assert rc == 0 and err.count("already converted (not re-hashed), skipping") == 2
    rc, err = run_main(argv, capsys)
    assert rc == 0, err
    assert re.search(r"layer 1: converting to fp8xfp4 \(.*corrupt or was replaced", err)
    assert "layer 2: already converted (verified), skipping" in err and "done: 1 converted, 1 skipped" in err
    same_layer(convert.load_converted(out, 1), convert.load_converted(conv[1], 1))
    # A malformed manifest is not "complete" either: the re-run says why and repairs it.
    edit_manifest(out, 2, lambda m: m.update(file=[]))
    rc, err = run_main(argv, capsys)
    assert rc == 0 and "layer 2: converting to fp8xfp4" in err and "field 'file' is [] (list)" in err
    assert convert.check_converted(out, 2) == (True, "")


def _as_version_1(folder, layer: int) -> None:
    """Rewrite a converted layer the way version 1 wrote it (no fingerprint, no manifest digest)."""
    data, _ = convert.layer_file_names(layer)
    sf = ckpt.SafetensorsFile(os.path.join(folder, data))
    tensors = {n: np.array(sf.get(n)) for n in sf.tensors}
    meta = {k: sf.metadata[k] for k in ("format", "layer_idx", "mode")}
    size, sha = convert.write_safetensors(os.path.join(folder, data), tensors, meta)

    def down(m):
        m.update(version=1, file={**m["file"], "size": size, "sha256": sha})
        del m["manifest_sha256"]

    edit_manifest(folder, layer, down)


def test_version_1_outputs_are_still_read_and_bound_by_layer(conv, out, capsys):
    _as_version_1(out, 1)
    _as_version_1(out, 2)
    assert "fingerprint" not in ckpt.SafetensorsFile(out / DATA1).metadata
    same_layer(convert.load_converted(out, 1), convert.load_converted(conv[1], 1))
    argv = [conv[0], "--layers", "1-2", "--target", "sm100", "--out", out, "--quiet"]
    rc, err = run_main(argv, capsys)
    assert rc == 0 and err.count("already converted (verified), skipping") == 2
    shutil.copyfile(out / DATA2, out / DATA1)
    with pytest.raises(CheckpointError, match="layer_idx '2'"):
        convert.load_converted(out, 1, verify=False)
    # --force (or a damaged layer) rewrites it as version 2.
    rc, err = run_main([*argv, "--force"], capsys)
    assert rc == 0 and json.loads((out / MAN1).read_text())["version"] == 2


# ------------------------------------------------------------------------------------------------
# Manifest schema
# ------------------------------------------------------------------------------------------------


def _set(*keys_value):
    *keys, value = keys_value

    def fn(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return fn


def _del(*keys):
    def fn(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return fn


MALFORMED = [
    (_set("file", []), "field 'file' is [] (list), expected a mapping"),
    (_set("tensors", [["experts.l1"]]), "field 'tensors' is [['experts.l1']] (list)"),
    (_set("weights", [1, 2]), "field 'weights' is [1, 2] (list)"),
    (_set("source", ["x"]), "field 'source' is ['x'] (list)"),
    (_set("config", []), "field 'config' is [] (list)"),
    (_set("file", "size", "abc"), "field 'file.size' is 'abc' (str), expected a non-negative integer"),
    (_set("file", "size", -1), "field 'file.size' is -1 (int)"),
    (_set("file", "size", True), "field 'file.size' is True (bool)"),
    (_del("file", "size"), "field 'file.size' is missing"),
    (_set("file", "sha256", "AB" * 32), "field 'file.sha256' is 'ABAB"),
    (_set("file", "sha256", "ab" * 31), "field 'file.sha256'"),
    (_set("file", "sha256", 5), "field 'file.sha256' is 5 (int), expected 64 lowercase hex digits"),
    (_set("file", "name", "../layer_001.safetensors"), "field 'file.name' is '../layer_001.safetensors' (str)"),
    (_set("file", "name", "/etc/passwd"), "field 'file.name'"),
    (_set("file", "name", DATA2), "field 'file.name' is 'layer_002.safetensors'"),
    (_set("file", "name", None), "field 'file.name' is None (NoneType)"),
    (_set("layer_idx", True), "field 'layer_idx' is True (bool)"),
    (_set("layer_idx", 2), "the manifest is for layer 2, not 1"),
    (_set("version", "2"), "field 'version' is '2' (str)"),
    (_set("version", 99), "field 'version' is 99 (int), expected one of (1, 2)"),
    (_set("format", 5), "field 'format' is 5 (int)"),
    (_set("mode", "fp16"), "field 'mode' is 'fp16' (str), expected one of mxf4xmxf4, fp8xfp4, fp8"),
    (_set("target", None), "field 'target' is None"),
    (_set("is_hash_layer", "false"), "field 'is_hash_layer' is 'false' (str)"),
    (_set("weights", "hidden", 0), "field 'weights.hidden' is 0 (int), expected a positive integer"),
    (_set("weights", "num_experts", 8.0), "field 'weights.num_experts' is 8.0 (float)"),
    (_del("weights", "intermediate"), "field 'weights.intermediate' is missing"),
    (_set("tensors", "experts.l1", []), "field 'tensors.experts.l1' is [] (list)"),
    (_set("tensors", "experts.l1", "shape", [8, -1]), "field 'tensors.experts.l1.shape' is [8, -1] (list)"),
    (_set("tensors", "experts.l1", "shape", "8x512"), "field 'tensors.experts.l1.shape' is '8x512' (str)"),
    (_set("tensors", "gate.weight", "dtype", None), "field 'tensors.gate.weight.dtype' is None"),
    (_del("tensors", "gate.bias"), "field 'tensors' lacks ['gate.bias'] (needed by a biased layer)"),
    (_del("tensors", "experts.l2_sf"), "field 'tensors' lacks ['experts.l2_sf']"),
    (_set("is_hash_layer", True), "field 'tensors' lacks ['gate.tid2eid'] (needed by a hash-routed layer)"),
    (_del("tensors", "shared_experts.w2.scale"), "field 'tensors' lacks ['shared_experts.w2.scale']"),
    (_set("conversion_report", []), "field 'conversion_report' is [] (list), expected null or a mapping"),
    (_set("source", "fingerprint", 5), "field 'source.fingerprint' is 5 (int), expected a string or null"),
    (_set("source", "nibble_order", "middle"), "field 'source.nibble_order' is 'middle'"),
    (_set("source", "expert_format", None), "field 'source.expert_format' is None"),
    (_del("manifest_sha256"), "field 'manifest_sha256' is missing"),
    (lambda m: [m], "the manifest is a JSON list, expected an object"),
    (lambda m: "x", "the manifest is a JSON str"),
]


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("edit,msg", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_manifest_names_the_field(out, edit, msg, verify):
    edit_manifest(out, 1, edit)
    with pytest.raises(CheckpointError) as ei:
        convert.load_converted(out, 1, verify=verify)
    assert str(ei.value).startswith(f"{out / MAN1}: ") and msg in str(ei.value), str(ei.value)
    ok, why = convert.check_converted(out, 1, verify=verify)
    assert not ok and msg in why


def test_manifest_edits_past_the_schema(out):
    """Well-typed but wrong contents: the digest catches them; without it they still surface as a
    CheckpointError naming the manifest, never as a TypeError from a constructor."""
    for edit, msg in (
        (_set("config", {"bogus": 1}), "inconsistent manifest or data (TypeError"),
        (_set("weights", "hidden", 1024), "field 'weights.hidden' is 1024 but field 'config.hidden_size' is 512"),
        (_set("conversion_report", {"num_experts": 1}), "inconsistent manifest or data (KeyError: 'lossy_experts')"),
        (_set("tensors", "experts.l1", "shape", [8, 512, 128]), "but " + str(out / MAN1) + " records U8[8, 512, 128]"),
    ):
        backup = (out / MAN1).read_bytes()
        edit_manifest(out, 1, edit)
        with pytest.raises(CheckpointError, match="do not match its manifest_sha256"):
            convert.load_converted(out, 1)
        with pytest.raises(CheckpointError) as ei:
            convert.load_converted(out, 1, verify=False)
        assert str(out / MAN1) in str(ei.value) and msg in str(ei.value), str(ei.value)
        (out / MAN1).write_bytes(backup)
    # JSON formatting is not significant (edit_manifest writes it without indentation).
    edit_manifest(out, 1, lambda m: None)
    assert (out / MAN1).read_bytes() != backup
    convert.load_converted(out, 1)
    # An edit the loader does not use is still an edit: verify refuses it, verify=False loads.
    edit_manifest(out, 1, _set("source", "path", "/elsewhere"))
    with pytest.raises(CheckpointError, match="corrupt or edited"):
        convert.load_converted(out, 1)
    convert.load_converted(out, 1, verify=False)


# ------------------------------------------------------------------------------------------------
# CLI errors: one line, no traceback
# ------------------------------------------------------------------------------------------------


def test_cli_errors_are_one_line(conv, tmp_path, capsys):
    path = conv[0]
    bad_config = tmp_path / "cfg.json"
    bad_config.write_text("[1, 2]")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((16).to_bytes(8, "little") + b"{not json}      ")
    for argv, msg in (
        (
            [path, "--layers", "1", "--target", "sm100", "--out", tmp_path / "o", "--config", bad_config],
            "--config must hold a JSON object",
        ),
        ([path, "--layers", "1", "--target", "sm100", "--out", not_a_dir], "File exists"),
        ([broken, "--layers", "1", "--target", "sm100", "--out", tmp_path / "o2"], "not valid JSON"),
    ):
        rc, err = run_main(argv, capsys)
        assert rc == 1 and "Traceback" not in err
        last = err.rstrip("\n").split("\n")[-1]
        assert last.startswith("jax_megamoe.convert: error: ") and msg in last, err
        assert all(line.startswith("jax_megamoe.convert: ") for line in err.rstrip("\n").split("\n"))


def test_cli_rerun_over_malformed_manifests_never_crashes(conv, out, capsys):
    """Wrong types where the re-run's check reads the manifest (which used to raise AttributeError
    out of ``main``): each layer is reported on one line and converted again."""
    argv = [conv[0], "--layers", "1-2", "--target", "sm100", "--out", out, "--quiet"]
    edit_manifest(out, 1, _set("source", ["x"]))
    edit_manifest(out, 2, _set("tensors", ["experts.l1"]))
    rc, err = run_main(argv, capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert "layer 1: converting to fp8xfp4" in err and "field 'source' is ['x'] (list)" in err
    assert "layer 2: converting to fp8xfp4" in err and "field 'tensors' is ['experts.l1'] (list)" in err
    assert convert.check_converted(out, 1) == (True, "") and convert.check_converted(out, 2) == (True, "")


# ------------------------------------------------------------------------------------------------
# Property: any one damaged byte is refused or harmless
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_layer(conv):
    return conv[1], convert.load_converted(conv[1], 1)


@settings(max_examples=60, deadline=None)
@given(
    target=st.sampled_from(["data", "data_header", "manifest", "manifest_indent"]),
    where=st.floats(0, 1, exclude_max=True),
    xor=st.integers(1, 255),
)
def test_any_damaged_byte_is_refused_or_harmless(clean_layer, tmp_path_factory, target, where, xor):
    src, want = clean_layer
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as d:
        for fn in (DATA1, MAN1):
            shutil.copyfile(os.path.join(src, fn), os.path.join(d, fn))
        victim = os.path.join(d, MAN1 if target.startswith("manifest") else DATA1)
        if target == "manifest_indent":  # an indentation space becomes a tab: must load unchanged
            text = open(victim, "rb").read()
            spaces = [i for i in range(1, len(text)) if text[i] == 0x20 and text[i - 1] in b"\n "]
            flip(victim, spaces[int(where * len(spaces))], 0x20 ^ 0x09)
            same_layer(convert.load_converted(d, 1), want)
            return
        end = ckpt.SafetensorsFile(victim).data_start if target == "data_header" else os.path.getsize(victim)
        flip(victim, int(where * end), xor)
        try:
            got = convert.load_converted(d, 1)
        except CheckpointError:
            return
        assert target == "manifest"  # any data byte changes the SHA-256
        same_layer(got, want)


def test_verify_cost_benchmark_runs(tmp_path):
    """benchmarks/convert_verify_cost.py on a 2-expert layer: its JSON has every method."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "benchmarks", "convert_verify_cost.py"),
            "--experts",
            "2",
            "--repeats",
            "1",
            "--no-cold",
            "--dir",
            str(tmp_path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["scaled_from_fewer_experts"] and res["file_bytes"] > 0
    assert {"verify, threaded", "no verify (mmap+copy)", "sha256 of the file", "sha256 in memory"} <= set(
        res["results"]
    )
    assert [p for p in os.listdir(tmp_path) if p.startswith("convert_verify_cost.")] == []  # temp file removed
