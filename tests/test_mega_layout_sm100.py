"""sm_100 Mega MoE: symmetric-buffer layout and launch heuristics (ffi/layout/sm100_mega_moe.{h,cc}).

CPU only -- no B200 has run any of this. The C++ arithmetic is reached through the library's
``jmm_sm100_mega_layout`` / ``jmm_sm100_mega_config`` C entry points and checked against

(a) values derived by hand (comments) from deep_gemm/layout/mega_moe.cuh,
    deep_gemm/scheduler/mega_moe.cuh and the 0.2.5 host rules read from the wheel's compiled
    host code (see ffi/layout/sm100_mega_moe.cc for the provenance of each rule),
(b) an independent Python transcription of the same formulas,
(c) the DeepGEMM headers' own host-callable functions (MegaMoEBuffer, get_num_max_live_pool_blocks,
    get_num_sf_ring_tokens, sizeof(MegaMoESignals), and the compiler's layout of a mirror of the
    kernel's SharedStorage built from the real member types), compiled with nvcc into a tiny host
    program (skipped without nvcc / the sgl-deep-gemm headers), and
(d) the kernel's static_assert rules and launch rules for every configuration the heuristics pick.
"""

from __future__ import annotations

import json
import math
import subprocess

import ffi_testing as ft
import pytest

from jax_megamoe._src.kernels import _toolchain

MXFP8FP4, MXFP4 = 1, 2
# The tests' short names for the C struct fields (common/c_api_testing.h) they use most; the others keep
# their C names. By name, not position: the field order lives in the C header only.
LAYOUT_NAMES = dict(
    workspace_bytes="workspace",
    num_max_pool_tokens="pool",
    num_ring_tokens="ring",
    num_sf_ring_tokens="sf_ring",
    num_experts_per_rank="e_local",
    elem_bits="bits",
    ring_is_full_pool="full_pool",
)
REGIONS = (
    "x",
    "x_sf",
    "topk_idx",
    "topk_weights",
    "l1",
    "l1_sf",
    "l1_topk_weights",
    "l2",
    "l2_sf",
    "combine",
    "input_x_scales",
    "l1_x_scales",
)  # in buffer order
CONFIG_NAMES = dict(
    num_max_tokens_per_rank="cap",
    hidden="H",
    intermediate="I",
    num_experts="E",
    num_shared_experts="S",
    top_k="K",
    store_block_m_l1="store_l1",
    store_block_m_l2="store_l2",
    num_ring_tokens="ring",
    num_sf_ring_tokens="sf_ring",
    num_stages="stages",
    num_bytes_per_pull="pull",
    num_dispatch_threads="dispatch_threads",
    num_non_epilogue_threads="non_epilogue_threads",
    num_epilogue_threads="epilogue_threads",
    num_ranks="ranks",
    use_situ="situ",
    use_x_scales="x_scales",
    with_l1_alphas="l1_alphas",
    with_l2_alphas="l2_alphas",
    with_l2_act_scales="l2_act_scales",
    use_fp8_combine="fp8_combine",
    post_expert_norm="post_norm",
    use_trtllm_weights="trtllm",
    elem_bits="bits",
    swizzle_acts_mode="swizzle_acts",
    swizzle_weights_mode="swizzle_weights",
    l1_out_block_n_bytes="l1_out_bytes",
    num_locality_domains="domains",
    num_tmem_cols="tmem_cols",
    cluster_size="cluster",
    num_threads="threads",
    smem_size="smem",
    host_smem_size="host_smem",
    kernel_smem_bytes="kernel_smem",
    reusable_smem_bytes="reusable_smem",
)
SMEM_CAPACITY = 232448
SIGNALS_BYTES = 21140864
B200_SMS = 148

SMALL = dict(E=16, P=1920, K=4, H=512, I=256)
FLASH = dict(E=256, P=1920, K=6, H=4096, I=2048)  # DeepSeek V4-Flash
PRO = dict(E=384, P=1920, K=6, H=7168, I=3072)  # DeepSeek V4-Pro


@pytest.fixture(scope="module")
def lib():
    return ft.library()


def _renamed(d, names):
    return {names.get(k, k): v for k, v in d.items()}


def layout(lib, E, P, K, H, I, kind=MXFP4, num_sms=B200_SMS, ranks=1):
    shape = ft.mega_shape(lib, E=E, P=P, K=K, H=H, I=I, ranks=ranks, kind=kind)
    return _renamed(ft.mega_layout(lib, 100, shape, num_sms), LAYOUT_NAMES)


def config(lib, E, P, K, H, I, T, kind=MXFP4, num_sms=B200_SMS, ranks=1, clamp=math.inf, fast_math=True):
    shape = ft.mega_shape(lib, E=E, P=P, K=K, H=H, I=I, ranks=ranks, kind=kind)
    call = ft.mega_call(lib, T=T, num_sms=num_sms, clamp=clamp, fast_math=fast_math)
    return _renamed(ft.mega_config(lib, 100, shape, call), CONFIG_NAMES)


# --------------------------------------------------------------------------------------
# Independent transcription (layout/mega_moe.cuh, scheduler/mega_moe.cuh, 0.2.5 host rules)
# --------------------------------------------------------------------------------------

CANDIDATE_BM = (8, 16, 32, 64, 96, 128, 192, 240)


