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
# Measured with benchmarks/decode_step.py (V4-Flash, 43 layers of 8 distinct weight sets in one
# jitted step, paths ffi_fused vs ffi_decode, one NVIDIA H100 80GB HBM3, 2026-12-06), per layer:
#   T=1: fused 105.0 us, decode 86.2 us   T=2: fused 151.1 us, decode 140.2 us
#   T=4: fused 236.7 us, decode 270.7 us  T=8: fused 414.5 us, decode 535.2 us (fused from here on)
# so decode while T <= 2 at K = 6. Rerun the benchmark before changing it.
DECODE_MAX_PAIRS = 12


def choose_kernel(kernel: str, mode: str, num_tokens: int, top_k: int) -> str:
    """``"fused"`` or ``"decode"`` for an FFI call of ``num_tokens`` tokens (validates ``kernel``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: {kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "decode" and mode != "fp8":
        raise ValueError(f"kernel='decode': the decode kernels run mode 'fp8' (sm_90) only, got mode {mode!r}")
    if kernel != "auto":
        return kernel
    return "decode" if mode == "fp8" and 0 < num_tokens * top_k <= DECODE_MAX_PAIRS else "fused"
