"""The pure-JAX definition of correct: every kernel, in the kernels' order of operations (the CPU path)."""

from jax_megamoe._src.numerics.config import MoEOptions
from jax_megamoe._src.numerics.reference import (
    PreDispatched,
    default_chunk_rows,
    dequantize_activations,
    expert_ffn,
    mega_moe,
    pre_dispatch,
    quantize_activations,
    requantize_intermediate,
    route_ids,
    swiglu,
)

__all__ = [
    "PreDispatched",
    "pre_dispatch",
    "mega_moe",
    "expert_ffn",
    "swiglu",
    "quantize_activations",
    "dequantize_activations",
    "requantize_intermediate",
    "default_chunk_rows",
    "route_ids",
    "MoEOptions",
]
