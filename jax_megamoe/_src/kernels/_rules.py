"""JAX transformation rules for the Mega MoE ops: ``vmap``, differentiation and sharding.

The ops (:func:`jax_megamoe.ops.mega_moe`, :func:`jax_megamoe.ops.pre_dispatch`) end in an XLA
custom call (or, off the GPU, the pure-JAX reference). A bare custom call has no rules: ``vmap``
and ``grad`` fail with messages about ``ffi_call``, and under ``jax.jit`` with sharded operands
XLA gathers every operand onto every device without a word. :func:`apply` wraps the backend
computation of one op, on every backend alike, in three layers (outermost first), the way
TransformerEngine-JAX gives its primitives a batcher, no VJP and a partitioning rule:

``jax.grad`` / ``jax.jvp`` (:class:`jax.custom_jvp`)
    :class:`InferenceOnlyError`: the kernels are inference-only (FP8/FP4 quantisation has no
    useful derivative, and the kernels have no backward pass). Only raised when something the op
    reads is actually differentiated.

``jax.vmap`` (:class:`jax.custom_batching.custom_vmap`)
    runs the op once per batch element, in order (``lax.map``), each call exactly the unbatched
    op (same bits). Unbatched operands (typically the weights) are shared, not copied.

sharding (:func:`jax.experimental.custom_partitioning` with a Shardy ``sharding_rule``, plus the
GSPMD callback)
    operands whose **token** dim is sharded run **per shard**: every device runs the op on its own
    rows with the (replicated) weights, no collective at all; results keep the token sharding.
    Anything else sharded (the **expert** dim of the weights, the hidden dim, ...) raises
    :class:`ShardingError` naming the operand and mesh axis, and for the expert dim pointing at
    :func:`jax_megamoe.parallel.ep_moe` (expert parallelism). Never a silent gather. The check runs
    where the sharding is known: at trace time for meshes with ``Explicit`` axes (the named
    exception itself), and when XLA partitions the program for ``Auto`` axes (XLA raises it from
    its partitioner as a :class:`jax.errors.JaxRuntimeError` whose message carries
    ``ShardingError: ...``). On one device the rule adds nothing (the call is inlined).

The custom calls themselves (:func:`jax_megamoe.ops.ffi_call_on_gpu`, which also serves the fused
expert-parallel call of :mod:`jax_megamoe.parallel`) get ``vmap_method="sequential"`` and the same
grad guard (:func:`inference_only`), for callers that reach them without :func:`apply`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["InferenceOnlyError", "ShardingError", "apply", "inference_only", "sequential_vmap"]


class InferenceOnlyError(TypeError):
    """A Mega MoE op was differentiated (``jax.grad``, ``jax.vjp``, ``jax.jvp``): the kernels are
    inference-only."""


class ShardingError(ValueError):
    """Operands of a Mega MoE op are sharded in a way the op cannot run per shard (only the token
    dim may be sharded); the message names the operand, its dim and the mesh axis."""


# --------------------------------------------------------------------------------------------
# grad: a clear error
# --------------------------------------------------------------------------------------------


def _no_derivative(op: str) -> InferenceOnlyError:
    return InferenceOnlyError(
        f"jax_megamoe.{op} is inference-only: the Mega MoE kernels (and the reference that mirrors "
        "them, FP8/FP4 quantisation included) have no derivative rule, so jax.grad / jax.vjp / jax.jvp "
        "cannot differentiate through it. Keep the MoE call out of the differentiated function (or "
        "apply jax.lax.stop_gradient to its inputs); to train, use a differentiable dense MoE."
    )


def inference_only(fn: Callable[..., Any], op: str) -> Callable[..., Any]:
    """``fn`` unchanged under every transformation but differentiation, which raises
    :class:`InferenceOnlyError` (only when an input of ``fn`` is actually being differentiated)."""
    guarded = jax.custom_jvp(fn)

    def jvp(primals, tangents):
        del primals, tangents
        raise _no_derivative(op)

    guarded.defjvp(jvp)
    return guarded


# --------------------------------------------------------------------------------------------
# vmap: sequential over the batch
# --------------------------------------------------------------------------------------------


def sequential_vmap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(*leaves)`` (array leaves) whose ``vmap`` runs ``fn`` once per batch element with
    :func:`jax.lax.map`; unbatched leaves are passed as they are to every step."""
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *leaves):
        del axis_size
        flags = [bool(b) for b in jax.tree.leaves(in_batched)]
        batched = [a for a, b in zip(leaves, flags) if b]

        def one(row):
            it = iter(row)
            return fn(*[next(it) if b else a for a, b in zip(leaves, flags)])

        out = lax.map(one, batched)
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


