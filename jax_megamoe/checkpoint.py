"""Read DeepSeek V4 safetensors checkpoints (one MoE layer into kernel layout, nibble checks).

Converting layers ahead of time is :mod:`jax_megamoe.convert`; building a Flax block from a
checkpoint is :meth:`jax_megamoe.models.deepseek_v4.DeepseekV4MoE.from_checkpoint`.
"""

from jax_megamoe._src.io.build import build_moe_layer, load_moe_layer
from jax_megamoe._src.io.safetensors_reader import (
    Checkpoint,
    CheckpointError,
    SafetensorsFile,
    TensorInfo,
    read_safetensors_header,
)
from jax_megamoe._src.io.v4_model_checkpoint import (
    TensorSpec,
    check_checkpoint_layout,
    expected_tensors,
    write_synthetic_checkpoint,
)
from jax_megamoe._src.io.v4_checkpoint import (
    NIBBLE_ORDERS,
    MoELayer,
    MoELayerTensors,
    check_checkpoint_nibble_order,
    check_nibble_order,
    dequantize_fp4_numpy,
    infer_config,
    layer_prefix,
    list_moe_layers,
    read_moe_layer,
    swap_nibbles,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "SafetensorsFile",
    "TensorInfo",
    "read_safetensors_header",
    "MoELayer",
    "MoELayerTensors",
    "read_moe_layer",
    "load_moe_layer",
    "build_moe_layer",
    "infer_config",
    "layer_prefix",
    "list_moe_layers",
    "dequantize_fp4_numpy",
    "swap_nibbles",
    "check_nibble_order",
    "check_checkpoint_nibble_order",
    "NIBBLE_ORDERS",
    "expected_tensors",
    "write_synthetic_checkpoint",
    "check_checkpoint_layout",
    "TensorSpec",
]
