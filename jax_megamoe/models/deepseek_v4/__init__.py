"""DeepSeek V4 in Flax NNX: the MoE block (gate, hash routing, routed experts on the Mega MoE ops,
shared expert), the attention layer (sliding window, CSA / HCA compressed KV, Lightning Indexer,
fixed-shape cache) and its configuration."""

from jax_megamoe._src.models.deepseek_v4.attention import (
    AttentionCache,
    CompressorCache,
    DeepseekV4Attention,
)
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
    "DeepseekV4Config",
    "DeepseekV4Attention",
    "AttentionCache",
    "CompressorCache",
    "DeepseekV4Gate",
    "DeepseekV4SharedExpert",
    "DeepseekV4MoE",
    "load_moe_block",
    "MoECheckpoint",
    "GateBias",
    "HashTable",
    "RoutedExperts",
    "random_moe_checkpoint",
    "random_checkpoint_scale_bytes",
    "BACKENDS",
]
