"""The Mega MoE ops: DeepGEMM's kernels through XLA FFI where the GPU runs the mode, else the reference."""

from jax_megamoe._src.kernels.ops import (
    pre_dispatch,
    mega_moe,
    choose_backend,
    device_arch,
    default_num_max_tokens,
    BACKENDS,
    BackendUnavailableError,
    MoEOptions,
)

__all__ = [
    "pre_dispatch",
    "mega_moe",
    "choose_backend",
    "device_arch",
    "default_num_max_tokens",
    "BACKENDS",
    "BackendUnavailableError",
    "MoEOptions",
]