# --------------------------------------------------------------------------------------------
# Sharding: per shard over the token dim, a clear error for anything else
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Spec:
    """One call of :func:`apply`: static, passed to the partitioner callbacks."""

    op: str
    fn: Callable[..., tuple[jax.Array, ...]]
    names: tuple[str, ...]  # one per input leaf
    num_token_inputs: int  # the first leaves are token-major ([T, ...], row t = token t)
    rows_are_tokens: bool  # outputs are token-major too (else token sharding is refused)
    not_per_token: str  # why not, for the error
    rule: str  # Shardy einsum-like sharding rule
    out_ndims: tuple[int, ...]  # rank of each result


def _entry(spec: Any, dim: int) -> Any:
    entries = tuple(spec) + (None,) * 8
    e = entries[dim]
    return None if e in ((), None) else e


def _axis_text(e: Any) -> str:
    return repr(e[0]) if isinstance(e, tuple) and len(e) == 1 else repr(e)


def _token_axes(spec: _Spec, specs: Sequence[Any], shapes: Sequence[tuple[int, ...]]) -> Any:
    """The mesh axes the token dim is sharded over (``None``: not sharded), after checking that
    nothing else is sharded; raises :class:`ShardingError`."""
    token = None
    for i, (name, ps, shape) in enumerate(zip(spec.names, specs, shapes)):
        for d in range(len(shape)):
            e = _entry(ps, d)
            if e is None:
                continue
            if i < spec.num_token_inputs and d == 0:
                token = token if token is not None else e
                continue
            if i >= spec.num_token_inputs and d == 0:
                raise ShardingError(
                    f"{name} of jax_megamoe.{spec.op} is sharded over mesh axis {_axis_text(e)} on "
                    f"its expert dim (shape {list(shape)}); plain jit would gather every expert onto every "
                    "device. Use jax_megamoe.parallel.ep_moe(x, topk_idx, topk_weights, weights, mesh=mesh, "
                    f"axis={_axis_text(e)}, mode=...) for expert parallelism, or replicate the weights (P())"
                )
            what = "token-major rows" if i < spec.num_token_inputs else "whole per-expert matrices"
            raise ShardingError(
                f"{name} of jax_megamoe.{spec.op} is sharded over mesh axis {_axis_text(e)} on dim "
                f"{d} (shape {list(shape)}); the kernels need {what}, so only the token dim (dim 0 of x, "
                "topk_idx, topk_weights) may be sharded. Reshard it (e.g. jax.lax.with_sharding_constraint "
                "with P(<token axes>, None)) before the call"
            )
    if token is not None and not spec.rows_are_tokens:
        raise ShardingError(
            f"jax_megamoe.{spec.op} operands are sharded over mesh axis {_axis_text(token)} on the "
            f"token dim, but {spec.not_per_token}; call it inside jax.shard_map for per-device buffers, or "
            "replicate its operands"
        )
    return token


def _call(spec: _Spec, *leaves: jax.Array) -> tuple[jax.Array, ...]:
    return spec.fn(*leaves)


def _sharding_of(mesh: Any, token: Any, ndim: int, token_major: bool) -> NamedSharding:
    if token is None or not token_major:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(token, *([None] * (ndim - 1))))


def _named_specs(spec: _Spec, arg_shapes: Sequence[Any]) -> list[Any]:
    out = []
    for name, a in zip(spec.names, arg_shapes):
        s = a.sharding
        if isinstance(s, NamedSharding):
            out.append(s.spec)
        elif s is None or s.is_fully_replicated:
            out.append(P())
        else:
            raise ShardingError(
                f"{name} of jax_megamoe.{spec.op} has a sharding without a mesh ({s}); "
                "shard the operands with jax.sharding.NamedSharding (token dim only)"
            )
    return out


def _partition(spec: _Spec, mesh: Any, arg_shapes: Any, result_shape: Any):
    args = list(arg_shapes)
    token = _token_axes(spec, _named_specs(spec, args), [tuple(a.shape) for a in args])
    arg_sh = tuple(_sharding_of(mesh, token, len(a.shape), i < spec.num_token_inputs) for i, a in enumerate(args))
    res_sh = tuple(_sharding_of(mesh, token, len(r.shape), True) for r in result_shape)
    return mesh, _lower_fn(spec), res_sh, arg_sh


