"""sm_90 Mega MoE: symmetric-buffer layout and launch heuristics (ffi/layout/sm90_mega_moe.{h,cc}).

CPU only: the C++ arithmetic is reached through the library's ``jmm_sm90_mega_layout`` /
``jmm_sm90_mega_config`` C entry points and checked against (a) byte offsets derived by hand
from deep_gemm/layout/sm90_mega_moe.cuh and the slicing in impls/sm90_fp8_mega_moe.cuh
(sgl-deep-gemm 0.2.5), (b) an independent Python transcription of the same formulas, and
(c) the kernel's static_assert rules for every configuration the heuristics pick.
"""

from __future__ import annotations

import math

import ffi_testing as ft
import pytest

# The tests' short names for the C struct fields (common/c_api_testing.h) they use most; the others keep
# their C names. By name, not position: the field order lives in the C header only.
LAYOUT_NAMES = dict(
    workspace_bytes="workspace",
    num_max_pool_tokens="pool",
    num_data_pool_tokens="data_pool",
    num_padded_sf_pool_tokens="padded_sf",
    num_experts_per_rank="e_local",
)
LAYOUT_REGIONS = (
    "workspace",
    "x",
    "x_sf",
    "topk_idx",
    "topk_weights",
    "l1_acts",
    "l1_acts_sf",
    "l1_topk_weights",
    "l2_acts",
    "l2_acts_sf",
    "combine",
    "num_bytes",
)  # in buffer order
CONFIG_NAMES = dict(
    num_max_tokens_per_rank="cap",
    hidden="H",
    intermediate="I",
    num_experts="E",
    top_k="K",
    num_experts_per_wave="experts_per_wave",
    num_max_pool_tokens="pool",
    num_padded_sf_pool_tokens="padded_sf",
    num_stages="stages",
    num_dispatch_threads="dispatch_threads",
    num_non_epilogue_threads="non_epilogue_threads",
    num_epilogue_threads="epilogue_threads",
    num_ranks="ranks",
    epilogue_register_budget="epilogue_regs",
    reuse_accum_as_final="reuse_accum",
    l2_epilogue_requires_full_sync="l2_full_sync",
    cluster_size="cluster",
    multicast_on_b="multicast_b",
    pull_publish_batch="pull_batch",
    pull_eager_publish="pull_eager",
    num_threads="threads",
    smem_size="smem",
    host_smem_size="host_smem",
    kernel_smem_bytes="kernel_smem",
    tile_table_entries="tile_entries",
    l1_output_box_n="l1_out_box_n",
    l1_output_box_m="l1_out_box_m",
    l1_output_swizzle="l1_out_swizzle",
)
SMEM_CAPACITY = 232448

SMALL = dict(E=16, P=128, K=4, H=512, I=256)
FLASH = dict(E=256, P=512, K=6, H=4096, I=2048)  # DeepSeek V4-Flash, 512-token capacity
PRO = dict(E=384, P=512, K=6, H=7168, I=3072)  # DeepSeek V4-Pro, 512-token capacity


@pytest.fixture(scope="module")
def lib():
    return ft.library()


def _renamed(d, names):
    return {names.get(k, k): v for k, v in d.items()}


def layout(lib, E, P, K, H, I, ranks=1):
    return _renamed(ft.mega_layout(lib, 90, ft.mega_shape(lib, E=E, P=P, K=K, H=H, I=I, ranks=ranks)), LAYOUT_NAMES)


def config(lib, E, P, K, H, I, T, num_sms=132, clamp=math.inf, fast_math=True, ranks=1, wide=False):
    shape = ft.mega_shape(lib, E=E, P=P, K=K, H=H, I=I, ranks=ranks)
    call = ft.mega_call(lib, T=T, num_sms=num_sms, clamp=clamp, fast_math=fast_math, sm90_wide_tile=wide)
    return _renamed(ft.mega_config(lib, 90, shape, call), CONFIG_NAMES)


# --------------------------------------------------------------------------------------
# Independent transcription of the 0.2.5 formulas (layout/sm90_mega_moe.cuh + the kernel's slicing)
# --------------------------------------------------------------------------------------


def align(x, a):
    return (x + a - 1) // a * a


