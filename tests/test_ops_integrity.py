"""Hostile inputs to the public ops (issue 14): ids that would wrap, FFI off the GPU, non-finite
activations, and scalar arguments of the wrong kind. Each check fails on the code before the fix."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe import ops, parallel, quant, reference
from jax_megamoe.ops import MoEOptions
from tests.test_ops import _inputs, _small_weights

E = 16
WRAPS_TO_3 = 2**32 + 3  # int64 -> int32 keeps the low 32 bits: 3, a real expert


def _routing(seed: int = 0, t: int = 6, k: int = 4):
    x, idx, w = _inputs(seed, t=t, k=k, e=E)
    idx = np.array(idx, np.int64)
    idx[:, 0] = np.arange(t) % E  # every row routes somewhere, so a wrong route changes the output
    return x, idx, w


def _poisoned(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids with out-of-int32 entries, the same slots as -1, the same slots as the wrapped ids)."""
    bad, nowhere, wrapped = idx.copy(), idx.copy(), idx.copy()
    for r, (v, w) in enumerate([(WRAPS_TO_3, 3), (-(2**32) + 5, 5), (2**31, -(2**31)), (2**40 + 1, 1)]):
        bad[r, 1], nowhere[r, 1], wrapped[r, 1] = v, -1, w
    return bad, nowhere, wrapped


def test_route_ids_decides_before_the_cast():
    ids = np.array([[WRAPS_TO_3, -(2**32) + 5, 5, E, -1, 2**31 - 1]], np.int64)
    np.testing.assert_array_equal(np.asarray(reference.route_ids(ids, E)), [[-1, -1, 5, -1, -1, -1]])
    np.testing.assert_array_equal(np.asarray(reference.route_ids(ids)), [[-1, -1, 5, E, -1, 2**31 - 1]])
    with jax.enable_x64(True):
        got = reference.route_ids(jnp.asarray(ids), E)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), [[-1, -1, 5, -1, -1, -1]])
    i32 = jnp.asarray([[3, -7, E + 2]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(reference.route_ids(i32, E)), [[3, -1, -1]])


@pytest.mark.parametrize("mode", ["fp8", "fp8xfp4"])
@pytest.mark.parametrize("x64", [False, True])
def test_int64_ids_beyond_int32_route_nowhere(mode, x64):
    """With x64 off a NumPy int64 array reaches the op; with x64 on a jax int64 array does."""
    x, idx, w = _routing(1)
    bad, nowhere, wrapped = _poisoned(idx)
    weights = _small_weights(mode, seed=3)
    ctx = jax.enable_x64(True) if x64 else jax.enable_x64(False)
    with ctx:
        as_ids = (lambda a: jnp.asarray(a)) if x64 else (lambda a: a)
        for fn in (
            functools.partial(reference.mega_moe, mode=mode),
            functools.partial(ops.mega_moe, mode=mode),  # auto: the reference on CPU
        ):
            got = np.asarray(fn(x, as_ids(bad), w, weights))
            want = np.asarray(fn(x, nowhere.astype(np.int32), w, weights))
            wrong = np.asarray(fn(x, wrapped.astype(np.int32), w, weights))
            np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
            assert not np.array_equal(got.view(np.uint16), wrong.view(np.uint16))  # the test can fail
        pre = reference.pre_dispatch(x, as_ids(bad), w, mode=mode, num_max_tokens=8)
        np.testing.assert_array_equal(np.asarray(pre.topk_idx)[:4, 1], -1)
        mesh = jax.make_mesh((1,), ("ep",))
        y = parallel.ep_moe(x, as_ids(bad), w, weights, mesh=mesh, mode=mode)
        y0 = parallel.ep_moe(x, nowhere.astype(np.int32), w, weights, mesh=mesh, mode=mode)
        np.testing.assert_array_equal(np.asarray(y).view(np.uint16), np.asarray(y0).view(np.uint16))


def test_ffi_call_lowered_for_cuda_compares_before_the_cast():
    x, idx, w = _routing(2)
    weights = _small_weights("fp8", seed=3)
    with jax.enable_x64(True):
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, jnp.asarray(idx), w)]
        fn = functools.partial(
            ops.mega_moe, weights=weights, backend="ffi", options=MoEOptions(num_max_tokens=64, kernel="fused")
        )
        text = jax.jit(lambda a, b, c: fn(a, b, c)).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert "tensor<6x4xi64>" in text and "@jax_megamoe_mega_moe_sm90(" in text
    line = next(line for line in text.splitlines() if "stablehlo.compare" in line and "LT" in line)
    assert "i64" in line, line  # the range test runs on the int64 ids, before the int32 convert


