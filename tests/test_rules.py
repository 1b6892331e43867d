"""JAX transformations of the ops (jax_megamoe/kernels/_rules.py): vmap, grad and sharded jit.

vmap and grad run here, on CPU with the reference backend, and with ``backend="ffi"`` as lowered
for CUDA (no GPU needed). The sharded-jit checks need 8 CPU devices and run in a fresh interpreter
(tests/rules_worker.py).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_megamoe
from jax_megamoe import reference
from jax_megamoe._src.kernels import _rules, ops
from jax_megamoe.layout import MoEWeights
from jax_megamoe.ops import MoEOptions

WORKER = Path(__file__).with_name("rules_worker.py")
H, I, E, K = 512, 256, 16, 4


def _inputs(seed, t=6, b=None):
    rng = np.random.default_rng(seed)
    lead = (t,) if b is None else (b, t)
    x = jnp.asarray(rng.standard_normal((*lead, H)) * 3, jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-1, E, size=(*lead, K)), jnp.int32)
    w = jnp.asarray(rng.random((*lead, K)), jnp.float32)
    return x, idx, w


@functools.cache
def _weights(mode, seed=0):
    rng = np.random.default_rng(seed)
    w13 = rng.integers(0, 256, size=(E, 2 * I, H // 2), dtype=np.uint8)
    w13s = rng.integers(118, 124, size=(E, 2 * I, H // 32), dtype=np.uint8)
    w2 = rng.integers(0, 256, size=(E, H, I // 2), dtype=np.uint8)
    w2s = rng.integers(118, 124, size=(E, H, I // 32), dtype=np.uint8)
    return MoEWeights.from_checkpoint(w13, w13s, w2, w2s, mode=mode)


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _lower_cuda(fn, *args) -> str:
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


def test_errors_are_exported():
    assert jax_megamoe.InferenceOnlyError is _rules.InferenceOnlyError
    assert jax_megamoe.ShardingError is _rules.ShardingError
    assert issubclass(jax_megamoe.InferenceOnlyError, TypeError)
    assert issubclass(jax_megamoe.ShardingError, ValueError)


# ------------------------------------------------------------------------------------------------
# vmap
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fp8", "fp8xfp4"])
def test_vmap_mega_moe_is_the_loop_bit_for_bit(mode):
    """vmap over a batch of token sets (weights shared): each element equals the unbatched op."""
    x, idx, w = _inputs(1, b=3)
    wts = _weights(mode, seed=1)
    f = functools.partial(
        ops.mega_moe, weights=wts, activation_clamp=8.0, options=MoEOptions(routed_scaling_factor=1.5)
    )
    got = jax.jit(jax.vmap(lambda a, b, c: f(a, b, c)))(x, idx, w)
    assert got.shape == (3, 6, H)
    for j in range(3):
        want = reference.mega_moe(
            x[j], idx[j], w[j], wts, mode=mode, activation_clamp=8.0, options=MoEOptions(routed_scaling_factor=1.5)
        )
        np.testing.assert_array_equal(_bits(got[j]), _bits(want))
    assert not np.array_equal(_bits(got[0]), _bits(got[1]))  # the elements differ: the test can fail


def test_vmap_over_layers_and_in_axes():
    """Weights batched too (two layers stacked), x shared (in_axes=None): layer j's output."""
    x, idx, w = _inputs(2)
    a, b = _weights("fp8", seed=2), _weights("fp8", seed=3)
    stacked = jax.tree.map(lambda p, q: jnp.stack([p, q]), a, b)
    got = jax.vmap(lambda ww: ops.mega_moe(x, idx, w, ww))(stacked)
    for j, wj in enumerate((a, b)):
        np.testing.assert_array_equal(_bits(got[j]), _bits(reference.mega_moe(x, idx, w, wj, mode="fp8")))
    assert not np.array_equal(_bits(got[0]), _bits(got[1]))
    # the routing batched on axis 1 (in_axes=1), weights shared
    xs, ids, ws = _inputs(3, b=2)
    got = jax.vmap(lambda p, q, r: ops.mega_moe(p, q, r, a), in_axes=(0, 1, 1))(
        xs, ids.swapaxes(0, 1), ws.swapaxes(0, 1)
    )
    for j in range(2):
        np.testing.assert_array_equal(_bits(got[j]), _bits(reference.mega_moe(xs[j], ids[j], ws[j], a, mode="fp8")))


