"""DeepSeek V4 in Flax NNX: the whole model (attention with its compressors and indexer, mHC
hyper-connections, MoE blocks on the Mega MoE ops, LM head), its cache, and its configuration."""

from jax_megamoe._src.models.deepseek_v4.attention import (
    AttentionCache,
    CompressorCache,
    DeepseekV4Attention,
)
from jax_megamoe._src.models.deepseek_v4.loading import load_checkpoint, load_state_dict
from jax_megamoe._src.models.deepseek_v4.model import (
    DeepseekV4Block,
    DeepseekV4ForCausalLM,
    ModelCache,
    ModelOptions,
    forward,
    forward_streams,
    jit_forward,
)
from jax_megamoe._src.models.deepseek_v4.moe import (
    BACKENDS,
    EXPERT_KINDS,
    BlockLoadOptions,
    DeepseekV4Config,
    DeepseekV4Gate,
    DeepseekV4MoE,
    DeepseekV4SharedExpert,
    ExactExperts,
    GateBias,
    HashTable,
    MoEBlockOptions,
    MoECheckpoint,
    RoutedExperts,
    load_moe_block,
    random_checkpoint_scale_bytes,
    random_moe_checkpoint,
)
from jax_megamoe._src.models.deepseek_v4.mtp import (
    DeepseekV4MTPBlock,
    SpeculativeResult,
    jit_mtp_draft,
    mtp_draft,
    speculative_greedy,
)

__all__ = [
    "BACKENDS",
    "DeepseekV4Config",
    "DeepseekV4ForCausalLM",
    "DeepseekV4Block",
    "DeepseekV4Attention",
    "AttentionCache",
    "CompressorCache",
    "ModelCache",
    "ModelOptions",
    "forward",
    "jit_forward",
    "forward_streams",
    "DeepseekV4MTPBlock",
    "mtp_draft",
    "jit_mtp_draft",
    "speculative_greedy",
    "SpeculativeResult",
    "DeepseekV4Gate",
    "DeepseekV4MoE",
    "MoEBlockOptions",
    "BlockLoadOptions",
    "DeepseekV4SharedExpert",
    "ExactExperts",
    "EXPERT_KINDS",
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
