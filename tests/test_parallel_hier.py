"""Token-form and two-level expert parallelism (jax_megamoe._src.kernels.parallel_hier) against the reference.

The multi-device checks run in fresh interpreters (tests/hier_worker.py), all three at once: one
process with 8 virtual CPU devices (2 x 4 and 8 x 1 meshes), and two processes x 4 devices over
``jax.distributed`` (gloo) as a 2 x 4 mesh whose host axis is the process. The validation errors
are checked here, on an AbstractMesh or this process's one CPU device.
"""

from __future__ import annotations

import dataclasses
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

from jax_megamoe._src.kernels import parallel_hier as PH
from jax_megamoe.layout import MoEWeights
from jax_megamoe.parallel import EPOptions

WORKER = Path(__file__).with_name("hier_worker.py")
TIMEOUT_S = 170

SINGLE_CHECKS = (
    "devices", "path_cpu", "hier2x4_skewed", "hier2x4_sharding", "hier2x4_second_pass", "hier2x4_empty_host",
    "hier2x4_empty_host_rows", "grouped_path", "grouped_ep8", "grouped_ep8_second_pass", "padded_dispatch_same_bits",
    "grouped_ep4",
    "hier_fused_lowers_for_cuda", "hier_fused_second_pass_lowered", "ragged_on_cpu_error", "fused_groups_one_process",
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
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
    return {ln.split(" ", 3)[1]: ln.split(" ", 3)[2] for ln in out.splitlines() if ln.startswith("CHECK ")}


@pytest.fixture(scope="module")
def workers():
    port = _free_port()
    run = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=WORKER.parent.parent)
    procs = {"single": subprocess.Popen([sys.executable, str(WORKER), "single"], **run)}
    for i in range(2):
        procs[f"multi{i}"] = subprocess.Popen(
            [sys.executable, str(WORKER), "multi", "--process-id", str(i), "--num-processes", "2", "--port", str(port)],
            **run,
        )
    deadline = time.monotonic() + TIMEOUT_S
    yield {name: _finish(p, deadline) for name, p in procs.items()}


def test_hier_and_grouped_8_virtual_devices(workers):
    """2 x 4 (host x GPU) and 8 x 1 meshes: bit for bit the per-host partial sums of the reference,
    within the stated bound of reference.mega_moe (exact on single-host rows), skewed routing, an empty
    host, a device whose tokens route nowhere, a device no pair names, the second pass past capacity
    (same bits, counted), the fused structure lowered for cuda."""
    rc, out = workers["single"]
    got = _checks(out)
    bad = {name: got.get(name, "missing") for name in SINGLE_CHECKS if got.get(name) != "ok"}
    assert rc == 0 and not bad, f"rc={rc} bad={bad}\n{out[-4000:]}"


def test_hier_two_processes_jax_distributed(workers):
    """2 processes x 4 CPU devices (gloo): the host axis crosses processes, the intranode stage stays
    in one; skewed routing with a second pass and an empty host, stats counted on every process."""
    for i in range(2):
        rc, out = workers[f"multi{i}"]
        got = _checks(out)
        names = ("devices", "hosts_are_processes", f"multi_skewed_p{i}", f"multi_empty_host_p{i}")
        assert rc == 0 and all(got.get(n) == "ok" for n in names), f"process {i}: rc={rc} {got}\n{out[-4000:]}"


# ------------------------------------------------------------------------------------------------
# Validation (shapes only)
# ------------------------------------------------------------------------------------------------

H, I, E, K = 512, 256, 16, 4


def _weights(mode: str = "fp8", e: int = E) -> MoEWeights:
    shapes = MoEWeights.kernel_shapes(mode, e, H, I)
    leaves = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    return MoEWeights(**leaves, mode=mode, hidden=H, intermediate=I, num_experts=e)


def _inputs(t: int):
    return (
        jax.ShapeDtypeStruct((t, H), jnp.bfloat16),
        jax.ShapeDtypeStruct((t, K), jnp.int32),
        jax.ShapeDtypeStruct((t, K), jnp.float32),
    )


def _mesh(hosts: int = 2, gpus: int = 4, names=("host", "ep")):
    return jax.sharding.AbstractMesh((hosts, gpus), names)


def _call(t=32, mesh=None, host_axis="host", axis="ep", **kw):
    """ep_moe_hier with ``kw``: the EPOptions fields go into ``options``, the rest are keywords."""
    kw.setdefault("mode", "fp8")
    fields = {f.name for f in dataclasses.fields(EPOptions)}
    opts = EPOptions(**{k: kw.pop(k) for k in list(kw) if k in fields})
    return PH.ep_moe_hier(
        *_inputs(t), kw.pop("weights", _weights()), mesh=mesh or _mesh(), axes=(host_axis, axis), options=opts, **kw
    )


