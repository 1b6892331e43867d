"""One spec per custom call: its target name, attributes and result types, defined once.

Each spec is a frozen, hashable dataclass: the ops build one per call (it is the one static
argument the call needs) and emit it with ``spec(...arrays)``; the tests lower the very same spec
to check the contract of ``ffi/handlers/*.h``. The target names are those the loader registers
(:mod:`jax_megamoe._src.kernels._ffi`); the MMA kinds are ``deep_gemm::MmaKind``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend
import jax.interpreters.batching
import jax.interpreters.mlir
import jax.numpy as jnp
import numpy as np

from jax_megamoe._src.kernels import _ffi, _rules
from jax_megamoe._src.numerics import config
from jax_megamoe._src.numerics.config import Mode

#: ``mma_kind`` attribute per mode (= ``deep_gemm::MmaKind``; 0: unused on sm_90).
MMA_KIND: dict[str, int] = {"fp8": 0, "fp8xfp4": 1, "mxf4xmxf4": 2}
#: Target name per compute-capability major, for each custom call (``_graph``: the twin that
#: declares CUDA-graph compatibility).
PRE_DISPATCH_TARGET = {9: _ffi.TARGET_PRE_DISPATCH_SM90, 10: _ffi.TARGET_PRE_DISPATCH_SM100}
MEGA_MOE_TARGET = {9: _ffi.TARGET_MEGA_MOE_SM90, 10: _ffi.TARGET_MEGA_MOE_SM100}


class BackendUnavailableError(RuntimeError):
    """The FFI backend was requested where it cannot run; the message says what is missing."""


def _no_handler_message(op: str, platform: str) -> str:
    return (
        f"jax_megamoe: backend='ffi' for {op} runs DeepGEMM kernels, which exist only for CUDA GPUs, "
        f"but this computation runs on {platform!r}; use backend='auto' (the pure-JAX reference off the "
        "GPU) or backend='reference', or run it on an H100/H200"
    )


# Stands in for a custom call on every platform but CUDA: abstractly it has the call's results,
# and lowering it (jit on CPU) or evaluating it (eager) raises BackendUnavailableError, before
# anything runs. Lowering for "cuda" never reaches it (platform_dependent takes the real call).
_unavailable = jax.extend.core.Primitive("jax_megamoe_ffi_unavailable")
_unavailable.multiple_results = True


def _unavailable_abstract(*args: Any, shapes: tuple[Any, ...], op: str) -> list[Any]:
    del args, op
    return [jax.core.ShapedArray(s.shape, s.dtype) for s in shapes]


def _unavailable_raise(*args: Any, shapes: tuple[Any, ...], op: str, **_: Any) -> Any:
    raise BackendUnavailableError(_no_handler_message(op, jax.default_backend()))


def _unavailable_lowering(ctx: Any, *args: Any, shapes: tuple[Any, ...], op: str) -> Any:
    platforms = getattr(ctx.module_context, "platforms", None) or (jax.default_backend(),)
    raise BackendUnavailableError(_no_handler_message(op, "/".join(platforms)))


def _unavailable_batch(args: Any, dims: Any, *, shapes: tuple[Any, ...], op: str) -> Any:
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    batched = tuple(jax.ShapeDtypeStruct((size, *s.shape), s.dtype) for s in shapes)
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    return _unavailable.bind(*args, shapes=batched, op=op), [0] * len(shapes)


_unavailable.def_abstract_eval(_unavailable_abstract)
_unavailable.def_impl(_unavailable_raise)
jax.interpreters.mlir.register_lowering(_unavailable, _unavailable_lowering)
jax.interpreters.batching.primitive_batchers[_unavailable] = _unavailable_batch


def ffi_call_on_gpu(
    op: str,
    target: str,
    result_shapes: jax.ShapeDtypeStruct | Sequence[jax.ShapeDtypeStruct],
    *args: jax.Array,
    **kwargs: Any,
) -> jax.Array | list[jax.Array]:
    """``jax.ffi.ffi_call(target, result_shapes)(*args, **kwargs)``, guarded for processes without a GPU.

    The handlers are registered for CUDA only, so XLA on another platform would stop with "No FFI
    handler registered ... on a platform Host". Where the default backend is not a GPU the call is
    wrapped in :func:`jax.lax.platform_dependent`: lowering for ``cuda`` still emits the bare custom
    call. On a GPU
    process the call is emitted as is (nothing is added to the hot path). Compiling or running it
    anywhere else raises :class:`BackendUnavailableError` before anything runs (jit: when XLA
    lowers it for the CPU; eagerly: at the call).

    ``kwargs`` are the custom call's attributes (NumPy scalars and arrays) and ``has_side_effect``.
    Returns one array per entry of ``result_shapes`` (one array for a single shape).
    """
    side = kwargs.pop("has_side_effect", False)

    # vmap: one kernel call per batch element, in order; grad: InferenceOnlyError (jax_megamoe._src.kernels._rules).
    @functools.partial(_rules.inference_only, op=op)
    def call(*a):
        return jax.ffi.ffi_call(target, result_shapes, has_side_effect=side, vmap_method="sequential")(*a, **kwargs)

    if jax.default_backend() == "gpu":
        return call(*args)

    single = isinstance(result_shapes, jax.ShapeDtypeStruct)
    shapes = (result_shapes,) if single else tuple(result_shapes)

    @functools.partial(_rules.inference_only, op=op)
    def elsewhere(*a):
        outs = _unavailable.bind(*a, shapes=shapes, op=op)
        return outs[0] if single else (tuple(outs) if isinstance(result_shapes, tuple) else list(outs))

    return jax.lax.platform_dependent(*args, cuda=call, default=elsewhere)


class _ModeCall:
    """What every call spec derives from its ``mode``: the compute-capability major it runs on."""

    mode: Mode

    @property
    def arch(self) -> int:
        return config.arch_of_mode(self.mode)


@dataclasses.dataclass(frozen=True)
class PreDispatchCall(_ModeCall):
    """The pre-dispatch custom call (``ffi/handlers/pre_dispatch.h``): ``(x bf16[T, H], topk_idx
    int32[T, K], topk_weights f32[T, K]) -> (x_q, x_sf, topk_idx int32[cap, K, 2] (int64 slots),
    topk_weights f32[cap, K])``, the kernel's input slots of ``capacity`` rows."""

    mode: Mode
    hidden: int
    top_k: int
    capacity: int
    routed_scaling_factor: float = 1.0
    graph: bool = False

    @property
    def target(self) -> str:
        return PRE_DISPATCH_TARGET[self.arch] + (_ffi.GRAPH_SUFFIX if self.graph else "")

    def attributes(self) -> dict[str, Any]:
        """Attributes with the exact MLIR types the handler decodes (i64 / f32)."""
        return {
            "hidden": np.int64(self.hidden),
            "top_k": np.int64(self.top_k),
            "capacity": np.int64(self.capacity),
            "group": np.int64(config.ACT_GROUP[self.mode]),
            "mma_kind": np.int64(MMA_KIND[self.mode]),
            "routed_scaling_factor": np.float32(self.routed_scaling_factor),
        }

    def result_types(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        """``jax.ShapeDtypeStruct``s of (x_q, x_sf, topk_idx_out, topk_weights_out)."""
        p, h, k = self.capacity, self.hidden, self.top_k
        if self.mode == "mxf4xmxf4":
            xq = jax.ShapeDtypeStruct((p, h // 2), jnp.uint8)
        else:
            xq = jax.ShapeDtypeStruct((p, h), jnp.float8_e4m3fn)
        sf = jax.ShapeDtypeStruct((p, h // 128), jnp.float32 if self.arch == 9 else jnp.int32)
        return xq, sf, jax.ShapeDtypeStruct((p, k, 2), jnp.int32), jax.ShapeDtypeStruct((p, k), jnp.float32)

    def __call__(self, x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array) -> list[jax.Array]:
        return ffi_call_on_gpu(
            "pre_dispatch", self.target, self.result_types(), x, topk_idx, topk_weights, **self.attributes()
        )


@dataclasses.dataclass(frozen=True)
class MegaMoECall(_ModeCall):
    """Static attributes of one mega-kernel custom call (``ffi/handlers/mega_moe_sm*.h``), and of the
    decode passes (``ffi/handlers/decode_moe_sm90.cc``, which use ``activation_clamp``,
    ``routed_scaling_factor`` and ``graph``): hashable, the one static argument of a kernel call.

    ``num_experts``: experts of the layer the call sees (over all ranks); ``capacity``: the aligned
    token cap per rank; ``rank_devices``: the rank table (CUDA ordinals, one row of ``num_ranks``
    per expert-parallel group, ``ffi/layout/rank_table.h``), empty for one rank. ``graph``: the
    command-buffer compatible twin (sm_90); ``sm90_wide_tile``: the sm_90 attribute of that name.
    """

    mode: Mode
    num_experts: int
    capacity: int
    activation_clamp: float | None = None
    routed_scaling_factor: float = 1.0
    fast_math: bool = True
    reserved_sms: int = 2
    num_ranks: int = 1
    rank_devices: tuple[tuple[int, ...], ...] = ()
    graph: bool = False
    sm90_wide_tile: bool = False

    @property
    def target(self) -> str:
        return MEGA_MOE_TARGET[self.arch] + (_ffi.GRAPH_SUFFIX if self.arch == 9 and self.graph else "")

    def clamp_attr(self) -> np.float32:
        return np.float32(np.inf if self.activation_clamp is None else self.activation_clamp)

    def attributes(self, *, hidden: int, intermediate: int, top_k: int) -> dict[str, Any]:
        """The mega target's attributes for these shapes (sm_100: ``mma_kind``; sm_90: ``sm90_wide_tile``)."""
        if self.arch == 10:
            extra: dict[str, Any] = {"mma_kind": np.int64(MMA_KIND[self.mode])}
        else:
            extra = {"sm90_wide_tile": bool(self.sm90_wide_tile)}
        table = np.asarray(self.rank_devices, np.int64).reshape(-1)
        return dict(
            hidden=np.int64(hidden),
            intermediate=np.int64(intermediate),
            num_experts=np.int64(self.num_experts),
            top_k=np.int64(top_k),
            capacity=np.int64(self.capacity),
            activation_clamp=self.clamp_attr(),
            fast_math=bool(self.fast_math),
            reserved_sms=np.int64(self.reserved_sms),
            routed_scaling_factor=np.float32(self.routed_scaling_factor),
            num_ranks=np.int64(self.num_ranks),
            rank_devices=table,
            **extra,
        )
