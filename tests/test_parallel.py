"""Expert parallelism (jax_megamoe.parallel.ep_moe) against the single-device reference.

The multi-device checks need 8 CPU devices, but this pytest process has started jax with one;
they run in fresh interpreters (tests/parallel_worker.py), all three launched at once:
one process with 8 virtual devices, and two processes x 4 devices over ``jax.distributed`` on
127.0.0.1. The validation errors are checked here, on an AbstractMesh (no devices needed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe._src.kernels import parallel
from jax_megamoe.layout import MoEWeights
from jax_megamoe.parallel import EPOptions

WORKER = Path(__file__).with_name("parallel_worker.py")
TIMEOUT_S = 150

SINGLE_CHECKS = (
    "devices",
    "ep2_fp8xfp4",
    "ep4_mxf4xmxf4",
    "ep8_fp8",
    "shard_weights",
    "ep8_fp8_auto_mesh_jit",
    "capacity_overflow",
    "exact_capacity_no_drop",
    "padded_dispatch_same_bits",
    "any_tokens_uneven_batch",
    "ragged_on_cpu_error",
    "fused_lowers_for_cuda",
    "fused_sm100_lowers_for_cuda",
    "fused_auto_on_cpu_is_collective",
    "block_mesh",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _finish(proc: subprocess.Popen, deadline: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return -9, f"TIMEOUT after {TIMEOUT_S}s\n{out}"
    return proc.returncode, out


def _checks(out: str) -> dict[str, str]:
    res = {}
    for line in out.splitlines():
        if line.startswith("CHECK "):
            parts = line.split(" ", 3)
            res[parts[1]] = parts[2]
    return res


@pytest.fixture(scope="module")
def workers():
    """Start the single-process worker and both ranks of the two-process run together."""
    port = _free_port()
    run = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=WORKER.parent.parent)
    procs = {
        "single": subprocess.Popen([sys.executable, str(WORKER), "single"], **run),
        **{
            f"multi{i}": subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    "multi",
                    "--process-id",
                    str(i),
                    "--num-processes",
                    "2",
                    "--port",
                    str(port),
                ],
                **run,
            )
            for i in range(2)
        },
    }
    deadline = time.monotonic() + TIMEOUT_S
    results = {name: _finish(p, deadline) for name, p in procs.items()}
    yield results


def test_ep_moe_bit_exact_8_virtual_devices(workers):
    """EP 2/4/8 in all three modes (one per size), skewed routing, a device whose tokens go nowhere,
    a device no pair is routed to, an Auto mesh under jit, capacity drops, the Flax block."""
    rc, out = workers["single"]
    got = _checks(out)
    bad = {name: got.get(name, "missing") for name in SINGLE_CHECKS if got.get(name) != "ok"}
    assert rc == 0 and not bad, f"rc={rc} bad={bad}\n{out[-4000:]}"
    assert "dispatch_path(auto)=padded" in out  # XLA:CPU has no ragged-all-to-all


def test_ep_moe_two_processes_jax_distributed(workers):
    """2 processes x 4 CPU devices (gloo collectives, coordinator on 127.0.0.1): EP 8 equals the
    reference bit for bit on every process's shards."""
    for i in range(2):
        rc, out = workers[f"multi{i}"]
        got = _checks(out)
        ok = got.get("devices") == "ok" and got.get(f"multiprocess_p{i}") == "ok"
        assert rc == 0 and ok, f"process {i}: rc={rc} checks={got}\n{out[-4000:]}"


# ------------------------------------------------------------------------------------------------
# Validation (no devices needed: shapes only, AbstractMesh)
# ------------------------------------------------------------------------------------------------

H, I, E, K = 512, 256, 16, 4


def _weights(mode: str = "fp8xfp4", e: int = E, e_local: int | None = None) -> MoEWeights:
    shapes = MoEWeights.kernel_shapes(mode, e if e_local is None else e_local, H, I)
    leaves = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    return MoEWeights(**leaves, mode=mode, hidden=H, intermediate=I, num_experts=e)