def py_layout(E, P, K, H, I, ranks=1):
    e_local = E // ranks
    pool = align(ranks * P * min(K, e_local) + e_local * 127, 128)  # get_num_max_pool_tokens_sm90
    pool_blocks = pool // 8  # kMinCandidateBlockM = 8
    ring_blocks = pool_blocks  # full pool
    ws = 32 + E * 16 + e_local * 8 + align(pool_blocks, 2) * 4 + pool_blocks * 8 + ring_blocks * 8
    ws += e_local * ranks * (ranks * P) * 4 + pool * 12
    flag_words = E + e_local + 1 + ranks
    ws += align((E + e_local) * 8 + flag_words * 4 + align(flag_words * 4, 8), 1024)
    ws = align(ws, 1024)
    D = pool
    S = max((D // 64) * 128, (D // 128) * 128)
    sizes = [
        ("x", P * H),
        ("x_sf", P * H // 32),
        ("topk_idx", P * K * 8),
        ("topk_weights", P * K * 4),
        ("l1_acts", D * H),
        ("l1_acts_sf", S * H // 32),
        ("l1_topk_weights", D * 4),
        ("l2_acts", D * I),
        ("l2_acts_sf", S * I // 32),
        ("combine", K * P * H * 2),
    ]
    out, o = {"workspace": ws}, ws
    for name, n in sizes:
        out[name] = o
        o += n
    out.update(num_bytes=o, pool=pool, data_pool=D, padded_sf=S, e_local=e_local)
    return out


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------

# Derived by hand (see the comments) from SM90Workspace::get_num_bytes and the kernel's region order.
HAND = {
    # small: pool = align(128*4 + 16*127, 128) = 2560 (320 blocks of 8); workspace
    # 32 + 256 + 128 + 1280 + 2560 + 2560 + 8192 + 30720 + align(392 + 136, 1024) = 46752 -> 47104;
    # S = (2560/64)*128 = 5120; combine 4*128*512*2 = 524288
    "small": dict(
        workspace=47104,
        x=47104,
        x_sf=112640,
        topk_idx=114688,
        topk_weights=118784,
        l1_acts=120832,
        l1_acts_sf=1431552,
        l1_topk_weights=1513472,
        l2_acts=1523712,
        l2_acts_sf=2179072,
        combine=2220032,
        num_bytes=2744320,
        pool=2560,
        data_pool=2560,
        padded_sf=5120,
        e_local=16,
    ),
    # V4-Flash: pool = 3072 + 256*127 = 35584 (4448 blocks); workspace 32 + 4096 + 2048 + 17792 + 35584
    # + 35584 + 524288 + 427008 + align(6152 + 2056, 1024) = 1055648 -> 1055744; S = 71168
    "flash": dict(
        workspace=1055744,
        x=1055744,
        x_sf=3152896,
        topk_idx=3218432,
        topk_weights=3243008,
        l1_acts=3255296,
        l1_acts_sf=149007360,
        l1_topk_weights=158116864,
        l2_acts=158259200,
        l2_acts_sf=231135232,
        combine=235689984,
        num_bytes=260855808,
        pool=35584,
        data_pool=35584,
        padded_sf=71168,
        e_local=256,
    ),
    # V4-Pro: pool = 3072 + 384*127 = 51840 (6480 blocks); workspace 32 + 6144 + 3072 + 25920 + 51840
    # + 51840 + 786432 + 622080 + align(9224 + 3080, 1024) = 1560672 -> 1561600; S = 103680
    "pro": dict(
        workspace=1561600,
        x=1561600,
        x_sf=5231616,
        topk_idx=5346304,
        topk_weights=5370880,
        l1_acts=5383168,
        l1_acts_sf=376972288,
        l1_topk_weights=400196608,
        l2_acts=400403968,
        l2_acts_sf=559656448,
        combine=569609728,
        num_bytes=613649920,
        pool=51840,
        data_pool=51840,
        padded_sf=103680,
        e_local=384,
    ),
}


@pytest.mark.parametrize("name,shape", [("small", SMALL), ("flash", FLASH), ("pro", PRO)])
def test_layout_hand_derived(lib, name, shape):
    assert layout(lib, **shape) == HAND[name]


@pytest.mark.parametrize(
    "shape",
    [
        SMALL,
        FLASH,
        PRO,
        dict(E=16, P=256, K=4, H=512, I=256),
        dict(E=256, P=8192, K=6, H=4096, I=2048),
        dict(E=384, P=4096, K=6, H=7168, I=3072),
        dict(E=8, P=128, K=8, H=1024, I=512),  # K == E_local
        dict(E=4, P=384, K=6, H=2048, I=4096),  # K > E_local: min(K, E_local) slots per token
        dict(E=33, P=128, K=1, H=8192, I=256),
    ],
)
def test_layout_matches_formulas(lib, shape):
    got = layout(lib, **shape)
    assert got == py_layout(**shape)
    # regions are contiguous, ordered, 16-byte aligned (TMA bases), workspace 1 KiB aligned
    offs = [got[k] for k in LAYOUT_REGIONS]
    assert offs == sorted(offs)
    assert got["workspace"] % 1024 == 0
    assert all(o % 16 == 0 for o in offs)
    assert got["data_pool"] % 128 == 0 and got["padded_sf"] >= (got["data_pool"] // 64) * 128


@pytest.mark.parametrize(
    "bad,why",
    [
        (dict(E=16, P=100, K=4, H=512, I=256), "capacity"),
        (dict(E=16, P=128, K=4, H=384, I=256), "hidden"),
        (dict(E=16, P=128, K=4, H=512, I=384), "intermediate"),
        (dict(E=16, P=128, K=4, H=512, I=8192), "intermediate"),
        (dict(E=16, P=128, K=33, H=512, I=256), "top_k"),
        (dict(E=16, P=128, K=4, H=16384, I=256), "hidden"),
    ],
)
def test_layout_rejects(lib, bad, why):
    with pytest.raises(ValueError, match=why):
        layout(lib, **bad)


# --------------------------------------------------------------------------------------
# Heuristics: every pick satisfies the kernel's static asserts and the host rules of 0.2.5
# --------------------------------------------------------------------------------------


def check_kernel_rules(c, lay, ranks=1):
    E, H, I, P = c["E"], c["H"], c["I"], c["cap"]
    bm, bn, bk = c["block_m"], c["block_n"], c["block_k"]
    e_local = E // c["ranks"]
    assert c["dispatch_threads"] >= 64 and c["dispatch_threads"] % 64 == 0
    assert c["non_epilogue_threads"] in (64, 128)
    assert (c["dispatch_threads"] + c["non_epilogue_threads"]) % 128 == 0
    assert c["epilogue_threads"] == 256
    assert c["threads"] == c["dispatch_threads"] + c["non_epilogue_threads"] + c["epilogue_threads"]
    assert bm % 64 == 0 and bm in (64, 128)
    assert bn in (128, 256, 512) and bk == 128
    assert (2 * I) % bn == 0 and H % bn == 0 and H % bk == 0 and I % bk == 0
    assert c["cluster"] in (1, 2)
    assert not c["multicast_b"] or c["cluster"] == 2
    if c["cluster"] == 2:
        assert c["num_sms"] % 2 == 0 and ((2 * I) // bn) % 2 == 0 and (H // bn) % 2 == 0
    assert c["l2_stage_mode"] in (0, 2, 4)
    assert c["l2_stage_mode"] == 0 or c["l2_cd_passes"] == 4
    assert c["early_combine"] in (0, 1)
    if c["early_combine"]:
        assert H // bk > c["stages"] and I // bk > c["stages"]
        stripes = -(-P // (c["num_sms"] * 8))
        assert stripes <= 32 and 32 + (-(-stripes * 8 // 32)) * 4 <= 64
    assert 1 <= c["pull_batch"] <= 256
    assert c["pull_batch"] == 1 or not c["pull_eager"]
    assert c["ranks"] <= 32 and c["ranks"] <= c["dispatch_threads"]
    # pool sizing agrees with the workspace (kernel static_assert) and the buffer
    assert c["pool"] == lay["pool"] and c["pool"] % bm == 0
    assert c["padded_sf"] == lay["padded_sf"] >= (c["pool"] // bm) * align(bm, 128)
    assert 1 <= c["experts_per_wave"] <= e_local
    # warpgroup split and the L2 act-SF group rules (per-128 scale)
    split_n = bm == 64 and bn % 2 == 0 and bn // 2 in (64, 128)
    wg_m, wg_n = (1, 2) if split_n else (2, 1)
    assert bm // wg_m == 64  # one WGMMA-M tile per warpgroup
    wg_l1_out = (bn // wg_n) // 2
    shares_sf = split_n and wg_l1_out < 128
    assert shares_sf or wg_l1_out % 128 == 0
    assert not shares_sf or bn // 2 == 128
    assert (c["l1_out_box_n"], c["l1_out_box_m"]) == ((bn // 2, bm) if shares_sf else (wg_l1_out, bm // 2))
    assert c["l1_out_swizzle"] == (128 if (wg_l1_out == 128 and not shares_sf) else 0)
    # registers (setmaxnreg budget) with the kernel's defaults for epilogue_regs == 0
    wide = bm == 128 and bn == 256 and c["dispatch_threads"] == 64 and c["non_epilogue_threads"] == 64
    regs = (200, 104, 104) if wide else (168, 48, 40)
    assert c["epilogue_regs"] == 0
    assert regs[0] * 256 + regs[1] * c["dispatch_threads"] + regs[2] * c["non_epilogue_threads"] <= 64512
    # shared memory: at least 2 stages, the kernel's own layout fits in what is requested
    assert c["stages"] >= 2
    assert c["kernel_smem"] <= c["smem"] <= SMEM_CAPACITY
    assert c["smem"] == max(c["host_smem"], c["kernel_smem"])
    assert c["tile_entries"] == -(-(c["pool"] // bm) * ((2 * I) // bn + H // bn) // c["num_sms"]) + 2
    # fixed choices of this implementation
    assert c["pdl"] == 0 and c["ranks"] == ranks
    assert c["weight_tma_block_n"] == min(bn, 256)


SHAPES = [
    SMALL,
    FLASH,
    PRO,
    dict(E=16, P=256, K=4, H=512, I=256),
    dict(E=256, P=8192, K=6, H=4096, I=2048),
    dict(E=384, P=4096, K=6, H=7168, I=3072),
    dict(E=64, P=1024, K=8, H=2048, I=1024),
]


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_sms", [132, 130, 114, 78])
def test_heuristics_satisfy_kernel_rules(lib, shape, num_sms, wide):
    lay = layout(lib, **shape)
    P = shape["P"]
    for T in sorted({1, 3, 4, 16, 100, 128, 129, 255, 256, 257, 512, 1024, 4096, 8192, P}):
        if T > P:
            continue
        c = config(lib, **shape, T=T, num_sms=num_sms, wide=wide)
        check_kernel_rules(c, lay)
        # BLOCK_M rule: the 64-row tile unless sm90_wide_tile allows DeepGEMM's rule
        # (64 or more expected tokens per expert -> the 128-row tile, K sum in the FP8 accumulator)
        assert c["block_m"] == (128 if wide and T * shape["K"] / shape["E"] >= 64 else 64)


@pytest.mark.parametrize("ranks", [2, 4, 8])
@pytest.mark.parametrize("shape", [SMALL, FLASH, PRO, dict(E=64, P=1024, K=8, H=2048, I=1024)])
def test_multi_rank_layout_and_heuristics(lib, shape, ranks):
    # Expert parallelism inside the kernel: every rank's buffer has room for all ranks' tokens
    # (pool >= ranks * P * min(K, E/ranks) plus per-expert padding), the workspace has per-rank counters, and the template
    # gets kNumRanks = ranks; the choices must still meet every kernel rule.
    lay = layout(lib, **shape, ranks=ranks)
    assert lay == py_layout(**shape, ranks=ranks)
    assert lay["e_local"] == shape["E"] // ranks
    el = shape["E"] // ranks
    assert lay["pool"] >= ranks * shape["P"] * min(shape["K"], el) + el * 127  # all ranks' tokens fit
    for T in sorted({1, 16, 128, shape["P"]}):
        c = config(lib, **shape, T=T, ranks=ranks)
        check_kernel_rules(c, lay, ranks=ranks)


def test_multi_rank_rejects(lib):
    with pytest.raises(ValueError, match="num_ranks=3"):
        layout(lib, **SMALL, ranks=3)
    with pytest.raises(ValueError, match="num_ranks=33"):
        layout(lib, E=66, P=128, K=4, H=512, I=256, ranks=33)


def test_choices_small(lib):
    c = config(lib, **SMALL, T=16)
    # 16*4/16 = 4 tokens per expert: decode tile 64x256, split-N warpgroups, one wave of all experts
    assert (c["block_m"], c["block_n"], c["cluster"], c["experts_per_wave"]) == (64, 256, 1, 16)
    assert (c["dispatch_threads"], c["non_epilogue_threads"], c["epilogue_threads"], c["threads"]) == (64, 64, 256, 384)
    # smem (host accounting): fixed 1024 + 32768 + 128 + 144 + 72 = 34136, stage 41232 -> 4 stages, 199064 B
    assert (c["stages"], c["host_smem"], c["smem"]) == (4, 199064, 199064)
    assert c["early_combine"] == 0  # hidden 512 < 512 * top_k
    assert (c["l2_arrival_counter"], c["l2_full_sync"], c["reuse_accum"]) == (1, 0, 0)  # 4 <= T <= 128
    assert config(lib, **SMALL, T=1)["l2_arrival_counter"] == 0
    assert (c["pull_batch"], c["pull_eager"]) == (1, 1)
    assert (c["l1_out_box_n"], c["l1_out_box_m"], c["l1_out_swizzle"]) == (128, 64, 0)


def test_choices_prefill_tile(lib, monkeypatch):
    assert config(lib, E=16, P=256, K=4, H=512, I=256, T=256)["block_m"] == 64  # default: never the wide tile
    monkeypatch.setenv("JAX_MEGAMOE_SM90_WIDE_TILE", "1")  # not read by the library: the call's field decides
    assert config(lib, E=16, P=256, K=4, H=512, I=256, T=256)["block_m"] == 64
    c = config(lib, E=16, P=256, K=4, H=512, I=256, T=256, wide=True)
    # 256*4/16 = 64 tokens per expert: 128x256 tile, split-M warpgroups, 2-CTA cluster multicasting B
    assert (c["block_m"], c["block_n"], c["cluster"], c["multicast_b"]) == (128, 256, 2, 1)
    assert (c["half_l2_cd"], c["l2_cd_passes"], c["reuse_accum"], c["l2_arrival_counter"]) == (1, 4, 1, 1)
    # weight-SF slot: max(2*4, 2*2) floats * 4 B = 32 B < 256 -> row passes with plain stores (mode 2)
    assert c["l2_stage_mode"] == 2
    assert (c["l1_out_box_n"], c["l1_out_box_m"], c["l1_out_swizzle"]) == (128, 64, 128)
    big = config(lib, E=256, P=8192, K=6, H=4096, I=2048, T=8192, wide=True)
    assert big["l2_stage_mode"] == 4 and big["pull_batch"] == 16 and big["pull_eager"] == 0


def test_choices_v4_flash(lib):
    for T in (1, 16, 128, 256):
        c = config(lib, **FLASH, T=T)
        assert (c["block_m"], c["experts_per_wave"], c["stages"], c["early_combine"]) == (64, 256, 4, 1)
        assert c["smem"] <= SMEM_CAPACITY
    # 512 tokens: 12 expected tokens per expert > 4 -> waves of num_sms / (2I/256) = 132 / 16 = 8 experts
    assert config(lib, **FLASH, T=512)["experts_per_wave"] == 8
    assert config(lib, **FLASH, T=512, num_sms=114)["experts_per_wave"] == 7
    pro = config(lib, **PRO, T=512)
    assert pro["experts_per_wave"] == 132 // 24 and pro["block_m"] == 64


def test_config_rejects(lib):
    with pytest.raises(ValueError, match="num_tokens"):
        config(lib, **SMALL, T=129)
    with pytest.raises(ValueError, match="num_sms"):
        config(lib, **SMALL, T=1, num_sms=131)
    with pytest.raises(ValueError, match="activation_clamp"):
        config(lib, **SMALL, T=1, clamp=-1.0)
