"""jax_megamoe: DeepGEMM's Mega MoE kernels for JAX (DeepSeek V4 routed experts).

Public modules: ``quant`` (MXFP4/FP8 numerics), ``layout`` (kernel weight layouts,
``MoEWeights``), ``reference`` (pure-JAX oracle and CPU path), ``ops`` (backend dispatch:
FFI kernels or reference), ``models.deepseek_v4`` (Flax NNX block).
"""

from jax_megamoe._rules import InferenceOnlyError, ShardingError
from jax_megamoe.config import MODES, MegaMoEConfig

__version__ = "0.1.0"


def register() -> bool:
    """Forward the environment once and register the FFI targets where the library loads.

    Idempotent and thread-safe. Returns True when the FFI targets are registered.
    """
    from jax_megamoe import _ffi

    return _ffi.register()


def describe() -> str:
    """A readable report: versions, library, headers, device, mode and where each setting came from."""
    from jax_megamoe import _ffi

    return _ffi.describe()


__all__ = ["MODES", "MegaMoEConfig", "InferenceOnlyError", "ShardingError", "register", "describe", "__version__"]
