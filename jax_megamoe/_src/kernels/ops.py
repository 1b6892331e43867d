"""Public ops: choose the FFI kernels or the pure-JAX reference, validate, and call.

Backend choice happens at trace time from the default device (``backend="auto"``): the FFI
kernels where the GPU's architecture matches the mode's kernels and the FFI library is
registered, the reference everywhere else. ``backend="ffi"`` insists on the kernels (and
skips the device check when no GPU is present, so a jitted call can be lowered for
``cuda`` on a CPU-only machine; *running* it there fails with one error that says why and what
to use, see :func:`ffi_call_on_gpu`); ``backend="reference"`` always runs the pure-JAX path.

Scalar arguments that become kernel attributes (``activation_clamp``, ``num_max_tokens``,
``reserved_sms``) must be static Python numbers: a traced one is a ``TypeError`` naming it. A
traced ``routed_scaling_factor`` is accepted: it is multiplied into ``topk_weights`` in f32 before
the kernel (the same bits as the kernel's own multiply). Expert ids outside ``[0, E)``, int64 ones
``>= 2**31`` included, route nowhere on every backend (:func:`jax_megamoe.reference.route_ids`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jax_megamoe._src.kernels import _decode, _ffi, _rules
from jax_megamoe._src.numerics import config
from jax_megamoe._src.numerics import policy as _policy
from jax_megamoe._src.numerics.layout import MoEWeights
from jax_megamoe._src.numerics.policy import Policy
from jax_megamoe._src.numerics import reference
from jax_megamoe._src.numerics._validate import check_dtype, check_ndim, check_shape, is_traced, static_float, static_int

Backend = Literal["auto", "ffi", "reference"]
BACKENDS = ("auto", "ffi", "reference")

PRE_DISPATCH_TARGET = {9: "jax_megamoe_pre_dispatch_sm90", 10: "jax_megamoe_pre_dispatch_sm100"}
_MMA_KIND = {"fp8": 0, "fp8xfp4": 1, "mxf4xmxf4": 2}  # deep_gemm::MmaKind (0: unused on sm_90)


def graph_targets_enabled(policy: Policy | None = None) -> bool:
    """Whether to call the targets that declare CUDA-graph (command buffer) compatibility.

    ``policy.graph_targets`` (``JAX_MEGAMOE_GRAPH_TARGETS=1`` in the process policy, read once)
    opts in: XLA may then capture the custom call into its CUDA graphs. The plain targets run
    outside command buffers (XLA splits the graph there). To choose per call, pass
    ``policy=jax_megamoe.policy.current().replace(graph_targets=True)`` to the op.
    XLA records custom calls into command buffers only when ``--xla_gpu_enable_command_buffer``
    lists ``CUSTOM_CALL``; ``jax_megamoe._ffi.execute_stats()`` tells whether that happened.
    """
    return _policy.resolve(policy).graph_targets


InferenceOnlyError = _rules.InferenceOnlyError
ShardingError = _rules.ShardingError


class BackendUnavailableError(RuntimeError):
    """The FFI backend was requested where it cannot run; the message says what is missing."""


def device_arch() -> int | None:
    """Compute-capability major of the default device, or None when it is not a CUDA GPU."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return None
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        return None
    return int(str(cc).split(".")[0])


def _ffi_ready() -> tuple[bool, str]:
    ok = _ffi.register()
    return ok, ("" if ok else _ffi.status().reason)


