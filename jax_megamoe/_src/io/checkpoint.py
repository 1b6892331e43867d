"""Load one DeepSeek V4 MoE layer from a safetensors checkpoint into kernel layout (the public face).

What is read and how (tensor names, dtypes, checks, nibble order): :mod:`jax_megamoe._src.io.v4_checkpoint`.

Where it lives: this module is the public face of the checkpoint path and re-exports it; the
code is in :mod:`jax_megamoe._src.io.safetensors_reader` (safetensors files and folders),
:mod:`jax_megamoe._src.io.v4_checkpoint` (V4 tensor names, config inference, nibble checks, reading one
layer), :mod:`jax_megamoe._src.io.build` (kernel layout) and :mod:`jax_megamoe._src.io.convert` (converted
folders). Building a Flax block from a checkpoint is the model's job:
:meth:`jax_megamoe.models.deepseek_v4.DeepseekV4MoE.from_checkpoint` /
:func:`jax_megamoe.models.deepseek_v4.load_moe_block`.
"""

from __future__ import annotations

from jax_megamoe._src.io.build import build_moe_layer, load_moe_layer
from jax_megamoe._src.io.convert import load_converted
from jax_megamoe._src.io.safetensors_reader import (
    CONFIG_NAME,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    SINGLE_NAME,
    Checkpoint,
    CheckpointError,
    SafetensorsFile,
    TensorInfo,
    read_safetensors_header,
    safetensors_dtype,
)
from jax_megamoe._src.io.v4_checkpoint import (
    CONFIG_KEYS,
    NIBBLE_ORDERS,
    MoELayer,
    MoELayerTensors,
    check_checkpoint_nibble_order,
    check_nibble_order,
    dequantize_fp4_numpy,
    infer_config,
    layer_prefix,
    list_moe_layers,
    nibble_order_errors,
    read_moe_layer,
    swap_nibbles,
)
from jax_megamoe._src.numerics.progress import make_progress

__all__ = [
    "CheckpointError",
    "TensorInfo",
    "SafetensorsFile",
    "Checkpoint",
    "read_safetensors_header",
    "safetensors_dtype",
    "MoELayerTensors",
    "MoELayer",
    "read_moe_layer",
    "load_moe_layer",
    "build_moe_layer",
    "load_converted",
    "infer_config",
    "layer_prefix",
    "list_moe_layers",
    "dequantize_fp4_numpy",
    "swap_nibbles",
    "nibble_order_errors",
    "check_nibble_order",
    "check_checkpoint_nibble_order",
    "NIBBLE_ORDERS",
    "SAFETENSORS_DTYPES",
    "CONFIG_KEYS",
    "CONFIG_NAME",
    "INDEX_NAME",
    "SINGLE_NAME",
    "MAX_HEADER_BYTES",
    "make_progress",
]
