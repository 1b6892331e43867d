"""Public ops: choose the FFI kernels or the pure-JAX reference, validate, and call.

Backend choice happens at trace time from the default device (``backend="auto"``): the FFI
kernels where the GPU's architecture matches the mode's kernels and the FFI library is
registered, the reference everywhere else. ``backend="ffi"`` insists on the kernels (and
skips the device check when no GPU is present, so a jitted call can be lowered for
``cuda`` on a CPU-only machine; *running* it there fails with one error that says why and what
to use, see :func:`ffi_call_on_gpu`); ``backend="reference"`` always runs the pure-JAX path.

Scalar arguments that become kernel attributes (``activation_clamp``, and the
:class:`MoEOptions` fields ``num_max_tokens``, ``reserved_sms``) must be static Python numbers: a traced one is a ``TypeError`` naming it. A
traced ``routed_scaling_factor`` is accepted: it is multiplied into ``topk_weights`` in f32 before
the kernel (the same bits as the kernel's own multiply). Expert ids outside ``[0, E)``, int64 ones
``>= 2**31`` included, route nowhere on every backend (:func:`jax_megamoe.reference.route_ids`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from jax_megamoe._src.kernels import _decode, _ffi, _rules
from jax_megamoe._src.kernels._calls import BackendUnavailableError, MegaMoECall, PreDispatchCall, ffi_call_on_gpu
from jax_megamoe._src.numerics import config, reference
from jax_megamoe._src.numerics import policy as _policy
from jax_megamoe._src.numerics._validate import check_routing, is_traced, static_float, static_int
from jax_megamoe._src.numerics.config import Mode, MoEOptions
from jax_megamoe._src.numerics.layout import MoEWeights
from jax_megamoe._src.numerics.policy import Policy

Backend = Literal["auto", "ffi", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)


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


def device_arch() -> int | None:
    """Compute-capability major of the default device, or None when it is not a CUDA GPU."""
    return _ffi.cc_major(jax.devices()[0])


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
    mode: Mode | None = None,
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
    t, h, k = check_routing(x, topk_idx, topk_weights)
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
            r = reference.pre_dispatch(
                x, topk_idx, topk_weights, mode=mode, num_max_tokens=cap, routed_scaling_factor=rsf
            )
        else:
            call = PreDispatchCall(mode, x.shape[1], topk_idx.shape[1], cap, rsf, pol.graph_targets)
            r = _pre_dispatch_ffi(x, reference.route_ids(topk_idx), topk_weights, call)
        return tuple(r)

    outs = jax.eval_shape(run, x, topk_idx, topk_weights)
    return reference.PreDispatched(*_rules.apply(
        "pre_dispatch", run, (x, topk_idx, topk_weights), ("x", "topk_idx", "topk_weights"), num_token_inputs=3,
        out_shapes=[o.shape for o in outs], rows_are_tokens=pad == 0,
        not_per_token=f"its outputs are the kernel's buffer of num_max_tokens={num_max_tokens} > {t} rows",
    ))  # fmt: skip


def _pre_dispatch_ffi(x, topk_idx, topk_weights, call: PreDispatchCall) -> reference.PreDispatched:
    """The pre-dispatch custom call; the sm_100 kernel has no routed scaling factor, so it is
    folded into the weights first, in f32 (the same bits)."""
    if call.arch == 10 and call.routed_scaling_factor != 1.0:
        topk_weights = topk_weights * jnp.float32(call.routed_scaling_factor)
        call = dataclasses.replace(call, routed_scaling_factor=1.0)
    x_q, x_sf, idx_pairs, w_out = call(x, topk_idx, topk_weights)
    return reference.PreDispatched(x_q, x_sf, _int64_slots_to_jax(idx_pairs), w_out)


def _int64_slots_to_jax(pairs: jax.Array) -> jax.Array:
    """The kernel's int64 top-k slots, as int64 under x64 and as their (exact) int32 values otherwise."""
    if jax.config.jax_enable_x64:
        return jax.lax.bitcast_convert_type(pairs, jnp.int64)
    return pairs[..., 0]


#: Token cap used when ``num_max_tokens`` is not given (SGLang's per-rank default); the policy's
#: ``num_max_tokens`` (``JAX_MEGAMOE_NUM_MAX_TOKENS``, read once) overrides it.
DEFAULT_NUM_MAX_TOKENS = _policy.DEFAULT_NUM_MAX_TOKENS


def default_num_max_tokens(policy: Policy | None = None) -> int:
    """The token cap of the mega kernel's buffer when a call gives none (the policy's, default 1024)."""
    return _policy.resolve(policy).num_max_tokens


