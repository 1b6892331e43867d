"""Environment forwarding (once, set-if-absent, aliases, errors), mode resolution and kernel limits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from jax_megamoe._src.numerics import config
from jax_megamoe._src.numerics import policy as P

ALL_VARS = P.ENV_FP4_ACTS + P.ENV_MXF4_KIND + (P.DG_FP4_ACTS, P.DG_MXF4_KIND)


def sm100_mode() -> str:
    """The process policy's sm_100 mode (derived once, from the forwarded DG_* flags)."""
    return P.current().sm100_mode


@pytest.fixture
def clean_env(monkeypatch):
    for v in ALL_VARS:
        monkeypatch.delenv(v, raising=False)
    P._reset()
    yield monkeypatch
    P._reset()


def test_neither_flag_is_w4a8_and_nothing_is_forwarded(clean_env):
    st = P.forward_env()
    assert st.forwarded == ()
    assert st.fp4_acts.source == "default" and st.mxf4_kind.source == "default"
    assert P.DG_FP4_ACTS not in os.environ
    assert sm100_mode() == "fp8xfp4"


def test_project_variables_forward_to_dg(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "1")
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "true")
    st = P.forward_env()
    assert os.environ[P.DG_FP4_ACTS] == "1"
    assert os.environ[P.DG_MXF4_KIND] == "1"
    assert set(st.forwarded) == {(P.DG_FP4_ACTS, "1"), (P.DG_MXF4_KIND, "1")}
    assert st.fp4_acts.source == "JAX_MEGAMOE_USE_FP4_ACTS"
    assert sm100_mode() == "mxf4xmxf4"


def test_sglang_aliases_forward(clean_env):
    clean_env.setenv("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS", "1")
    clean_env.setenv("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_MXF4_KIND", "1")
    st = P.forward_env()
    assert st.mxf4_kind.source == "SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_MXF4_KIND"
    assert sm100_mode() == "mxf4xmxf4"


def test_project_name_beats_sglang_name(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "0")
    clean_env.setenv("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS", "1")
    st = P.forward_env()
    assert st.fp4_acts.value is False
    assert os.environ[P.DG_FP4_ACTS] == "0"


def test_explicit_dg_value_wins(clean_env):
    clean_env.setenv(P.DG_FP4_ACTS, "1")
    clean_env.setenv(P.DG_MXF4_KIND, "1")
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "0")
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "0")
    st = P.forward_env()
    assert st.forwarded == ()
    assert os.environ[P.DG_FP4_ACTS] == "1"
    assert st.fp4_acts.source == P.DG_FP4_ACTS
    assert sm100_mode() == "mxf4xmxf4"


def test_forwarding_happens_once(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "1")
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "1")
    first = P.forward_env()
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "0")
    clean_env.delenv(P.DG_FP4_ACTS)
    second = P.forward_env()
    assert second is first
    assert P.DG_FP4_ACTS not in os.environ  # not re-forwarded
    assert sm100_mode() == "mxf4xmxf4"


def test_forwarding_is_thread_safe(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "1")
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "1")
    results = []
    barrier = threading.Barrier(16)

    def work():
        barrier.wait()
        results.append(P.forward_env())

    threads = [threading.Thread(target=work) for _ in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == 16 and all(r is results[0] for r in results)
    assert len(results[0].forwarded) == 2


def test_mxf4_kind_without_fp4_acts_is_an_error(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "1")
    with pytest.raises(ValueError, match="USE_MXF4_KIND=1 needs USE_FP4_ACTS=1"):
        sm100_mode()


def test_fp4_acts_without_mxf4_kind_is_an_error(clean_env):
    clean_env.setenv("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS", "1")
    with pytest.raises(ValueError, match="0.2.x no longer has"):
        sm100_mode()


def test_bad_boolean_names_the_variable(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "maybe")
    with pytest.raises(ValueError, match="JAX_MEGAMOE_USE_FP4_ACTS"):
        P.forward_env()


def test_explicit_mode_beats_environment(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "1")  # impossible combination in the environment
    assert P.resolve_mode("fp8xfp4") == "fp8xfp4"
    assert P.resolve_mode("mxf4xmxf4", arch=9) == "mxf4xmxf4"
    assert P.resolve_mode(None, arch=9) == "fp8"
    assert P.resolve_mode(None, 10, P.Policy(sm100_mode="mxf4xmxf4")) == "mxf4xmxf4"  # an explicit policy wins
    with pytest.raises(ValueError):
        P.resolve_mode(None, arch=10)  # the process policy: the impossible combination


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="mode: 'w4a16'"):
        config.check_mode("w4a16")