def _inputs(t: int):
    return (
        jax.ShapeDtypeStruct((t, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((t, K), jnp.int32),
        jax.ShapeDtypeStruct((t, K), jnp.float32),
    )


def _mesh(n: int, name: str = "ep"):
    return jax.sharding.AbstractMesh((n,), (name,))


def test_error_experts_not_divisible():
    with pytest.raises(ValueError, match=r"weights: num_experts=16 is not divisible by the size 3"):
        parallel.ep_moe(*_inputs(30), _weights(), mesh=_mesh(3), mode="fp8xfp4")


def test_error_missing_mesh_axis():
    with pytest.raises(ValueError, match=r"axis: 'ep' is not an axis of the mesh"):
        parallel.ep_moe(*_inputs(32), _weights(), mesh=_mesh(4, "data"), mode="fp8xfp4")
    with pytest.raises(TypeError, match=r"mesh: expected a jax.sharding.Mesh"):
        parallel.ep_moe(*_inputs(32), _weights(), mesh=None, mode="fp8xfp4")


def test_error_tokens_not_divisible():
    with pytest.raises(ValueError, match=r"x: 30 tokens are not divisible by the size 4 of mesh axis 'ep'.*pad_tokens"):
        parallel.ep_moe(*_inputs(30), _weights(), mesh=_mesh(4), mode="fp8xfp4")
    # pad_tokens=True takes any T (run in parallel_worker), but not with return_overflow when it pads
    opts = EPOptions(pad_tokens=True, return_overflow=True)
    with pytest.raises(ValueError, match=r"return_overflow is not supported with pad_tokens when T needs padding"):
        parallel.ep_moe(*_inputs(30), _weights(), mesh=_mesh(4), mode="fp8xfp4", options=opts)
    with pytest.raises(TypeError, match=r"options\.pad_tokens: expected a bool, got 'yes'"):
        parallel.ep_moe(*_inputs(32), _weights(), mesh=_mesh(4), mode="fp8xfp4", options=EPOptions(pad_tokens="yes"))


def test_error_weights_mode_mismatch():
    with pytest.raises(ValueError, match=r"weights: built for mode 'fp8xfp4'.*'mxf4xmxf4'"):
        parallel.ep_moe(*_inputs(32), _weights("fp8xfp4"), mesh=_mesh(4), mode="mxf4xmxf4")
    with pytest.raises(ValueError, match=r"mode: 'fp4' is not a kernel mode"):
        parallel.ep_moe(*_inputs(32), _weights(), mesh=_mesh(4), mode="fp4")
    with pytest.raises(TypeError, match=r"weights: expected a jax_megamoe.layout.MoEWeights"):
        parallel.ep_moe(*_inputs(32), {"l1": 0}, mesh=_mesh(4), mode="fp8xfp4")


def test_error_weights_local_slice():
    with pytest.raises(ValueError, match=r"weights: leaves hold 4 experts but num_experts=16"):
        parallel.ep_moe(*_inputs(32), _weights(e_local=4), mesh=_mesh(4), mode="fp8xfp4")


def test_error_options():
    args = (*_inputs(32), _weights())
    with pytest.raises(ValueError, match=r"dispatch: 'sparse' is not one of"):
        parallel.ep_moe(*args, mesh=_mesh(4), mode="fp8xfp4", options=EPOptions(dispatch="sparse"))
    with pytest.raises(ValueError, match=r"backend: 'cuda' is not one of"):
        parallel.ep_moe(*args, mesh=_mesh(4), mode="fp8xfp4", options=EPOptions(backend="cuda"))
    with pytest.raises(
        ValueError, match=r"pair_capacity: 3 is below the exact worst case T/n\*K = 32.*return_overflow=True"
    ):
        parallel.ep_moe(*args, mesh=_mesh(4), mode="fp8xfp4", options=EPOptions(pair_capacity=3))
    with pytest.raises(ValueError, match=r"pair_capacity: 0 must be"):
        parallel.ep_moe(*args, mesh=_mesh(4), mode="fp8xfp4", options=EPOptions(pair_capacity=0, return_overflow=True))
    # the old name capacity= is gone (never released): a TypeError like any unknown keyword
    with pytest.raises(TypeError, match="capacity"):
        parallel.ep_moe(*args, mesh=_mesh(4), mode="fp8xfp4", capacity=3)
    with pytest.raises(ValueError, match=r"x: hidden=100 must be a multiple of 128"):
        parallel.ep_moe(
            jax.ShapeDtypeStruct((32, 100), jnp.bfloat16), *_inputs(32)[1:], _weights(), mesh=_mesh(4), mode="fp8xfp4"
        )


def test_error_fused_dispatch():
    """dispatch='fused' insists on the kernel: every way it cannot run is one clear error."""
    cpu = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    fp8 = (*_inputs(32), _weights("fp8"))
    with pytest.raises(ValueError, match=r"dispatch: 'fused' cannot run here: an AbstractMesh has no devices"):
        parallel.ep_moe(*fp8, mesh=_mesh(4), mode="fp8", options=EPOptions(dispatch="fused"))
    with pytest.raises(ValueError, match=r"pair_capacity: applies to the collective dispatch"):
        parallel.ep_moe(*fp8, mesh=cpu, mode="fp8", options=EPOptions(dispatch="fused", pair_capacity=8))
    with pytest.raises(ValueError, match=r"backend='reference' cannot run it"):
        parallel.ep_moe(*fp8, mesh=cpu, mode="fp8", options=EPOptions(dispatch="fused", backend="reference"))
    with pytest.raises(ValueError, match=r"x: 256 tokens per device exceed num_max_tokens=128 .*dispatch='auto'"):
        parallel.ep_moe(
            *_inputs(256),
            _weights("fp8"),
            mesh=cpu,
            mode="fp8",
            options=EPOptions(dispatch="fused", num_max_tokens=100),
        )
    with pytest.raises(ValueError, match=r"num_max_tokens: 0 must be a Python int >= 1"):
        parallel.ep_moe(*fp8, mesh=cpu, mode="fp8", options=EPOptions(dispatch="fused", num_max_tokens=0))
    with pytest.raises(ValueError, match=r"dispatch: 'fused' uses no collective"):
        parallel.dispatch_path(cpu, "fused")
    ok, why = parallel.fused_available(cpu, "ep", "fp8")
    assert not ok and "'cpu', not CUDA GPUs" in why
    # sm_100 modes: "auto" needs the opt-in on top (that kernel has never run on a B200 here)
    assert parallel.ep_path(cpu, "ep", "fp8xfp4", 8) == "padded"
    with pytest.raises(ValueError, match=r"dispatch: 'dense' is not one of auto, fused, ragged, padded"):
        parallel.ep_path(cpu, "ep", "fp8", 8, options=EPOptions(dispatch="dense"))
    with pytest.raises(ValueError, match=r"dispatch: 'dense ' is not one of auto, fused, ragged, padded"):
        parallel.ep_path(cpu, "ep", "fp8", 8, options=EPOptions(dispatch="dense "))


def test_fused_auto_env_switch(monkeypatch):
    """fused_ep=False (JAX_MEGAMOE_FUSED_EP=0) keeps 'auto' on the collectives even where the fused
    kernel could run; the policy's graph and wide-tile switches are part of the static arguments."""
    from jax_megamoe import policy
    from jax_megamoe.policy import Policy

    cpu = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    monkeypatch.setattr(parallel, "fused_available", lambda *a, **k: (True, ""))

    def choose(capacity=None, **kw):
        return parallel._choose_path(cpu, "ep", "fp8", 8, EPOptions(pair_capacity=capacity, **kw))

    base = Policy()
    path, fused = choose(dispatch="auto", policy=base)
    assert path == "fused" and fused.capacity == 1024 and fused.rank_devices == ((jax.devices()[0].id,),)
    assert fused.reserved_sms == 2 and fused.num_ranks == 1
    assert fused.graph is False and fused.sm90_wide_tile is False  # graph_targets, sm90_wide_tile off
    assert choose(dispatch="auto", policy=base.replace(graph_targets=True))[1].graph is True  # static: no stale trace
    wide = choose(dispatch="auto", policy=base.replace(sm90_wide_tile=True))[1]
    assert (wide.graph, wide.sm90_wide_tile) == (False, True)
    capped = choose(dispatch="auto", policy=base.replace(reserved_sms=5, num_max_tokens=200))[1]
    assert (capped.capacity, capped.reserved_sms) == (256, 5)
    assert choose(dispatch="auto", policy=Policy.from_environ({"JAX_MEGAMOE_FUSED_EP": "0"})) == ("padded", None)
    assert policy.current().fused_ep  # the process policy, read now if not before
    monkeypatch.setenv("JAX_MEGAMOE_FUSED_EP", "0")  # read once into the process policy: changing it later does nothing
    assert choose(dispatch="auto")[0] == "fused"
    monkeypatch.delenv("JAX_MEGAMOE_FUSED_EP")
    assert choose(dispatch="auto", backend="reference") == ("padded", None)  # the reference never runs the kernel
    assert choose(dispatch="auto", capacity=4) == ("padded", None)  # a capacity asks for the collective
    assert parallel.ep_path(cpu, "ep", "fp8", 2048) == "padded"  # over the per-rank cap
    assert parallel.ep_path(cpu, "ep", "fp8", 2048, options=EPOptions(num_max_tokens=4096)) == "fused"
    assert parallel.ep_path(cpu, "ep", "fp8xfp4", 8) == "padded"  # sm_100 kernel: opt-in only
    opted_in = Policy.from_environ({"JAX_MEGAMOE_SM100_MEGA": "1"})
    assert parallel.ep_path(cpu, "ep", "mxf4xmxf4", 8, options=EPOptions(policy=opted_in)) == "fused"


def test_dispatch_path_and_capacity():
    cpu_mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    assert parallel.dispatch_path(cpu_mesh) == "padded"
    assert parallel.dispatch_path(cpu_mesh, "padded") == "padded"
    with pytest.raises(ValueError, match=r"dispatch: 'dense' is not one of"):
        parallel.dispatch_path(cpu_mesh, "dense")
    with pytest.raises(ValueError, match=r"dispatch: 'collective' is not one of auto, fused, ragged, padded"):
        parallel.dispatch_path(cpu_mesh, "collective")
    with pytest.raises(ValueError, match=r"dispatch: 'ragged' needs ragged_all_to_all"):
        parallel.dispatch_path(cpu_mesh, "ragged")
    assert parallel.dispatch_path(_mesh(2), "ragged") == "ragged"  # no platform to judge
    assert parallel.exact_capacity(32, 6, 8) == 24


def test_explicit_policy_reaches_the_kernel_on_the_collective_path(monkeypatch):
    """ep_moe(policy=...) on the collective path hands that policy (not the process one) to the
    per-device kernel call: its token cap, graph and wide-tile switches decide there too."""
    from jax_megamoe import reference
    from jax_megamoe._src.kernels import ops
    from jax_megamoe.policy import Policy, current

    seen = []

    def fake_mega_moe(x, idx, w, weights, **kw):
        seen.append(kw["options"].policy)
        return reference.mega_moe(x, idx, w, weights, mode=kw["mode"], activation_clamp=kw.get("activation_clamp"))

    monkeypatch.setattr(ops, "mega_moe", fake_mega_moe)
    jax.clear_caches()  # a trace cached by another test would not call the stand-in
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    rng = np.random.default_rng(1)
    shapes = MoEWeights.kernel_shapes("fp8xfp4", E, H, I)
    w = MoEWeights(
        **{k: jnp.asarray(rng.integers(0, 120, size=s).astype(np.dtype(d))) for k, (s, d) in shapes.items()},
        mode="fp8xfp4",
        hidden=H,
        intermediate=I,
        num_experts=E,
    )
    x = jnp.asarray(rng.standard_normal((4, H)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(0, E, size=(4, K)), jnp.int32)
    tw = jnp.asarray(rng.random((4, K)), jnp.float32)
    mine = Policy(graph_targets=True, sm90_wide_tile=True, num_max_tokens=77)
    assert mine != current()
    y = parallel.ep_moe(
        x, idx, tw, w, mesh=mesh, mode="fp8xfp4", options=EPOptions(backend="ffi", dispatch="padded", policy=mine)
    )
    assert seen and all(p == mine for p in seen), seen
    seen.clear()
    parallel.ep_moe(x, idx, tw, w, mesh=mesh, mode="fp8xfp4", options=EPOptions(backend="ffi", dispatch="padded"))
    assert seen and all(p == current() for p in seen), seen  # no policy: the process one
    want = reference.mega_moe(x, idx, tw, w, mode="fp8xfp4")
    assert np.any(np.asarray(want) != 0)
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16), np.asarray(want).view(np.uint16))


def test_ffi_backend_plugs_in_per_device(monkeypatch):
    """backend='ffi' reaches ops.mega_moe (the single plug-in point) with backend='ffi' and the
    device's E/n local experts; the stand-in records the call and computes the reference."""
    from jax_megamoe import reference
    from jax_megamoe._src.kernels import ops

    calls = []

    def fake_mega_moe(x, idx, w, weights, **kw):
        calls.append((kw.get("backend"), weights.num_local_experts, x.shape))
        return reference.mega_moe(x, idx, w, weights, mode=kw["mode"], activation_clamp=kw.get("activation_clamp"))

    monkeypatch.setattr(ops, "mega_moe", fake_mega_moe)
    jax.clear_caches()  # a trace cached by another test would not call the stand-in
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    rng = np.random.default_rng(0)
    shapes = MoEWeights.kernel_shapes("fp8xfp4", E, H, I)
    w = MoEWeights(
        **{k: jnp.asarray(rng.integers(0, 120, size=s).astype(np.dtype(d))) for k, (s, d) in shapes.items()},
        mode="fp8xfp4",
        hidden=H,
        intermediate=I,
        num_experts=E,
    )
    x = jnp.asarray(rng.standard_normal((4, H)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(0, E, size=(4, K)), jnp.int32)
    tw = jnp.asarray(rng.random((4, K)), jnp.float32)
    y = parallel.ep_moe(x, idx, tw, w, mesh=mesh, mode="fp8xfp4", options=EPOptions(backend="ffi"))
    assert calls and all(c[0] == "ffi" and c[1] == E for c in calls), calls
    want = reference.mega_moe(x, idx, tw, w, mode="fp8xfp4")
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16), np.asarray(want).view(np.uint16))