def cdiv(a, b):
    return -(-a // b)


def align(x, a):
    return cdiv(x, a) * a


def py_live_blocks(tot, sms, H, I):
    clusters, l1, l2 = sms // 2, 2 * I // 256, H // 256
    warm = max(cdiv(cdiv(clusters, l2) * l1, clusters), cdiv(l1 + (tot - 1) * max(l1 - l2, 0), clusters) + 1)
    warm = min(warm, cdiv(tot * l1, clusters))
    live = cdiv(min(warm * clusters, tot * l1), l1)
    growth = cdiv(tot * (l2 - l1), l2) if l2 > l1 else 0
    return min(tot, live + growth + cdiv(clusters, min(l1, l2)))


def py_layout(E, P, K, H, I, kind=MXFP4, num_sms=B200_SMS, ranks=1):
    el = E // ranks
    bits = 4 if kind == MXFP4 else 8
    pool = align(ranks * P * min(K, el) + el * 239, 1920)
    routed = P * ranks * min(K, el)
    ring = align(max(py_live_blocks(cdiv(routed, bm) + el, num_sms, H, I) * bm for bm in CANDIDATE_BM), 1920)
    if P >= 6144:
        ring = pool
    sf = max((ring // bm) * align(bm, 128) for bm in CANDIDATE_BM)
    ws = align(SIGNALS_BYTES + E * P * 4 + pool * 12 + P * K * 4, 16)
    sizes = [
        P * H * bits // 8,
        P * H // 32,
        P * K * 8,
        P * K * 4,
        ring * H * bits // 8,
        sf * H // 32,
        ring * 4,
        ring * I * bits // 8,
        sf * I // 32,
        K * P * H * 2,
        P * 4,
        ring * 4,
    ]
    out, o = {"workspace": ws}, ws
    for name, n in zip(REGIONS, sizes):
        out[name] = o
        o += n
    out.update(
        num_bytes=o, pool=pool, ring=ring, sf_ring=sf, e_local=el, bits=bits, full_pool=int(P >= 6144), num_sms=num_sms
    )
    return out


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------

# Region sizes derived by hand (148 SMs, mxf4xmxf4 = 4-bit activations, one rank).
HAND = {
    # small: pool = align(1920*4 + 16*239 = 11504, 1920) = 11520. H = 512, I = 256: 2 L1 and 2 L2
    # N-clusters, 74 clusters -> live blocks min(tot, 74 + 0 + 37) = min(tot, 111): bm 8..64 give
    # 111*bm <= 7104, bm 96: 96 blocks (9216), 128: 76 (9728), 192: 56 (10752), 240: 48 (11520)
    # -> R = 11520; Rsf = (11520/8)*128 = 184320. Workspace 21140864 + 16*1920*4 + 11520*12 +
    # 1920*4*4 = 21432704.
    "small": dict(
        workspace=21432704,
        ring=11520,
        sf_ring=184320,
        pool=11520,
        sizes=[
            1920 * 256,
            1920 * 16,
            1920 * 4 * 8,
            1920 * 4 * 4,
            11520 * 256,
            184320 * 16,
            11520 * 4,
            11520 * 128,
            184320 * 8,
            4 * 1920 * 512 * 2,
            1920 * 4,
            11520 * 4,
        ],
    ),
    # V4-Flash: 16 L1 and 16 L2 N-clusters; live = min(tot, ceil(148/16) = 10 + 0 + ceil(74/16) = 5) = 15
    # -> max over bm is 15*240 = 3600 -> R = 3840; Rsf = 480*128 = 61440; pool = align(11520 + 256*239,
    # 1920) = 72960. Workspace 21140864 + 256*1920*4 + 72960*12 + 1920*6*4 = 24028544.
    "flash": dict(
        workspace=24028544,
        ring=3840,
        sf_ring=61440,
        pool=72960,
        sizes=[
            1920 * 2048,
            1920 * 128,
            1920 * 6 * 8,
            1920 * 6 * 4,
            3840 * 2048,
            61440 * 128,
            3840 * 4,
            3840 * 1024,
            61440 * 64,
            6 * 1920 * 4096 * 2,
            1920 * 4,
            3840 * 4,
        ],
    ),
    # V4-Pro: 24 L1 and 28 L2 N-clusters; bm 240: tot = 48 + 384 = 432, live = ceil(148/24) = 7 +
    # ceil(432*4/28) = 62 + ceil(74/24) = 4 = 73 -> 17520 (the maximum) -> R = 19200; Rsf = 2400*128 =
    # 307200; pool = align(11520 + 384*239, 1920) = 103680. Workspace 21140864 + 384*1920*4 +
    # 103680*12 + 1920*6*4 = 25380224.
    "pro": dict(
        workspace=25380224,
        ring=19200,
        sf_ring=307200,
        pool=103680,
        sizes=[
            1920 * 3584,
            1920 * 224,
            1920 * 6 * 8,
            1920 * 6 * 4,
            19200 * 3584,
            307200 * 224,
            19200 * 4,
            19200 * 1536,
            307200 * 96,
            6 * 1920 * 7168 * 2,
            1920 * 4,
            19200 * 4,
        ],
    ),
}


@pytest.mark.parametrize("name,shape", [("small", SMALL), ("flash", FLASH), ("pro", PRO)])
def test_layout_hand_derived(lib, name, shape):
    got = layout(lib, **shape)
    want = HAND[name]
    assert (got["workspace"], got["ring"], got["sf_ring"], got["pool"]) == (
        want["workspace"],
        want["ring"],
        want["sf_ring"],
        want["pool"],
    )
    o = want["workspace"]
    for region, size in zip(REGIONS, want["sizes"]):
        assert got[region] == o, region
        o += size
    assert got["num_bytes"] == o
    assert got["full_pool"] == 0 and got["bits"] == 4 and got["num_sms"] == B200_SMS


def test_layout_full_pool_rule(lib):
    # capacity >= 6144: the ring is the whole pool (non-wrapping prefill path of 0.2.5)
    big = layout(lib, **{**FLASH, "P": 7680})
    assert big["full_pool"] == 1 and big["ring"] == big["pool"] == align(7680 * 6 + 256 * 239, 1920) == 107520
    # ... and does not depend on the SM count any more
    assert layout(lib, **{**FLASH, "P": 7680}, num_sms=100)["ring"] == 107520
    # below 6144 the ring follows the live-block bound, which depends on the SM count
    small = layout(lib, **{**FLASH, "P": 3840})
    assert small["full_pool"] == 0 and small["ring"] < small["pool"]
    assert layout(lib, **{**FLASH, "P": 3840}, num_sms=64)["ring"] != small["ring"]


def test_layout_modes(lib):
    fp4, fp8 = layout(lib, **FLASH, kind=MXFP4), layout(lib, **FLASH, kind=MXFP8FP4)
    assert fp4["bits"] == 4 and fp8["bits"] == 8
    # ring and SF ring do not depend on the mode; the activation regions double with FP8
    assert (fp4["ring"], fp4["sf_ring"]) == (fp8["ring"], fp8["sf_ring"])
    assert fp8["x_sf"] - fp8["x"] == 2 * (fp4["x_sf"] - fp4["x"])
    assert fp8["l1_sf"] - fp8["l1"] == 2 * (fp4["l1_sf"] - fp4["l1"])
    assert fp8["l2_sf"] - fp8["l2"] == 2 * (fp4["l2_sf"] - fp4["l2"])


SHAPES = [
    SMALL,
    FLASH,
    PRO,
    dict(E=256, P=3840, K=6, H=4096, I=2048),
    dict(E=256, P=7680, K=6, H=4096, I=2048),
    dict(E=384, P=7680, K=6, H=7168, I=3072),
    dict(E=8, P=1920, K=8, H=1024, I=512),  # K == E_local
    dict(E=4, P=1920, K=6, H=2048, I=1024),  # K > E_local: min(K, E_local) slots per token
    dict(E=33, P=1920, K=1, H=8192, I=256),
    dict(E=64, P=5760, K=8, H=2560, I=768),  # 2I not a multiple of 512: one locality domain
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", [MXFP4, MXFP8FP4])
@pytest.mark.parametrize("num_sms", [148, 146, 132, 64, 2])
def test_layout_matches_formulas(lib, shape, kind, num_sms):
    if kind == MXFP4 and shape["I"] % 256:
        pytest.skip("mxf4xmxf4 needs I % 256 (BLOCK_K = 256)")
    got = layout(lib, **shape, kind=kind, num_sms=num_sms)
    assert got == py_layout(**shape, kind=kind, num_sms=num_sms)
    offs = [got[k] for k in REGIONS] + [got["num_bytes"]]
    assert offs == sorted(offs) and all(o % 16 == 0 for o in offs)  # TMA bases are 16-byte aligned
    assert got["ring"] % 1920 == 0 and got["ring"] <= got["pool"] and got["ring"] <= (1 << 23)
    assert got["sf_ring"] % 4 == 0  # the SF descriptors' TMA-aligned MN dimension


@pytest.mark.parametrize("ranks", [2, 8, 72])
def test_layout_n_ranks(lib, ranks):
    shape = dict(E=288, P=1920, K=6, H=4096, I=2048)
    got = layout(lib, **shape, ranks=ranks)
    assert got == py_layout(**shape, ranks=ranks)
    el = 288 // ranks
    assert got["e_local"] == el and got["pool"] == align(ranks * 1920 * min(6, el) + el * 239, 1920)
    # the source-index table covers every global expert, the combine buffer only this rank's tokens
    assert got["workspace"] == align(SIGNALS_BYTES + 288 * 1920 * 4 + got["pool"] * 12 + 1920 * 6 * 4, 16)
    assert got["input_x_scales"] - got["combine"] == 6 * 1920 * 4096 * 2


@pytest.mark.parametrize(
    "bad,why",
    [
        (dict(E=16, P=1000, K=4, H=512, I=256), "capacity"),
        (dict(E=16, P=1920, K=4, H=384, I=256), "hidden"),
        (dict(E=16, P=1920, K=4, H=16384, I=256), "hidden"),
        (dict(E=16, P=1920, K=4, H=4352, I=256), "hidden"),  # > 4096 needs % 512 (combine halves)
        (dict(E=16, P=1920, K=4, H=512, I=192), "intermediate"),
        (dict(E=16, P=1920, K=4, H=512, I=384), "intermediate"),  # mxf4xmxf4: I % 256
        (dict(E=16, P=1920, K=33, H=512, I=256), "top_k"),
        (dict(E=4096, P=1920, K=4, H=512, I=256), "num_experts"),
        (dict(E=16, P=1920 * 137, K=4, H=512, I=256), "capacity"),
    ],
)
def test_layout_rejects(lib, bad, why):
    with pytest.raises(ValueError, match=why):
        layout(lib, **bad)


def test_layout_rejects_sms_and_kind(lib):
    with pytest.raises(ValueError, match="num_sms"):
        layout(lib, **SMALL, num_sms=147)
    with pytest.raises(ValueError, match="mma_kind"):
        layout(lib, **SMALL, kind=3)
    with pytest.raises(ValueError, match="num_ranks"):
        layout(lib, **{**SMALL, "E": 73 * 2}, ranks=73)
    # fp8xfp4 accepts I % 128
    assert layout(lib, **{**SMALL, "I": 384}, kind=MXFP8FP4)["bits"] == 8


# --------------------------------------------------------------------------------------
# Heuristics
# --------------------------------------------------------------------------------------


def py_block(T, E, K, ranks, kind):
    """0.2.5 get_block_config_for_mega_moe: (BLOCK_M, STORE_L1, STORE_L2) from the f32 expectation."""
    import numpy as np

    f = np.float32
    e = f(K) * (f(T) * f(ranks)) / f(E)
    if e <= f(10):
        return 16, 8, 8
    if e <= f(24):
        return 32, 16, 16
    cov = e + np.sqrt(e)
    n = int(np.ceil(cov / f(240)))
    skip64 = n == 1 and cov > f(192) and E // ranks <= 13
    n = 2 if skip64 else n
    for bm, st in ((64, 16), (128, 32), (192, 48)):
        if bm == 64 and skip64:
            continue
        if f(n * bm) >= cov:
            return bm, st, st
    return (240, 24, 8) if kind == MXFP8FP4 else (240, 40, 40)


def check_kernel_rules(c, lay):
    """The static_asserts of sm100_fp8_fp4_mega_moe_impl and its scheduler, plus the launch rules."""
    E, H, I, K = c["E"], c["H"], c["I"], c["K"]
    bm, bn, bk = c["block_m"], c["block_n"], c["block_k"]
    bits = 4 if c["mma_kind"] == MXFP4 else 8
    assert c["bits"] == bits and c["block_k_bytes"] == bk * bits // 8 == 128
    assert c["dispatch_threads"] % 128 == 0 and c["non_epilogue_threads"] == 128 and c["epilogue_threads"] % 128 == 0
    assert E % c["ranks"] == 0 and K <= 32 and c["ranks"] <= c["dispatch_threads"]
    assert bm % 16 == 0 and bm in CANDIDATE_BM and bn == 128
    assert c["block_k_bytes"] % 128 == 0
    assert c["sf_block_m"] == align(bm, 128) and c["sf_block_n"] == bn
    umma_k = 32 * 8 // bits
    assert (128 // umma_k) == (2 if bits == 4 else 4)  # kNumMMAsPerSFChunk for MXFP4 / MXFP8FP4
    assert bk % (c["gran_k"] * 4) == 0 and c["gran_k"] == 32
    wg_bm = bm // (c["epilogue_threads"] // 128)
    assert wg_bm % c["store_l1"] == 0 and wg_bm % c["store_l2"] == 0
    assert c["store_l1"] % 8 == 0 and c["store_l2"] % 8 == 0
    # scheduler: 2-CTA clusters over N, even SM count, whole K blocks
    assert (2 * I) % (2 * bn) == 0 and H % (2 * bn) == 0 and c["num_sms"] % 2 == 0 and c["num_sms"] > 1
    assert H % bk == 0 and I % bk == 0 and bk % (bn // 2) == 0
    assert c["domains"] == (2 if (2 * I) % 512 == 0 and H % 512 == 0 else 1)
    # ring: whole BLOCK_M blocks, within the signal arrays; the kernel's buffer = the host's buffer
    assert c["ring"] == lay["ring"] and c["sf_ring"] == lay["sf_ring"] and c["ring"] % bm == 0
    assert c["ring"] <= (1 << 23)
    # dispatch pull: divides the token bytes, 16-byte aligned, at most 8192 bytes (0.2.5)
    tok = H * bits // 8
    assert (
        tok % c["pull"] == 0
        and c["pull"] % 16 == 0
        and c["pull"] <= 8192
        and (c["pull"] == tok or c["pull"] * 2 > 8192)
    )
    # registers (setmaxnreg budget)
    regs = (48, 40, 208) if E // c["ranks"] <= 64 else (96, 72, 168)
    assert (
        regs[0] * c["dispatch_threads"] + regs[1] * c["non_epilogue_threads"] + regs[2] * c["epilogue_threads"] <= 64512
    )
    # tensor memory
    need = 2 * bm + c["sf_block_m"] // 32 + c["sf_block_n"] // 32
    assert need <= c["tmem_cols"] <= 512 and c["tmem_cols"] >= 32 and c["tmem_cols"] & (c["tmem_cols"] - 1) == 0
    # pipeline and shared memory
    assert 2 <= c["stages"] <= 32
    assert c["kernel_smem"] <= c["smem"] <= SMEM_CAPACITY and c["smem"] == c["host_smem"]
    chunks = c["combine_chunks"]
    assert chunks in (1, 2) and 3 * 8 * H * 2 // chunks <= c["reusable_smem"] and (H * 2 // chunks) % 512 == 0
    # launch: persistent grid of num_sms CTAs in 2-CTA clusters, 512 threads, one CTA per SM
    assert (
        c["cluster"] == 2
        and c["threads"] == c["dispatch_threads"] + c["non_epilogue_threads"] + c["epilogue_threads"] == 512
    )
    assert c["smem"] > SMEM_CAPACITY // 2  # so exactly one CTA per SM, as __launch_bounds__(…, 1) assumes
    # TMA boxes
    assert c["load_block_m"] == bm // 2 and c["load_block_n"] == bn and c["swizzle_acts"] == c["swizzle_weights"] == 128
    assert c["l1_out_bytes"] == (bn // 2) * bits // 8 and c["l1_out_bytes"] in (32, 64)
    # only what jax_megamoe uses
    assert c["S"] == 0 and not any(
        c[k]
        for k in (
            "situ",
            "x_scales",
            "l1_alphas",
            "l2_alphas",
            "l2_act_scales",
            "fp8_combine",
            "post_norm",
            "post_norm_weight_first",
            "post_norm_has_weight",
            "trtllm",
        )
    )


CONFIG_SHAPES = [
    SMALL,
    FLASH,
    PRO,
    dict(E=256, P=7680, K=6, H=4096, I=2048),
    dict(E=384, P=7680, K=6, H=7168, I=3072),
    dict(E=8, P=1920, K=8, H=1024, I=512),
    dict(E=64, P=5760, K=8, H=2560, I=768),
    dict(E=33, P=1920, K=1, H=8192, I=256),
]


@pytest.mark.parametrize("shape", CONFIG_SHAPES)
@pytest.mark.parametrize("kind", [MXFP4, MXFP8FP4])
@pytest.mark.parametrize("num_sms", [148, 132])
def test_heuristics_satisfy_kernel_rules(lib, shape, kind, num_sms):
    if kind == MXFP4 and shape["I"] % 256:
        pytest.skip("mxf4xmxf4 needs I % 256")
    lay = layout(lib, **shape, kind=kind, num_sms=num_sms)
    P = shape["P"]
    for T in sorted({1, 2, 7, 16, 100, 128, 256, 427, 512, 853, 1024, 1500, 1920, 4096, 6000, P}):
        if T > P:
            continue
        c = config(lib, **shape, T=T, kind=kind, num_sms=num_sms)
        check_kernel_rules(c, lay)
        assert (c["block_m"], c["store_l1"], c["store_l2"]) == py_block(T, shape["E"], shape["K"], 1, kind), T
        assert c["num_sms"] == num_sms and c["cap"] == P


def test_block_m_bands(lib):
    # E = 64, K = 8: expected = T / 8 tokens per expert (E_local = 64 > 13)
    s = dict(E=64, P=1920, K=8, H=1024, I=512)
    bands = {
        80: 16,  # 10.0 <= 10 -> 16
        81: 32,  # 10.125
        192: 32,  # 24.0
        193: 64,  # 24.125 + 4.91 = 29.0 covered -> one block; 64 >= 29
        1000: 192,  # 125 + 11.2 = 136.2 -> n = 1: neither 64 nor 128 covers it, 192 does
        1800: 240,  # 225 + 15 = 240 -> n = 1, > 192, E_local 64 > 13 -> 240
        1920: 128,  # 240 + 15.5 = 255.5 -> n = 2: 2 * 64 < 255.5 <= 2 * 128 -> 128
    }
    for T, bm in bands.items():
        assert config(lib, **s, T=T, kind=MXFP4)["block_m"] == bm, T
    # fp8xfp4 at BLOCK_M 240 stores L1 in 24-row and L2 in 8-row blocks (0.2.5); mxf4 keeps 40/40
    c8, c4 = config(lib, **s, T=1800, kind=MXFP8FP4), config(lib, **s, T=1800, kind=MXFP4)
    assert (c8["store_l1"], c8["store_l2"], c4["store_l1"], c4["store_l2"]) == (24, 8, 40, 40)
    # few local experts (<= 13): one covering 240-row block becomes two 128-row blocks
    few = dict(E=8, P=1920, K=1, H=1024, I=512)
    assert config(lib, **few, T=1700)["block_m"] == 128  # 212.5 + 14.6 = 227.1 > 192
    assert config(lib, **few, T=1400)["block_m"] == 192  # 175 + 13.2 = 188.2 <= 192
    assert config(lib, **{**few, "E": 16, "K": 2}, T=1700)["block_m"] == 240  # same load, 16 local experts
    # N ranks: the expectation counts every rank's tokens
    assert config(lib, **{**s, "E": 512}, T=80, ranks=8)["block_m"] == 16
    assert config(lib, **{**s, "E": 512}, T=81, ranks=8)["block_m"] == 32


def test_choices_v4_flash(lib):
    # T = 128: 3 tokens per expert -> BLOCK_M 16, STORE 8; BLOCK_K = 128 bytes: 256 FP4 / 128 FP8 elements
    c4 = config(lib, **FLASH, T=128, kind=MXFP4)
    c8 = config(lib, **FLASH, T=128, kind=MXFP8FP4)
    assert (c4["block_m"], c4["store_l1"], c4["block_k"], c4["sf_block_m"], c4["load_block_m"]) == (16, 8, 256, 128, 8)
    assert (c8["block_m"], c8["block_k"]) == (16, 128)
    # mxf4: pull = 2048 (H/2 bytes); fixed smem 1024 + 8192 + 4096 (L2 staging 2*8*128*2) + 256 (amax)
    # + 224 (barriers) + 68 = 13860; stage 1024 + 16384 + 1024 + 1024 + 16 = 19472 -> 11 stages, 228052 B
    assert (c4["pull"], c4["stages"], c4["smem"]) == (2048, 11, 13860 + 11 * 19472)
    # fp8xfp4: pull = 4096; fixed 1024 + 16384 + 4096 + 256 + 224 + 68 = 22052; stage 1024 + 16384 + 512
    # + 512 + 16 = 18448 -> 11 stages, 224980 B
    assert (c8["pull"], c8["stages"], c8["smem"]) == (4096, 11, 22052 + 11 * 18448)
    assert c4["domains"] == 2 and c4["combine_chunks"] == 1 and c4["tmem_cols"] == 64
    assert c4["l1_out_bytes"] == 32 and c8["l1_out_bytes"] == 64
    # 1920 tokens: 45 per expert + sqrt -> 51.7 -> BLOCK_M 64
    assert config(lib, **FLASH, T=1920)["block_m"] == 64


def test_choices_v4_pro(lib):
    c = config(lib, **PRO, T=1920, kind=MXFP8FP4)
    # 30 tokens per expert -> 35.5 covered -> 64 / 16; pull = 7168 bytes (<= 8192: one chunk)
    assert (c["block_m"], c["store_l1"], c["pull"], c["ring"], c["sf_ring"]) == (64, 16, 7168, 19200, 307200)
    assert c["combine_chunks"] == 2  # 7168 > 4096 columns
    c4 = config(lib, **PRO, T=1, kind=MXFP4)
    assert (c4["block_m"], c4["pull"]) == (16, 3584)


def test_config_rejects(lib):
    with pytest.raises(ValueError, match="num_tokens"):
        config(lib, **SMALL, T=1921)
    with pytest.raises(ValueError, match="num_tokens"):
        config(lib, **SMALL, T=0)
    with pytest.raises(ValueError, match="num_sms"):
        config(lib, **SMALL, T=1, num_sms=131)
    with pytest.raises(ValueError, match="activation_clamp"):
        config(lib, **SMALL, T=1, clamp=-1.0)


TMAP_NAMES = (
    "l1_acts",
    "l1_acts_sf",
    "l1_weights",
    "l1_weights_sf",
    "l1_output",
    "l2_acts",
    "l2_acts_sf",
    "l2_weights",
    "l2_weights_sf",
)
UINT8, INT32, U4_ALIGN16B = 0, 3, 14


def tensor_maps(lib, E, P, K, H, I, T, kind=MXFP4, num_sms=B200_SMS, ranks=1):
    shape = ft.mega_shape(lib, E=E, P=P, K=K, H=H, I=I, ranks=ranks, kind=kind)
    plans = ft.mega_tensor_maps(lib, 100, shape, ft.mega_call(lib, T=T, num_sms=num_sms))
    assert len(plans) == len(TMAP_NAMES)
    maps = {}
    for name, m in zip(TMAP_NAMES, plans):
        rank = m["rank"]
        maps[name] = dict(m, dims=m["dims"][:rank], strides=m["strides"][: rank - 1], box=m["box"][:rank])
        assert m["dims"][rank:] == [0] * (5 - rank) and m["box"][rank:] == [0] * (5 - rank)
    return maps


def check_cuda_encode_rules(m):
    """cuTensorMapEncodeTiled's documented requirements (cuda.h, CUDA 13) for what the handler encodes."""
    esize = {UINT8: 1.0, INT32: 4.0, U4_ALIGN16B: 0.5}[m["dtype"]]
    assert m["rank"] in (2, 4) and len(m["dims"]) == m["rank"]
    assert all(0 < d < 2**32 for d in m["dims"])
    assert all(1 <= b <= 256 for b in m["box"]) and all(b <= d for b, d in zip(m["box"], m["dims"]))
    assert all(s % 16 == 0 and s < 2**40 for s in m["strides"])
    assert (m["box"][0] * esize) % 16 == 0
    assert m["swizzle"] in (0, 32, 64, 128)
    if m["swizzle"]:
        assert m["box"][0] * esize <= m["swizzle"]
    if m["dtype"] == U4_ALIGN16B:
        assert m["box"][0] == 128 and m["dims"][0] % 128 == 0 and all(s % 32 == 0 for s in m["strides"])
        assert m["swizzle"] in (0, 128)
    # strides cover the previous dimension
    span = m["dims"][0] * esize
    for d, s in zip(m["dims"][1:], m["strides"]):
        assert s >= span
        span = s * d


@pytest.mark.parametrize("shape", [SMALL, FLASH, PRO, dict(E=64, P=5760, K=8, H=2560, I=768)])
@pytest.mark.parametrize("kind", [MXFP4, MXFP8FP4])
@pytest.mark.parametrize("T", [1, 853, 1920])
def test_tensor_maps(lib, shape, kind, T):
    if kind == MXFP4 and shape["I"] % 256:
        pytest.skip("mxf4xmxf4 needs I % 256")
    E, H, I = shape["E"], shape["H"], shape["I"]
    c = config(lib, **shape, T=T, kind=kind)
    lay = layout(lib, **shape, kind=kind)
    maps = tensor_maps(lib, **shape, T=T, kind=kind)
    bits = c["bits"]
    hb, ib = H * bits // 8, I * bits // 8
    R, Rsf, sf_rows = lay["ring"], lay["sf_ring"], c["block_k"] // 128
    for name, m in maps.items():
        check_cuda_encode_rules(m)
        if m["source"] == 0:  # a slice of the symmetric buffer: 16-byte aligned, inside its region
            assert m["offset"] % 16 == 0
            end = m["offset"] + m["strides"][0] * (m["dims"][1] - 1) + m["dims"][0] * {UINT8: 1, INT32: 4}[m["dtype"]]
            nxt = min(lay[k] for k in REGIONS + ("num_bytes",) if lay[k] > m["offset"])
            assert end <= nxt, name
    # A operands: (BLOCK_M/2 rows x 128 B) = one CTA's smem_a stage, 128B swizzle, over the ring
    for name, region, row in (("l1_acts", "l1", hb), ("l2_acts", "l2", ib)):
        m = maps[name]
        assert (m["source"], m["offset"], m["dtype"], m["dims"], m["strides"]) == (
            0,
            lay[region],
            UINT8,
            [row, R],
            [row],
        )
        assert (m["box"], m["swizzle"]) == ([128, c["block_m"] // 2], 128)
    # L1 output: the same memory as l2_acts; (STORE_BLOCK_M_L1 rows x BLOCK_N/2 values), swizzle = box bytes
    m = maps["l1_output"]
    assert (m["offset"], m["dims"], m["box"]) == (lay["l2"], [ib, R], [64 * bits // 8, c["store_l1"]])
    assert m["swizzle"] == 64 * bits // 8 == c["l1_out_bytes"]
    # SFA: MN-major int32 [K/128][Rsf], (SF_BLOCK_M x BLOCK_K/128) words = smem_sfa stage
    for name, region, k in (("l1_acts_sf", "l1_sf", H), ("l2_acts_sf", "l2_sf", I)):
        m = maps[name]
        assert (m["offset"], m["dtype"], m["dims"], m["strides"], m["box"], m["swizzle"]) == (
            lay[region],
            INT32,
            [Rsf, k // 128],
            [Rsf * 4],
            [c["sf_block_m"], sf_rows],
            0,
        )
    # weights: [E][2][N/2][K] 4-D view of the packed [E, N, K/2] operand, (128 rows x 128 smem bytes) boxes
    for name, source, n, k in (("l1_weights", 1, 2 * I, H), ("l2_weights", 3, H, I)):
        m = maps[name]
        unpacked = kind == MXFP8FP4
        assert (m["source"], m["dtype"]) == (source, U4_ALIGN16B if unpacked else UINT8)
        assert m["dims"] == [k if unpacked else k // 2, n // 2, 2, E] and m["strides"] == [
            k // 2,
            n * k // 4,
            n * k // 2,
        ]
        assert m["strides"][2] * E == E * n * k // 2  # exactly the operand's bytes
        assert (m["box"], m["swizzle"]) == ([128, 128, 1, 1], 128)
    # SFB: int32 [E][K/128][N] (the operand as laid out by jax_megamoe.layout), (128 x BLOCK_K/128) words
    for name, source, n, k in (("l1_weights_sf", 2, 2 * I, H), ("l2_weights_sf", 4, H, I)):
        m = maps[name]
        assert (m["source"], m["dtype"], m["dims"], m["strides"], m["box"]) == (
            source,
            INT32,
            [n, E * (k // 128)],
            [n * 4],
            [128, sf_rows],
        )


def test_locality_table(lib):
    n, table = ft.locality_table(lib, 148, 2048)
    assert n == 1024 and len(table) == n  # one entry per physical SM, padded to 1024 as a guard
    assert table[:8] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert table == [(i // 2) % 2 for i in range(n)]
    # balanced over the physical SMs; both CTAs of a cluster (an even/odd SM pair) share a domain
    assert sum(table[:148]) == 74
    assert all(table[2 * i] == table[2 * i + 1] for i in range(74))
    assert ft.locality_table(lib, 2000, 0) == (2000, [])


# --------------------------------------------------------------------------------------
# Cross-check against the DeepGEMM headers' own host-callable code, compiled with nvcc
# --------------------------------------------------------------------------------------

CHECKER_HEAD = r"""
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
// Host-checkable assertions (the headers' DG_UNIFIED_ASSERT would use `trap` in host code).
__host__ __device__ inline void checker_fail(const char* what) {
#ifdef __CUDA_ARCH__
  asm volatile("trap;");
#else
  std::printf("{\"kind\": \"assert\", \"what\": \"%s\"}\n", what);
  std::exit(3);
#endif
}
#define DG_UNIFIED_ASSERT(c) do { if (!(c)) checker_fail(#c); } while (0)
#include <cuda_bf16.h>
#include <cutlass/arch/barrier.h>
#include <deep_gemm/layout/mega_moe.cuh>
#include <deep_gemm/scheduler/mega_moe.cuh>
using namespace deep_gemm;

static unsigned long long off(const void* p) { return static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(p)); }

// The buffer for (ranks, E, P, K, H, I, kind) sized for num_sms SMs: the ring rule of 0.2.5's host
// (get_symm_buffer_size_for_mega_moe) on the headers' own functions, then MegaMoEBuffer on a null base.
static void layout_case(unsigned ranks, unsigned E, unsigned P, unsigned K, unsigned H, unsigned I, int kind, int sms) {
  const int el = static_cast<int>(E / ranks);
  const int routed = static_cast<int>(P * ranks) * std::min(static_cast<int>(K), el);
  int ring = 0;
  for (int bm : layout::kCandidateBlockM)
    ring = std::max(ring, sched::get_num_max_live_pool_blocks(math::ceil_div(routed, bm) + el, sms, static_cast<int>(H), static_cast<int>(I)) * bm);
  ring = math::align(ring, layout::kLCMCandidateBlockM);
  if (P >= 6144) ring = layout::get_num_max_pool_tokens<int>(ranks, P, K, el);
  int sf = 0;
  for (int bm : layout::kCandidateBlockM) sf = std::max(sf, layout::get_num_sf_ring_tokens<int>(ring, bm));
  const MmaKind mk = kind == 2 ? MmaKind::MXFP4 : MmaKind::MXFP8FP4;
  const layout::MegaMoEBuffer b(nullptr, H, I, ranks, E, P, K, static_cast<unsigned>(ring), static_cast<unsigned>(sf), mk, 0u, false);
  std::printf("{\"kind\": \"layout\", \"case\": [%u, %u, %u, %u, %u, %u, %d, %d], \"workspace\": %llu, \"x\": %llu, "
              "\"x_sf\": %llu, \"topk_idx\": %llu, \"topk_weights\": %llu, \"l1\": %llu, \"l1_sf\": %llu, "
              "\"l1_topk_weights\": %llu, \"l2\": %llu, \"l2_sf\": %llu, \"combine\": %llu, \"input_x_scales\": %llu, "
              "\"l1_x_scales\": %llu, \"num_bytes\": %lld, \"pool\": %u, \"ring\": %d, \"sf_ring\": %d}\n",
              ranks, E, P, K, H, I, kind, sms, static_cast<unsigned long long>(b.workspace.get_num_bytes()),
              off(b.input_token_buffer.base), off(b.input_sf_buffer.base), off(b.input_topk_idx_buffer.base),
              off(b.input_topk_weights_buffer.base), off(b.l1_token_buffer.base), off(b.l1_sf_buffer.base),
              off(b.l1_topk_weights_buffer.base), off(b.l2_token_buffer.base), off(b.l2_sf_buffer.base),
              off(b.combine_token_buffer.base), off(b.input_x_scales_buffer.base), off(b.l1_x_scales_buffer.base),
              static_cast<long long>(b.get_num_bytes()), b.workspace.num_max_pool_tokens, ring, sf);
}

static void live_case(int tot, int sms, int H, int I) {
  std::printf("{\"kind\": \"live\", \"case\": [%d, %d, %d, %d], \"value\": %d}\n", tot, sms, H, I,
              sched::get_num_max_live_pool_blocks(tot, sms, H, I));
}

// A mirror of the kernel's SharedStorage (impls/sm100_fp8_fp4_mega_moe.cuh), built from the real member
// types, so that the compiler lays it out: checks the C++ port's shared-memory arithmetic.
template <uint32_t E, uint32_t DW, uint32_t PULL, uint32_t WGS, uint32_t EW, uint32_t SL1, uint32_t L1OUT,
          uint32_t SL2, uint32_t BN, uint32_t ST, uint32_t LBM, uint32_t LBN, uint32_t BKB, uint32_t SFM,
          uint32_t SFN, uint32_t SFC>
struct Smem {
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  alignas(1024) uint32_t expert_token_count[E];
  alignas(1024) uint8_t dispatch_send_buffer[DW][PULL];
  union {
    alignas(1024) uint8_t l1[WGS][2][SL1 * L1OUT];
    alignas(1024) nv_bfloat16 l2[WGS][SL2 * BN];
  } smem_d;
  alignas(1024) uint8_t smem_a[ST][LBM * BKB];
  alignas(1024) uint8_t smem_b[ST][LBN * BKB];
  uint32_t smem_sfa[ST][SFM * SFC];
  uint32_t smem_sfb[ST][SFN * SFC];
  float2 amax_reduction[EW][SL1 / 2];
  sched::TaskInfo<false> task_infos[2];
  Barrier dispatch_barriers[DW];
  Barrier full_barriers[ST];
  Barrier empty_barriers[ST];
  Barrier tmem_full_barriers[2];
  Barrier tmem_empty_barriers[2];
  Barrier combine_barriers[EW * 2];
  Barrier task_info_full_barriers[2];
  Barrier task_info_empty_barriers[2];
  uint32_t tmem_ptr_in_smem;
  float nvfp4_sf_inv_lut[1];
  static void print(int id) {
    std::printf("{\"kind\": \"smem\", \"id\": %d, \"reusable\": %zu, \"used_end\": %zu, \"sizeof\": %zu}\n", id,
                offsetof(Smem, dispatch_barriers), offsetof(Smem, tmem_ptr_in_smem) + sizeof(uint32_t), sizeof(Smem));
  }
};

int main() {
  std::printf("{\"kind\": \"sizes\", \"signals\": %zu, \"task_info\": %zu, \"barrier\": %zu, \"symbuffer\": %zu, "
              "\"lcm\": %d, \"max_ring_blocks\": %u}\n",
              sizeof(layout::MegaMoESignals), sizeof(sched::TaskInfo<false>), sizeof(cutlass::arch::ClusterTransactionBarrier),
              sizeof(layout::SymBuffer<1>), layout::kLCMCandidateBlockM, layout::MegaMoESignals::kNumMaxRingBlocks);
"""


def _smem_args(c):
    bits = c["bits"]
    return (
        c["E"],
        c["dispatch_threads"] // 32,
        c["pull"],
        c["epilogue_threads"] // 128,
        c["epilogue_threads"] // 32,
        c["store_l1"],
        (c["block_n"] // 2) * bits // 8,
        c["store_l2"],
        c["block_n"],
        c["stages"],
        c["load_block_m"],
        c["load_block_n"],
        c["block_k_bytes"],
        c["sf_block_m"],
        c["sf_block_n"],
        c["block_k"] // (c["gran_k"] * 4),
    )


LAYOUT_CASES = [
    (1, s["E"], s["P"], s["K"], s["H"], s["I"], kind, sms)
    for s in SHAPES
    for kind in (MXFP4, MXFP8FP4)
    for sms in (148, 132, 2)
    if not (kind == MXFP4 and s["I"] % 256)
] + [(8, 256, 1920, 6, 4096, 2048, MXFP4, 148), (72, 288, 1920, 6, 7168, 3072, MXFP8FP4, 146)]
LIVE_CASES = [
    (t, sms, h, i)
    for t in (1, 17, 256, 1696, 4000)
    for sms in (2, 132, 148)
    for h, i in ((512, 256), (4096, 2048), (7168, 3072), (2560, 768))
]


@pytest.fixture(scope="module")
def checker(lib, tmp_path_factory):
    """Runs the nvcc-compiled host program once: {"layout": {case: ...}, "live": {...}, "smem": [...], "sizes": {...}}."""
    try:
        tc = _toolchain.find_nvcc()
        hd = _toolchain.find_deepgemm_headers()
    except _toolchain.ToolchainError as e:
        pytest.skip(str(e))
    configs = []
    for s in CONFIG_SHAPES:
        for kind in (MXFP4, MXFP8FP4):
            if kind == MXFP4 and s["I"] % 256:
                continue
            for T in (1, 128, 853, 1920, s["P"]):
                configs.append(config(lib, **s, T=min(T, s["P"]), kind=kind))
    configs.append(config(lib, E=64, P=1920, K=8, H=1024, I=512, T=1800, kind=MXFP8FP4))  # BLOCK_M 240, store 24/8
    configs.append(config(lib, E=64, P=1920, K=8, H=1024, I=512, T=1800, kind=MXFP4))
    body = [CHECKER_HEAD]
    body += [f"  layout_case({', '.join(map(str, case))});\n" for case in LAYOUT_CASES]
    body += [f"  live_case({', '.join(map(str, case))});\n" for case in LIVE_CASES]
    body += [f"  Smem<{', '.join(f'{v}u' for v in _smem_args(c))}>::print({i});\n" for i, c in enumerate(configs)]
    body.append("  return 0;\n}\n")
    d = tmp_path_factory.mktemp("sm100_checker")
    src, exe = d / "checker.cu", d / "checker"
    src.write_text("".join(body))
    cmd = [
        tc.nvcc,
        "-std=c++20",
        "-x",
        "cu",
        "--expt-relaxed-constexpr",
        "-w",
        f"-I{hd.include_dir}",
        *(f"-I{p}" for p in tc.include_dirs),
        str(src),
        "-o",
        str(exe),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = {"layout": {}, "live": {}, "smem": {}, "sizes": None, "configs": configs}
    for line in r.stdout.splitlines():
        rec = json.loads(line)
        if rec["kind"] == "sizes":
            out["sizes"] = rec
        elif rec["kind"] == "smem":
            out["smem"][rec["id"]] = rec
        else:
            out[rec["kind"]][tuple(rec["case"])] = rec
    return out


@pytest.mark.nvcc
def test_checker_struct_sizes(checker):
    s = checker["sizes"]
    assert s["signals"] == SIGNALS_BYTES
    assert (s["task_info"], s["barrier"], s["symbuffer"], s["lcm"], s["max_ring_blocks"]) == (32, 8, 592, 1920, 1 << 20)


@pytest.mark.nvcc
def test_checker_live_blocks(checker):
    assert len(checker["live"]) == len(LIVE_CASES)
    for case, rec in checker["live"].items():
        assert rec["value"] == py_live_blocks(*case), case


@pytest.mark.nvcc
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_checker_layout(lib, checker, case):
    ranks, E, P, K, H, I, kind, sms = case
    got = layout(lib, E, P, K, H, I, kind=kind, num_sms=sms, ranks=ranks)
    want = checker["layout"][case]
    for k in ("workspace", "num_bytes", "pool", "ring", "sf_ring", *REGIONS):
        assert got[k] == want[k], k


@pytest.mark.nvcc
def test_checker_shared_memory(checker):
    assert len(checker["smem"]) == len(checker["configs"]) > 30
    assert {c["block_m"] for c in checker["configs"]} >= {16, 32, 64, 240}
    for i, c in enumerate(checker["configs"]):
        rec = checker["smem"][i]
        assert (c["reusable_smem"], c["kernel_smem"]) == (rec["reusable"], rec["used_end"]), c
        # DeepGEMM's own accounting equals the kernel's layout up to the unused NVFP4 table
        assert c["host_smem"] == rec["used_end"] and rec["sizeof"] >= rec["used_end"]
