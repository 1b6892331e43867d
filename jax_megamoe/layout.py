"""Kernel weight layouts: :class:`MoEWeights` built from DeepSeek V4 checkpoint tensors."""

from jax_megamoe._src.numerics.layout import (
    ConversionReport,
    MoEWeights,
    deinterleave_gate_up,
    deinterleave_gate_up_packed_fp4,
    fp4_to_fp8_block128,
    interleave_gate_up,
    interleave_gate_up_packed_fp4,
    pack_sf_mn_major,
    unpack_sf_mn_major,
    utccp_transpose,
    utccp_untranspose,
)

__all__ = [
    "interleave_gate_up",
    "deinterleave_gate_up",
    "interleave_gate_up_packed_fp4",
    "deinterleave_gate_up_packed_fp4",
    "utccp_transpose",
    "utccp_untranspose",
    "pack_sf_mn_major",
    "unpack_sf_mn_major",
    "fp4_to_fp8_block128",
    "ConversionReport",
    "MoEWeights",
]
