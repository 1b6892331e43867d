"""Layer 3, io: safetensors reading, DeepSeek V4 checkpoint mapping (``checkpoint``) and the
offline conversion to kernel layout (``convert``, ``python -m jax_megamoe._src.io.convert``).

Imports only from ``jax_megamoe._src.numerics`` and ``jax_megamoe._src.kernels``. Submodules are imported on use.
"""