def choose_backend(backend: str, mode: str, *, op: str) -> str:
    """Resolve ``backend`` to "ffi" or "reference" for ``mode`` on the default device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return "reference"
    arch = device_arch()
    want = config.arch_of_mode(mode)
    if backend == "auto":
        if arch != want:
            return "reference"
        ok, _ = _ffi_ready()
        return "ffi" if ok else "reference"
    # backend == "ffi"
    if arch is not None and arch != want:
        raise BackendUnavailableError(
            f"backend='ffi': mode {mode!r} needs an sm_{want}0 GPU for {op}, but the default device is "
            f"sm_{arch}x ({jax.devices()[0].device_kind}); use mode='fp8' on H100/H200 or backend='reference'"
        )
    if arch is not None:
        ok, reason = _ffi_ready()
        if not ok:
            raise BackendUnavailableError(f"backend='ffi' for {op}: {reason}")
    return "ffi"


def _check_routing(x, topk_idx, topk_weights) -> tuple[int, int, int]:
    check_ndim("x", x, 2)
    check_dtype("x", x, jnp.bfloat16)
    t, h = x.shape
    check_ndim("topk_idx", topk_idx, 2)
    check_dtype("topk_idx", topk_idx, (jnp.int32, jnp.int64))
    check_shape("topk_idx", topk_idx, (t, None))
    k = topk_idx.shape[1]
    check_dtype("topk_weights", topk_weights, jnp.float32)
    check_shape("topk_weights", topk_weights, (t, k))
    return t, h, k


def _check_scaling(routed_scaling_factor: float) -> float | jax.Array:
    """A finite static float, or a traced factor as it is (the kernel paths fold it into the weights)."""
    if is_traced(routed_scaling_factor):
        return routed_scaling_factor
    return static_float("routed_scaling_factor", routed_scaling_factor, finite=True)


def _fold_traced_scaling(topk_weights: jax.Array, rsf: float | jax.Array) -> tuple[jax.Array, float]:
    """``(weights, factor)`` for a kernel attribute: a traced factor is multiplied into the f32
    weights first (``w * f * 1.0f`` is ``w * f``: the same bits as the kernel's own multiply)."""
    if is_traced(rsf):
        return topk_weights * jnp.asarray(rsf, jnp.float32), 1.0
    return topk_weights, float(rsf)


def pre_dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    *,
    mode: str | None = None,
    num_max_tokens: int,
    routed_scaling_factor: float = 1.0,
    backend: Backend = "auto",
    policy: Policy | None = None,
) -> reference.PreDispatched:
    """Quantize ``x`` and write the kernel's input slots, padded to ``num_max_tokens`` rows.

    Same contract as :func:`jax_megamoe.reference.pre_dispatch`; with the FFI backend the
    bytes come from DeepGEMM's own pre-dispatch kernel and equal the reference bit for bit.
    ``policy``: the settings to use (default: the process policy, :func:`jax_megamoe.policy.current`).
    """
    pol = _policy.resolve(policy)
    mode = _policy.resolve_mode(mode, device_arch(), pol)
    t, h, k = _check_routing(x, topk_idx, topk_weights)
    config.validate_pre_dispatch_shape(hidden=h, top_k=k, mode=mode)
    num_max_tokens = static_int("num_max_tokens", num_max_tokens, lo=1)
    if t > num_max_tokens:
        raise ValueError(f"x: {t} tokens exceed num_max_tokens={num_max_tokens}")
    if t < 1:
        raise ValueError(f"x: needs at least one token row, got shape {tuple(x.shape)}")
    rsf = _check_scaling(routed_scaling_factor)
    chosen = choose_backend(backend, mode, op="pre_dispatch")
    topk_weights, rsf = _fold_traced_scaling(topk_weights, rsf)  # (w * f) * 1.0: the same bits
    topk_idx = reference.route_ids(topk_idx)  # int64 ids beyond int32 -> -1 before any int32 cast
    pad = num_max_tokens - t  # per token shard (only when pad == 0) each shard's cap is its row count

    def run(x, topk_idx, topk_weights):
        cap = x.shape[0] + pad
        if chosen == "reference":
            r = reference.pre_dispatch(x, topk_idx, topk_weights, mode=mode, num_max_tokens=cap, routed_scaling_factor=rsf)
        else:
            r = _pre_dispatch_ffi(x, reference.route_ids(topk_idx), topk_weights, mode=mode, cap=cap, rsf=rsf,
                                  graph=pol.graph_targets)
        return tuple(r)

    outs = jax.eval_shape(run, x, topk_idx, topk_weights)
    return reference.PreDispatched(*_rules.apply(
        "pre_dispatch", run, (x, topk_idx, topk_weights), ("x", "topk_idx", "topk_weights"), num_token_inputs=3,
        out_shapes=[o.shape for o in outs], rows_are_tokens=pad == 0,
        not_per_token=f"its outputs are the kernel's buffer of num_max_tokens={num_max_tokens} > {t} rows",
    ))  # fmt: skip


def _no_handler_here(op: str):
    def fail(*_args):
        raise BackendUnavailableError(
            f"jax_megamoe: backend='ffi' for {op} runs DeepGEMM kernels, which exist only for CUDA GPUs, "
            f"but this computation runs on {jax.default_backend()!r}; use backend='auto' (the pure-JAX "
            "reference off the GPU) or backend='reference', or run it on an H100/H200"
        )

    return fail


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
    call, and running it elsewhere fails with one message that says why and what to use. On a GPU
    process the call is emitted as is (nothing is added to the hot path).

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

    def elsewhere(*a):
        return jax.pure_callback(_no_handler_here(op), result_shapes, *a, vmap_method="sequential")

    return jax.lax.platform_dependent(*args, cuda=call, default=elsewhere)


