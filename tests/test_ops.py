"""ops.py on CPU: backend choice, validation, and the FFI custom call as lowered for CUDA."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe._src.kernels import ops
from jax_megamoe.ops import MoEOptions


def _inputs(seed, t=5, h=512, k=4, e=16):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, h)) * 3, jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-1, e, size=(t, k)), jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    return x, idx, w


def _lower_cuda(fn, *args) -> str:
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "mode, target, xq_type, sf_type, kind, group",
    [
        ("fp8", "jax_megamoe_pre_dispatch_sm90", "tensor<256x512xf8E4M3FN>", "tensor<256x4xf32>", 0, 128),
        ("fp8xfp4", "jax_megamoe_pre_dispatch_sm100", "tensor<256x512xf8E4M3FN>", "tensor<256x4xi32>", 1, 32),
        ("mxf4xmxf4", "jax_megamoe_pre_dispatch_sm100", "tensor<256x256xui8>", "tensor<256x4xi32>", 2, 32),
    ],
)
def test_pre_dispatch_lowers_to_the_custom_call(mode, target, xq_type, sf_type, kind, group):
    x, idx, w = _inputs(0)
    fn = functools.partial(ops.pre_dispatch, mode=mode, num_max_tokens=256, routed_scaling_factor=1.5, backend="ffi")
    text = _lower_cuda(fn, x, idx, w)
    calls = re.findall(r"stablehlo\.custom_call @(\w+)\(([^)]*)\).*", text)
    assert [c[0] for c in calls] == [target], text
    line = next(line for line in text.splitlines() if f"@{target}" in line)
    for attr in ("hidden = 512", "top_k = 4", "capacity = 256", f"group = {group}", f"mma_kind = {kind}"):
        assert attr in line, (attr, line)
    rsf = "1.500000e+00" if mode == "fp8" else "1.000000e+00"  # sm_100 folds the factor before the kernel
    assert f"routed_scaling_factor = {rsf}" in line, line
    assert xq_type in line and sf_type in line and "tensor<256x4x2xi32>" in line, line
    if mode != "fp8":
        assert "stablehlo.multiply" in text  # the folded routed scaling factor


def test_auto_backend_on_cpu_matches_the_float64_quantiser():
    """backend='auto' on CPU (the reference path) against the independent float64 numpy quantiser of
    test_reference.py: slot bytes and scales bit for bit, routing copied, weights times the factor,
    padding rows zero / -1."""
    from test_reference import np_quantize_x

    x, idx, w = _inputs(1)
    t, cap = x.shape[0], 64
    for mode in ("fp8", "fp8xfp4", "mxf4xmxf4"):
        got = ops.pre_dispatch(x, idx, w, mode=mode, num_max_tokens=cap, routed_scaling_factor=2.0)
        xq, xsf, _ = np_quantize_x(np.asarray(x), mode)
        gx = np.asarray(got.x).view(np.uint8)
        np.testing.assert_array_equal(gx[:t], xq)
        np.testing.assert_array_equal(np.asarray(got.x_sf)[:t].view(np.uint32), np.asarray(xsf).view(np.uint32))
        assert not gx[t:].any() and not np.asarray(got.x_sf)[t:].view(np.uint32).any()
        np.testing.assert_array_equal(np.asarray(got.topk_idx)[:t], np.asarray(idx))
        assert (np.asarray(got.topk_idx)[t:] == -1).all()
        want_w = (np.asarray(w) * np.float32(2.0)).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got.topk_weights)[:t].view(np.uint32), want_w.view(np.uint32))
        assert gx[:t].any()
    assert ops.choose_backend("auto", "fp8", op="t") == "reference"
    assert ops.choose_backend("ffi", "fp8", op="t") == "ffi"  # no GPU present: lowering-only use is allowed


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda x, i, w: (x.astype(jnp.float32), i, w), TypeError, "x: dtype float32"),
        (lambda x, i, w: (x, i.astype(jnp.float32), w), TypeError, "topk_idx: dtype float32"),
        (lambda x, i, w: (x, i, w.astype(jnp.bfloat16)), TypeError, "topk_weights: dtype bfloat16"),
        (lambda x, i, w: (x, i[:, :2], w), ValueError, "topk_weights: expected shape"),
        (lambda x, i, w: (x[:, :500], i, w), ValueError, "hidden: 500"),
        (lambda x, i, w: (jnp.zeros((3, 8448), jnp.bfloat16), i[:3], w[:3]), ValueError, "hidden: 8448"),
        (lambda x, i, w: (x[0], i, w), ValueError, "x: expected a rank-2"),
    ],
)
def test_pre_dispatch_rejects_bad_inputs(change, exc, match):
    x, idx, w = change(*_inputs(2))
    with pytest.raises(exc, match=match):
        ops.pre_dispatch(x, idx, w, mode="fp8", num_max_tokens=64)


def test_pre_dispatch_rejects_bad_options():
    x, idx, w = _inputs(3)
    with pytest.raises(ValueError, match="num_max_tokens=4"):
        ops.pre_dispatch(x, idx, w, mode="fp8", num_max_tokens=4)
    with pytest.raises(ValueError, match="backend: 'cuda'"):
        ops.pre_dispatch(x, idx, w, mode="fp8", num_max_tokens=64, backend="cuda")
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        ops.pre_dispatch(x, idx, w, mode="fp8", num_max_tokens=64, routed_scaling_factor=float("nan"))
    with pytest.raises(ValueError, match="mode: 'fp4'"):
        ops.pre_dispatch(x, idx, w, mode="fp4", num_max_tokens=64)


def _small_weights(mode, seed=0, e=16, h=512, i=256):
    from jax_megamoe.layout import MoEWeights

    rng = np.random.default_rng(seed)
    w13 = rng.integers(0, 256, size=(e, 2 * i, h // 2), dtype=np.uint8)
    w13s = rng.integers(118, 124, size=(e, 2 * i, h // 32), dtype=np.uint8)
    w2 = rng.integers(0, 256, size=(e, h, i // 2), dtype=np.uint8)
    w2s = rng.integers(118, 124, size=(e, h, i // 32), dtype=np.uint8)
    return MoEWeights.from_checkpoint(w13, w13s, w2, w2s, mode=mode)


def test_mega_moe_lowers_to_the_sm90_custom_call():
    x, idx, w = _inputs(4, t=7)
    weights = _small_weights("fp8")
    fn = functools.partial(
        ops.mega_moe,
        weights=weights,
        activation_clamp=10.0,
        backend="ffi",  # T*K = 28: "auto" would take the decode kernels at this shape
        options=MoEOptions(routed_scaling_factor=1.5, num_max_tokens=200, kernel="fused"),
    )
    text = _lower_cuda(lambda x, i, w: fn(x, i, w), x, idx, w)
    line = next(line for line in text.splitlines() if "@jax_megamoe_mega_moe_sm90" in line)
    for attr in (
        "hidden = 512",
        "intermediate = 256",
        "num_experts = 16",
        "top_k = 4",
        "capacity = 256",
        "activation_clamp = 1.000000e+01",
        "routed_scaling_factor = 1.500000e+00",
        "reserved_sms = 2",
        "num_ranks = 1",
        "rank_devices = dense<> : tensor<0xi64>",
        "sm90_wide_tile = false",
    ):
        assert attr in line, (attr, line)
    assert "has_side_effect = true" in line and "-> tensor<7x512xbf16>" in line, line
    # ids >= E are turned into -1 (skipped, as the reference skips them) before the kernel sees them
    assert re.search(r"stablehlo.compare\s+LT, %arg1, .*tensor<7x4xi32>", text), text


def test_mega_moe_graph_target_follows_the_policy(monkeypatch):
    """policy.graph_targets (JAX_MEGAMOE_GRAPH_TARGETS=1, read once) selects the command-buffer
    compatible sm_90 twin; the sm_100 target has no twin and stays. os.environ at trace time is
    not read."""
    from jax_megamoe.policy import Policy

    x, idx, w = _inputs(5, t=7)
    weights = _small_weights("fp8")
    on, off = Policy(graph_targets=True), Policy()

    def fn(x, i, w, policy):
        options = MoEOptions(num_max_tokens=200, kernel="fused", policy=policy)
        return ops.mega_moe(x, i, w, weights, backend="ffi", options=options)

    monkeypatch.setenv("JAX_MEGAMOE_GRAPH_TARGETS", "0")  # ignored: the policy decides
    text = _lower_cuda(lambda x, i, w: fn(x, i, w, policy=on), x, idx, w)
    assert "@jax_megamoe_mega_moe_sm90_graph(" in text
    monkeypatch.setenv("JAX_MEGAMOE_GRAPH_TARGETS", "1")
    text = _lower_cuda(lambda x, i, w: fn(x, i, w, policy=off), x, idx, w)
    assert "@jax_megamoe_mega_moe_sm90(" in text and "_graph" not in text
    x100 = _small_weights("fp8xfp4", seed=4)
    text = _lower_cuda(
        lambda x, i, w: ops.mega_moe(x, i, w, x100, backend="ffi", options=MoEOptions(policy=on)), x, idx, w
    )
    assert "@jax_megamoe_mega_moe_sm100(" in text


@pytest.mark.parametrize("mode, kind", [("mxf4xmxf4", 2), ("fp8xfp4", 1)])
def test_mega_moe_sm100_lowers_to_its_custom_call(mode, kind):
    x, idx, w = _inputs(8, t=9)
    weights = _small_weights(mode, seed=4)
    fn = functools.partial(
        ops.mega_moe,
        weights=weights,
        activation_clamp=10.0,
        backend="ffi",
        options=MoEOptions(routed_scaling_factor=1.5),
    )
    text = _lower_cuda(lambda x, i, w: fn(x, i, w), x, idx, w)
    line = next(line for line in text.splitlines() if "@jax_megamoe_mega_moe_sm100" in line)
    for attr in (f"mma_kind = {kind}", "capacity = 1920", "routed_scaling_factor = 1.500000e+00", "top_k = 4"):
        assert attr in line, (attr, line)
    assert "tensor<16x256x512xi32>" not in line  # sanity: SF operands are [E, K/128, MN]
    assert "tensor<16x4x512xi32>" in line and "tensor<16x2x512xi32>" in line, line


def _oracle_case(mode, seed, t):
    """(x, idx, w, weights, float64 emulating oracle output) from test_reference.py's generators."""
    from test_reference import make_routing, make_weights, make_x, np_moe, np_quantize_x

    rng = np.random.default_rng(seed)
    weights, w13, w2 = make_weights(mode, 16, 512, 256, seed=seed)
    x = make_x(rng, t, 512, 4.0)
    idx, w = make_routing(rng, t, 4, 16, drop=0.2)
    _, _, xd = np_quantize_x(x, mode)
    want = np_moe(xd, idx, w.astype(np.float64), w13, w2, mode=mode, clamp=10.0, emulate=True)
    return jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), weights, want


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("mode", ["fp8xfp4", "fp8"])
def test_mega_moe_auto_on_cpu_matches_the_float64_oracle(mode):
    """backend='auto' on CPU against test_reference.py's float64 MoE oracle (same rounding steps,
    float64 accumulation): within 1e-3; swapping the slots' weights moves it far (the check can fail)."""
    x, idx, w, weights, want = _oracle_case(mode, 6, t=24)
    got = ops.mega_moe(x, idx, w, weights, activation_clamp=10.0)
    assert _rel_l2(np.asarray(got, np.float32), want) < 1e-3 and np.linalg.norm(want) > 0
    swapped = ops.mega_moe(x, idx, w[:, ::-1], weights, activation_clamp=10.0)
    assert _rel_l2(np.asarray(swapped, np.float32), want) > 0.1


