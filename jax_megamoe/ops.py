"""The Mega MoE ops: DeepGEMM's kernels through XLA FFI where the GPU runs the mode, else the reference."""

from jax_megamoe._src.kernels.ops import (
    BACKENDS,
    BackendUnavailableError,
    MoEOptions,
    choose_backend,
    default_num_max_tokens,
    device_arch,
    mega_moe,
    pre_dispatch,
    token_cap,
)

__all__ = [
    "pre_dispatch",
    "mega_moe",
    "choose_backend",
    "device_arch",
    "default_num_max_tokens",
    "token_cap",
    "BACKENDS",
    "BackendUnavailableError",
    "MoEOptions",
]