def _pre_dispatch_ffi(
    x, topk_idx, topk_weights, *, mode: str, cap: int, rsf: float, graph: bool
) -> reference.PreDispatched:
    _, h = x.shape
    k = topk_idx.shape[1]
    arch = config.arch_of_mode(mode)
    group = config.ACT_GROUP[mode]
    if mode == "mxf4xmxf4":
        xq = jax.ShapeDtypeStruct((cap, h // 2), jnp.uint8)
    else:
        xq = jax.ShapeDtypeStruct((cap, h), jnp.float8_e4m3fn)
    if arch == 9:
        sf = jax.ShapeDtypeStruct((cap, h // 128), jnp.float32)
        kernel_rsf = rsf
    else:
        sf = jax.ShapeDtypeStruct((cap, h // 128), jnp.int32)
        # The sm_100 pre-dispatch kernel has no routed scaling factor: fold it in first, in f32.
        if rsf != 1.0:
            topk_weights = topk_weights * jnp.float32(rsf)
        kernel_rsf = 1.0
    target = PRE_DISPATCH_TARGET[arch] + ("_graph" if graph else "")
    outs = ffi_call_on_gpu(
        "pre_dispatch",
        target,
        (
            xq,
            sf,
            jax.ShapeDtypeStruct((cap, k, 2), jnp.int32),
            jax.ShapeDtypeStruct((cap, k), jnp.float32),
        ),
        x,
        topk_idx,
        topk_weights,
        hidden=np.int64(h),
        top_k=np.int64(k),
        capacity=np.int64(cap),
        group=np.int64(group),
        mma_kind=np.int64(_MMA_KIND[mode]),
        routed_scaling_factor=np.float32(kernel_rsf),
    )
    x_q, x_sf, idx_pairs, w_out = outs
    return reference.PreDispatched(x_q, x_sf, _int64_slots_to_jax(idx_pairs), w_out)


def _int64_slots_to_jax(pairs: jax.Array) -> jax.Array:
    """The kernel's int64 top-k slots, as int64 under x64 and as their (exact) int32 values otherwise."""
    if jax.config.jax_enable_x64:
        return jax.lax.bitcast_convert_type(pairs, jnp.int64)
    return pairs[..., 0]


MEGA_MOE_TARGET = {9: "jax_megamoe_mega_moe_sm90", 10: "jax_megamoe_mega_moe_sm100"}
#: Token cap used when ``num_max_tokens`` is not given (SGLang's per-rank default); the policy's
#: ``num_max_tokens`` (``JAX_MEGAMOE_NUM_MAX_TOKENS``, read once) overrides it.
DEFAULT_NUM_MAX_TOKENS = _policy.DEFAULT_NUM_MAX_TOKENS


def default_num_max_tokens(policy: Policy | None = None) -> int:
    """The token cap of the mega kernel's buffer when a call gives none (the policy's, default 1024)."""
    return _policy.resolve(policy).num_max_tokens


def mega_moe(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    mode: str | None = None,
    activation_clamp: float | None = None,
    routed_scaling_factor: float = 1.0,
    num_max_tokens: int | None = None,
    fast_math: bool = True,
    reserved_sms: int | None = None,
    backend: Backend = "auto",
    kernel: _decode.Kernel = "auto",
    policy: Policy | None = None,
) -> jax.Array:
    """Routed experts of one MoE layer: pre-dispatch + fused Mega MoE kernel -> ``bf16[T, H]``.

    ``kernel`` picks the GPU kernel where the FFI backend runs: ``"fused"`` (DeepGEMM's mega
    kernel), ``"decode"`` (our low-latency FP8 GEMV passes, sm_90 ``fp8`` only, no token cap) or
    ``"auto"`` (decode while ``0 < T * K <= jax_megamoe._src.kernels._decode.decode_max_pairs(H, I)``, the
    crossover measured on an H100 per expert shape: 48 for V4-Flash, i.e. T <= 8, and 6 for V4-Pro,
    T = 1; see :mod:`jax_megamoe._src.kernels._decode`).

    ``mode`` defaults to the mode ``weights`` were built for. ``num_max_tokens`` is the token
    cap of the kernel's persistent buffer (default :func:`default_num_max_tokens`; rounded up
    to the kernel's alignment; calls with the same cap and shapes share one buffer). Above the
    cap ``backend="auto"`` runs the reference (as SGLang falls back) and ``"ffi"`` raises.
    ``reserved_sms`` SMs are left free for other streams (default 2). Kernels: sm_90 mode
    ``fp8`` (run and tested on H200); sm_100 modes ``mxf4xmxf4``/``fp8xfp4`` (compiled and
    host-side tested only: no B200 has run them). ``policy``: the settings a call does not give
    (token cap, reserved SMs, graph targets, sm_100 opt-in; default: the process policy,
    :func:`jax_megamoe.policy.current`, read once).
    """
    pol = _policy.resolve(policy)
    if mode is None:
        mode = getattr(weights, "mode", None)
    mode = _policy.resolve_mode(mode, device_arch(), pol)
    t, h, k = _check_routing(x, topk_idx, topk_weights)
    rsf = _check_scaling(routed_scaling_factor)
    activation_clamp = config.check_clamp(activation_clamp)
    validate_for = getattr(weights, "validate_for", None)
    if validate_for is None:
        raise TypeError(f"weights: expected a jax_megamoe.layout.MoEWeights, got {type(weights).__name__}")
    validate_for(mode, hidden=h)
    config.validate_moe_shape(
        hidden=h, intermediate=weights.intermediate, num_experts=weights.num_experts, top_k=k, mode=mode
    )
    cap_requested = static_int("num_max_tokens", num_max_tokens, lo=1, allow_none=True)
    if cap_requested is None:
        cap_requested = pol.num_max_tokens
    reserved = static_int("reserved_sms", reserved_sms, lo=0, allow_none=True)
    if reserved is None:
        reserved = pol.reserved_sms
    chosen = choose_backend(backend, mode, op="mega_moe")
    if chosen == "ffi" and backend == "auto" and config.arch_of_mode(mode) == 10 and not pol.sm100_mega:
        # Never run on hardware here: "auto" keeps the reference until a B200 has validated it.
        chosen = "reference"
    # The decode kernels have no token cap (their scratch is f32[T*K, I] in XLA's memory).
    use_decode = (
        _decode.choose_kernel(kernel, mode, t, k, hidden=h, intermediate=weights.intermediate) == "decode"
        and chosen == "ffi"
    )
    if t > cap_requested and not use_decode:
        if backend == "ffi":
            raise ValueError(
                f"x: {t} tokens exceed num_max_tokens={cap_requested} (the kernel buffer's cap); "
                "raise num_max_tokens or use backend='auto' to fall back to the reference above the cap"
            )
        chosen = "reference"
    cap = config.align_token_cap(cap_requested, mode)
    topk_weights, rsf = _fold_traced_scaling(topk_weights, rsf)  # (w * f) * 1.0: the same bits
    topk_idx = reference.route_ids(topk_idx)  # int64 ids beyond int32 -> -1 before any int32 cast
    leaves, tree = jax.tree.flatten(weights)

    def run(x, topk_idx, topk_weights, *w_leaves):
        w = jax.tree.unflatten(tree, w_leaves)
        if chosen == "reference" or x.shape[0] == 0:
            return (reference.mega_moe(x, topk_idx, topk_weights, w, mode=mode, activation_clamp=activation_clamp,
                                       routed_scaling_factor=rsf, fast_math=fast_math),)  # fmt: skip
        if use_decode:
            return (decode_target_call(
                x, topk_idx, topk_weights, w, activation_clamp=activation_clamp, routed_scaling_factor=rsf,
                graph=pol.graph_targets,
            ),)  # fmt: skip
        return (mega_moe_target_call(
            x, topk_idx, topk_weights, w, mode=mode, num_experts=w.num_experts, capacity=cap,
            activation_clamp=activation_clamp, routed_scaling_factor=rsf, fast_math=fast_math, reserved_sms=reserved,
            graph=pol.graph_targets, sm90_wide_tile=pol.sm90_wide_tile,
        ),)  # fmt: skip

    names = ("x", "topk_idx", "topk_weights", *(f"weights.{n}" for n in ("l1", "l1_sf", "l2", "l2_sf")))
    return _rules.apply(
        "mega_moe", run, (x, topk_idx, topk_weights, *leaves), names, num_token_inputs=3, out_shapes=[(t, h)]
    )[0]


def mega_moe_target_call(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    mode: str,
    num_experts: int,
    capacity: int,
    activation_clamp: float | None,
    routed_scaling_factor: float,
    fast_math: bool,
    reserved_sms: int,
    num_ranks: int = 1,
    rank_devices: np.ndarray | None = None,
    graph: bool | None = None,
    sm90_wide_tile: bool | None = None,
) -> jax.Array:
    """The mega-kernel custom call itself, arguments already validated (:func:`mega_moe`,
    :func:`jax_megamoe.parallel.ep_moe`).

    ``weights`` hold this rank's ``num_experts / num_ranks`` experts. With ``num_ranks > 1``
    ``rank_devices`` is the rank table (CUDA device ordinals, one row of ``num_ranks`` per
    expert-parallel group, see ``ffi/layout/rank_table.h``) and the call must run on every device of
    the table at once, inside :func:`jax.shard_map`. ``graph``: call the command-buffer compatible
    twin (sm_90); ``None`` follows the process policy (:func:`graph_targets_enabled`).
    ``sm90_wide_tile``: the sm_90 target's attribute of that name (let the kernel take DeepGEMM's
    128-row tile, see :class:`jax_megamoe.policy.Policy`); ``None`` follows the process policy.
    The library reads no environment variable for it: this attribute is the only way in.
    """
    clamp = np.float32(np.inf if activation_clamp is None else activation_clamp)
    arch = config.arch_of_mode(mode)
    t, h = x.shape
    # sm_100 only: the MMA kind; the handler applies routed_scaling_factor itself (per-expert scales).
    # sm_90 only: the wide-tile switch (the policy's, read once; never the environment at trace time).
    if arch == 10:
        extra = {"mma_kind": np.int64(_MMA_KIND[mode])}
    else:
        wide = _policy.current().sm90_wide_tile if sm90_wide_tile is None else sm90_wide_tile
        if not isinstance(wide, (bool, np.bool_)):
            raise TypeError(f"sm90_wide_tile: {wide!r} must be a bool or None")
        extra = {"sm90_wide_tile": bool(wide)}
    table = np.zeros((0,), np.int64) if rank_devices is None else np.asarray(rank_devices, np.int64).reshape(-1)
    extra.update(num_ranks=np.int64(num_ranks), rank_devices=table)
    # Ids outside [0, E) are skipped, as the reference skips them (the kernel would index past its
    # tables); decided before the int32 cast so int64 ids >= 2**31 cannot wrap onto real experts.
    idx = reference.route_ids(topk_idx, num_experts)
    # sm_90: the command-buffer compatible twin with policy.graph_targets (XLA may then
    # record the launches into its CUDA graphs; see ffi/handlers/mega_moe_sm90.cc).
    if graph is None:
        graph = graph_targets_enabled()
    target = MEGA_MOE_TARGET[arch] + ("_graph" if arch == 9 and graph else "")
    return ffi_call_on_gpu(
        "mega_moe",
        target,
        jax.ShapeDtypeStruct((t, h), jnp.bfloat16),
        x,
        idx,
        topk_weights,
        weights.l1,
        weights.l1_sf,
        weights.l2,
        weights.l2_sf,
        hidden=np.int64(h),
        intermediate=np.int64(weights.intermediate),
        num_experts=np.int64(num_experts),
        top_k=np.int64(topk_idx.shape[1]),
        capacity=np.int64(capacity),
        activation_clamp=clamp,
        fast_math=bool(fast_math),
        reserved_sms=np.int64(reserved_sms),
        routed_scaling_factor=np.float32(routed_scaling_factor),
        has_side_effect=True,
        **extra,
    )


def decode_target_call(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    activation_clamp: float | None,
    routed_scaling_factor: float,
    graph: bool | None = None,
) -> jax.Array:
    """The two decode custom calls (``ffi/handlers/decode_moe_sm90.cc``), arguments already validated
    by :func:`mega_moe`: l1 writes the weighted SwiGLU output ``f32[T*K, I]``, l2 requantises it,
    runs W2 and combines the slots into ``bf16[T, H]``. No device state, no side effect."""
    t, h = x.shape
    k = topk_idx.shape[1]
    e = weights.num_local_experts
    idx = reference.route_ids(topk_idx, e)
    if graph is None:
        graph = graph_targets_enabled()
    suffix = "_graph" if graph else ""
    dims = dict(hidden=np.int64(h), intermediate=np.int64(weights.intermediate), num_experts=np.int64(e), top_k=np.int64(k))
    act = ffi_call_on_gpu(
        "mega_moe", _ffi.TARGET_DECODE_L1_SM90 + suffix, jax.ShapeDtypeStruct((t * k, weights.intermediate), jnp.float32),
        x, idx, topk_weights, weights.l1, weights.l1_sf,
        activation_clamp=np.float32(np.inf if activation_clamp is None else activation_clamp),
        routed_scaling_factor=np.float32(routed_scaling_factor), **dims,
    )  # fmt: skip
    return ffi_call_on_gpu(
        "mega_moe", _ffi.TARGET_DECODE_L2_SM90 + suffix, jax.ShapeDtypeStruct((t, h), jnp.bfloat16),
        act, idx, weights.l2, weights.l2_sf, **dims,
    )  # fmt: skip