def test_register_forwards_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARS}
    env.update(JAX_MEGAMOE_USE_FP4_ACTS="1", SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_MXF4_KIND="1", JAX_PLATFORMS="cpu")
    code = (
        "import os, jax_megamoe as m; from jax_megamoe import policy as p; m.register(); m.register();"
        "print(os.environ['DG_USE_FP4_ACTS'], os.environ['DG_USE_MXF4_KIND'], p.current().sm100_mode)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-3:] == ["1", "1", "mxf4xmxf4"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=4096, intermediate=2048, num_experts=256, top_k=33, mode="fp8xfp4"), "top_k: 33"),
        (dict(hidden=4096, intermediate=2048, num_experts=4, top_k=6, mode="fp8xfp4"), "top_k: 6"),
        (dict(hidden=4000, intermediate=2048, num_experts=256, top_k=6, mode="mxf4xmxf4"), "hidden: 4000"),
        (dict(hidden=4096, intermediate=2000, num_experts=256, top_k=6, mode="mxf4xmxf4"), "intermediate: 2000"),
        (dict(hidden=4096, intermediate=8192, num_experts=256, top_k=6, mode="fp8"), "intermediate: 8192"),
        (dict(hidden=4096, intermediate=2048, num_experts=4096, top_k=6, mode="fp8xfp4"), "num_experts: 4096"),
        (dict(hidden=4096, intermediate=2048, num_experts=255, top_k=6, mode="fp8", num_ranks=2), "num_experts: 255"),
    ],
)
def test_moe_shape_limits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        config.validate_moe_shape(**kwargs)


def test_v4_shapes_pass_every_mode():
    for mode in config.MODES:
        config.validate_moe_shape(hidden=4096, intermediate=2048, num_experts=256, top_k=6, mode=mode)
        config.validate_moe_shape(hidden=7168, intermediate=3072, num_experts=384, top_k=6, mode=mode)


@pytest.mark.parametrize(
    "hidden, top_k, mode, match",
    [(8448, 6, "fp8", "exceeds the pre-dispatch"), (4000, 6, "fp8", "hidden: 4000"), (128, 17, "fp8xfp4", "top_k: 17")],
)
def test_pre_dispatch_limits(hidden, top_k, mode, match):
    with pytest.raises(ValueError, match=match):
        config.validate_pre_dispatch_shape(hidden=hidden, top_k=top_k, mode=mode)


def test_token_cap_alignment_and_call_spec():
    from jax_megamoe._src.kernels._calls import MMA_KIND, MegaMoECall

    assert config.align_token_cap(1, "fp8xfp4") == 1920
    assert config.align_token_cap(1921, "mxf4xmxf4") == 3840
    assert config.align_token_cap(129, "fp8") == 256
    # The static attributes of one kernel call: hashable (one static argument), one definition.
    a = MegaMoECall("fp8", num_experts=256, capacity=config.align_token_cap(1000, "fp8"), activation_clamp=10.0)
    assert a.capacity == 1024 and a.target == "jax_megamoe_mega_moe_sm90"
    assert hash(a) == hash(MegaMoECall("fp8", num_experts=256, capacity=1024, activation_clamp=10.0))
    attrs = a.attributes(hidden=4096, intermediate=2048, top_k=6)
    assert (attrs["capacity"], attrs["top_k"], float(attrs["activation_clamp"])) == (1024, 6, 10.0)
    assert attrs["sm90_wide_tile"] is False and "mma_kind" not in attrs
    b = MegaMoECall("fp8xfp4", num_experts=256, capacity=1920, graph=True)
    assert b.target == "jax_megamoe_mega_moe_sm100"  # no graph twin on sm_100
    assert b.attributes(hidden=4096, intermediate=2048, top_k=6)["mma_kind"] == MMA_KIND["fp8xfp4"] == 1
    assert float(b.attributes(hidden=4096, intermediate=2048, top_k=6)["activation_clamp"]) == float("inf")
    with pytest.raises(ValueError, match="activation_clamp"):
        config.check_clamp(-1.0)