def test_mega_moe_errors():
    x, idx, w = _inputs(7, t=5)
    fp8 = _small_weights("fp8", seed=2)
    with pytest.raises(ValueError, match="num_max_tokens: 0"):
        ops.mega_moe(x, idx, w, fp8, options=MoEOptions(num_max_tokens=0))
    with pytest.raises(ValueError, match="weights: built for mode 'fp8'"):
        ops.mega_moe(x, idx, w, fp8, mode="fp8xfp4")
    with pytest.raises(TypeError, match="weights: expected"):
        ops.mega_moe(x, idx, w, weights=None, mode="fp8")
    with pytest.raises(ValueError, match="activation_clamp"):
        ops.mega_moe(x, idx, w, fp8, activation_clamp=-1.0)
    with pytest.raises(ValueError, match="weights: hidden is 512"):
        ops.mega_moe(jnp.zeros((5, 1024), jnp.bfloat16), idx, w, fp8)
    # above the cap off the GPU, auto runs the reference: the same MoE
    x, idx, w, weights, want = _oracle_case("fp8", 7, t=9)
    y = ops.mega_moe(x, idx, w, weights, activation_clamp=10.0, backend="auto", options=MoEOptions(num_max_tokens=4))
    assert _rel_l2(np.asarray(y, np.float32), want) < 1e-3