def test_vmap_pre_dispatch_is_the_loop():
    x, idx, w = _inputs(4, b=2)
    got = jax.vmap(lambda a, b, c: ops.pre_dispatch(a, b, c, mode="fp8xfp4", num_max_tokens=16))(x, idx, w)
    for j in range(2):
        want = reference.pre_dispatch(x[j], idx[j], w[j], mode="fp8xfp4", num_max_tokens=16)
        for g, e in zip(got, want):
            np.testing.assert_array_equal(_bits(g[j]), _bits(e))


def test_vmap_ffi_lowers_to_one_kernel_call_per_element():
    """backend='ffi': vmap lowers to a loop around the unbatched custom call (the kernel's own shapes)."""
    x, idx, w = _inputs(5, b=3, t=7)
    wts = _weights("fp8", seed=5)
    text = _lower_cuda(
        jax.vmap(
            lambda a, b, c: ops.mega_moe(
                a, b, c, wts, backend="ffi", options=MoEOptions(num_max_tokens=200, kernel="fused")
            )
        ),
        x,
        idx,
        w,
    )
    calls = [ln for ln in text.splitlines() if "@jax_megamoe_mega_moe_sm90" in ln]
    assert len(calls) == 1 and "-> tensor<7x512xbf16>" in calls[0], calls
    assert "stablehlo.while" in text
    assert re.search(r"func.func public @main.*-> \(tensor<3x7x512xbf16>", text), text[:2000]
    text = _lower_cuda(jax.vmap(lambda a, b, c: ops.pre_dispatch(a, b, c, mode="fp8", num_max_tokens=8, backend="ffi")),
                       x, idx, w)  # fmt: skip
    assert "@jax_megamoe_pre_dispatch_sm90" in text and "stablehlo.while" in text


def test_vmap_of_the_bare_custom_call_is_sequential():
    """The custom call itself (what parallel's fused path calls) has vmap_method='sequential'."""
    x, idx, w = _inputs(6, b=2, t=5)
    wts = _weights("fp8", seed=6)
    spec = ops.MegaMoECall("fp8", num_experts=E, capacity=128)
    call = functools.partial(ops.mega_moe_target_call, weights=wts, call=spec)
    text = _lower_cuda(jax.vmap(lambda a, b, c: call(a, b, c)), x, idx, w)
    assert "stablehlo.while" in text and "-> tensor<5x512xbf16>" in text
    with pytest.raises(jax_megamoe.InferenceOnlyError, match="inference-only"):
        _lower_cuda(jax.grad(lambda a, b, c: call(a.astype(jnp.bfloat16), b, c).astype(jnp.float32).sum()),
                    x[0].astype(jnp.float32), idx[0], w[0])  # fmt: skip


# ------------------------------------------------------------------------------------------------
# grad
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "ffi"])
def test_grad_is_a_clear_error(backend):
    x, idx, w = _inputs(7)
    wts = _weights("fp8", seed=7)
    xf = x.astype(jnp.float32)

    def loss_x(a):
        return ops.mega_moe(a.astype(jnp.bfloat16), idx, w, wts, backend=backend).astype(jnp.float32).sum()

    def loss_w(c):
        return ops.mega_moe(x, idx, c, wts, backend=backend).astype(jnp.float32).sum()

    run = (lambda f, *a: f(*a)) if backend == "reference" else (lambda f, *a: _lower_cuda(f, *a))
    for fn, arg in ((jax.grad(loss_x), xf), (jax.grad(loss_w), w)):
        with pytest.raises(
            jax_megamoe.InferenceOnlyError, match=r"jax_megamoe.mega_moe is inference-only.*stop_gradient"
        ):
            run(fn, arg)
    with pytest.raises(jax_megamoe.InferenceOnlyError, match="pre_dispatch is inference-only"):
        run(jax.grad(lambda a: ops.pre_dispatch(a.astype(jnp.bfloat16), idx, w, mode="fp8", num_max_tokens=8,
                                                backend=backend).topk_weights.sum()), xf)  # fmt: skip
    with pytest.raises(jax_megamoe.InferenceOnlyError):
        jax.jvp(loss_w, (w,), (jnp.ones_like(w),)) if backend == "reference" else _lower_cuda(
            lambda c: jax.jvp(loss_w, (c,), (jnp.ones_like(c),)), w
        )


def test_grad_elsewhere_is_unaffected():
    """A gradient that does not flow through the op (stop_gradient on its inputs) is the exact one."""
    x, idx, w = _inputs(8)
    wts = _weights("fp8", seed=8)
    y = ops.mega_moe(x, idx, w, wts).astype(jnp.float32)

    def loss(s):
        out = ops.mega_moe(jax.lax.stop_gradient(x), idx, w, wts).astype(jnp.float32)
        return (s * out).sum()

    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(jnp.float32(2.0))), np.asarray(y.sum()))
    assert float(jnp.abs(y).sum()) > 0


