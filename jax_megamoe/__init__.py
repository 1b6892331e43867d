"""jax_megamoe: DeepGEMM's Mega MoE kernels for JAX (DeepSeek V4 routed experts).

Public modules (each name imports one way; the implementation lives in ``jax_megamoe._src``):
``ops`` (the kernels, or the reference), ``reference`` (the pure-JAX definition of correct),
``quant``, ``layout`` (``MoEWeights``), ``parallel`` (expert parallelism), ``checkpoint``,
``convert``, ``policy`` (settings) and ``models.deepseek_v4`` (Flax NNX). The names used most are
here too.
"""

from __future__ import annotations

from jax_megamoe._src.io.safetensors_reader import CheckpointError
from jax_megamoe._src.kernels import _ffi
from jax_megamoe._src.kernels._ffi import FfiUnavailableError
from jax_megamoe._src.kernels._rules import InferenceOnlyError, ShardingError
from jax_megamoe._src.kernels._toolchain import ToolchainError
from jax_megamoe._src.kernels.ops import BackendUnavailableError, mega_moe, pre_dispatch
from jax_megamoe._src.kernels.parallel import ep_moe
from jax_megamoe._src.models.deepseek_v4.moe import DeepseekV4MoE
from jax_megamoe._src.numerics.config import MODES, Mode
from jax_megamoe._src.numerics.layout import MoEWeights
from jax_megamoe._src.numerics.policy import Policy
from jax_megamoe._version import __version__


def register() -> bool:
    """Read the process policy once (:func:`jax_megamoe.policy.current`: every setting, the DG_*
    forwarding included) and register the FFI targets where the library loads.

    Idempotent and thread-safe. Returns True when the FFI targets are registered.
    """
    return _ffi.register()


def describe() -> str:
    """A readable report: versions, library, headers, device, mode and where each setting came from."""
    return _ffi.describe()


__all__ = [
    "mega_moe",
    "pre_dispatch",
    "ep_moe",
    "MoEWeights",
    "DeepseekV4MoE",
    "Policy",
    "Mode",
    "MODES",
    "register",
    "describe",
    "BackendUnavailableError",
    "CheckpointError",
    "FfiUnavailableError",
    "InferenceOnlyError",
    "ShardingError",
    "ToolchainError",
    "__version__",
]
