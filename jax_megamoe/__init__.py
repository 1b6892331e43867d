"""jax_megamoe: DeepGEMM's Mega MoE kernels for JAX (DeepSeek V4 routed experts).

The package is layered; imports only run downward (``docs/architecture.md``):

- ``jax_megamoe.numerics``: ``config`` (modes, settings), ``quant`` (MXFP4/FP8 numerics),
  ``layout`` (kernel weight layouts, ``MoEWeights``), ``reference`` (pure-JAX oracle and CPU path);
- ``jax_megamoe.kernels``: ``_ffi`` (library loading, FFI registration), ``_toolchain``,
  ``ops`` (backend dispatch: FFI kernels or reference), ``parallel`` (expert parallelism);
- ``jax_megamoe.io``: ``checkpoint`` (safetensors, V4 checkpoints), ``convert``;
- ``jax_megamoe.models``: ``deepseek_v4`` (Flax NNX block).

The flat names of earlier releases (``jax_megamoe.ops``, ``jax_megamoe.layout``, ...,
``python -m jax_megamoe.convert``) stay importable: each is the same module object as its
layered home (so ``monkeypatch.setattr(jax_megamoe.ops, ...)`` patches the real one).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

from jax_megamoe._version import __version__
from jax_megamoe.kernels import _ffi
from jax_megamoe.kernels._rules import InferenceOnlyError, ShardingError
from jax_megamoe.numerics import policy
from jax_megamoe.numerics.config import MODES, MegaMoEConfig
from jax_megamoe.numerics.policy import Policy

# Old flat module name -> its home in the layered package.
_ALIASES: dict[str, str] = {
    "jax_megamoe.config": "jax_megamoe.numerics.config",
    "jax_megamoe.policy": "jax_megamoe.numerics.policy",
    "jax_megamoe.quant": "jax_megamoe.numerics.quant",
    "jax_megamoe.layout": "jax_megamoe.numerics.layout",
    "jax_megamoe.reference": "jax_megamoe.numerics.reference",
    "jax_megamoe._validate": "jax_megamoe.numerics._validate",
    "jax_megamoe._ffi": "jax_megamoe.kernels._ffi",
    "jax_megamoe._toolchain": "jax_megamoe.kernels._toolchain",
    "jax_megamoe.ops": "jax_megamoe.kernels.ops",
    "jax_megamoe.parallel": "jax_megamoe.kernels.parallel",
    "jax_megamoe.parallel_hier": "jax_megamoe.kernels.parallel_hier",
    "jax_megamoe.checkpoint": "jax_megamoe.io.checkpoint",
    "jax_megamoe.convert": "jax_megamoe.io.convert",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old flat name as the very module object of its layered home."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(self.target)
        self._home_spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system stamped the alias spec on the real module; give it its own back.
        module.__spec__ = self._home_spec

    def get_code(self, fullname: str) -> types.CodeType | None:
        """For ``python -m jax_megamoe.convert``: runpy runs the layered module's code."""
        spec = importlib.util.find_spec(self.target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            return None
        return spec.loader.get_code(self.target)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        home = _ALIASES.get(fullname)
        if home is None:
            return None
        found = importlib.util.find_spec(home)
        # origin: runpy puts it in sys.argv[0] for ``python -m jax_megamoe.convert``.
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(home), origin=found.origin if found else None)


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())


def register() -> bool:
    """Read the process policy once (:func:`jax_megamoe.policy.current`: every setting, the DG_*
    forwarding included) and register the FFI targets where the library loads.

    Idempotent and thread-safe. Returns True when the FFI targets are registered.
    """
    return _ffi.register()


def describe() -> str:
    """A readable report: versions, library, headers, device, mode and where each setting came from."""
    return _ffi.describe()


__all__ = ["MODES", "MegaMoEConfig", "InferenceOnlyError", "ShardingError", "Policy", "policy", "register", "describe", "__version__"]