def token_cap(num_tokens: int, num_max_tokens: int | None = None, policy: Policy | None = None) -> int:
    """The token cap of the fused kernel's buffer for a call of ``num_tokens`` tokens.

    A call's own ``num_max_tokens`` is kept (the caller chose that memory). Otherwise the policy's
    ``num_max_tokens`` (default 1024), raised for a larger call to the power of two >= T, at most
    the policy's ``prefill_token_cap`` (default 4096, the largest cap a GPU has run): a prompt's
    prefill runs on the kernel instead of the reference. A call of more tokens than its cap runs
    the kernel in chunks of the cap, one after the other through the same buffer.
    """
    t = static_int("num_tokens", num_tokens, lo=0)
    if num_max_tokens is not None:
        return static_int("num_max_tokens", num_max_tokens, lo=1)
    pol = _policy.resolve(policy)
    cap = pol.num_max_tokens
    if t <= cap:
        return cap
    return max(cap, min(1 << (t - 1).bit_length(), pol.prefill_token_cap))


def _token_chunks(num_tokens: int, cap: int) -> tuple[tuple[int, int], ...]:
    """``(start, size)`` of the kernel calls that run ``num_tokens`` rows through a buffer of ``cap``."""
    return tuple((s, min(cap, num_tokens - s)) for s in range(0, num_tokens, cap))


def mega_moe(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    mode: Mode | None = None,
    activation_clamp: float | None = None,
    backend: Backend = "auto",
    options: MoEOptions | None = None,
) -> jax.Array:
    """Routed experts of one MoE layer: pre-dispatch + fused Mega MoE kernel -> ``bf16[T, H]``.

    ``mode`` defaults to the mode ``weights`` were built for. The rarely changed options are one
    :class:`MoEOptions` (``options=MoEOptions(num_max_tokens=256, policy=...)``):

    - ``routed_scaling_factor`` (float, or a traced scalar, folded into ``topk_weights`` in f32);
    - ``num_max_tokens``: the token cap of the kernel's persistent buffer (default
      :func:`token_cap`: the policy's cap, raised for a prefill up to its ``prefill_token_cap``;
      rounded up to the kernel's alignment; calls with the same cap and shapes share one buffer).
      A call of more tokens than the cap runs the fused kernel in chunks of the cap, one after the
      other through the one buffer (each token's output depends on its own row only, so chunks
      change nothing but the number of launches);
    - ``reserved_sms``: SMs left free for other streams (default the policy's, 2); ``fast_math``
      (default on);
    - ``kernel``: the GPU kernel where the FFI backend runs: ``"fused"`` (DeepGEMM's mega
      kernel), ``"decode"`` (our low-latency FP8 GEMV passes, sm_90 ``fp8`` only, no token cap) or
      ``"auto"`` (decode while ``0 < T * K <= jax_megamoe._src.kernels._decode.decode_max_pairs(H, I)``,
      the crossover measured on an H100 per expert shape: 48 for V4-Flash, i.e. T <= 8, and 6 for
      V4-Pro, T = 1; see :mod:`jax_megamoe._src.kernels._decode`);
    - ``policy``: the settings a call does not give (token cap, reserved SMs, graph targets, sm_100
      opt-in; default: the process policy, :func:`jax_megamoe.policy.current`, read once).

    Kernels: sm_90 mode ``fp8`` (run and tested on H200); sm_100 modes ``mxf4xmxf4``/``fp8xfp4``
    (compiled and host-side tested only: no B200 has run them).
    """
    opts = MoEOptions.of(options)
    pol = _policy.resolve(opts.policy)
    if mode is None:
        mode = getattr(weights, "mode", None)
    mode = _policy.resolve_mode(mode, device_arch(), pol)
    t, h, k = check_routing(x, topk_idx, topk_weights)
    rsf = _check_scaling(opts.routed_scaling_factor)
    activation_clamp = config.check_clamp(activation_clamp)
    validate_for = getattr(weights, "validate_for", None)
    if validate_for is None:
        raise TypeError(f"weights: expected a jax_megamoe.layout.MoEWeights, got {type(weights).__name__}")
    validate_for(mode, hidden=h)
    config.validate_moe_shape(
        hidden=h, intermediate=weights.intermediate, num_experts=weights.num_experts, top_k=k, mode=mode
    )
    cap_requested = token_cap(t, opts.num_max_tokens, pol)
    reserved = static_int("reserved_sms", opts.reserved_sms, lo=0, allow_none=True)
    if reserved is None:
        reserved = pol.reserved_sms
    fast_math = True if opts.fast_math is None else bool(opts.fast_math)
    chosen = choose_backend(backend, mode, op="mega_moe")
    if chosen == "ffi" and backend == "auto" and config.arch_of_mode(mode) == 10 and not pol.sm100_mega:
        # Never run on hardware here: "auto" keeps the reference until a B200 has validated it.
        chosen = "reference"
    # The decode kernels have no token cap (their scratch is f32[T*K, I] in XLA's memory).
    use_decode = (
        _decode.choose_kernel(opts.kernel, mode, t, k, hidden=h, intermediate=weights.intermediate) == "decode"
        and chosen == "ffi"
    )
    topk_weights, rsf = _fold_traced_scaling(topk_weights, rsf)  # (w * f) * 1.0: the same bits
    topk_idx = reference.route_ids(topk_idx)  # int64 ids beyond int32 -> -1 before any int32 cast
    call = MegaMoECall(
        mode, num_experts=weights.num_experts, capacity=config.align_token_cap(cap_requested, mode),
        activation_clamp=activation_clamp, routed_scaling_factor=rsf, fast_math=fast_math, reserved_sms=reserved,
        graph=pol.graph_targets, sm90_wide_tile=pol.sm90_wide_tile,
    )  # fmt: skip
    ref_options = MoEOptions(routed_scaling_factor=rsf, fast_math=fast_math, chunk_rows=opts.chunk_rows)
    leaves, tree = jax.tree.flatten(weights)

    def run(x, topk_idx, topk_weights, *w_leaves):
        w = jax.tree.unflatten(tree, w_leaves)
        if chosen == "reference" or x.shape[0] == 0:
            return (reference.mega_moe(x, topk_idx, topk_weights, w, mode=mode, activation_clamp=activation_clamp,
                                       options=ref_options),)  # fmt: skip
        if use_decode:
            return (decode_target_call(x, topk_idx, topk_weights, w, call),)
        chunks = _token_chunks(x.shape[0], call.capacity)  # this device's rows: one call per chunk
        ys = [mega_moe_target_call(x[a : a + n], topk_idx[a : a + n], topk_weights[a : a + n], w, call)
              for a, n in chunks]  # fmt: skip
        return (ys[0] if len(ys) == 1 else jnp.concatenate(ys),)

    names = ("x", "topk_idx", "topk_weights", *(f"weights.{n}" for n in ("l1", "l1_sf", "l2", "l2_sf")))
    return _rules.apply(
        "mega_moe", run, (x, topk_idx, topk_weights, *leaves), names, num_token_inputs=3, out_shapes=[(t, h)]
    )[0]