def _lower_fn(spec: _Spec) -> Callable[..., tuple[jax.Array, ...]]:
    def lower(*leaves: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(spec.fn(*leaves))

    return lower


def _infer(spec: _Spec, mesh: Any, arg_shapes: Any, result_shape: Any):
    """GSPMD (``jax_use_shardy_partitioner=False``): the results' shardings from the operands'."""
    args = list(arg_shapes)
    token = _token_axes(spec, _named_specs(spec, args), [tuple(a.shape) for a in args])
    return tuple(_sharding_of(mesh, token, len(r.shape), True) for r in result_shape)


def _rule(spec: _Spec, mesh: Any, value_types: Any, result_types: Any) -> str:
    del mesh, value_types, result_types
    return spec.rule


_partitioned = custom_partitioning(_call, static_argnums=(0,))
_kw: dict[str, Any] = {"sharding_rule": _rule}
if "infer_sharding_from_operands" in inspect.signature(_partitioned.def_partition).parameters:
    _kw["infer_sharding_from_operands"] = _infer
_partitioned.def_partition(_partition, **_kw)


def _shardy_rule(
    spec_names: Sequence[str],
    in_shapes: Sequence[tuple[int, ...]],
    n_tok: int,
    out_shapes: Sequence[tuple[int, ...]],
    rows_are_tokens: bool,
) -> str:
    """Token dim ``t`` shared by the token-major operands (and the results when their rows are the
    tokens); the weights' expert dims share ``e``; every other dim is its own factor."""
    del spec_names
    counter = iter(range(10_000))

    def fresh() -> str:
        return f"d{next(counter)}"

    ins = []
    t_size = in_shapes[0][0] if in_shapes else None
    e_size = in_shapes[n_tok][0] if len(in_shapes) > n_tok and in_shapes[n_tok] else None
    for i, shape in enumerate(in_shapes):
        dims = []
        for d, size in enumerate(shape):
            if d == 0 and i < n_tok and size == t_size:
                dims.append("t")
            elif d == 0 and i >= n_tok and size == e_size:
                dims.append("e")
            else:
                dims.append(fresh())
        ins.append(" ".join(dims))
    outs = []
    for shape in out_shapes:
        dims = ["t" if (d == 0 and rows_are_tokens and size == t_size) else fresh() for d, size in enumerate(shape)]
        outs.append(" ".join(dims))
    return ", ".join(ins) + " -> " + ", ".join(outs)


def _explicit_specs(leaves: Sequence[Any]) -> tuple[Any, list[Any]] | None:
    """``(abstract mesh, specs)`` when some leaf's type carries a mesh with ``Explicit`` axes (then
    the op runs inside :func:`jax.shard_map`, replicated operands included: the reference's inner
    ops would otherwise have to type-check every intermediate's sharding)."""
    mesh, specs, any_explicit = None, [], False
    for a in leaves:
        s = getattr(jax.typeof(a), "sharding", None)
        m = getattr(s, "mesh", None)
        ps = getattr(s, "spec", P())
        explicit = (
            m is not None
            and not m.empty
            and any(t == jax.sharding.AxisType.Explicit for t in getattr(m, "axis_types", ()))
        )
        if explicit:
            any_explicit = True
            mesh = m
        specs.append(ps if explicit else P())
    return (mesh, specs) if any_explicit else None


def _sharded(spec: _Spec) -> Callable[..., tuple[jax.Array, ...]]:
    def run(*leaves: jax.Array) -> tuple[jax.Array, ...]:
        explicit = _explicit_specs(leaves)
        if explicit is None:
            return tuple(_partitioned(spec, *leaves))
        mesh, specs = explicit
        token = _token_axes(spec, specs, [tuple(a.shape) for a in leaves])  # raises for anything else
        in_specs = tuple(
            P(token, *([None] * (len(a.shape) - 1))) if i < spec.num_token_inputs else P() for i, a in enumerate(leaves)
        )
        out_specs = tuple(P(token, *([None] * (nd - 1))) for nd in spec.out_ndims)
        f = jax.shard_map(lambda *a: tuple(spec.fn(*a)), mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                          check_vma=False)  # fmt: skip
        return tuple(f(*leaves))

    return run


# --------------------------------------------------------------------------------------------
# The three together
# --------------------------------------------------------------------------------------------


def apply(
    op: str,
    fn: Callable[..., tuple[jax.Array, ...]],
    leaves: Sequence[Any],
    names: Sequence[str],
    *,
    num_token_inputs: int,
    out_shapes: Sequence[tuple[int, ...]],
    rows_are_tokens: bool = True,
    not_per_token: str = "",
) -> tuple[jax.Array, ...]:
    """``fn(*leaves)`` with the rules of this module.

    ``fn`` maps array ``leaves`` (the first ``num_token_inputs`` of them token-major: row ``t`` is
    token ``t``; the others per-layer constants such as weight leaves) to a tuple of arrays of
    ``out_shapes``, token-major when ``rows_are_tokens`` (else ``not_per_token`` says why they are
    not, for the error). ``fn`` must be a function of its operands alone (no traced closure) and give
    each token's rows independently of the other tokens, so that running it per token shard is the
    same function. ``names`` name the leaves in errors.
    """
    leaves = list(leaves)
    if len(names) != len(leaves):
        raise ValueError(f"names: {len(names)} names for {len(leaves)} operands")
    shapes = [tuple(jax.typeof(a).shape) for a in leaves]
    spec = _Spec(
        op=op, fn=fn, names=tuple(names), num_token_inputs=num_token_inputs, rows_are_tokens=rows_are_tokens,
        not_per_token=not_per_token, out_ndims=tuple(len(s) for s in out_shapes),
        rule=_shardy_rule(names, shapes, num_token_inputs, [tuple(s) for s in out_shapes], rows_are_tokens),
    )  # fmt: skip
    body = inference_only(sequential_vmap(_sharded(spec)), op)
    return tuple(body(*leaves))
