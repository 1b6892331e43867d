"""The low-latency decode kernels for sm_90 ``fp8``: which kernel runs a call, and the custom calls.

DeepGEMM's fused mega kernel has a fixed cost per call (pre-dispatch, grid-wide barriers, a
schedule over every expert, the GEMM1 -> GEMM2 drain) that dominates when a decode step has a
handful of tokens. Our two FP8 GEMV passes (``ffi/jit/decode_kernels.h``) stream only the selected
experts' weights and have none of it, so ``kernel="auto"`` takes them while ``T * K`` is at most
:data:`DECODE_MAX_PAIRS`, a crossover measured in one jitted program of 43 V4-Flash layers
(``benchmarks/decode_step.py``; the table below). Same function as :func:`reference.mega_moe`
(same activation quantisation and requantisation; f32 accumulation; ``fast_math`` does not apply:
the SwiGLU uses an accurate ``expf``).
"""

from __future__ import annotations

from typing import Literal

Kernel = Literal["auto", "fused", "decode"]
KERNELS = ("auto", "fused", "decode")

# Crossover of kernel="auto" on sm_90, in (token, slot) pairs per call: decode while T * K <= this.
# To be chosen from benchmarks/decode_step.py (V4-Flash, 43 layers in one jitted step; paths
# ffi_fused vs ffi_decode). The decode kernels have not run on a GPU yet (no device was lent when
# they were written), so "auto" keeps the fused kernel everywhere (0) until that measurement and
# tests/gpu/test_decode_gpu.py have passed; kernel="decode" opts in.
DECODE_MAX_PAIRS = 0
DECODE_CROSSOVER_EVIDENCE = "not measured yet: the decode kernels are compile-checked only; auto = fused"

def choose_kernel(kernel: str, mode: str, num_tokens: int, top_k: int) -> str:
    """``"fused"`` or ``"decode"`` for an FFI call of ``num_tokens`` tokens (validates ``kernel``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "decode" and mode != "fp8":
        raise ValueError(f"kernel='decode': the decode kernels run mode 'fp8' (sm_90) only, got mode {mode!r}")
    if kernel != "auto":
        return kernel
    return "decode" if mode == "fp8" and 0 < num_tokens * top_k <= DECODE_MAX_PAIRS else "fused"
