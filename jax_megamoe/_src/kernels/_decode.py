"""The low-latency decode kernels for sm_90 ``fp8``: which kernel runs a call, and the custom calls.

DeepGEMM's fused mega kernel has a fixed cost per call (pre-dispatch, grid-wide barriers, a
schedule over every expert, the GEMM1 -> GEMM2 drain) that dominates when a decode step has a
handful of tokens. Our two FP8 GEMV passes (``ffi/jit/decode_kernels.h``) stream only the selected
experts' weights and have none of it, so ``kernel="auto"`` takes them while ``T * K`` is at most
:func:`decode_max_pairs`, a crossover per expert shape measured in one jitted program of 43 layers
(``benchmarks/decode_step.py``; the table below). Same function as :func:`reference.mega_moe`
(same activation quantisation and requantisation; f32 accumulation; ``fast_math`` does not apply:
the SwiGLU uses an accurate ``expf``).
"""

from __future__ import annotations

from typing import Literal

Kernel = Literal["auto", "fused", "decode"]
KERNELS = ("auto", "fused", "decode")

#: Crossover of kernel="auto" on sm_90 per expert shape (hidden, intermediate), in (token, slot)
#: pairs per call: decode while T * K <= this. Measured with benchmarks/decode_step.py (43 layers in
#: one jitted step, paths ffi_fused vs ffi_decode, one NVIDIA H100 80GB HBM3, 2026-12-07, decode
#: kernels with the chunk-interleaved shared memory; benchmarks/RESULTS.md), per layer:
#:   V4-Flash (8 distinct weight sets):  T=1 fused 107.7 / decode 76.0 us, T=2 152.7 / 118.5,
#:     T=4 237.1 / 219.6, T=8 415.4 / 414.8 (a tie), T=16 721.4 / 761.0 -> decode while T <= 8
#:   V4-Pro (4 distinct sets, 224 of 384 experts): T=1 fused 191.4 / decode 175.6 us, T=2 301.9 / 317.0,
#:     T=4 546.2 / 558.9 -> decode at T = 1 only
#: The fused kernel's fixed cost weighs less as experts grow, so the crossover falls with H * I.
#: Rerun the benchmark before changing these.
DECODE_MAX_PAIRS_BY_SHAPE: dict[tuple[int, int], int] = {(4096, 2048): 48, (7168, 3072): 6}


def decode_max_pairs(hidden: int, intermediate: int) -> int:
    """The crossover of ``kernel="auto"`` for experts of this shape: the measured one, else that of
    the smallest measured shape at least as large (H * I), else that of the largest (the crossover
    only falls as experts grow, so this never picks decode where a measured larger shape did not)."""
    if (hidden, intermediate) in DECODE_MAX_PAIRS_BY_SHAPE:
        return DECODE_MAX_PAIRS_BY_SHAPE[(hidden, intermediate)]
    by_size = sorted(DECODE_MAX_PAIRS_BY_SHAPE.items(), key=lambda kv: kv[0][0] * kv[0][1])
    for (h, i), pairs in by_size:
        if hidden * intermediate <= h * i:
            return pairs
    return by_size[-1][1]


def choose_kernel(kernel: str, mode: str, num_tokens: int, top_k: int, *, hidden: int, intermediate: int) -> str:
    """``"fused"`` or ``"decode"`` for an FFI call of ``num_tokens`` tokens (validates ``kernel``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "decode" and mode != "fp8":
        raise ValueError(f"kernel='decode': the decode kernels run mode 'fp8' (sm_90) only, got mode {mode!r}")
    if kernel != "auto":
        return kernel
    pairs = num_tokens * top_k
    return "decode" if mode == "fp8" and 0 < pairs <= decode_max_pairs(hidden, intermediate) else "fused"