@pytest.mark.parametrize(
    "t, cap, prefill, want",
    [(5, None, 4096, 1024), (1024, None, 4096, 1024), (1025, None, 4096, 2048), (3000, None, 4096, 4096),
     (9000, None, 4096, 4096), (9000, None, 16384, 16384), (9000, 512, 4096, 512), (0, None, 4096, 1024)],
)  # fmt: skip
def test_token_cap(t, cap, prefill, want):
    from jax_megamoe.policy import Policy

    assert ops.token_cap(t, cap, Policy(prefill_token_cap=prefill)) == want


def test_above_the_cap_the_kernel_runs_in_chunks(monkeypatch):
    """Past its buffer's cap a call runs the fused kernel once per chunk of the (aligned) cap and
    puts the rows back in order; with a stand-in kernel (the reference on each chunk) the result
    is the reference's on the whole call."""
    from jax_megamoe._src.numerics import reference

    x, idx, w, weights, _ = _oracle_case("fp8", 11, t=300)
    calls = []

    def fake_kernel(x, topk_idx, topk_weights, weights, call):
        assert x.shape[0] <= call.capacity
        calls.append((x.shape[0], call.capacity))
        return reference.mega_moe(x, topk_idx, topk_weights, weights, mode=call.mode, activation_clamp=10.0)

    monkeypatch.setattr(ops, "choose_backend", lambda backend, mode, op: "ffi")
    monkeypatch.setattr(ops, "mega_moe_target_call", fake_kernel)
    y = ops.mega_moe(x, idx, w, weights, activation_clamp=10.0,
                     options=MoEOptions(num_max_tokens=100, kernel="fused"))  # fmt: skip
    assert calls == [(128, 128), (128, 128), (44, 128)]  # the cap 100 is aligned to 128 rows
    want = reference.mega_moe(x, idx, w, weights, mode="fp8", activation_clamp=10.0)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16), np.asarray(want).view(np.uint16))


