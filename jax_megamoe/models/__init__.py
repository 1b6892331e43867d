"""Flax NNX model code built on the Mega MoE ops (DeepSeek V4's MoE block).

Submodules are imported on use (``from jax_megamoe.models import deepseek_v4``), so importing
this package does not pull in Flax.
"""

__all__ = ["deepseek_v4"]
