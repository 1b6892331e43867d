"""Host-side launch geometry of the pre-dispatch handlers (sm_90 and sm_100), checked on CPU.

The sm_100 kernels cannot run here (no B200), so the numbers the handler passes to
cuLaunchKernel are checked against the kernel's own contract instead: one CTA per token plus
enough pad CTAs for the (P - T) * K top-k slots, H/8 threads, ``num_groups = H / group``.
"""

from __future__ import annotations

import ffi_testing as ft
import numpy as np
import pytest

from jax_megamoe._src.kernels import _ffi

lib = _ffi.load_library()
pytestmark = pytest.mark.skipif(lib is None, reason="FFI library not built")


def _plan(arch, kind, t, p, h, k):
    got = ft.pre_dispatch_launch_plan(lib, arch, kind, t, p, h, k)
    if got is None:
        return -1, None
    return 0, [got["grid"], got["block"], got["num_groups"], got["x_row_bytes"], got["sf_row_bytes"]]


def _expected(arch, kind, t, p, h, k):
    block = h // 8
    pad_slots = (p - t) * k
    grid = t + -(-pad_slots // block)
    group = 128 if arch == 90 else 32
    x_row = h // 2 if (arch == 100 and kind == 2) else h
    return [grid, block, h // group, x_row, 4 * (h // 128)]


@pytest.mark.parametrize("arch, kind", [(90, 0), (100, 1), (100, 2)])
def test_launch_plan_matches_the_kernel_contract(arch, kind):
    rng = np.random.default_rng(arch + kind)
    for h in (512, 4096, 7168, 8192):
        for _ in range(20):
            p = int(rng.integers(1, 4096))
            t = int(rng.integers(0, p + 1))
            k = int(rng.integers(1, 9))
            rc, got = _plan(arch, kind, t, p, h, k)
            assert rc == 0
            assert got == _expected(arch, kind, t, p, h, k), (arch, kind, t, p, h, k)
            grid, block = got[0], got[1]
            # every pad slot is covered exactly by the pad CTAs, and no CTA is wholly idle
            assert (grid - t) * block >= (p - t) * k > (grid - t - 1) * block or p == t
            assert block <= 1024


def test_launch_plan_v4_numbers():
    # V4-Flash decode on sm_100 W4A4: 1 token, cap 1920, K=6 -> 1 + ceil(1919*6/512) = 24 CTAs of 512
    assert _plan(100, 2, 1, 1920, 4096, 6)[1] == [24, 512, 128, 2048, 128]
    # V4-Pro prefill on sm_90: 512 tokens, cap 512 -> no pad CTA, 896 threads, 56 groups of 128
    assert _plan(90, 0, 512, 512, 7168, 6)[1] == [512, 896, 56, 7168, 224]


@pytest.mark.parametrize(
    "args",
    [
        (80, 0, 1, 8, 512, 6),
        (90, 1, 1, 8, 512, 6),
        (100, 0, 1, 8, 512, 6),
        (90, 0, 9, 8, 512, 6),
        (90, 0, 1, 8, 500, 6),
    ],
)
def test_launch_plan_rejects_impossible_arguments(args):
    assert _plan(*args)[0] == -1
