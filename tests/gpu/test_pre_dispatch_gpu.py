"""sm_90 pre-dispatch through XLA FFI equals the pure-JAX reference bit for bit (GPU only)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe import ops, reference

GPU_ARCH = ops.device_arch()

pytestmark = pytest.mark.gpu

CAP = 512  # buffer capacity used for these tests (a multiple of 128, as the sm_90 kernel sizes it)


def _inputs(seed: int, t: int, h: int, k: int, num_experts: int = 256):
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0.0, 2.0, size=(t, 1)))  # per-token dynamic range, 1e-3 .. 1e3
    x = rng.standard_normal((t, h)) * scale
    x[:, rng.integers(0, h, size=3)] *= 50.0  # outlier columns
    if t > 2:
        x[1] = 0.0  # an all-zero token (exercises the amax floor)
        x[2] *= 1e-30  # tiny values (bf16 subnormals after rounding)
    idx = rng.integers(0, num_experts, size=(t, k)).astype(np.int32)
    idx[rng.random((t, k)) < 0.1] = -1
    w = rng.random((t, k)).astype(np.float32)
    return jnp.asarray(x, jnp.bfloat16), jnp.asarray(idx), jnp.asarray(w)


def _bytes(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


def _reference_on_cpu(x, idx, w, *, mode, cap, rsf):
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        xs, ids, ws = (jax.device_put(np.asarray(a), cpu) for a in (x, idx, w))
        return reference.pre_dispatch(xs, ids, ws, mode=mode, num_max_tokens=cap, routed_scaling_factor=rsf)


@functools.cache
def _jitted(mode: str, cap: int, rsf: float):
    return jax.jit(
        functools.partial(ops.pre_dispatch, mode=mode, num_max_tokens=cap, routed_scaling_factor=rsf, backend="ffi")
    )


def _assert_equal_slots(got, want, t: int):
    names = ("x", "x_sf", "topk_idx", "topk_weights")
    for name, g, w in zip(names, got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        gb, wb = _bytes(g), _bytes(w)
        bad = np.argwhere(gb != wb)
        assert bad.size == 0, f"{name}: {len(bad)} mismatching elements, first at {bad[:5].tolist()}"


@pytest.mark.skipif(GPU_ARCH != 9, reason="sm_90 kernels need an H100/H200")
@pytest.mark.parametrize("hidden", [4096, 7168])
@pytest.mark.parametrize("t", [1, 7, 128, CAP])
def test_sm90_pre_dispatch_bit_exact(hidden, t):
    k = 6
    rsf = 1.5
    for seed in range(2):
        x, idx, w = _inputs(1000 * t + seed + hidden, t, hidden, k)
        f = _jitted("fp8", CAP, rsf)
        t0 = time.perf_counter()
        got = jax.block_until_ready(f(x, idx, w))
        dt = time.perf_counter() - t0
        want = _reference_on_cpu(x, idx, w, mode="fp8", cap=CAP, rsf=rsf)
        _assert_equal_slots(got, want, t)
        print(
            f"TABLE pre_dispatch|fp8|H={hidden}|T={t}|cap={CAP}|seed={seed}|bit-exact|{dt * 1e3:.2f} ms (incl. first-call)"
        )


@pytest.mark.skipif(GPU_ARCH != 9, reason="sm_90 kernels need an H100/H200")
def test_sm90_pre_dispatch_repeated_1000_times():
    """1000 jitted calls with varying inputs: no error, no growth in device memory, samples stay exact."""
    h, k, t = 4096, 6, 64
    f = _jitted("fp8", CAP, 1.0)
    x, idx, w = _inputs(7, t, h, k)
    jax.block_until_ready(f(x, idx, w))
    dev = jax.devices()[0]
    before = (dev.memory_stats() or {}).get("bytes_in_use", 0)
    step = jax.jit(lambda x, i: x * (1 + i).astype(jnp.bfloat16))
    t0 = time.perf_counter()
    for i in range(1000):
        xi = step(x, jnp.int32(i % 7))
        out = f(xi, idx, w)
        if i in (0, 499, 999):
            want = _reference_on_cpu(xi, idx, w, mode="fp8", cap=CAP, rsf=1.0)
            _assert_equal_slots(out, want, t)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / 1000
    after = (dev.memory_stats() or {}).get("bytes_in_use", 0)
    assert after - before < 16 << 20, f"device memory grew by {after - before} bytes over 1000 calls"
    print(
        f"TABLE pre_dispatch|fp8|H={h}|T={t}|x1000|exact samples, mem +{(after - before) >> 10} KiB|{dt * 1e6:.1f} us/call"
    )


@pytest.mark.skipif(GPU_ARCH != 9, reason="sm_90 kernels need an H100/H200")
def test_ffi_rejects_sm100_modes_on_hopper():
    x, idx, w = _inputs(3, 4, 4096, 6)
    with pytest.raises(ops.BackendUnavailableError, match="sm_100"):
        ops.pre_dispatch(x, idx, w, mode="mxf4xmxf4", num_max_tokens=CAP, backend="ffi")
    # auto falls back to the reference for a mode this GPU cannot run
    got = ops.pre_dispatch(x, idx, w, mode="mxf4xmxf4", num_max_tokens=CAP, backend="auto")
    want = _reference_on_cpu(x, idx, w, mode="mxf4xmxf4", cap=CAP, rsf=1.0)
    _assert_equal_slots(got, want, 4)


@pytest.mark.skipif(GPU_ARCH != 9, reason="sm_90 kernels need an H100/H200")
def test_sm90_pre_dispatch_nonfinite_follows_the_kernel():
    """inf / -inf / NaN in a 128-group: the reference's semantics (quant.quantize_fp8_per128) are the
    kernel's, byte for byte, including the poisoned group's scale and codes."""
    t, h, k = 9, 4096, 6
    x, idx, w = _inputs(4242, t, h, k)
    xn = np.asarray(x, np.float32)
    xn[0, 130] = np.inf
    xn[2, 7] = -np.inf
    xn[3, 300] = np.nan
    xn[4, 0:128] = np.nan  # a whole group of NaN: the amax floor applies
    xn[5, 1000] = np.inf
    xn[5, 1001] = np.nan
    x = jnp.asarray(xn, jnp.bfloat16)
    got = jax.block_until_ready(_jitted("fp8", CAP, 1.0)(x, idx, w))
    want = _reference_on_cpu(x, idx, w, mode="fp8", cap=CAP, rsf=1.0)
    assert np.isinf(np.asarray(want.x_sf)[0, 1])  # the poisoned group really is poisoned
    _assert_equal_slots(got, want, t)
    print("TABLE pre_dispatch|fp8|H=4096|T=9|inf/-inf/NaN groups|bit-exact")
