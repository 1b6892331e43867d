"""Expert parallelism over a mesh axis with XLA collectives: :func:`ep_moe`.

The options below (``dispatch=``, ``pair_capacity=``, ``return_overflow=``, ...) are fields of one
:class:`EPOptions`: ``ep_moe(..., mesh=mesh, mode="fp8", options=EPOptions(dispatch="padded"))``.

Experts and tokens are both sharded over one mesh axis (``axis``, size ``n``): device ``d`` owns
experts ``[d * E/n, (d + 1) * E/n)`` and tokens ``[d * T/n, (d + 1) * T/n)``, and gets the outputs
of its own tokens back. One call, inside :func:`jax.shard_map`, per device:

1. **Route.** Every (token, slot) pair ``r = t * K + k`` with a valid expert ``e`` (``0 <= e < E``;
   ``-1`` and ids ``>= E`` are skipped, as :func:`jax_megamoe.reference.mega_moe` skips them) goes to
   device ``e // (E/n)``. Pairs keep their ``r`` order within each destination.
2. **Dispatch.** A send buffer ``[n, cap]`` rows (``cap`` = ``T/n * K`` by default: the exact worst
   case, one source sending every pair to one device) holds, per pair, the token's bf16 row, its
   *local* expert id and its routing weight (``routed_scaling_factor`` already multiplied in, in
   f32, as the reference does). Row ``[s, j]`` of the receive buffer is the ``j``-th pair that
   device ``s`` sent here, so the received pairs of one expert come in global ``r`` order.
   ``dispatch="padded"``: :func:`jax.lax.all_to_all` of the whole fixed-capacity buffer (padding
   rows included); ``dispatch="ragged"``: :func:`jax.lax.ragged_all_to_all` of only the used rows
   into the same layout; ``"auto"`` picks ragged on GPU/TPU and padded on CPU (XLA:CPU has no
   ``ragged-all-to-all``: ``UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported by
   XLA:CPU ThunkEmitter`` with jax 0.10.2). :func:`dispatch_path` says which one a call takes.
   These two are the *collective* dispatches (XLA collectives), as opposed to ``"fused"`` below.
3. **Local experts** (:func:`_local_experts`, the one place a kernel plugs in): the received rows are
   a single-rank Mega MoE problem with top-k 1 over the ``E/n`` local experts. ``backend="auto"`` /
   ``"reference"`` run :func:`jax_megamoe.reference.mega_moe` on them with the chunk size the
   single-device call over all ``T`` tokens would use, so each row meets the very same operations
   (activation quantisation is per token, the intermediate requantisation per row).
4. **Combine.** The per-pair bf16 outputs travel back by the reverse collective into the sender's
   slots, and ``y[t] = bf16(0 + f32(o_k0) + f32(o_k1) + ...)`` over the valid slots in ascending
   ``k``, the kernel's (and the reference's) combine.

Exactness: the result equals ``reference.mega_moe`` on one device over all ``T`` tokens **bit for
bit**: tested for EP 2, 4, 8 (one mode each) with 8 virtual CPU devices (padded dispatch), across two
processes x 4 CPU devices (``jax.distributed``, gloo), and on 2 x H200 (jax 0.11.2) in every mode
with both ragged and padded dispatch, at V4-Flash size too (``python tests/parallel_worker.py gpu``,
``python examples/ep_moe.py --check``).

Capacity: ``pair_capacity=None`` is exact. A smaller ``pair_capacity`` (rows per source/destination pair;
the token cap of the kernel buffer is ``num_max_tokens``, a different thing)
drops the pairs past it (they contribute 0) and is only accepted with ``return_overflow=True``,
which returns ``(y, dropped)``, ``dropped`` the int32 number of (token, slot) pairs dropped over the
whole mesh, so a drop is never silent.

**Fused intranode path** (``dispatch="fused"``; what ``"auto"`` takes where it can, see
:func:`fused_available` and :func:`ep_path`): DeepGEMM's multi-rank Mega MoE kernel replaces steps
1-4 with one custom call per device. The FFI library allocates every rank's symmetric buffer (one
per GPU, zeroed once), enables peer access between the GPUs, and gives every rank the same pointer
table; each device's call finds its own rank from the rank table (:func:`rank_table`, CUDA device
ordinals per expert-parallel group) and launches the kernel every step, also when none of its
tokens is routed. The kernel then dispatches over NVLink loads/stores, runs the local experts and
writes each result into the source rank's combine slots: no XLA collective at all. Conditions: one
process driving every device of the mesh, GPUs of the mode's architecture with peer access,
``T/n <= num_max_tokens``. sm_90 (``"fp8"``): run on 2 x H200, the same bits as the single-GPU
kernel, so within the kernel's tolerance of the reference (rel. L2 ~5e-3), not bit for bit. sm_100
(``"fp8xfp4"``, ``"mxf4xmxf4"``): wired the same way, compile-checked, never run (no B200);
``"auto"`` takes it only with ``JAX_MEGAMOE_SM100_MEGA=1``. ``JAX_MEGAMOE_FUSED_EP=0`` keeps
``"auto"`` on the collective path.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_megamoe._src.kernels import _ffi, _rules, ops
from jax_megamoe._src.numerics import config, reference
from jax_megamoe._src.numerics import policy as _policy
from jax_megamoe._src.numerics._validate import check_instance
from jax_megamoe._src.numerics.layout import MoEWeights
from jax_megamoe._src.numerics.policy import Policy

__all__ = [
    "ep_moe", "shard_weights", "dispatch_path", "ep_path", "exact_capacity", "fused_available",
    "rank_table", "EPOptions", "DISPATCHES", "COLLECTIVE_DISPATCHES", "BACKENDS",
]  # fmt: skip

#: ``dispatch=`` values: ``"fused"`` (the intranode kernel) or a collective one, ``"ragged"``
#: (``ragged_all_to_all`` of the used rows) or ``"padded"`` (``all_to_all`` of the fixed-capacity
#: buffer, padding rows included); ``"auto"`` picks.
DISPATCHES: tuple[str, ...] = ("auto", "fused", "ragged", "padded")
#: The ``dispatch=`` values that name an XLA collective, ``"auto"`` first (what :func:`dispatch_path`
#: and :func:`jax_megamoe.parallel_hier`'s inter-host exchange take).
COLLECTIVE_DISPATCHES: tuple[str, ...] = tuple(d for d in DISPATCHES if d != "fused")
BACKENDS: tuple[str, ...] = ops.BACKENDS


@dataclasses.dataclass(frozen=True)
class EPOptions:
    """The options of the expert-parallel calls (:func:`ep_moe`, :func:`ep_path`,
    :func:`jax_megamoe.parallel.ep_moe_hier`, ``hier_path``), grouped so the
    calls keep a short signature.

    ``activation_clamp``: ``None`` or a number ``>= 0`` (SwiGLU clamp). ``backend``: ``"auto"`` |
    ``"reference"`` | ``"ffi"`` (see :func:`ep_moe`). ``routed_scaling_factor``: multiplied into
    ``topk_weights`` in f32 before dispatch (a float or a traced scalar). ``dispatch``: ``"auto"`` |
    ``"fused"`` | ``"ragged"`` | ``"padded"`` (two-level calls: the inter-host collective, no
    ``"fused"``). ``intranode`` (two-level calls only): ``"auto"`` | ``"fused"`` | ``"collective"`` |
    ``"local"``. ``pair_capacity``: rows per (source, destination) pair of the collective buffer.
    ``num_max_tokens``: the fused kernel's token cap per rank. ``return_overflow`` (:func:`ep_moe`):
    return ``(y, dropped)``; ``return_stats`` (two-level calls): return ``(y, EPStats)``.
    ``pad_tokens`` (:func:`ep_moe`): accept any ``T`` (see there).
    ``policy``: a :class:`jax_megamoe.policy.Policy` (default: the process policy).
    """

    activation_clamp: float | None = None
    backend: str = "auto"
    routed_scaling_factor: Any = 1.0
    dispatch: str = "auto"
    intranode: str = "auto"
    pair_capacity: int | None = None
    num_max_tokens: int | None = None
    return_overflow: bool = False
    return_stats: bool = False
    pad_tokens: bool = False
    policy: Policy | None = None

    @staticmethod
    def of(options: EPOptions | None) -> EPOptions:
        """``options``, or the defaults for None (a TypeError naming the argument otherwise)."""
        if options is None:
            return EPOptions()
        return check_instance("options", options, EPOptions, "a jax_megamoe.parallel.EPOptions")


@dataclasses.dataclass(frozen=True)
class _EPCall:
    """Every static choice of one collective / fused expert-parallel step: the one static argument
    of the jitted step and of the per-device bodies."""

    mesh: Any
    axis: Any
    mode: str
    clamp: float | None
    backend: str
    path: str
    cap: int
    chunk: int
    fused: ops.MegaMoECall | None
    policy: Policy


#: Platforms whose XLA implements ``ragged-all-to-all``.
_RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


# --------------------------------------------------------------------------------------------
# Mesh helpers and validation
# --------------------------------------------------------------------------------------------


def _axis_size(mesh: Mesh | AbstractMesh, axis: Any) -> int:
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis: {axis!r} is not an axis of the mesh (its axes are {tuple(mesh.axis_names)})")
    return int(mesh.shape[axis])


def _platform(mesh: Mesh | AbstractMesh) -> str | None:
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return None
    devices = getattr(mesh, "devices", None)
    if devices is None or not isinstance(devices, np.ndarray) or devices.size == 0:
        return None  # an AbstractMesh
    return devices.flat[0].platform


def dispatch_path(mesh: Mesh | AbstractMesh, dispatch: str = "auto") -> str:
    """``"ragged"`` or ``"padded"``: the collective :func:`ep_moe` uses on ``mesh`` for ``dispatch``
    when it does not take the fused kernel.

    ``"auto"`` is ``"ragged"`` (:func:`jax.lax.ragged_all_to_all`) where the mesh's platform is a GPU
    or TPU and ``"padded"`` (:func:`jax.lax.all_to_all` of the fixed-capacity buffer) elsewhere, i.e.
    on CPU.
    """
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch: {dispatch!r} is not one of {', '.join(DISPATCHES)}")
    if dispatch == "fused":
        raise ValueError(
            "dispatch: 'fused' uses no collective; dispatch_path answers for "
            + ", ".join(repr(d) for d in COLLECTIVE_DISPATCHES)
        )
    platform = _platform(mesh)
    if dispatch == "auto":
        return "ragged" if platform in _RAGGED_PLATFORMS else "padded"
    if dispatch == "ragged" and platform is not None and platform not in _RAGGED_PLATFORMS:
        raise ValueError(
            f"dispatch: 'ragged' needs ragged_all_to_all, which XLA on {platform!r} does not implement "
            "(XLA:CPU: 'HLO opcode ragged-all-to-all is not supported'); use dispatch='padded' or 'auto'"
        )
    return dispatch


def exact_capacity(num_tokens: int, top_k: int, num_shards: int) -> int:
    """Rows per (source, destination) device pair that can never overflow: ``T/n * K``."""
    return (num_tokens // num_shards) * top_k


def rank_table(mesh: Mesh | AbstractMesh, axis: str = "ep") -> np.ndarray:
    """int64 ``[groups, n]``: the CUDA device ordinal of every device of ``mesh``, one row per
    expert-parallel group (the devices along ``axis`` for one position of the other axes) in rank
    order. What the fused kernel's FFI handler receives (``ffi/layout/rank_table.h``); a device finds
    its group and rank in it from its own ordinal. Devices without a hardware id (CPU) use ``id``.
    """
    n = _axis_size(mesh, axis)
    if isinstance(mesh, jax.sharding.AbstractMesh):
        raise ValueError("mesh: the fused path needs a concrete jax.sharding.Mesh (its devices), not an AbstractMesh")
    devices = np.moveaxis(mesh.devices, tuple(mesh.axis_names).index(axis), -1).reshape(-1, n)

    def ordinal(d: Any) -> int:
        hw = getattr(d, "local_hardware_id", None)
        return int(d.id if hw is None else hw)

    return np.vectorize(ordinal, otypes=[np.int64])(devices)


def fused_available(mesh: Mesh | AbstractMesh, axis: str = "ep", mode: str = "fp8") -> tuple[bool, str]:
    """``(True, "")`` where :func:`ep_moe` can run the fused intranode kernel on ``mesh`` for
    ``mode``, else ``(False, why)``: one process drives every device of the mesh, all are GPUs of the
    mode's architecture (sm_90 for ``"fp8"``, sm_100 for ``"fp8xfp4"``/``"mxf4xmxf4"``) and the FFI
    library is registered. (Peer access between the GPUs is checked by the library when it first
    allocates the buffers; without it the call fails with a clear error.) ``dispatch="auto"``
    additionally needs ``JAX_MEGAMOE_SM100_MEGA=1`` for the sm_100 modes: that kernel has never run
    on a B200 here.
    """
    _axis_size(mesh, axis)  # names a bad mesh or axis
    devices, why = _mesh_gpus(mesh, mode)
    if why:
        return False, why
    me = jax.process_index()
    if any(d.process_index != me for d in devices):
        return False, "the mesh spans several processes; the fused path needs one process driving every GPU"
    why = _wrong_arch(devices, mode)
    if why:
        return False, why
    return ops._ffi_ready()


def _mesh_gpus(mesh: Mesh | AbstractMesh, mode: str) -> tuple[list[Any], str]:
    """``(devices, "")`` for a concrete mesh of GPUs, else ``([], why)``; a bad ``mode`` raises.

    Shared by :func:`fused_available` and the hierarchical path's per-host check."""
    config.arch_of_mode(mode)  # names a bad mode before any device question
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return [], "an AbstractMesh has no devices"
    devices = list(mesh.devices.flat)
    if any(d.platform != "gpu" for d in devices):
        return [], f"the mesh's devices are {devices[0].platform!r}, not CUDA GPUs"
    return devices, ""


