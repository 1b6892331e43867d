"""benchmarks/: the XLA baselines compute the reference's function, the roofline arithmetic, the
``--quick`` CPU smoke run's JSON + PNG (+ RESULTS.md section), RESULTS.md built from the JSON
files; ffi_overhead skips cleanly on CPU. The scripts run as ``python -m benchmarks.<name>`` from
the repository root (which must be importable: ``python -m pytest`` from the root, or PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import _common as C
from benchmarks import baselines as B
from benchmarks import report as R
from benchmarks import sweep as S

REPO = Path(__file__).resolve().parents[1]
SHAPE = B.Shape("test", hidden=256, intermediate=128, num_experts=8, full_experts=8, top_k=3, rho=1.5, clamp=10.0)


def _emulated_scaled_matmul(a, b, sa, sb, preferred_element_type=jnp.float32):
    """``jax.nn.scaled_matmul``'s documented definition (it has no CPU lowering)."""
    a = a.astype(jnp.float32) * jnp.repeat(sa, a.shape[-1] // sa.shape[-1], axis=-1)
    b = b.astype(jnp.float32) * jnp.repeat(sb, b.shape[-1] // sb.shape[-1], axis=-1)
    return jnp.einsum("bmk,bnk->bmn", a, b, precision="highest").astype(preferred_element_type)


@pytest.fixture(scope="module")
def problem():
    w = B.random_fp8_weights(SHAPE, seed=3)
    w13t, w2t = B.dequantize_all_bf16(w)
    inp = S.make_inputs(SHAPE, 13, 1, seed=5)
    x, idx, wt = inp.sets[0]
    x = (x.astype(jnp.float32) * 4).astype(jnp.bfloat16)  # large enough that the clamp at 10 bites
    clamp = SHAPE.clamp
    y_f32 = np.asarray(B.f32_oracle(x, idx, wt, w, clamp=clamp))
    y_ref = np.asarray(B.reference_mega_moe(x, idx, wt, w, clamp=clamp)).astype(np.float32)
    return dict(w=w, w13t=w13t, w2t=w2t, inp=inp, x=x, idx=idx, wt=wt, y_f32=y_f32, y_ref=y_ref)


def test_test_data_exercises_the_clamp(problem):
    p = problem
    unclamped = np.asarray(B.f32_oracle(p["x"], p["idx"], p["wt"], p["w"], clamp=None))
    assert C.rel_l2(unclamped, p["y_f32"]) > 1e-3


def test_bf16_dequantisation_is_exact(problem):
    w = problem["w"]
    for e in (0, SHAPE.num_experts - 1):
        w13, w2 = w.dequantize_expert(e)
        np.testing.assert_array_equal(np.asarray(problem["w13t"][e], np.float32), np.asarray(w13).T)
        np.testing.assert_array_equal(np.asarray(problem["w2t"][e], np.float32), np.asarray(w2).T)


def test_f32_oracle_and_reference_compute_the_same_layer(problem):
    # They differ only by the kernel's FP8 activation and intermediate quantisation (a few %).
    r = C.rel_l2(problem["y_ref"], problem["y_f32"])
    assert 1e-3 < r < S.TOL["reference_vs_f32"]


@pytest.mark.parametrize(
    "name", ["xla_gather", "xla_capacity", "xla_ragged", "fp8w_gather", "fp8w_capacity", "fp8w_capacity_g2"]
)
def test_bf16_activation_paths_match_the_f32_oracle(problem, name):
    p = problem
    w, clamp, cap = p["w"], SHAPE.clamp, p["inp"].capacity
    q = (w.l1, w.l1_sf, w.l2, w.l2_sf)
    fn, wts = {
        "xla_gather": (partial(B.xla_gather, clamp=clamp), (p["w13t"], p["w2t"])),
        "xla_capacity": (partial(B.xla_capacity, clamp=clamp, cap=cap), (p["w13t"], p["w2t"])),
        "xla_ragged": (partial(B.xla_ragged, clamp=clamp), (p["w13t"], p["w2t"])),
        "fp8w_gather": (partial(B.fp8w_gather, clamp=clamp), q),
        "fp8w_capacity": (partial(B.fp8w_capacity, clamp=clamp, cap=cap, group=SHAPE.num_experts), q),
        "fp8w_capacity_g2": (partial(B.fp8w_capacity, clamp=clamp, cap=cap, group=2), q),
    }[name]
    y = jax.jit(fn)(p["x"], p["idx"], p["wt"], *wts)
    assert y.shape == p["x"].shape and y.dtype == jnp.bfloat16
    r = C.rel_l2(np.asarray(y, np.float32), p["y_f32"])
    assert r <= S.TOL["bf16_vs_f32"], r
    # The check has teeth: the same path with the slots' routing weights swapped fails it.
    y_bad = jax.jit(fn)(p["x"], p["idx"], p["wt"][:, ::-1], *wts)
    assert C.rel_l2(np.asarray(y_bad, np.float32), p["y_f32"]) > 10 * S.TOL["bf16_vs_f32"]


@pytest.mark.parametrize("name", ["fp8_ragged", "fp8_gather", "fp8_capacity"])
def test_fp8_activation_paths_match_the_reference(problem, name, monkeypatch):
    p = problem
    w, clamp = p["w"], SHAPE.clamp
    if name == "fp8_ragged":
        l1b, l2b = B.blocked_fp8(w)
        fn, wts = partial(B.fp8_ragged, clamp=clamp), (l1b, w.l1_sf, l2b, w.l2_sf)
    else:
        monkeypatch.setattr(jax.nn, "scaled_matmul", _emulated_scaled_matmul)
        s1, s2 = B.scale_rows(w)
        f = B.fp8_gather if name == "fp8_gather" else partial(B.fp8_capacity, cap=p["inp"].capacity)
        fn, wts = partial(f, clamp=clamp), (w.l1, s1, w.l2, s2)
    y = np.asarray(jax.jit(fn)(p["x"], p["idx"], p["wt"], *wts), np.float32)
    assert C.rel_l2(y, p["y_ref"]) <= S.TOL["fp8_vs_reference"]


def test_capacity_is_the_largest_expert_load():
    inp = S.make_inputs(SHAPE, 40, 3, seed=1)
    loads = [np.bincount(i.reshape(-1), minlength=SHAPE.num_experts).max() for i in inp.idx_host]
    assert inp.capacity == max(loads)
    for i in inp.idx_host:  # K distinct experts per token
        assert all(len(set(r)) == SHAPE.top_k for r in i.tolist())
    assert len(inp.check_rows) == S.CHECK_ROWS and inp.check_rows.max() == 39
    small = S.make_inputs(SHAPE, 5, 1, seed=1)
    assert len(small.check_rows) == S.CHECK_ROWS and set(small.check_rows.tolist()) == set(range(5))


def test_roofline_hand_worked():
    # H=512, I=256: an expert is [2I, H] + [H, I] = 393216 weights.
    assert B.bytes_per_expert("bf16", 512, 256) == 786432
    # FP8: 1 byte each + f32 scales: (512/128)*(512/128) + (512/128)*(256/128) = 16 + 8 blocks.
    assert B.bytes_per_expert("fp8", 512, 256) == 393216 + 4 * 24
    # 2 * T * K * (2I*H + H*I) = 2 * 2 * 2 * 393216
    assert S.layer_flops(2, 2, 512, 256) == 3145728
    r = S.roofline(
        tokens=2,
        top_k=2,
        hidden=512,
        intermediate=256,
        distinct_experts=3,
        fmt="bf16",
        hbm_bytes_per_s=1e9,
        flops_per_s=1e12,
    )
    assert r["weight_bytes"] == 3 * 786432
    assert r["t_memory_s"] == pytest.approx(2.359296e-3)
    assert r["t_compute_s"] == pytest.approx(3.145728e-6)
    assert r["floor_s"] == r["t_memory_s"] and r["bound"] == "memory"
    r = S.roofline(
        tokens=1000,
        top_k=2,
        hidden=512,
        intermediate=256,
        distinct_experts=3,
        fmt="fp8",
        hbm_bytes_per_s=1e12,
        flops_per_s=1e9,
    )
    assert r["t_compute_s"] == pytest.approx(1.572864) and r["bound"] == "compute"
    assert r["t_memory_s"] == pytest.approx(3 * 393312 / 1e12)
    # An FP8 matmul slower than bf16 is no native FP8 GEMM: FP8 floors then use the bf16 peak.
    assert S.compute_peaks({"bf16_flops_per_s": 8e14, "fp8_flops_per_s": 1.5e15})["fp8"] == 1.5e15
    assert S.compute_peaks({"bf16_flops_per_s": 8e14, "fp8_flops_per_s": 2e14})["fp8"] == 8e14
    assert S.compute_peaks({"bf16_flops_per_s": 8e14, "fp8_flops_per_s": None})["fp8"] == 8e14


def test_choose_experts_reduces_to_fit():
    pro = B.model_shape("pro", smoke=False)
    assert pro.num_experts == 384 and (pro.hidden, pro.intermediate) == (7168, 3072)
    per = B.bytes_per_expert("fp8", 7168, 3072) + B.bytes_per_expert("bf16", 7168, 3072)
    lim = int(67.6 * 2**30)  # an H100's pool at XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
    s = S.choose_experts(pro, lim, None)
    assert s.num_experts == 192 and s.num_experts * per <= 0.6 * lim and "reduced to 192 of 384" in s.e_note
    assert S.choose_experts(pro, 10 * lim, None).num_experts == 384
    assert S.choose_experts(pro, lim, 64).num_experts == 64
    flash = B.model_shape("flash", smoke=False)
    assert S.choose_experts(flash, lim, None).num_experts == 256


def test_replace_section(tmp_path):
    f = tmp_path / "RESULTS.md"
    C.replace_section(f, "moe_layer", "first")
    C.replace_section(f, "ffi_overhead", "other")
    C.replace_section(f, "moe_layer", "second\n")
    text = f.read_text()
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("<!-- BEGIN moe_layer -->") == 1 and text.count("<!-- END ffi_overhead -->") == 1


def test_path_state_skips_what_cannot_run_and_retries_once():
    st = S.PathState()
    assert "no GPU" in st.static_skip(B.PATH_BY_NAME["ffi"])  # CPU here
    assert st.static_skip(B.PATH_BY_NAME["xla_capacity"]) is None
    assert st.classify(RuntimeError("RESOURCE_EXHAUSTED: Out of memory"), "xla_gather")[0] == "skipped"
    assert "xla_gather" not in st.sticky  # out of memory depends on T: not sticky
    assert st.classify(NotImplementedError("no lowering"), "fp8_gather")[0] == "skipped"
    assert "not supported here" in st.static_skip(B.PATH_BY_NAME["fp8_gather"])
    assert st.classify(ValueError("boom"), "xla_ragged") == ("failed", "ValueError: boom")
    st.ok("xla_ragged")  # a success in between resets the count
    st.classify(ValueError("boom"), "xla_ragged")
    assert "xla_ragged" not in st.sticky
    st.classify(ValueError("boom"), "xla_ragged")
    assert st.static_skip(B.PATH_BY_NAME["xla_ragged"]).startswith("failed twice")
    assert st.gather_limit(0) == 2 * 2**30 and S.PathState(gather_max_gib=0.5).gather_limit(10**12) == 2**29


def _fake_moe_run(date: str, kind: str, tokens: dict[int, float | None], *, experts: int = 256, **extra) -> dict:
    """A moe_layer JSON as the sweep writes it: ``tokens`` T -> ffi median (None: not run)."""

    def point(t, med):
        if med is None:
            return {"tokens": t, "skipped": "time budget exhausted (--budget-s / --deadline)"}
        floor = {"floor_s": med / 2}
        ok = {
            "status": "ok",
            "median_s": med,
            "p10_s": med,
            "p90_s": med,
            "time_over_floor": 2.0,
            "check": {"pass": True, "rel_l2": 1e-3, "rel_l2_vs_f32": 4e-2, "tol": 1e-2},
        }
        return {
            "tokens": t,
            "distinct_experts": 6.0,
            "floors": {"fp8_weights_fp8_mma": floor, "bf16_weights_bf16_mma": floor},
            "paths": {"ffi": ok},
            "best": {},
        }

    return {
        "schema": S.SCHEMA,
        "date": f"{date}T01:00:00+00:00",
        "command": f"run {date}",
        "device": {"kind": kind, "platform": "gpu"},
        "versions": {"jax": "0.x"},
        "ceilings": {"hbm_bytes_per_s": 3e12, "bf16_flops_per_s": 6e14, "fp8_flops_per_s": 1.2e15},
        "tolerances": dict(S.TOL),
        "paths": {"ffi": {"label": "(a) FFI"}},
        "models": [
            {
                "name": "v4_flash",
                "hidden": 4096,
                "intermediate": 2048,
                "num_experts": experts,
                "full_experts": 256,
                "top_k": 6,
                "points": [point(t, m) for t, m in tokens.items()],
            }
        ],
        **extra,
    }


def test_merge_moe_layer_puts_the_runs_of_a_day_side_by_side():
    a = _fake_moe_run("2026-12-07", "H100", {1: 1e-4, 4096: None})
    b = _fake_moe_run("2026-12-07", "H100", {4096: 4e-3})
    m = R.merge_moe_layer([a, b])
    pts = {q["tokens"]: q for q in m["models"][0]["points"]}
    assert (
        sorted(pts) == [1, 4096] and pts[4096]["paths"]["ffi"]["median_s"] == 4e-3
    )  # b's measured point wins the skip
    assert [s["command"] for s in m["sources"]] == ["run 2026-12-07", "run 2026-12-07"]
    md = R.results_markdown(m)
    assert "| | T=1 | T=4096 |" in md and "time budget exhausted" not in md
    assert "100.0 us (2.0x)" in md and "4.00 ms (2.0x)" in md
    # A point no run measured gets no column; it is listed instead.
    md = R.results_markdown(a)
    assert "| | T=1 |" in md and "T=4096 |" not in md and "v4_flash T=4096: time budget exhausted" in md
    # Different E is a different model, not merged points.
    c = _fake_moe_run("2026-12-07", "H100", {8: 1e-4}, experts=192)
    assert len(R.merge_moe_layer([a, c])["models"]) == 2


def test_results_md_is_built_from_the_json_one_section_per_card_and_date(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    runs = {
        "moe_layer.json": _fake_moe_run("2026-11-28", "NVIDIA H200", {1: 7e-4, 8: 5e-4}),
        "moe_layer_t4096.json": _fake_moe_run("2026-12-07", "NVIDIA H100", {4096: 4e-3}),
        "moe_layer_t1.json": _fake_moe_run("2026-12-07", "NVIDIA H100", {1: 2e-4}),
        "moe_layer_wide.json": _fake_moe_run(
            "2026-12-07", "NVIDIA H100", {4096: 3e-3}, annotation={"variant": "wide tile on"}
        ),
        "moe_layer_chunked.json": _fake_moe_run(
            "2026-12-07", "NVIDIA H100", {8192: 9e-3}, args={"ffi_num_max_tokens": 4096}
        ),
    }
    for name, r in runs.items():
        (res / name).write_text(json.dumps(r))
    md = tmp_path / "RESULTS.md"
    md.write_text("old generated text\n" + R.KEEP_MARKER + "\n\n## History\n\n- by hand\n")
    text = R.build(res, md, draw=False)
    heads = [ln for ln in text.splitlines() if ln.startswith("## ")]
    assert heads == ["## NVIDIA H100, 2026-12-07", "## NVIDIA H200, 2026-11-28", "## History"], heads
    h100 = text[text.index("## NVIDIA H100") : text.index("## NVIDIA H200")]
    assert "2 runs, merged by T" in h100 and "| | T=1 | T=4096 |" in h100  # the two default-policy runs, one table
    assert "variant: wide tile on (annotated after the run)" in h100 and "3.00 ms" in h100  # the variant apart
    # a run with one buffer cap for every T (larger T in chunks of it) is a variant, not merged by T
    assert "variant: ffi buffer cap 4096 (--ffi-num-max-tokens; larger T in chunks of it)" in h100
    assert "| | T=1 | T=4096 |" in h100 and "9.00 ms" in h100
    assert "| `ffi` rel. L2 vs reference | 1.00e-03 | 1.00e-03 |" in h100  # accuracy rows under the times
    assert "| `ffi` rel. L2 vs f32 | 4.00e-02 | 4.00e-02 |" in h100
    assert "old generated text" not in text and text.rstrip().endswith("- by hand")
    md.write_text(text)
    assert R.main(["--results", str(res), "--out", str(md), "--check"]) == 0
    (res / "moe_layer.json").write_text(json.dumps(_fake_moe_run("2026-11-28", "NVIDIA H200", {1: 9e-4})))
    assert R.main(["--results", str(res), "--out", str(md), "--check"]) == 1  # stale now


def test_results_md_in_the_repo_is_what_its_json_gives():
    """benchmarks/RESULTS.md is generated: it must match benchmarks/results/*.json."""
    assert R.build(C.RESULTS_DIR, R.RESULTS_MD, draw=False) == R.RESULTS_MD.read_text(), (
        "benchmarks/RESULTS.md is stale: run python -m benchmarks.report"
    )


def _run(module: str, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<module> args`` from the repository root, as the README runs it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quick_cpu_smoke_writes_json_png_and_results(tmp_path):
    md = tmp_path / "RESULTS.md"
    proc = _run(
        "moe_layer",
        "--quick",
        "--cpu-smoke",
        "--models",
        "flash",
        "--budget-s",
        "400",
        "--out",
        str(tmp_path),
        "--write-results",
        str(md),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((tmp_path / "moe_layer.json").read_text())
    assert data["schema"] == S.SCHEMA and data["cpu_smoke"] and "tiny stand-in shapes" in data["shrink_note"]
    assert data["device"]["platform"] == "cpu" and data["versions"]["jax"] == jax.__version__
    c = data["ceilings"]
    assert c["hbm_bytes_per_s"] > 0 and c["bf16_flops_per_s"] > 0
    (model,) = data["models"]
    assert [q["tokens"] for q in model["points"]] == list(S.SMOKE_TOKENS)
    for q in model["points"]:
        paths = q["paths"]
        assert set(paths) == set(B.PATH_BY_NAME)
        must_run = ("xla_capacity", "xla_ragged", "fp8w_capacity", "fp8_ragged", "reference")
        for name, r in paths.items():
            if name in must_run or r["status"] == "ok":  # tokamax / scaled_matmul run where installed / lowered
                assert r["status"] == "ok", (name, r)
                assert r["check"]["pass"] and r["check"]["rel_l2"] <= r["check"]["tol"], (name, r["check"])
                assert 0 < r["p10_s"] <= r["median_s"] <= r["p90_s"] and r["time_over_floor"] > 0
            else:
                assert r["status"] == "skipped" and r["reason"], (name, r)
        for name in ("ffi", "xla_ragged_cudnn", "xla_ragged_triton"):  # GPU only
            assert paths[name]["status"] == "skipped" and "no GPU" in paths[name]["reason"]
        assert q["best"]["best_xla_bf16"] in B.XLA_BF16
    png = (tmp_path / "moe_layer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = md.read_text()
    assert "<!-- BEGIN moe_layer -->" in text and "| `xla_ragged` |" in text and "CPU smoke run" in text
    assert "<!-- BEGIN ffi_overhead -->" in text  # the other section is left in place


def test_ffi_overhead_skips_cleanly_without_a_gpu(tmp_path):
    proc = _run("ffi_overhead", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((tmp_path / "ffi_overhead.json").read_text())
    assert "no CUDA GPU" in data["skipped"] and data["cases"] == []


# ---------------------------------------------------------------------------------------------
# decode_step.py: the L-layer program, the weight-set choice, and the --smoke run
# ---------------------------------------------------------------------------------------------

from benchmarks import decode_step as D  # noqa: E402 - the decode_step tests' module, next to them


def _toy_layer(xn, idx, w, s):
    """Depends on the input, the routing and the weight set ``s`` (a scalar)."""
    return (xn.astype(jnp.float32) * s + jnp.sum(w, -1, keepdims=True) + 0.01 * idx[:, :1]).astype(jnp.bfloat16)


def test_decode_step_program_uses_set_l_mod_L_in_both_loop_shapes():
    n_layers, n_sets, t, k, h = 7, 3, 5, 2, 16  # scan: 2 cycles of 3 layers + 1 unrolled
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(0, 8, (n_layers, t, k)), jnp.int32)
    w = jnp.asarray(rng.random((n_layers, t, k)), jnp.float32)
    sets = tuple((jnp.float32(0.5 + j),) for j in range(n_sets))
    want = x
    for layer in range(n_layers):  # what the step must compute
        want = want + _toy_layer(D.rms_norm(want), idx[layer], w[layer], *sets[layer % n_sets])
    outs = {}
    for loop in ("scan", "unroll"):
        step = D.make_step(_toy_layer, n_layers=n_layers, n_sets=n_sets, loop=loop)
        outs[loop] = np.asarray(step(x, idx, w, sets), np.float32)
        np.testing.assert_allclose(outs[loop], np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
        text = step.lower(x, idx, w, sets).as_text()
        assert ("while" in text) == (loop == "scan"), loop
    # The weight sets matter (a shifted cycle gives a different result).
    shifted = tuple(sets[(j + 1) % n_sets] for j in range(n_sets))
    bad = np.asarray(
        D.make_step(_toy_layer, n_layers=n_layers, n_sets=n_sets, loop="scan")(x, idx, w, shifted), np.float32
    )
    assert C.rel_l2(bad, outs["scan"]) > 0.05


def test_decode_step_check_separates_numerics_from_wrong_weights():
    # Real paths on tiny weights: FP8 (reference) vs bf16 (xla_capacity) activations stay well within
    # the cross-numerics tolerance; the wrong weight cycle is far outside it.
    n_layers, n_sets = 4, 2
    p = D.make_point(SHAPE, 6, n_layers, 1, seed=2)
    x, idx, w = D.device_sets(p)[0]
    w8 = [B.random_fp8_weights(SHAPE, seed=j) for j in range(n_sets)]
    bf = [B.dequantize_all_bf16(v) for v in w8]
    ref = D.make_step(partial(B.reference_mega_moe, clamp=SHAPE.clamp), n_layers=n_layers, n_sets=n_sets, loop="scan")
    cap = D.make_step(
        partial(B.xla_capacity, clamp=SHAPE.clamp, cap=p.capacity), n_layers=n_layers, n_sets=n_sets, loop="scan"
    )
    y_cap = np.asarray(cap(x, idx, w, tuple(bf)), np.float32)
    y_ref = np.asarray(ref(x, idx, w, tuple((v,) for v in w8)), np.float32)
    y_bad = np.asarray(ref(x, idx, w, tuple((v,) for v in w8[::-1])), np.float32)
    tol = D.CHECK_TOL["fp8_vs_bf16_activations"]
    assert C.rel_l2(y_ref, y_cap) < tol / 2
    assert C.rel_l2(y_bad, y_cap) > 2 * tol


def test_decode_step_weight_sets_and_caps():
    flash = B.model_shape("flash", smoke=False)
    assert D.set_bytes(flash, "fp8") / 2**30 == pytest.approx(6.0, abs=0.01)
    h100, h200 = int(73.2 * 2**30), int(128.6 * 2**30)  # pools at XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    kw = dict(requested=8, n_layers=43, explicit=False)
    assert D.choose_sets(flash, "fp8", limit=h100, **kw)[0] == 8
    n, why = D.choose_sets(flash, "bf16", limit=h100, **kw)
    assert n == 4 and "not 8" in why
    assert D.choose_sets(flash, "bf16", limit=h200, **kw)[0] == 8
    assert D.choose_sets(flash, "fp8", limit=None, requested=50, n_layers=43, explicit=True)[0] == 43
    assert D.choose_sets(flash, "fp8", limit=2**30, **kw)[0] == 1  # at least one set
    assert [D.ffi_cap(t) for t in (1, 2, 100, 128, 129, 256)] == [128, 128, 128, 128, 256, 256]


def test_decode_step_smoke_writes_json_png_and_results(tmp_path):
    md = tmp_path / "RESULTS.md"
    proc = _run("decode_step", "--smoke", "--out", str(tmp_path), "--write-results", str(md))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((tmp_path / "decode_step.json").read_text())
    assert data["schema"] == D.SCHEMA and data["smoke"] and data["n_layers"] == 3
    assert data["model"]["top_k"] == 4 and data["model"]["hidden"] == 512 and data["model"]["num_experts"] == 16
    for fmt in ("fp8", "bf16"):
        assert data["weight_sets"][fmt]["distinct"] == 2 and data["weight_sets"][fmt]["why"]
    assert [q["tokens"] for q in data["points"]] == list(D.SMOKE_TOKENS)
    for q in data["points"]:
        assert q["floor_s"] > 0 and q["floors"]["bf16_weights_bf16_mma"]["floor_s"] > 0 and q["distinct_experts"] > 0
        assert set(q["paths"]) == set(D.PATH_NAMES)
        for name, r in q["paths"].items():
            if r["status"] == "ok":
                assert r["per_layer_s"] > 0 and 0 < r["floor_fraction"] < float("inf"), (name, r)
                assert r["per_layer_s"] == pytest.approx(r["median_s"] / 3) and r["check"]["pass"], (name, r)
            else:
                assert r["status"] == "skipped" and r["reason"], (name, r)
        for name in ("reference", "xla_capacity", "xla_gather"):  # these run on CPU
            assert q["paths"][name]["status"] == "ok", (name, q["paths"][name])
        assert "no GPU" in q["paths"]["ffi"]["reason"]
        for fmt in ("fp8", "bf16"):
            assert q["empty"][fmt]["per_layer_s"] > 0
        assert q["best"]["best_xla"] in D.XLA_PATHS
    png = (tmp_path / "decode_step.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = md.read_text()
    assert (
        "<!-- BEGIN decode_step -->" in text
        and "| `xla_capacity` (L=2) |" in text
        and "| empty step, per layer" in text
    )
    assert "smoke run" in text and "**L = 2 distinct**" in text
    # Re-rendered from the JSON alone.
    md2 = tmp_path / "again.md"
    assert (
        D.main(
            [
                "--from-json",
                str(tmp_path / "decode_step.json"),
                "--out",
                str(tmp_path / "re"),
                "--write-results",
                str(md2),
            ]
        )
        == 0
    )
    assert "| `xla_capacity` (L=2) |" in md2.read_text() and (tmp_path / "re" / "decode_step.png").is_file()
    # A --model pro run keeps its own files and section, so one RESULTS.md holds both models.
    pro = dict(data, args=dict(data["args"], model="pro"))
    (tmp_path / "pro.json").write_text(json.dumps(pro))
    assert (
        D.main(["--from-json", str(tmp_path / "pro.json"), "--out", str(tmp_path / "re"), "--write-results", str(md2)])
        == 0
    )
    both = md2.read_text()
    assert both.count("<!-- BEGIN decode_step -->") == 1 and both.count("<!-- BEGIN decode_step_pro -->") == 1
    assert (tmp_path / "re" / "decode_step_pro.png").is_file()


def test_narrow_pair_probe_patch_applies_and_only_adds_the_switch():
    """benchmarks/probes/narrow_pair.patch (the large-T probe) still applies to ffi/layout, and it
    changes the configuration only behind its probe variable: every added code line sits in the
    include or in the block guarded by JMM_PROBE_NARROW_PAIR."""
    import shutil

    patch = REPO / "benchmarks" / "probes" / "narrow_pair.patch"
    text = patch.read_text()
    added = [l[1:] for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
    code = [l.strip() for l in added if l.strip() and not l.strip().startswith("//")]
    assert code[0].startswith("#include <cstdlib>")
    assert 'std::getenv("JMM_PROBE_NARROW_PAIR")' in code[1] and code[-2:] == ["c.cluster_size = 2;", "}"]
    assert not any(l.startswith("-") and not l.startswith("---") for l in text.splitlines())
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("no git checkout to check the patch against")
    r = subprocess.run(["git", "apply", "--check", str(patch)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# model_step.py: the whole model's step split into attention / MoE / rest
# ---------------------------------------------------------------------------------------------

from benchmarks import model_step as MS  # noqa: E402 - the model_step tests' module, next to them


def test_model_step_config_is_a_slice_of_the_real_schedule():
    cfg = MS.model_config(smoke=False, layers=4, first_layer=2)
    flash = MS.DeepseekV4Config.v4_flash()
    assert cfg.compress_ratios == tuple(flash.layer_compress_ratio(i) for i in range(2, 6)) == (4, 128, 4, 128)
    assert cfg.num_hash_layers == 1 and cfg.is_hash_layer(0) and not cfg.is_hash_layer(1)  # real layer 2 is hash
    assert (cfg.hidden_size, cfg.n_routed_experts, cfg.vocab_size) == (4096, 256, 129280)
    assert MS.model_config(smoke=False, layers=2, first_layer=10).num_hash_layers == 0
    per_layer, top = MS.estimate_bytes(cfg)
    assert 6.0 * 2**30 < per_layer < 7.0 * 2**30 and 1.8 * 2**30 < top < 2.3 * 2**30  # FP8 experts; embed + head bf16
    with pytest.raises(ValueError, match="first-layer"):
        MS.model_config(smoke=False, layers=4, first_layer=41)


def test_model_step_variants_cut_what_they_say_and_leave_the_model_as_it_was():
    cfg = MS.model_config(smoke=True, layers=1, first_layer=1)  # one CSA layer of tiny(), gate-routed
    model = MS.build_model(cfg, seed=0, on_device=False)
    tok = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 3)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3))

    def run(variant, backend="reference"):
        gd, state = MS.split_variant(model, variant, backend)
        logits, _ = MS.make_step(gd)(state, model.init_cache(2, 8), tok, pos)
        return np.asarray(logits)

    full = run("full")
    no_routed, no_moe, none = run("no_routed"), run("no_moe"), run("none")
    assert np.isfinite(full).all() and np.abs(full).max() > 0
    # each cut removes real work: the routed experts, then the gate + shared expert, then attention
    assert C.rel_l2(no_routed, full) > 1e-3 and C.rel_l2(no_moe, no_routed) > 1e-3 and C.rel_l2(none, no_moe) > 1e-3
    layer = model.layers[0]
    assert type(layer.ffn).__name__ == "DeepseekV4MoE" and type(layer.attn).__name__ == "DeepseekV4Attention"
    assert layer.ffn.backend == "ffi"  # put back after the reference variant
    np.testing.assert_array_equal(run("full"), full)
    from jax_megamoe.models.deepseek_v4 import jit_forward

    plain, _ = jit_forward(_as_reference(model))(model.init_cache(2, 8), tok, pos)
    assert C.rel_l2(full, np.asarray(plain)) < 1e-6  # the model's own jitted forward
    with pytest.raises(ValueError, match="variant"):
        MS.split_variant(model, "half")
    # the tokamax backend's wiring (RoutedBF16MoE: the block's gate + shared expert, bf16 expert copies),
    # here with XLA's ragged_dot in tokamax's place: bf16 instead of FP8 activations, otherwise the same layer
    _as_reference(model)
    copies = [B.dequantize_all_bf16(layer.ffn.moe_weights) for layer in model.layers]
    gd, state = MS.split_variant(model, "full", "tokamax", (partial(B.xla_ragged), copies))
    bf16, _ = MS.make_step(gd)(state, model.init_cache(2, 8), tok, pos)
    assert type(model.layers[0].ffn).__name__ == "DeepseekV4MoE"
    assert 1e-4 < C.rel_l2(np.asarray(bf16), full) < 0.1  # one layer: the FP8 activation rounding (~4% of the MoE)


def _as_reference(model):
    for layer in model.layers:
        layer.ffn.backend = "reference"
    return model


def test_model_step_cpu_smoke_writes_json_png_and_results(tmp_path):
    md = tmp_path / "RESULTS.md"
    proc = _run(
        "model_step",
        "--cpu-smoke",
        "--batch",
        "1",
        "--prefill-len",
        "8",
        "--out",
        str(tmp_path),
        "--write-results",
        str(md),
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    data = json.loads((tmp_path / "model_step.json").read_text())
    assert data["schema"] == MS.SCHEMA and data["smoke"] and data["model"]["layers"] == 2
    assert [q["label"] for q in data["points"]] == ["decode B=1", "prefill 1x8"]
    for q in data["points"]:
        ref = q["backends"]["reference"]
        assert ref["status"] == "ok" and ref["logits_finite"], ref
        assert ref["step_s"] > 0 and ref["tokens_per_s"] > 0
        assert ref["attn_s"] + ref["moe_s"] + ref["rest_s"] == pytest.approx(ref["step_s"])
        assert ref["moe_per_layer_s"] == pytest.approx(ref["moe_s"] / 2)
        assert ref["routed_per_layer_s"] == pytest.approx(ref["routed_s"] / 2)
        for name in ("full_reference", "no_routed", "no_moe", "none"):
            r = q["programs"][name]
            assert r["status"] == "ok" and 0 < r["p10_s"] <= r["median_s"] <= r["p90_s"], (name, r)
        assert q["backends"]["ffi"]["status"] == "skipped" and "sm_90" in q["backends"]["ffi"]["reason"]
        assert q["backends"]["tokamax"]["status"] == "skipped"
    png = (tmp_path / "model_step.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "<!-- BEGIN model_step -->" in text and "| decode B=1 | `reference` |" in text
    assert "| decode B=1 | `reference` |" in proc.stdout  # the table is printed
    assert MS.main(["--from-json", str(tmp_path / "model_step.json"), "--out", str(tmp_path / "re")]) == 0
    assert (tmp_path / "re" / "model_step.png").is_file()
    built = R.build(tmp_path, tmp_path / "BUILT.md", draw=False)  # RESULTS.md renders a model_step JSON
    assert "### Whole-model steps, attention / MoE / rest" in built and "| decode B=1 | `reference` |" in built
