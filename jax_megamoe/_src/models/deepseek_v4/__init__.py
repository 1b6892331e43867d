"""DeepSeek V4 in Flax NNX (implementation; public names in ``jax_megamoe.models.deepseek_v4``)."""
