"""Expert parallelism that reads each local expert's weights once per step, over one mesh axis or a
two-level ``(host, GPU)`` mesh: :func:`ep_moe_hier` (``axes=(axis, None)``: one level), :func:`hier_path`.

Options (``dispatch``, ``intranode``, ``pair_capacity``, ``return_stats``, ...) are fields of one
:class:`jax_megamoe.parallel.EPOptions`; the two mesh axes are ``axes=(host_axis, axis)``.

The collective path of :func:`jax_megamoe.parallel.ep_moe` sends every (token, slot) *pair* as its
own top-1 row and sizes each device's receive buffer for ``n * T/n * K`` rows. Here, as in DeepEP,
a token travels **once per destination** with all ``K`` of its slots: the slots whose expert lives
at that destination carry its local id and routing weight, the others ``-1`` / ``0``. The receive
buffer is therefore exactly a single-rank Mega MoE problem (``rows x K`` slots over the local
experts, padding rows all ``-1``), and one kernel call per step runs it: every local expert's
weights are read once, padding rows route nowhere.

One step, per device, with ``n_o`` = size of the outer axis (``host_axis``), ``G`` = size of the
inner axis (``axis``; 1 for one level), ``T_l = T / (n_o G)`` tokens per device:

1. **Route to hosts.** Expert ``e`` lives on host ``e // (E/n_o)``, and within it on GPU
   ``(e % (E/n_o)) // (E/(n_o G))`` (device ``(h, g)`` holds the ``h G + g``-th block of ``E/(n_o G)``
   experts; tokens are sharded the same way, ``P((host_axis, axis))``). Token ``t`` goes to host ``d``
   if any valid slot names an expert there; per destination the tokens keep their order.
2. **One inter-host exchange** over ``host_axis`` (device ``(h, g)`` talks to ``(h', g)``): a send
   buffer ``[n_o, C]`` rows (``C`` = ``pair_capacity``, default ``T_l``: the exact worst case) of bf16
   token rows, host-local ids ``[K]`` and f32 weights ``[K]`` (``routed_scaling_factor`` multiplied in,
   as the reference does); ``dispatch="padded"`` is :func:`jax.lax.all_to_all` of the whole buffer, ``"ragged"``
   :func:`jax.lax.ragged_all_to_all` of the used rows only (GPU/TPU; ``"auto"`` picks it there).
3. **Intranode stage** on the ``n_o C`` received rows, whose ids are host-local (``[0, E/n_o)``):
   ``"fused"``: DeepGEMM's multi-rank kernel over the host's ``G`` GPUs (one custom call per device:
   it moves the pairs over NVLink, runs the experts and combines; GPU only, one process per host);
   ``"collective"``: :func:`jax_megamoe.parallel.ep_moe`'s collective body over ``axis`` (pairs by
   ``all_to_all`` as top-1 rows, exact capacity, the reference or the single-rank kernel on each GPU;
   what runs on CPU, and the GPU fallback where the fused stage cannot run: correct but not fast);
   ``"local"`` (``G = 1``): the single-rank kernel (``backend="ffi"``) or the reference on this
   device's experts, once (with the kernel this needs ``E/n >= K`` local experts, which
   :func:`jax_megamoe.ops.mega_moe` checks). Each gives per received row the sum of its slots on
   this host, in the kernel's ascending-``k`` order, in bf16.
4. **Back and combine.** The partial rows travel back by the reverse exchange and the sender adds
   them in ascending host order: ``y[t] = bf16(0 + f32(p_0) + f32(p_1) + ...)``.

Same function as :func:`jax_megamoe.reference.mega_moe`, to this bound: with the reference backend,
every per-slot output ``o_k`` is the reference's own bf16 value (same chunk size, so the same
operations), and a token whose valid slots all live on one host gets the reference's bits exactly.
A token spread over several hosts is rounded to bf16 once per host and once at the end, so
elementwise ``|y - y_ref| <= 2**-6 * sum_k |o_k|`` (three bf16 roundings, unit 2**-8, of partial sums
bounded by ``sum_k |o_k|``, plus f32 reassociation). The tests check both: bit for bit against the
per-host partial sums computed by the reference, and the bound against ``reference.mega_moe``.
With the kernels, ``o_k`` themselves are the kernel's (rel. L2 ~5e-3 vs the reference on sm_90).

**Capacity and overflow** (policy: exact by a second pass, never a drop). ``pair_capacity`` is rows
(tokens) per (source device, destination host) pair, the name :func:`jax_megamoe.parallel.ep_moe`
uses for its per-pair rows; a receive buffer holds ``n_o * pair_capacity`` rows.
Rows past it in a step are not dropped: a **second pass** (the same exchange, intranode stage and
reverse exchange, sized ``T_l - pair_capacity`` per pair so that it can never overflow) moves them, under
a :func:`jax.lax.cond` on the mesh-wide overflow count, so a step without overflow pays nothing for
it. Each (token, host) row is in exactly one pass and the combine is unchanged: the result has the
same bits as with ``pair_capacity=None``. ``return_stats=True`` returns ``(y, EPStats)``: rows moved, rows
and (token, slot) pairs that took the second pass, and the largest per-pair row count (the pair_capacity a
one-pass step would have needed), all mesh-wide int32.

:func:`hier_path` says which dispatch and intranode stage a call takes, and why.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from jax_megamoe._src.kernels import ops, parallel
from jax_megamoe._src.kernels.parallel import EPOptions
from jax_megamoe._src.numerics import config, reference
from jax_megamoe._src.numerics import policy as _policy
from jax_megamoe._src.numerics.layout import MoEWeights
from jax_megamoe._src.numerics.policy import Policy

__all__ = ["ep_moe_hier", "hier_path", "EPStats", "HierPath", "INTRANODE", "OVERFLOW_POLICY"]

#: Intranode stages: ``"auto"`` picks ``"fused"`` where it can run, else ``"collective"`` (``G > 1``)
#: or ``"local"`` (``G = 1``).
INTRANODE: tuple[str, ...] = ("auto", "fused", "collective", "local")
#: What happens to rows past ``pair_capacity``: a second pass moves them (exact); nothing is dropped.
OVERFLOW_POLICY = "second_pass"


class EPStats(NamedTuple):
    """Mesh-wide counters of one step (int32 scalars, replicated)."""

    rows: jax.Array  #: (token, destination host) rows moved, both passes
    second_pass_rows: jax.Array  #: rows past ``pair_capacity``, moved by the second pass
    second_pass_pairs: jax.Array  #: valid (token, slot) pairs in those rows
    max_rows_per_pair: jax.Array  #: most rows one source device sent one host (the one-pass pair_capacity)


class HierPath(NamedTuple):
    """What :func:`ep_moe_hier` runs: ``dispatch`` (``"padded"``/``"ragged"``,
    the inter-host collective), ``intranode`` (``"fused"``/``"collective"``/``"local"``), ``backend``
    of the per-GPU expert compute (``"ffi"``/``"reference"``; ``"ffi"`` for the fused stage) and
    ``reason``, a sentence."""

    dispatch: str
    intranode: str
    backend: str
    reason: str


# --------------------------------------------------------------------------------------------
# Path choice
# --------------------------------------------------------------------------------------------


def _axes(mesh: Mesh | AbstractMesh, host_axis: Any, axis: Any) -> tuple[int, int]:
    n_o = parallel._axis_size(mesh, host_axis)
    if axis is None:
        return n_o, 1
    if axis == host_axis:
        raise ValueError(f"axis: {axis!r} is also host_axis; the two levels need two different mesh axes")
    return n_o, parallel._axis_size(mesh, axis)


def _groups_in_one_process(mesh: Mesh | AbstractMesh, axis: str) -> tuple[bool, str]:
    devices = np.moveaxis(mesh.devices, tuple(mesh.axis_names).index(axis), -1)
    for row in devices.reshape(-1, devices.shape[-1]):
        procs = {d.process_index for d in row}
        if len(procs) > 1:
            return False, (
                f"the devices along {axis!r} of one host span processes {sorted(procs)}; the fused stage needs one "
                "process driving every GPU of a host"
            )
    return True, ""


def _fused_inner_available(mesh: Mesh | AbstractMesh, axis: str, mode: str) -> tuple[bool, str]:
    """Like :func:`parallel.fused_available` for one host's GPUs: several processes may drive the
    mesh (one per host), but every group along ``axis`` belongs to one process."""
    devices, why = parallel._mesh_gpus(mesh, mode)
    if why:
        return False, why
    ok, why = _groups_in_one_process(mesh, axis)
    if not ok:
        return False, why
    me = jax.process_index()
    why = parallel._wrong_arch([d for d in devices if d.process_index == me], mode)
    if why:
        return False, why
    return ops._ffi_ready()


def _local_rank_table(mesh: Mesh | AbstractMesh, axis: str) -> tuple[tuple[int, ...], ...]:
    """The rank-table rows (CUDA ordinals, rank order along ``axis``) of the groups this process drives."""
    devices = np.moveaxis(mesh.devices, tuple(mesh.axis_names).index(axis), -1)
    rows = devices.reshape(-1, devices.shape[-1])
    me = jax.process_index()

    def ordinal(d: Any) -> int:
        hw = getattr(d, "local_hardware_id", None)
        return int(d.id if hw is None else hw)

    return tuple(tuple(ordinal(d) for d in row) for row in rows if row[0].process_index == me)


def _resolve(mesh, host_axis, axis, mode, rows_per_device: int, opts: EPOptions):
    """``(HierPath, fused)``; ``fused``: the fused stage's kernel call (its ``num_experts`` and clamp
    filled in by the caller), or None."""
    dispatch, intranode, backend = opts.dispatch, opts.intranode, opts.backend
    if intranode not in INTRANODE:
        raise ValueError(f"intranode: {intranode!r} is not one of {', '.join(INTRANODE)}")
    if backend not in parallel.BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(parallel.BACKENDS)}")
    if dispatch not in parallel.COLLECTIVE_DISPATCHES:
        raise ValueError(
            f"dispatch: {dispatch!r} is not one of {', '.join(parallel.COLLECTIVE_DISPATCHES)} (the inter-host collective)"
        )
    n_o, g = _axes(mesh, host_axis, axis)
    pol = _policy.resolve(opts.policy)
    disp = parallel.dispatch_path(mesh, dispatch)
    num_max_tokens = parallel._check_token_cap(opts.num_max_tokens, "rows per device")
    cap = config.align_token_cap(max(int(rows_per_device if num_max_tokens is None else num_max_tokens), 1), mode)
    if num_max_tokens is not None and num_max_tokens < rows_per_device:
        raise ValueError(
            f"num_max_tokens: {num_max_tokens} is below the {rows_per_device} rows a device can receive per pass "
            f"({n_o} sources x pair_capacity); raise it, lower pair_capacity, or leave it None"
        )
    be = ops.choose_backend(backend, mode, op="ep_moe_hier")
    if be == "ffi" and backend == "auto" and config.arch_of_mode(mode) == 10 and not pol.sm100_mega:
        be = "reference"
    if intranode == "local" and g > 1:
        raise ValueError(
            f"intranode: 'local' runs one device's experts alone, but axis {axis!r} has {g} devices per host; "
            "use 'fused', 'collective' or 'auto'"
        )
    fused = None
    if intranode in ("auto", "fused") and g > 1:
        ok, why = _fused_inner_available(mesh, axis, mode)
        if intranode == "fused":
            if backend == "reference":
                raise ValueError("intranode: 'fused' runs the FFI kernel; backend='reference' cannot run it")
            platform = parallel._platform(mesh)
            if not ok and (platform == "gpu" or isinstance(mesh, jax.sharding.AbstractMesh)):
                raise ValueError(f"intranode: 'fused' cannot run here: {why}")
            # no GPU at all: allowed, so that a jitted call still lowers for cuda on a CPU-only machine
            reason = "intranode='fused' requested" + ("" if ok else f" (lowering only: {why})")
            inner = "fused"
        elif ok and backend != "reference" and pol.fused_ep and (mode == "fp8" or pol.sm100_mega):
            inner, reason = "fused", f"the {g} GPUs of each host run DeepGEMM's multi-rank kernel over NVLink"
        else:
            inner = "collective"
            if not ok:
                reason = f"fused intranode kernel unavailable: {why}"
            elif backend == "reference":
                reason = "backend='reference'"
            elif not pol.fused_ep:
                reason = f"{_policy.ENV['fused_ep'][0]}=0 (policy.fused_ep off)"
            else:
                reason = f"mode {mode!r}: the sm_100 fused kernel is opt-in (JAX_MEGAMOE_SM100_MEGA=1)"
    elif intranode == "fused":  # g == 1
        raise ValueError(
            f"intranode: 'fused' needs an inner axis with several GPUs; axis {axis!r} has size {g} (use 'local')"
        )
    elif g == 1:
        inner = "local"
        reason = "one device per host: its experts run alone, once per pass" + (
            " (a collective over one device is this)" if intranode == "collective" else ""
        )
    else:
        inner, reason = "collective", "intranode='collective' requested"
    if inner == "fused":
        be = "ffi"
        table = _local_rank_table(mesh, axis) if not isinstance(mesh, jax.sharding.AbstractMesh) else ()
        fused = ops.MegaMoECall(
            mode, num_experts=0, capacity=cap, reserved_sms=pol.reserved_sms, num_ranks=g, rank_devices=table,
            graph=pol.graph_targets, sm90_wide_tile=pol.sm90_wide_tile,
        )  # fmt: skip
    why_disp = f"inter-host {disp} ({'ragged_all_to_all' if disp == 'ragged' else 'all_to_all'}) over {host_axis!r}"
    return HierPath(disp, inner, be, f"{why_disp}; {reason}; expert compute: {be}"), fused


def hier_path(
    mesh: Mesh | AbstractMesh,
    host_axis: str = "host",
    axis: str | None = "ep",
    mode: config.Mode = "fp8",
    tokens_per_device: int = 1,
    *,
    options: EPOptions | None = None,
) -> HierPath:
    """The :class:`HierPath` :func:`ep_moe_hier` takes with these arguments (``axis=None``: one level
    over ``host_axis``; ``options``: the call's :class:`EPOptions`, of which
    ``dispatch``, ``intranode``, ``backend``, ``pair_capacity``, ``num_max_tokens`` and ``policy``
    matter here); raises as the call would for one that cannot run."""
    opts = EPOptions.of(options)
    config.check_mode(mode)
    n_o, _ = _axes(mesh, host_axis, axis)
    c = _capacity(opts.pair_capacity, int(tokens_per_device))
    return _resolve(mesh, host_axis, axis, mode, n_o * c, opts)[0]


def _capacity(pair_capacity: Any, tokens_per_device: int) -> int:
    if pair_capacity is None:
        return max(tokens_per_device, 1)
    if isinstance(pair_capacity, bool) or not isinstance(pair_capacity, (int, np.integer)) or int(pair_capacity) < 1:
        raise ValueError(
            f"pair_capacity: {pair_capacity!r} must be a Python int >= 1 (token rows per source device and host)"
        )
    return max(1, min(int(pair_capacity), tokens_per_device))


def ep_moe_hier(
    x: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    weights: MoEWeights,
    *,
    mesh: Mesh | AbstractMesh,
    axes: tuple[str, str | None] = ("host", "ep"),
    mode: config.Mode,
    options: EPOptions | None = None,
) -> jax.Array | tuple[jax.Array, EPStats]:
    """Routed experts of one MoE layer over a two-level mesh: hosts (``host_axis``, XLA collectives)
    x GPUs of a host (``axis``: the fused kernel, or a collective on CPU). Jit-able; keywords static.

    Args:
      x: bf16 ``[T, H]``, ``T`` divisible by ``n_o * G``; placed ``P((host_axis, axis))``.
      topk_idx: int32/int64 ``[T, K]`` global expert ids; ids outside ``[0, E)`` skip the slot.
      topk_weights: f32 ``[T, K]``.
      weights: the layer's global :class:`jax_megamoe.layout.MoEWeights`, ``E`` divisible by
        ``n_o * G``; placed ``P((host_axis, axis))`` on the expert dim (host-major blocks).
      mesh: a :class:`jax.sharding.Mesh` with both axes (other axes replicate).
      axes: ``(host_axis, axis)``, the outer (inter-host) and inner (intranode) axes. ``axis=None``:
        one level, e.g. ``("ep", None)``: experts and tokens over ``host_axis`` alone, every device its
        own "host" (one all-to-all of token rows, each token once per destination device, one
        single-rank kernel call over the received rows, the reverse all-to-all, combine).
      mode: as :func:`jax_megamoe.ops.mega_moe`.
      options: an :class:`jax_megamoe.parallel.EPOptions`; its fields here:
      activation_clamp, routed_scaling_factor: as :func:`jax_megamoe.ops.mega_moe`.
      backend: per-GPU expert compute of the ``"local"``/``"collective"`` stages: ``"auto"`` (the
        single-rank kernel where the default device runs the mode's kernels, else the reference),
        ``"ffi"``, ``"reference"``.
      dispatch: inter-host collective, ``"auto"`` | ``"ragged"`` | ``"padded"`` (:func:`parallel.dispatch_path`).
      intranode: ``"auto"`` | ``"fused"`` | ``"collective"`` | ``"local"`` (see :func:`hier_path`).
      pair_capacity: token rows per (source device, destination host) pair per pass; default (and at
        most) ``T_l``, the exact worst case. Rows past it take the second pass (module docstring).
      return_stats: return ``(y, EPStats)``.
      num_max_tokens: at least the rows a device receives per pass (``n_o * pair_capacity``); default that.
      policy: the settings the call does not give (fused opt-out, reserved SMs, graph targets, sm_100
        opt-in); default the process policy (:func:`jax_megamoe.policy.current`).

    Returns:
      ``y`` bf16 ``[T, H]`` sharded ``P((host_axis, axis))`` (and :class:`EPStats` if ``return_stats``).
    """
    opts = EPOptions.of(options)
    if not (isinstance(axes, tuple) and len(axes) == 2):
        raise TypeError(f"axes: {axes!r} must be a pair (host_axis, axis), axis None for one level")
    host_axis, axis = axes
    activation_clamp, routed_scaling_factor, return_stats = (
        opts.activation_clamp,
        opts.routed_scaling_factor,
        opts.return_stats,
    )
    if opts.return_overflow:
        raise ValueError("options: return_overflow applies to ep_moe; ep_moe_hier never drops (return_stats)")
    config.check_mode(mode)
    n_o, g = _axes(mesh, host_axis, axis)
    n = n_o * g
    t, h, k = reference._check_routing(x, topk_idx, topk_weights)
    if h % 128 != 0:
        raise ValueError(f"x: hidden={h} must be a multiple of 128")
    names = host_axis if axis is None else f"{host_axis!r} x {axis!r}"
    if t % n != 0:
        raise ValueError(
            f"x: {t} tokens are not divisible by the {n} devices of mesh axes {names} (each device owns T/{n} "
            "tokens; pad the batch with rows whose topk_idx is -1)"
        )
    parallel._check_weights(weights, mode, h, k, n)
    clamp = config.check_clamp(activation_clamp)
    reference._check_scaling(routed_scaling_factor)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats: expected a bool, got {type(return_stats).__name__}")
    tl = t // n
    cap1 = _capacity(opts.pair_capacity, tl)
    path, fused = _resolve(mesh, host_axis, axis, mode, n_o * cap1, opts)
    caps = (cap1,) if cap1 >= tl else (cap1, tl - cap1)
    if clamp is not None and math.isinf(clamp):
        clamp = None
    fused2 = None
    if fused is not None:
        fused = dataclasses.replace(fused, num_experts=weights.num_experts // n_o, activation_clamp=clamp)
        if len(caps) == 2:
            fused2 = dataclasses.replace(fused, capacity=config.align_token_cap(n_o * caps[1], mode))
    zero = jnp.zeros((), jnp.int32)
    if t == 0:
        y = jnp.zeros((0, h), jnp.bfloat16)
        return (y, EPStats(zero, zero, zero, zero)) if return_stats else y

    spec = P(host_axis) if axis is None else P((host_axis, axis))
    explicit = parallel._is_explicit(mesh, host_axis)
    topk_idx = reference.route_ids(topk_idx, weights.num_experts)
    x = parallel._place(x, mesh, spec, explicit)
    topk_idx = parallel._place(topk_idx, mesh, spec, explicit)
    topk_weights = parallel._place(topk_weights, mesh, spec, explicit)
    weights = jax.tree.map(lambda a: parallel._place(a, mesh, spec, explicit), weights)
    rsf = jnp.asarray(routed_scaling_factor, jnp.float32)
    chunk = reference.default_chunk_rows(t * k, weights.num_experts)
    spec = _HierCall(
        mesh, host_axis, axis, mode, clamp, path, caps, (fused, fused2), chunk, _policy.resolve(opts.policy)
    )
    y, stats = _hier_jit(x, topk_idx, topk_weights, rsf, weights, spec=spec)
    return (y, EPStats(*stats)) if return_stats else y


@dataclasses.dataclass(frozen=True)
class _HierCall:
    """Every static choice of one two-level step: the one static argument of the jitted step."""

    mesh: Any
    host_axis: Any
    axis: Any
    mode: str
    clamp: float | None
    path: HierPath
    caps: tuple[int, ...]
    fused: tuple[ops.MegaMoECall | None, ops.MegaMoECall | None]
    chunk: int
    policy: Policy

    def inner(self, backend: str, path: str, cap: int) -> parallel._EPCall:
        """The one-level spec of the intranode stage over ``axis`` (or of the local experts)."""
        return parallel._EPCall(
            None, self.axis, self.mode, self.clamp, backend, path, cap, self.chunk, None, self.policy
        )


@partial(jax.jit, static_argnames=("spec",))
def _hier_jit(x, topk_idx, topk_weights, rsf, weights, *, spec: _HierCall):
    w = topk_weights.astype(jnp.float32) * rsf  # reference._scale_weights: one f32 multiply
    pspec = P(spec.host_axis) if spec.axis is None else P((spec.host_axis, spec.axis))
    body = partial(_hier_body, spec=spec, num_experts=weights.num_experts)
    f = jax.shard_map(
        body,
        mesh=spec.mesh,
        in_specs=(pspec, pspec, pspec, pspec),
        out_specs=(pspec, P()),
        check_vma=False,
    )
    return f(x, topk_idx, w, weights)


# --------------------------------------------------------------------------------------------
# Per device
# --------------------------------------------------------------------------------------------


def _exchange_fn(path: HierPath, axis: str, n: int, cap: int, send_sizes: jax.Array):
    """``(forward, backward)`` moving ``[n * cap, ...]`` buffers over ``axis``: row ``[s * cap + j]``
    of the result is the ``j``-th row device ``s`` sent here."""
    if path.dispatch == "padded":

        def fwd(a, fill):
            del fill
            return lax.all_to_all(a, axis, 0, 0, tiled=True)

        return fwd, fwd
    me = lax.axis_index(axis)
    recv_sizes = lax.all_to_all(send_sizes, axis, 0, 0, tiled=True)
    starts = jnp.arange(n, dtype=jnp.int32) * cap
    at_peer = jnp.full((n,), me * cap, jnp.int32)

    def go(a, fill, sizes_out, sizes_in):
        out = jnp.full(a.shape, fill, a.dtype)
        return lax.ragged_all_to_all(a, out, starts, sizes_out, at_peer, sizes_in, axis_name=axis)

    return (lambda a, fill: go(a, fill, send_sizes, recv_sizes)), (lambda a, fill: go(a, fill, recv_sizes, send_sizes))


def _intranode(rx, rid, rw, weights, *, spec: _HierCall, fused: ops.MegaMoECall | None, num_host_experts: int):
    """The experts of this host on the received rows (host-local ids, ``-1`` = none): per row, the
    sum of its slots on this host (ascending ``k``), bf16 ``[R, H]``."""
    rows = rx.shape[0]
    path = spec.path
    if path.intranode == "fused":
        return ops.mega_moe_target_call(rx, rid, rw, weights, fused)
    if path.intranode == "collective":
        # The pair-form collective body of parallel.ep_moe over the host's GPUs; its pair_capacity is the
        # exact worst case (rows * K pairs per device pair), so nothing is dropped here.
        inner = spec.inner(path.backend, path.dispatch, rows * rid.shape[1])
        y, _ = parallel._ep_body(rx, rid, rw, weights, spec=inner, num_experts=num_host_experts)
        return y
    # "local": this device's experts alone, one call over every received row.
    return parallel._local_experts(rx, rid, rw, weights, spec.inner(path.backend, path.dispatch, 0))


def _hier_body(x, topk_idx, w, weights, *, spec: _HierCall, num_experts: int):
    host_axis, axis, path, caps, fused = spec.host_axis, spec.axis, spec.path, spec.caps, spec.fused
    n_o = lax.axis_size(host_axis)
    tl, h = x.shape
    k = topk_idx.shape[1]
    eh = num_experts // n_o  # experts per host

    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    host = jnp.where(valid, topk_idx // eh, n_o)  # [tl, K]; n_o: nowhere
    dests = jnp.arange(n_o, dtype=jnp.int32)
    on = host[:, None, :] == dests[None, :, None]  # [tl, n_o, K]: slot k of token t lives on host d
    sends = jnp.any(on, axis=2)  # [tl, n_o]
    pos = jnp.cumsum(sends.astype(jnp.int32), axis=0) - 1  # the token's row among those to host d
    count = jnp.sum(sends, axis=0).astype(jnp.int32)  # [n_o]
    ids_to = jnp.where(on, (topk_idx % eh)[:, None, :], -1)  # [tl, n_o, K] host-local ids
    w_to = jnp.where(on, w[:, None, :], jnp.float32(0))

    def one_pass(offset: int, cap: int, fused_p):
        mine = sends & (pos >= offset) & (pos < offset + cap)
        rows = n_o * cap
        slot = jnp.where(mine, dests[None, :] * cap + (pos - offset), rows)  # [tl, n_o]; rows: dropped
        # For every send row, the (token, host) entry it carries (tl * n_o: a padding row), then one
        # gather per buffer (no [tl * n_o, H] temporary).
        src = (
            jnp.full((rows,), tl * n_o, jnp.int32)
            .at[slot.reshape(-1)]
            .set(jnp.arange(tl * n_o, dtype=jnp.int32), mode="drop")
        )
        send_x = jnp.concatenate([x, jnp.zeros((1, h), x.dtype)])[src // n_o]
        send_e = jnp.concatenate([ids_to.reshape(-1, k), jnp.full((1, k), -1, jnp.int32)])[src]
        send_w = jnp.concatenate([w_to.reshape(-1, k), jnp.zeros((1, k), jnp.float32)])[src]
        sizes = jnp.clip(count - offset, 0, cap).astype(jnp.int32)
        fwd, bwd = _exchange_fn(path, host_axis, n_o, cap, sizes)
        rx, rid, rw = fwd(send_x, 0), fwd(send_e, -1), fwd(send_w, 0)
        part = _intranode(rx, rid, rw, weights, spec=spec, fused=fused_p, num_host_experts=eh)
        back = bwd(part, 0)
        got = back[jnp.minimum(slot, rows - 1)]  # [tl, n_o, H]
        return jnp.where(mine[:, :, None], got, jnp.zeros((), jnp.bfloat16))

    parts = one_pass(0, caps[0], fused[0])
    over_rows = jnp.sum(sends & (pos >= caps[0])).astype(jnp.int32)
    over_pairs = jnp.sum(on & (pos >= caps[0])[:, :, None]).astype(jnp.int32)
    all_axes = (host_axis,) if axis is None else (host_axis, axis)
    total_over = lax.psum(over_rows, all_axes)
    if len(caps) == 2:
        # Exact by a second pass: the rows past the pair_capacity, sized so that it cannot overflow; taken
        # only when some device overflowed (the predicate is mesh-wide, so every device agrees).
        parts = lax.cond(
            total_over > 0,
            lambda p: p + one_pass(caps[0], caps[1], fused[1]),  # disjoint rows: p + 0 or 0 + q, exact
            lambda p: p,
            parts,
        )
    # Combine: f32 adds from +0 in ascending host order, then bf16 (as the kernel's slot combine).
    acc = jnp.zeros((tl, h), jnp.float32)
    for d in range(n_o):
        acc = acc + parts[:, d].astype(jnp.float32)
    acc = jnp.where(acc == 0, jnp.float32(0), acc)
    stats = (
        lax.psum(jnp.sum(count), all_axes),
        total_over,
        lax.psum(over_pairs, all_axes),
        lax.pmax(jnp.max(count), all_axes),
    )
    return acc.astype(jnp.bfloat16), stats
