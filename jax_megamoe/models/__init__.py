"""Flax NNX models built on the Mega MoE ops (``jax_megamoe.models.deepseek_v4``)."""