def _wrong_arch(devices: list[Any], mode: str) -> str:
    """Why one of ``devices`` cannot run ``mode``'s kernel (its compute capability), or ``""``."""
    arch = config.arch_of_mode(mode)
    for d in devices:
        if _ffi.cc_major(d) != arch:
            cc = getattr(d, "compute_capability", None) or "?"
            return f"device {d.id} has compute capability {cc}; mode {mode!r} runs the sm_{arch}0 kernel"
    return ""


def _check_weights(weights: MoEWeights, mode: str, hidden: int, top_k: int, n: int) -> None:
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights: expected a jax_megamoe.layout.MoEWeights, got {type(weights).__name__}")
    weights.validate_for(mode, hidden=hidden)  # names the mode mismatch
    if weights.num_local_experts != weights.num_experts:
        raise ValueError(
            f"weights: leaves hold {weights.num_local_experts} experts but num_experts={weights.num_experts}; "
            "ep_moe takes the layer's global weights (one array per leaf over all experts, sharded over the "
            "mesh axis or not), not one device's slice"
        )
    if weights.num_experts % n != 0:
        raise ValueError(
            f"weights: num_experts={weights.num_experts} is not divisible by the size {n} of the expert-parallel "
            "mesh axis (every device must hold the same number of experts)"
        )
    if top_k > weights.num_experts:
        raise ValueError(f"topk_idx: top_k={top_k} exceeds num_experts={weights.num_experts}")
    if mode in config.SM100_MODES and top_k > config.MAX_TOPK_SM100:
        raise ValueError(f"topk_idx: top_k={top_k} exceeds the sm_100 kernel's limit of {config.MAX_TOPK_SM100}")


