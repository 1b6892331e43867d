"""Read DeepSeek V4 safetensors checkpoints (one MoE layer into kernel layout, nibble checks).

Converting layers ahead of time is :mod:`jax_megamoe.convert`; building a Flax block from a
checkpoint is :meth:`jax_megamoe.models.deepseek_v4.DeepseekV4MoE.from_checkpoint`.
"""

from jax_megamoe._src.io.build import build_moe_layer, load_moe_layer
from jax_megamoe._src.io.safetensors_reader import (
    CONFIG_NAME,
    INDEX_NAME,
    Checkpoint,
    CheckpointError,
    SafetensorsFile,
    TensorInfo,
    read_safetensors_header,
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
    read_moe_layer,
    swap_nibbles,
)
from jax_megamoe._src.io.v4_model_checkpoint import (
    TensorSpec,
    check_checkpoint_layout,
    expected_tensors,
    write_synthetic_checkpoint,
)

__all__ = [
    "NIBBLE_ORDERS",
    "Checkpoint",
    "CheckpointError",
    "MoELayer",
    "MoELayerTensors",
    "SafetensorsFile",
    "TensorInfo",
    "TensorSpec",
    "build_moe_layer",
    "check_checkpoint_layout",
    "check_checkpoint_nibble_order",
    "check_nibble_order",
    "dequantize_fp4_numpy",
    "expected_tensors",
    "infer_config",
    "layer_prefix",
    "list_moe_layers",
    "load_moe_layer",
    "read_moe_layer",
    "read_safetensors_header",
    "swap_nibbles",
    "CONFIG_KEYS",
    "CONFIG_NAME",
    "INDEX_NAME",
    "write_synthetic_checkpoint",
]
