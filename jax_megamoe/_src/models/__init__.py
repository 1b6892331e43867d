"""Layer 4, models: Flax NNX model code built on the Mega MoE ops."""