def mega_moe_target_call(
    x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array, weights: MoEWeights, call: MegaMoECall
) -> jax.Array:
    """The mega-kernel custom call itself, arguments already validated (:func:`mega_moe`,
    :func:`jax_megamoe.parallel.ep_moe`): ``call`` holds every static attribute.

    ``weights`` hold this rank's ``call.num_experts / call.num_ranks`` experts. With several ranks
    the call must run on every device of ``call.rank_devices`` at once, inside :func:`jax.shard_map`.
    """
    if not isinstance(call, MegaMoECall):
        raise TypeError(f"call: expected a MegaMoECall, got {type(call).__name__}")
    t, h = x.shape
    # Ids outside [0, E) are skipped, as the reference skips them (the kernel would index past its
    # tables); decided before the int32 cast so int64 ids >= 2**31 cannot wrap onto real experts.
    idx = reference.route_ids(topk_idx, call.num_experts)
    return ffi_call_on_gpu(
        "mega_moe", call.target, jax.ShapeDtypeStruct((t, h), jnp.bfloat16),
        x, idx, topk_weights, weights.l1, weights.l1_sf, weights.l2, weights.l2_sf,
        has_side_effect=True,
        **call.attributes(hidden=h, intermediate=weights.intermediate, top_k=topk_idx.shape[1]),
    )  # fmt: skip


def decode_target_call(
    x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array, weights: MoEWeights, call: MegaMoECall
) -> jax.Array:
    """The two decode custom calls (``ffi/handlers/decode_moe_sm90.cc``), arguments already validated
    by :func:`mega_moe` (``call``: its clamp, routed scaling factor and graph switch): l1 writes the
    weighted SwiGLU output ``f32[T*K, I]``, l2 requantises it, runs W2 and combines the slots into
    ``bf16[T, H]``. No device state, no side effect."""
    t, h = x.shape
    k = topk_idx.shape[1]
    e = weights.num_local_experts
    idx = reference.route_ids(topk_idx, e)
    suffix = _ffi.GRAPH_SUFFIX if call.graph else ""
    dims = dict(
        hidden=np.int64(h), intermediate=np.int64(weights.intermediate), num_experts=np.int64(e), top_k=np.int64(k)
    )
    act = ffi_call_on_gpu(
        "mega_moe", _ffi.TARGET_DECODE_L1_SM90 + suffix, jax.ShapeDtypeStruct((t * k, weights.intermediate), jnp.float32),
        x, idx, topk_weights, weights.l1, weights.l1_sf,
        activation_clamp=call.clamp_attr(), routed_scaling_factor=np.float32(call.routed_scaling_factor), **dims,
    )  # fmt: skip
    return ffi_call_on_gpu(
        "mega_moe", _ffi.TARGET_DECODE_L2_SM90 + suffix, jax.ShapeDtypeStruct((t, h), jnp.bfloat16),
        act, idx, weights.l2, weights.l2_sf, **dims,
    )  # fmt: skip