def _is_explicit(mesh: Mesh | AbstractMesh, axis: Any) -> bool:
    types = getattr(mesh, "axis_types", None)
    if not types:
        return False
    t = types[tuple(mesh.axis_names).index(axis)]
    return t == jax.sharding.AxisType.Explicit


def _place(a: Any, mesh: Mesh | AbstractMesh, spec: P, explicit: bool) -> Any:
    """``a`` with sharding ``NamedSharding(mesh, spec)``: moved only where it is not already so."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return a
    sharding = NamedSharding(mesh, spec)
    if isinstance(a, jax.core.Tracer):
        return jax.reshard(a, sharding) if explicit else lax.with_sharding_constraint(a, sharding)
    have = getattr(a, "sharding", None)
    if explicit:
        # An Explicit mesh types the spec: a one-device array "equivalent" to P(axis) on a size-1
        # axis still carries P(None) in its type, and shard_map would reject it.
        if isinstance(have, NamedSharding) and have.mesh == mesh and have.spec == spec:
            return a
    elif have is not None and have.is_equivalent_to(sharding, a.ndim):
        return a
    return jax.device_put(a, sharding)


def _check_token_cap(num_max_tokens: Any, unit: str) -> int | None:
    """``EPOptions.num_max_tokens``: None or a Python int >= 1 (``unit``: what it counts, for the error)."""
    if num_max_tokens is None:
        return None
    if isinstance(num_max_tokens, bool) or not isinstance(num_max_tokens, (int, np.integer)) or num_max_tokens < 1:
        raise ValueError(f"num_max_tokens: {num_max_tokens!r} must be a Python int >= 1 ({unit})")
    return int(num_max_tokens)


def _resolve_backend(backend: str, mode: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    # Collective path only (the fused kernel is chosen in _choose_path). "auto" runs the reference
    # math on every device (bit-exact, tested). "ffi" sends each device's received rows through
    # ops.mega_moe(backend="ffi"), the single-rank kernel: run on 2 x H200 (same bits as the fused
    # path), but it processes the whole padded receive buffer (n * T/n * K rows at top-1) and gets
    # slow above ~1k rows per GPU (benchmarks/RESULTS.md, ep_step), so "auto" does not pick it.
    return "ffi" if backend == "ffi" else "reference"


def ep_moe(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    mesh: Mesh | AbstractMesh,
    axis: str = "ep",
    mode: config.Mode,
    options: EPOptions | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Routed experts of one MoE layer with experts and tokens sharded over ``mesh`` axis ``axis``.

    The same function as :func:`jax_megamoe.reference.mega_moe` (bit for bit with the reference
    backend). Jit-able; every keyword is static.

    Args:
      x: bf16 ``[T, H]``; ``T`` divisible by the axis size ``n`` (device ``d`` owns rows
        ``[d T/n, (d+1) T/n)``). Placed with ``P(axis)`` on the token dim if not already.
      topk_idx: int32/int64 ``[T, K]`` global expert ids; ``-1`` (negative) and ids ``>= E`` skip the slot.
      topk_weights: f32 ``[T, K]``.
      weights: the layer's :class:`jax_megamoe.layout.MoEWeights` over all ``E`` experts (global
        arrays), ``E`` divisible by ``n``; unsharded weights are placed with ``P(axis)`` on the expert dim
        (device ``d`` holds experts ``[d E/n, (d+1) E/n)``), already sharded ones are used as they are.
      mesh: a :class:`jax.sharding.Mesh` with axis ``axis`` (Auto or Explicit axis types). Other axes
        replicate the computation.
      mode: ``"mxf4xmxf4"``, ``"fp8xfp4"`` or ``"fp8"``; must be the mode ``weights`` were built for.
      options: an :class:`EPOptions`; its fields:
      activation_clamp: ``None`` or a number ``>= 0`` (SwiGLU clamp).
      backend: ``"auto"`` | ``"reference"`` (pure-JAX expert math per device; never the fused
        kernel) | ``"ffi"`` (kernels: the fused kernel, or on the collective path the single-rank
        FFI mega kernel per device).
      routed_scaling_factor: multiplied into ``topk_weights`` in f32 before dispatch.
      dispatch: ``"auto"`` | ``"fused"`` | ``"ragged"`` | ``"padded"``. ``"auto"`` takes the fused
        intranode kernel where :func:`fused_available` says it can (and ``T/n <= num_max_tokens``,
        ``pair_capacity`` not given, backend not ``"reference"``, ``JAX_MEGAMOE_FUSED_EP`` not 0), else the
        collective of :func:`dispatch_path`. ``"fused"`` insists (clear error where it cannot run; on
        a machine without GPUs it still lowers for ``cuda``).
      pair_capacity: rows per (source, destination) pair; default :func:`exact_capacity` (never overflows).
        Collective path only.
      return_overflow: return ``(y, dropped)``; required when ``pair_capacity`` is below the exact one
        (the fused path never drops: ``dropped`` is 0).
      num_max_tokens: fused path: token cap per rank of the kernel's buffers (default
        :func:`jax_megamoe.ops.default_num_max_tokens`, rounded up to 128).
      policy: the settings the call does not give (token cap, reserved SMs, graph targets, fused
        opt-out ``fused_ep``, sm_100 opt-in); default the process policy (:func:`jax_megamoe.policy.current`).
      pad_tokens: accept any ``T`` (model code): a ``T`` that is not a multiple of ``n`` is padded with
        rows routed nowhere (``topk_idx = -1``, they give exactly 0) and the first ``T`` rows come back
        replicated; not with ``return_overflow``.

    Returns:
      ``y`` bf16 ``[T, H]`` sharded ``P(axis)`` (and ``dropped`` int32 ``[]`` if ``return_overflow``).
    """
    opts = EPOptions.of(options)
    activation_clamp, routed_scaling_factor = opts.activation_clamp, opts.routed_scaling_factor
    return_overflow = opts.return_overflow
    config.check_mode(mode)
    n = _axis_size(mesh, axis)
    t, h, k = reference._check_routing(x, topk_idx, topk_weights)
    if h % 128 != 0:
        raise ValueError(f"x: hidden={h} must be a multiple of 128")
    if not isinstance(opts.pad_tokens, (bool, np.bool_)):
        raise TypeError(f"options.pad_tokens: expected a bool, got {opts.pad_tokens!r}")
    if t % n != 0 and opts.pad_tokens:
        return _ep_moe_padded(x, topk_idx, topk_weights, weights, mesh=mesh, axis=axis, mode=mode, opts=opts)
    if t % n != 0:
        raise ValueError(
            f"x: {t} tokens are not divisible by the size {n} of mesh axis {axis!r} (each device owns T/{n} tokens; "
            "pad the batch with rows whose topk_idx is -1, or pass options=EPOptions(pad_tokens=True))"
        )
    _check_weights(weights, mode, h, k, n)
    capacity = opts.pair_capacity
    clamp = config.check_clamp(activation_clamp)
    reference._check_scaling(routed_scaling_factor)
    if opts.return_stats or opts.intranode != "auto":
        raise ValueError("options: return_stats and intranode apply to ep_moe_hier, not ep_moe")
    path, fused = _choose_path(mesh, axis, mode, t // n, opts)
    be = _resolve_backend(opts.backend, mode)
    exact = exact_capacity(t, k, n)
    if capacity is None:
        cap = exact
    else:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or int(capacity) < 1:
            raise ValueError(f"pair_capacity: {capacity!r} must be a Python int >= 1 (rows per device pair)")
        cap = min(int(capacity), exact)
        if cap < exact and not return_overflow:
            raise ValueError(
                f"pair_capacity: {capacity} is below the exact worst case T/n*K = {exact} rows per device pair, so "
                "pairs past it would be dropped; pass return_overflow=True to get the dropped count, or "
                "pair_capacity=None"
            )
    if clamp is not None and math.isinf(clamp):
        clamp = None
    if t == 0:
        y = jnp.zeros((0, h), jnp.bfloat16)
        return (y, jnp.zeros((), jnp.int32)) if return_overflow else y

    explicit = _is_explicit(mesh, axis)
    topk_idx = reference.route_ids(topk_idx, weights.num_experts)  # before any int32 cast can wrap
    x = _place(x, mesh, P(axis), explicit)
    topk_idx = _place(topk_idx, mesh, P(axis), explicit)
    topk_weights = _place(topk_weights, mesh, P(axis), explicit)
    weights = jax.tree.map(lambda a: _place(a, mesh, P(axis), explicit), weights)
    rsf = jnp.asarray(routed_scaling_factor, jnp.float32)
    # The chunk size reference.mega_moe picks for all T tokens on one device: with it every
    # expert's rows pass through the same matmul shapes, in the same chunks, as there.
    chunk = reference.default_chunk_rows(t * k, weights.num_experts)
    if fused is not None:
        fused = dataclasses.replace(fused, num_experts=weights.num_experts, activation_clamp=clamp)
    spec = _EPCall(mesh, axis, mode, clamp, be, path, cap, chunk, fused, _policy.resolve(opts.policy))
    run = partial(_ep_moe_jit, spec=spec)
    # jax.grad / jvp: InferenceOnlyError (jax_megamoe._src.kernels._rules), whichever path runs.
    y, dropped = _rules.inference_only(run, "parallel.ep_moe")(x, topk_idx, topk_weights, rsf, weights)
    return (y, dropped) if return_overflow else y


def ep_path(
    mesh: Mesh | AbstractMesh,
    axis: str = "ep",
    mode: config.Mode = "fp8",
    tokens_per_device: int = 1,
    *,
    options: EPOptions | None = None,
) -> str:
    """``"fused"``, ``"ragged"`` or ``"padded"``: the path :func:`ep_moe` takes with these arguments
    (``tokens_per_device`` = ``T/n``; ``options``: the :class:`EPOptions` of the call, of which
    ``dispatch``, ``backend``, ``pair_capacity``, ``num_max_tokens`` and ``policy`` matter here);
    raises as :func:`ep_moe` would for a ``dispatch`` that cannot run."""
    return _choose_path(mesh, axis, mode, tokens_per_device, EPOptions.of(options))[0]


def _choose_path(mesh, axis, mode, tokens_per_device, opts: EPOptions):
    """``(path, fused)``: ``"fused"`` with ``fused`` the kernel call (its ``num_experts`` and clamp
    filled in by the caller), or the collective ``"ragged"``/``"padded"`` with ``fused = None``."""
    dispatch, backend, capacity = opts.dispatch, opts.backend, opts.pair_capacity
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch: {dispatch!r} is not one of {', '.join(DISPATCHES)}")
    pol = _policy.resolve(opts.policy)
    num_max_tokens = _check_token_cap(opts.num_max_tokens, "tokens per rank")
    cap = config.align_token_cap(pol.num_max_tokens if num_max_tokens is None else num_max_tokens, mode)
    if dispatch == "fused":
        if backend == "reference":
            raise ValueError("dispatch: 'fused' runs the FFI kernel; backend='reference' cannot run it")
        if capacity is not None:
            raise ValueError("pair_capacity: applies to the collective dispatch; the fused kernel never drops pairs")
        ok, why = fused_available(mesh, axis, mode)
        platform = _platform(mesh)
        if not ok and (platform == "gpu" or isinstance(mesh, jax.sharding.AbstractMesh)):
            raise ValueError(f"dispatch: 'fused' cannot run here: {why}")
        # (no GPU at all: allowed, so a jitted call still lowers for cuda on a CPU-only machine)
        if tokens_per_device > cap:
            raise ValueError(
                f"x: {tokens_per_device} tokens per device exceed num_max_tokens={cap} (the fused kernel's "
                "per-rank cap); raise num_max_tokens or use dispatch='auto' to fall back to the collective path"
            )
    elif dispatch == "auto":
        if (
            backend != "reference"
            and capacity is None
            and tokens_per_device <= cap
            and pol.fused_ep
            and (mode == "fp8" or pol.sm100_mega)  # the sm_100 kernel: opt-in, never run here
            and fused_available(mesh, axis, mode)[0]
        ):
            dispatch = "fused"
    if dispatch != "fused":
        return dispatch_path(mesh, dispatch), None
    table = tuple(tuple(int(v) for v in row) for row in rank_table(mesh, axis))
    # The graph-target and wide-tile switches come from the policy and travel in the static call
    # spec, so that _ep_moe_jit's trace cache never hands a trace made for one policy to another.
    call = ops.MegaMoECall(
        mode, num_experts=0, capacity=cap, reserved_sms=pol.reserved_sms, num_ranks=_axis_size(mesh, axis),
        rank_devices=table, graph=pol.graph_targets, sm90_wide_tile=pol.sm90_wide_tile,
    )  # fmt: skip
    return "fused", call


@partial(jax.jit, static_argnames=("spec",))
def _ep_moe_jit(x, topk_idx, topk_weights, rsf, weights, *, spec: _EPCall):
    w = topk_weights.astype(jnp.float32) * rsf  # reference._scale_weights: one f32 multiply
    if spec.path == "fused":
        body = partial(_ep_fused_body, call=spec.fused)
    else:
        body = partial(_ep_body, spec=spec, num_experts=weights.num_experts)
    f = jax.shard_map(
        body,
        mesh=spec.mesh,
        in_specs=(P(spec.axis), P(spec.axis), P(spec.axis), P(spec.axis)),
        out_specs=(P(spec.axis), P()),
        check_vma=False,  # the reference's loops start from unsharded zeros
    )
    return f(x, topk_idx, w, weights)


# --------------------------------------------------------------------------------------------
# Per device
# --------------------------------------------------------------------------------------------


def _local_experts(x, idx, w, weights, spec: _EPCall):
    """The experts of this device on its received rows: ``x`` bf16 ``[R, H]``, ``idx`` int32 ``[R, 1]``
    local expert ids (``-1`` = padding row), ``w`` f32 ``[R, 1]`` -> bf16 ``[R, H]`` (0 for padding).

    A single-rank Mega MoE problem with top-k 1: the one place a per-device kernel plugs in.
    """
    if spec.backend == "ffi":
        # One rank holding E/n experts with local ids: the kernel sees a layer of E/n experts and a
        # buffer for all R received rows; the call's policy (not the process one) decides the rest.
        local = dataclasses.replace(weights, num_experts=weights.num_local_experts)
        return ops.mega_moe(
            x,
            idx,
            w,
            local,
            mode=spec.mode,
            activation_clamp=spec.clamp,
            backend="ffi",
            options=ops.MoEOptions(num_max_tokens=x.shape[0], policy=spec.policy),
        )
    return reference.mega_moe(
        x, idx, w, weights, mode=spec.mode, activation_clamp=spec.clamp, options=ops.MoEOptions(chunk_rows=spec.chunk)
    )


def _ep_fused_body(x, topk_idx, w, weights, *, call: ops.MegaMoECall):
    """One rank of the fused kernel: its own tokens in, its own outputs back; the kernel moves the
    (token, slot) pairs between the GPUs itself. ``w`` already carries routed_scaling_factor."""
    return ops.mega_moe_target_call(x, topk_idx, w, weights, call), jnp.zeros((), jnp.int32)


def _ep_body(x, topk_idx, w, weights, *, spec: _EPCall, num_experts: int):
    axis, path, cap = spec.axis, spec.path, spec.cap
    n = lax.axis_size(axis)
    me = lax.axis_index(axis)
    tl, h = x.shape
    k = topk_idx.shape[1]
    el = num_experts // n
    r = tl * k
    rows = n * cap

    # 1. Route every (token, slot) pair r = t * K + k to the device that owns its expert.
    idx = topk_idx.reshape(r)
    valid = (idx >= 0) & (idx < num_experts)
    dest = jnp.where(valid, idx // el, n)  # n: nowhere
    onehot = (dest[:, None] == jnp.arange(n, dtype=jnp.int32)[None, :]).astype(jnp.int32)  # [R, n]
    rank_in_dest = jnp.cumsum(onehot, axis=0) - 1  # the pair's position among those to its dest, r order
    pos_in_dest = jnp.take_along_axis(rank_in_dest, jnp.minimum(dest, n - 1)[:, None], axis=1)[:, 0]
    keep = valid & (pos_in_dest < cap)
    dropped = jnp.sum(valid & ~keep).astype(jnp.int32)
    send_sizes = jnp.minimum(jnp.sum(onehot, axis=0), cap).astype(jnp.int32)  # [n]
    slot = jnp.where(keep, dest * cap + pos_in_dest, rows)  # `rows` is out of bounds: dropped by the scatter

    src_tok = jnp.arange(r, dtype=jnp.int32) // k
    send_x = jnp.zeros((rows, h), x.dtype).at[slot].set(x[src_tok], mode="drop")
    send_e = jnp.full((rows,), -1, jnp.int32).at[slot].set(idx % el, mode="drop")
    send_w = jnp.zeros((rows,), jnp.float32).at[slot].set(w.reshape(r), mode="drop")

    # 2. Dispatch: receive row [s * cap + j] = the j-th pair device s sent here.
    if path == "padded":

        def exchange(a, fill, sizes_out, sizes_in):
            del fill, sizes_out, sizes_in
            return lax.all_to_all(a, axis, 0, 0, tiled=True)

        recv_sizes = None
    else:
        recv_sizes = lax.all_to_all(send_sizes, axis, 0, 0, tiled=True)  # [n]: rows from each source
        starts = jnp.arange(n, dtype=jnp.int32) * cap
        at_peer = jnp.full((n,), me * cap, jnp.int32)  # where my rows land in every peer's buffer

        def exchange(a, fill, sizes_out, sizes_in):
            out = jnp.full(a.shape, fill, a.dtype)
            return lax.ragged_all_to_all(a, out, starts, sizes_out, at_peer, sizes_in, axis_name=axis)

    recv_x = exchange(send_x, 0, send_sizes, recv_sizes)
    recv_e = exchange(send_e, -1, send_sizes, recv_sizes)
    recv_w = exchange(send_w, 0, send_sizes, recv_sizes)

    # 3. Local experts on the received rows.
    out = _local_experts(recv_x, recv_e[:, None], recv_w[:, None], weights, spec)

    # 4. Back to the senders (reverse exchange), then combine in ascending k.
    back = exchange(out, 0, recv_sizes, send_sizes)
    slots = jnp.where(keep[:, None], back[jnp.minimum(slot, rows - 1)], jnp.zeros((), jnp.bfloat16))
    slots = slots.reshape(tl, k, h)
    # As reference.mega_moe: f32 adds from +0 in ascending k (an unused slot adds +0, exact), then bf16.
    acc = jnp.zeros((tl, h), jnp.float32)
    for kk in range(k):
        acc = acc + slots[:, kk].astype(jnp.float32)
    acc = jnp.where(acc == 0, jnp.float32(0), acc)
    return acc.astype(jnp.bfloat16), lax.psum(dropped, axis)


# --------------------------------------------------------------------------------------------
# For model code: weights placed once, any token count
# --------------------------------------------------------------------------------------------


def shard_weights(weights: MoEWeights, mesh: Mesh | AbstractMesh, axis: str = "ep") -> MoEWeights:
    """``weights`` (global ``MoEWeights``) placed with ``P(axis)`` on the expert dim, checked for ``mesh``.

    Concrete arrays are moved now (so a model holds its experts sharded); traced ones get a sharding
    constraint.
    """
    n = _axis_size(mesh, axis)
    _check_weights(weights, getattr(weights, "mode", None), getattr(weights, "hidden", 0), 1, n)
    explicit = _is_explicit(mesh, axis)
    return jax.tree.map(lambda a: _place(a, mesh, P(axis), explicit), weights)


def _ep_moe_padded(x, topk_idx, topk_weights, weights, *, mesh, axis, mode, opts: EPOptions) -> jax.Array:
    """:func:`ep_moe` with ``pad_tokens`` for a ``T`` that is not a multiple of the axis size ``n``:
    pads to one with rows routed nowhere and returns the first ``T`` rows, replicated."""
    if opts.return_overflow:
        raise ValueError("options: return_overflow is not supported with pad_tokens when T needs padding")
    t = x.shape[0]
    pad = (-t) % _axis_size(mesh, axis)
    x = jnp.pad(x, ((0, pad), (0, 0)))
    topk_idx = jnp.pad(topk_idx, ((0, pad), (0, 0)), constant_values=-1)
    topk_weights = jnp.pad(topk_weights, ((0, pad), (0, 0)))
    y = ep_moe(x, topk_idx, topk_weights, weights, mesh=mesh, axis=axis, mode=mode, options=opts)
    y = _place(y, mesh, P(), _is_explicit(mesh, axis))
    return y[:t]