@pytest.mark.parametrize("arch, mode", [(8, "fp8"), (9, "mxf4xmxf4"), (10, "fp8"), (12, "fp8xfp4")])
def test_unsupported_gpu_is_one_clear_error(monkeypatch, arch, mode):
    monkeypatch.setattr(ops, "device_arch", lambda: arch)
    x, idx, w = _inputs(5)
    with pytest.raises(ops.BackendUnavailableError, match=rf"needs an sm_\d+0 GPU.*sm_{arch}x"):
        ops.pre_dispatch(x, idx, w, mode=mode, num_max_tokens=64, backend="ffi")
    # auto never fails on a GPU it cannot use: it runs the reference
    assert ops.choose_backend("auto", mode, op="t") == "reference"


def test_auto_keeps_the_unvalidated_sm100_mega_kernel_opt_in(monkeypatch):
    x, idx, w = _inputs(9, t=5)
    weights = _small_weights("fp8xfp4", seed=6)
    monkeypatch.setattr(ops, "device_arch", lambda: 10)
    monkeypatch.setattr(ops, "_ffi_ready", lambda: (True, ""))
    from jax_megamoe.policy import Policy

    text = _lower_cuda(lambda x, i, w: ops.mega_moe(x, i, w, weights, options=MoEOptions(policy=Policy())), x, idx, w)
    assert "jax_megamoe_mega_moe_sm100" not in text  # reference
    opted_in = Policy.from_environ({"JAX_MEGAMOE_SM100_MEGA": "1"})
    text = _lower_cuda(lambda x, i, w: ops.mega_moe(x, i, w, weights, options=MoEOptions(policy=opted_in)), x, idx, w)
    assert "@jax_megamoe_mega_moe_sm100" in text