@pytest.mark.parametrize("op", ["mega_moe", "pre_dispatch"])
def test_ffi_backend_without_a_gpu_is_one_clear_error(op):
    """backend='ffi' still lowers for cuda (test_ops), but running it on the host raises
    BackendUnavailableError itself, before anything runs: jitted (when XLA lowers it for the CPU),
    eagerly and under vmap; never a JaxRuntimeError from a host callback."""
    x, idx, w = _inputs(3, t=5)
    if op == "mega_moe":
        call = functools.partial(
            ops.mega_moe, weights=_small_weights("fp8", seed=1), options=MoEOptions(num_max_tokens=64)
        )
    else:
        call = functools.partial(ops.pre_dispatch, mode="fp8", num_max_tokens=64)
    ffi = functools.partial(call, backend="ffi")
    for run, args in ((jax.jit(ffi), (x, idx, w)), (ffi, (x, idx, w)), (jax.vmap(ffi), (x[None], idx[None], w[None]))):
        with pytest.raises(
            ops.BackendUnavailableError, match=rf"backend='ffi' for {op} runs DeepGEMM kernels.*use backend='auto'"
        ) as e:
            jax.block_until_ready(run(*args))
        assert "No FFI handler registered" not in str(e.value) and "CpuCallback" not in str(e.value)
    text = jax.jit(ffi).trace(x, idx, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "@jax_megamoe_" in text  # lowering for cuda is unaffected


def test_quantize_fp8_per128_nonfinite_semantics():
    """Follows the sm_90 pre-dispatch kernel (checked bit for bit on GPU in
    tests/gpu/test_pre_dispatch_gpu.py): an inf poisons its own 128-group (scale inf, every value
    dequantises to NaN) and nothing else; a NaN is ignored by the amax (fmaxf) and encodes as NaN."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 512)) * 4).astype(np.float32)
    clean_q, clean_s = (np.asarray(a) for a in quant.quantize_fp8_per128(jnp.asarray(x, jnp.bfloat16)))
    bad = x.copy()
    bad[0, 130] = np.inf  # row 0, group 1
    bad[1, 5] = np.nan  # row 1, group 0
    q, s = quant.quantize_fp8_per128(jnp.asarray(bad, jnp.bfloat16))
    d = np.asarray(quant.dequantize_fp8_per128(q, s))
    q, s = np.asarray(q).view(np.uint8), np.asarray(s)
    assert np.isinf(s[0, 1]) and np.isnan(d[0, 128:256]).all()
    assert (q[0, 128:256][np.arange(128) != 2] & 0x7F == 0).all() and q[0, 130] == 0x7F
    keep = np.ones_like(q, bool)
    keep[0, 128:256] = False
    keep[1, 5] = False
    np.testing.assert_array_equal(q[keep], clean_q.view(np.uint8)[keep])  # other groups untouched
    assert q[1, 5] & 0x7F == 0x7F and s[1, 0] == clean_s[1, 0]  # NaN: ignored by the amax
    assert np.isfinite(np.delete(d[1], 5)).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            dict(activation_clamp="10"),
            TypeError,
            r"activation_clamp: got '10' \(str\); expected a static Python float or None",
        ),
        (dict(activation_clamp=[1.0]), TypeError, r"activation_clamp: got \[1.0\]"),
        (dict(activation_clamp=True), TypeError, r"activation_clamp: got True"),
        (dict(activation_clamp=float("nan")), ValueError, r"activation_clamp: nan"),
        (dict(activation_clamp=-1.0), ValueError, r"activation_clamp: -1.0 must be >= 0"),
        (dict(routed_scaling_factor="x"), TypeError, r"routed_scaling_factor: got 'x' \(str\)"),
        (dict(routed_scaling_factor=np.ones(2)), TypeError, r"routed_scaling_factor: got array"),
        (dict(routed_scaling_factor=float("inf")), ValueError, r"routed_scaling_factor: inf must be a finite"),
        (dict(num_max_tokens="64"), TypeError, r"num_max_tokens: got '64' \(str\); expected a static Python int"),
        (dict(num_max_tokens=64.0), TypeError, r"num_max_tokens: got 64.0 \(float\)"),
        (dict(reserved_sms=-1), ValueError, r"reserved_sms: -1 must be >= 0"),
    ],
)
@pytest.mark.parametrize("entry", ["ops", "reference"])
def test_scalar_arguments_are_named(entry, kwargs, exc, match):
    x, idx, w = _inputs(4, t=5)
    weights = _small_weights("fp8", seed=2)
    if entry == "reference":
        if "reserved_sms" in kwargs:
            pytest.skip("reference has no reserved_sms")
        fn = functools.partial(reference.mega_moe, mode="fp8")
    else:
        fn = ops.mega_moe
    kwargs = dict(kwargs)  # shared by the parametrized cases
    clamp = kwargs.pop("activation_clamp", None)
    options = MoEOptions(**kwargs) if kwargs else None
    with pytest.raises(exc, match=match):
        fn(x, idx, w, weights, activation_clamp=clamp, options=options)


@pytest.mark.parametrize(
    "chunk_rows, exc, match",
    [
        ("8", TypeError, r"chunk_rows: got '8'"),
        (2.5, TypeError, r"chunk_rows: got 2.5"),
        (0, ValueError, r"chunk_rows: 0 must be >= 1"),
    ],
)
def test_chunk_rows_is_named(chunk_rows, exc, match):
    x, idx, w = _inputs(5, t=5)
    with pytest.raises(exc, match=match):
        reference.mega_moe(
            x, idx, w, _small_weights("fp8", seed=2), mode="fp8", options=MoEOptions(chunk_rows=chunk_rows)
        )


def test_traced_clamp_is_named_and_traced_scaling_factor_is_folded():
    x, idx, w = _inputs(6, t=5)
    weights = _small_weights("fp8", seed=2)
    for fn in (ops.mega_moe, functools.partial(reference.mega_moe, mode="fp8")):
        with pytest.raises(TypeError, match=r"activation_clamp: got a traced value inside jax.jit; expected a static"):
            jax.jit(lambda c, fn=fn: fn(x, idx, w, weights, activation_clamp=c))(10.0)
    # a traced routed_scaling_factor is data: folded into the weights (same bits as a static one)
    for fn in (ops.mega_moe, functools.partial(reference.mega_moe, mode="fp8")):
        got = jax.jit(lambda r, fn=fn: fn(x, idx, w, weights, options=MoEOptions(routed_scaling_factor=r)))(1.5)
        want = fn(x, idx, w, weights, options=MoEOptions(routed_scaling_factor=1.5))
        np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
    got = jax.jit(lambda r: ops.pre_dispatch(x, idx, w, mode="fp8", num_max_tokens=8, routed_scaling_factor=r))(1.5)
    want = reference.pre_dispatch(x, idx, w, mode="fp8", num_max_tokens=8, routed_scaling_factor=1.5)
    np.testing.assert_array_equal(np.asarray(got.topk_weights), np.asarray(want.topk_weights))
    lowered = (
        jax.jit(
            lambda a, b, c, r: ops.mega_moe(
                a,
                b,
                c,
                weights,
                backend="ffi",
                options=MoEOptions(routed_scaling_factor=r, num_max_tokens=64, kernel="fused"),
            )
        )
        .trace(x, idx, w, 1.5)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    line = next(line for line in lowered.splitlines() if "@jax_megamoe_mega_moe_sm90(" in line)
    assert "routed_scaling_factor = 1.000000e+00" in line  # folded before the kernel
