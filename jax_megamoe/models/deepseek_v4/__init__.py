"""DeepSeek V4 in Flax NNX: the MoE block (gate, hash routing, routed experts on the Mega MoE ops,
shared expert) and its configuration."""

from jax_megamoe._src.models.deepseek_v4.loading import load_checkpoint, load_state_dict
from jax_megamoe._src.models.deepseek_v4.moe import (
    BACKENDS,
    DeepseekV4Config,
    DeepseekV4Gate,
    DeepseekV4MoE,
    DeepseekV4SharedExpert,
    GateBias,
    HashTable,
    MoECheckpoint,
    RoutedExperts,
    load_moe_block,
    random_checkpoint_scale_bytes,
    random_moe_checkpoint,
)

__all__ = [
    "BACKENDS",
    "DeepseekV4Config",
    "DeepseekV4Gate",
    "DeepseekV4MoE",
    "DeepseekV4SharedExpert",
    "GateBias",
    "HashTable",
    "MoECheckpoint",
    "RoutedExperts",
    "load_checkpoint",
    "load_moe_block",
    "load_state_dict",
    "random_checkpoint_scale_bytes",
    "random_moe_checkpoint",
]