def test_error_axes():
    with pytest.raises(ValueError, match=r"axis: 'host' is also host_axis"):
        _call(axis="host")
    with pytest.raises(ValueError, match=r"axis: 'gpu' is not an axis of the mesh"):
        _call(axis="gpu")
    with pytest.raises(ValueError, match=r"axis: 'node' is not an axis of the mesh"):
        _call(host_axis="node")
    with pytest.raises(TypeError, match=r"mesh: expected a jax.sharding.Mesh"):
        PH.ep_moe_hier(*_inputs(32), _weights(), mesh="mesh", mode="fp8")


def test_error_divisibility():
    with pytest.raises(ValueError, match=r"x: 36 tokens are not divisible by the 8 devices of mesh axes 'host' x 'ep'"):
        _call(t=36)
    with pytest.raises(ValueError, match=r"weights: num_experts=16 is not divisible by the size 12"):
        _call(t=48, mesh=_mesh(3, 4))
    with pytest.raises(ValueError, match=r"x: hidden=100 must be a multiple of 128"):
        PH.ep_moe_hier(
            jax.ShapeDtypeStruct((32, 100), jnp.bfloat16), *_inputs(32)[1:], _weights(), mesh=_mesh(), mode="fp8"
        )


def test_error_options():
    with pytest.raises(ValueError, match=r"intranode: 'nvlink' is not one of auto, fused, collective, local"):
        _call(intranode="nvlink")
    with pytest.raises(ValueError, match=r"intranode: 'local' runs one device's experts alone.*4 devices per host"):
        _call(intranode="local")
    with pytest.raises(ValueError, match=r"intranode: 'fused' needs an inner axis with several GPUs"):
        _call(mesh=_mesh(8, 1), intranode="fused")
    with pytest.raises(ValueError, match=r"intranode: 'fused' runs the FFI kernel; backend='reference'"):
        _call(intranode="fused", backend="reference")
    with pytest.raises(ValueError, match=r"intranode: 'fused' cannot run here: an AbstractMesh has no devices"):
        _call(intranode="fused")
    with pytest.raises(ValueError, match=r"dispatch: 'fused' is not one of auto, ragged, padded"):
        _call(dispatch="fused")
    with pytest.raises(ValueError, match=r"backend: 'cuda' is not one of"):
        _call(backend="cuda")
    with pytest.raises(ValueError, match=r"pair_capacity: 0 must be a Python int >= 1"):
        _call(pair_capacity=0)
    with pytest.raises(ValueError, match=r"pair_capacity: True must be a Python int >= 1"):
        _call(pair_capacity=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'capacity'"):
        _call(pair_capacity=2, capacity=2)  # the old name is gone
    with pytest.raises(ValueError, match=r"num_max_tokens: 5 is below the 8 rows a device can receive per pass"):
        _call(num_max_tokens=5)
    with pytest.raises(ValueError, match=r"num_max_tokens: 0 must be a Python int >= 1"):
        _call(num_max_tokens=0)
    with pytest.raises(TypeError, match=r"return_stats: expected a bool, got int"):
        _call(return_stats=1)
    with pytest.raises(ValueError, match=r"mode: 'fp4' is not a kernel mode"):
        _call(mode="fp4")
    with pytest.raises(ValueError, match=r"weights: built for mode 'fp8'.*'mxf4xmxf4'"):
        _call(mode="mxf4xmxf4")


def test_hier_path_reports_choice_and_reason():
    p = PH.hier_path(_mesh(), "host", "ep", "fp8", 4)
    assert (p.dispatch, p.intranode, p.backend) == ("padded", "collective", "reference")
    assert "AbstractMesh" in p.reason and "'host'" in p.reason
    g = PH.hier_path(_mesh(8, 1), "host", "ep", "fp8", 4)
    assert g.intranode == "local" and "one device per host" in g.reason
    one = PH.hier_path(jax.sharding.AbstractMesh((8,), ("ep",)), "ep", None, "fp8", 4)
    assert one.intranode == "local"
    c = PH.hier_path(_mesh(), "host", "ep", "fp8", 4, options=EPOptions(intranode="collective"))
    assert c.intranode == "collective" and "requested" in c.reason
    assert PH.hier_path(_mesh(), "host", "ep", "fp8", 4, options=EPOptions(dispatch="padded")) == p
    with pytest.raises(ValueError, match=r"dispatch: 'dense' is not one of"):
        PH.hier_path(_mesh(), "host", "ep", "fp8", 4, options=EPOptions(dispatch="dense"))
    with pytest.raises(ValueError, match=r"pair_capacity: -2 must be"):
        PH.hier_path(_mesh(), "host", "ep", "fp8", 4, options=EPOptions(pair_capacity=-2))
    one_row = PH.hier_path(_mesh(), "host", "ep", "fp8", 4, options=EPOptions(num_max_tokens=4, pair_capacity=1))
    assert one_row.dispatch == "padded"
    with pytest.raises(ValueError, match=r"num_max_tokens: 4 is below the 8 rows"):
        PH.hier_path(
            _mesh(), "host", "ep", "fp8", 4, options=EPOptions(num_max_tokens=4)
        )  # so pair_capacity=1 did reach it


def test_hier_path_env_switch(monkeypatch):
    """With fused available (faked), 'auto' takes it unless JAX_MEGAMOE_FUSED_EP=0 or backend='reference'."""
    monkeypatch.setattr(PH, "_fused_inner_available", lambda mesh, axis, mode: (True, ""))
    assert PH.hier_path(_mesh(), "host", "ep", "fp8", 4).intranode == "fused"
    assert (
        PH.hier_path(_mesh(), "host", "ep", "fp8", 4, options=EPOptions(backend="reference")).intranode == "collective"
    )
    assert PH.hier_path(_mesh(), "host", "ep", "mxf4xmxf4", 4).intranode == "collective"  # sm_100: opt-in
    import jax_megamoe

    p = PH.hier_path(
        _mesh(), "host", "ep", "fp8", 4, options=EPOptions(policy=jax_megamoe.policy.current().replace(fused_ep=False))
    )
    assert p.intranode == "collective" and "JAX_MEGAMOE_FUSED_EP=0" in p.reason


def test_groups_spanning_processes_refused():
    class Dev:
        def __init__(self, i, proc):
            self.id, self.process_index, self.platform = i, proc, "gpu"

    class FakeMesh:
        axis_names = ("host", "ep")
        devices = np.array([[Dev(0, 0), Dev(1, 1)], [Dev(2, 0), Dev(3, 1)]], dtype=object)

    ok, why = PH._groups_in_one_process(FakeMesh(), "ep")
    assert not ok and "span processes [0, 1]" in why
    assert PH._groups_in_one_process(FakeMesh(), "host")[0]


def test_one_cpu_device_runs():
    """A 1 x 1 mesh in this process: every slot is local, so the result is the reference's bits."""
    from jax_megamoe import reference
    from jax_megamoe.models.deepseek_v4 import DeepseekV4Config, random_moe_checkpoint

    cfg = DeepseekV4Config.tiny()
    w = MoEWeights.from_checkpoint(*random_moe_checkpoint(cfg, 7), mode="fp8")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, cfg.hidden_size)), jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-1, w.num_experts, (8, 4)), jnp.int32)
    tw = jnp.asarray(rng.uniform(0.1, 1, (8, 4)), jnp.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("host", "ep"))
    y, st = PH.ep_moe_hier(x, idx, tw, w, mesh=mesh, mode="fp8", options=EPOptions(return_stats=True))
    ref = reference.mega_moe(x, idx, tw, w, mode="fp8")
    assert np.array_equal(np.asarray(y).view(np.uint16), np.asarray(ref).view(np.uint16))
    assert np.any(np.asarray(ref) != 0)
    assert int(st.rows) == int(np.sum(np.any(np.asarray(idx) >= 0, axis=1))) and int(st.second_pass_rows) == 0
    # pair_capacity=1 runs the second pass: the same bits; one level over one device agrees.
    y1, st1 = PH.ep_moe_hier(
        x, idx, tw, w, mesh=mesh, mode="fp8", options=EPOptions(pair_capacity=1, return_stats=True)
    )
    assert int(st1.second_pass_rows) > 0
    assert np.array_equal(np.asarray(y1).view(np.uint16), np.asarray(ref).view(np.uint16))
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    for fn, kw in ((PH.ep_moe_hier, dict(mesh=mesh)), (PH.ep_moe_hier, dict(mesh=one, axes=("ep", None)))):
        y_old, st_old = fn(x, idx, tw, w, mode="fp8", options=EPOptions(pair_capacity=1, return_stats=True), **kw)
        assert np.array_equal(np.asarray(y_old).view(np.uint16), np.asarray(y1).view(np.uint16))
        assert tuple(int(v) for v in st_old) == tuple(int(v) for v in st1)
