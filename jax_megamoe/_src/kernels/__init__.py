"""Layer 2, kernels: the FFI library (``_ffi``), the CUDA toolchain probe (``_toolchain``), the
backend dispatch of the Mega MoE op (``ops``) and expert parallelism (``parallel``).

Imports only from ``jax_megamoe._src.numerics``. Submodules are imported on use.
"""