# ------------------------------------------------------------------------------------------------
# Sharded jit (8 virtual CPU devices, fresh interpreter)
# ------------------------------------------------------------------------------------------------

WORKER_CHECKS = (
    "devices",
    *(f"{p}token_sharded_{k}_{m}" for k in ("Auto", "Explicit") for m in ("fp8", "fp8xfp4", "mxf4xmxf4")
      for p in ("", "pre_dispatch_")),
    *(f"expert_sharded_{k}_{b}" for k in ("Auto", "Explicit") for b in ("auto", "ffi")),
    "without_the_rule_xla_gathers",
    "hidden_sharded",
    "pre_dispatch_padded_sharded",
    "replicated_runs_whole",
    "ffi_token_sharded_lowers_per_shard",
)  # fmt: skip


def test_sharded_jit_8_virtual_devices():
    """Token-sharded operands run per shard (bit-exact, no collective, Auto and Explicit meshes,
    every mode, mega_moe and pre_dispatch); expert- or hidden-sharded ones raise ShardingError;
    without the rule the same call gathers."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=WORKER.parent.parent)  # fmt: skip
    out = proc.stdout + proc.stderr
    got = {}
    for line in out.splitlines():
        if line.startswith("CHECK "):
            parts = line.split(" ", 3)
            got[parts[1]] = parts[2]
    bad = {name: got.get(name, "missing") for name in WORKER_CHECKS if got.get(name) != "ok"}
    assert proc.returncode == 0 and not bad, f"rc={proc.returncode} bad={bad}\n{out[-4000:]}"


# ------------------------------------------------------------------------------------------------
# The rule's pieces
# ------------------------------------------------------------------------------------------------


def test_shardy_rule_shares_the_token_and_expert_factors():
    rule = _rules._shardy_rule(
        ["x", "i", "w", "l1", "l2"], [(8, 512), (8, 4), (8, 4), (16, 3, 5), (16, 7)], 3, [(8, 512)], True
    )
    assert rule == "t d0, t d1, t d2, e d3 d4, e d5 -> t d6"
    # pre_dispatch's padded buffer: its rows are not the tokens
    rule = _rules._shardy_rule(["x", "i", "w"], [(8, 512), (8, 4), (8, 4)], 3, [(16, 512), (16, 4)], False)
    assert rule == "t d0, t d1, t d2 -> d3 d4, d5 d6"


def test_token_axes_names_what_is_sharded():
    from jax.sharding import PartitionSpec as P

    spec = _rules._Spec(op="mega_moe", fn=lambda *a: a, names=("x", "topk_idx", "topk_weights", "weights.l1"),
                        num_token_inputs=3, rows_are_tokens=True, not_per_token="", rule="", out_ndims=(2,))  # fmt: skip
    shapes = [(8, 512), (8, 4), (8, 4), (16, 3, 5)]
    assert _rules._token_axes(spec, [P(("a", "b")), P("a"), P(), P()], shapes) == ("a", "b")
    assert _rules._token_axes(spec, [P(), P(), P(), P()], shapes) is None
    with pytest.raises(_rules.ShardingError, match=r"weights.l1 .* mesh axis 'ep' on its expert dim.*ep_moe"):
        _rules._token_axes(spec, [P("a"), P(), P(), P("ep")], shapes)
    with pytest.raises(_rules.ShardingError, match=r"weights.l1 .* on dim 2 .*whole per-expert matrices"):
        _rules._token_axes(spec, [P(), P(), P(), P(None, None, "tp")], shapes)
    with pytest.raises(_rules.ShardingError, match=r"topk_idx .* on dim 1"):
        _rules._token_axes(spec, [P(), P(None, "k"), P(), P()], shapes)


def test_ep_moe_grad_is_a_clear_error():
    """parallel.ep_moe (one-device mesh, collective reference path) under grad: InferenceOnlyError."""
    from jax_megamoe import parallel

    x, idx, w = _inputs(9, t=4)
    wts = _weights("fp8", seed=9)
    mesh = jax.make_mesh((1,), ("ep",))
    y = parallel.ep_moe(x, idx, w, wts, mesh=mesh, mode="fp8")
    np.testing.assert_array_equal(_bits(y), _bits(reference.mega_moe(x, idx, w, wts, mode="fp8")))
    with pytest.raises(jax_megamoe.InferenceOnlyError, match="parallel.ep_moe is inference-only"):
        jax.grad(lambda c: parallel.ep_moe(x, idx, c, wts, mesh=mesh, mode="fp8").astype(jnp.float32).sum())(w)
