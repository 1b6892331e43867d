"""The rendered mega-kernel instantiations and launch configurations did not change.

``tests/data/mega_instantiations.json`` was taken with the pre-refactor C API (positional int64
arrays, commit 089dbb8, before the sm_90 / sm_100 handlers were merged into one template): for 288
calls (sm_90: 4 shapes x 1/2 ranks x 5 token counts x 2 SM counts/clamps x the default and the wide
tile; sm_100: both modes x 4 shapes x 1/2 ranks x 4 token counts x 2 SM counts/clamps) the SHA-256 of
the rendered kernel.cu, the buffer layout, every configuration field, the sm_100 TMA descriptor plans
and the pre-dispatch launch plan. Every call must render the same source and give the same numbers
through the typed API now; the only fields allowed to be gone are the dead knobs named below. CPU only.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import ffi_testing as ft
import pytest

from jax_megamoe._src.kernels import _ffi

DATA = json.loads((Path(__file__).parent / "data" / "mega_instantiations.json").read_text())
# Fields of the old arrays that are gone on purpose: sm_90's ring was always the full pool and its
# L2 lag always 0 (the renderer spells both); the sm_100 tokens-per-expert estimate is now an f64.
REMOVED = {"num_ring_tokens", "l2_lag_units", "expected_tokens_per_expert_x1000"}


@pytest.fixture(scope="module")
def lib():
    return ft.library()


def _ids(case):
    s, c = case["shape"], case["call"]
    return (
        f"sm{case['arch']}{'w' if case.get('wide') else ''}-E{s['num_experts']}-P{s['capacity']}-H{s['hidden']}"
        f"-R{s['num_ranks']}-k{s.get('mma_kind', 0)}-T{c['num_tokens']}-sms{c['num_sms']}"
    )


def test_snapshot_covers_both_archs_and_tiles():
    arches = {(c["arch"], c.get("wide", False)) for c in DATA["cases"]}
    assert arches == {(90, False), (90, True), (100, False)}
    assert len({c["source_sha256"] for c in DATA["cases"]}) > 100  # the cases really differ


@pytest.mark.parametrize("case", DATA["cases"], ids=_ids)
def test_instantiation_unchanged(lib, case, monkeypatch):
    """The wide-tile cases were taken with JAX_MEGAMOE_SM90_WIDE_TILE=1 read by the library; now the
    call carries the switch (jmm_mega_call.sm90_wide_tile) and the environment says the opposite, to
    show it is not read."""
    arch = case["arch"]
    wide = bool(case.get("wide"))
    if wide:
        monkeypatch.delenv("JAX_MEGAMOE_SM90_WIDE_TILE", raising=False)
    else:
        monkeypatch.setenv("JAX_MEGAMOE_SM90_WIDE_TILE", "1")
    s, c = case["shape"], case["call"]
    shape = ft.mega_shape(
        lib,
        E=s["num_experts"],
        P=s["capacity"],
        K=s["top_k"],
        H=s["hidden"],
        I=s["intermediate"],
        ranks=s["num_ranks"],
        kind=s.get("mma_kind", 0),
    )
    clamp = math.inf if c["activation_clamp"] == "inf" else c["activation_clamp"]
    call = ft.mega_call(
        lib, T=c["num_tokens"], num_sms=c["num_sms"], clamp=clamp, fast_math=bool(c["fast_math"]), sm90_wide_tile=wide
    )

    src = ft.mega_render(lib, arch, shape, call)
    assert (len(src), hashlib.sha256(src.encode()).hexdigest()) == (case["source_len"], case["source_sha256"])

    lay = ft.mega_layout(lib, arch, shape, c["num_sms"] if arch == 100 else None)
    assert {k: lay[k] for k in case["layout"]} == case["layout"]
    cfg = ft.mega_config(lib, arch, shape, call)
    gone = set(case["config"]) - set(cfg)
    assert gone <= REMOVED, gone
    assert {k: cfg[k] for k in case["config"] if k not in gone} == {
        k: v for k, v in case["config"].items() if k not in gone
    }
    if "expected_tokens_per_expert_x1000" in case["config"]:
        assert (
            math.floor(cfg["expected_tokens_per_expert"] * 1000 + 0.5)
            == case["config"]["expected_tokens_per_expert_x1000"]
        )
    if arch == 100:
        # old layout: 20 int64 per plan (..., swizzle, index)
        old = [case["tensor_maps"][i * 20 : i * 20 + 19] for i in range(9)]
        new = [
            [m["source"], m["offset"], m["dtype"], m["rank"], *m["dims"], *m["strides"], *m["box"], m["swizzle"]]
            for m in ft.mega_tensor_maps(lib, arch, shape, call)
        ]
        assert new == old
    kind = s.get("mma_kind", 0)
    assert (
        ft.pre_dispatch_launch_plan(lib, arch, kind, c["num_tokens"], s["capacity"], s["hidden"], s["top_k"])
        == case["pre_dispatch"]
    )


def test_pre_dispatch_sources_unchanged(lib):
    for key, digest in DATA["pre_dispatch_source_sha256"].items():
        arch, kind = map(int, key.split("/"))
        src = _ffi.call_render(lib, lib.jmm_render_pre_dispatch, arch, kind)
        assert hashlib.sha256(src.encode()).hexdigest() == digest, key


def test_sm90_tensor_maps_follow_the_layout(lib):
    """The sm_90 descriptor plans (now shared code with sm_100) address the layout's slices: the
    buffer ones at their region's offset, the weights (sources 1 = l1, 3 = l2) over all local experts."""
    shape = ft.mega_shape(lib, E=32, P=256, K=6, H=1024, I=512)
    call = ft.mega_call(lib, T=200, num_sms=132)
    lay, cfg = ft.mega_layout(lib, 90, shape), ft.mega_config(lib, 90, shape, call)
    maps = ft.mega_tensor_maps(lib, 90, shape, call)
    assert [m["source"] for m in maps] == [0, 0, 1, 0, 0, 0, 3]
    assert [m["offset"] for m in maps if m["source"] == 0] == [
        lay["l1_acts"],
        lay["l1_acts_sf"],
        lay["l2_acts"],
        lay["l2_acts"],
        lay["l2_acts_sf"],
    ]
    assert maps[2]["dims"][:2] == [1024, 32 * 2 * 512] and maps[6]["dims"][:2] == [512, 32 * 1024]
    assert maps[1]["dims"][:2] == [lay["num_padded_sf_pool_tokens"], 1024 // 128] and maps[1]["dtype"] == 7
    assert all(m["box"][0] == 128 for m in maps if m["swizzle"] == 128)
    assert maps[3]["box"][:2] == [cfg["l1_output_box_n"], cfg["l1_output_box_m"]]
