"""Environment forwarding (once, set-if-absent, aliases, errors), mode resolution and kernel limits."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from jax_megamoe._src.numerics import config

ALL_VARS = config.ENV_FP4_ACTS + config.ENV_MXF4_KIND + (config.DG_FP4_ACTS, config.DG_MXF4_KIND)


@pytest.fixture
def clean_env(monkeypatch):
    for v in ALL_VARS:
        monkeypatch.delenv(v, raising=False)
    config._reset_env_forwarding()
    yield monkeypatch
    config._reset_env_forwarding()


def test_neither_flag_is_w4a8_and_nothing_is_forwarded(clean_env):
    st = config.forward_env()
    assert st.forwarded == ()
    assert st.fp4_acts.source == "default" and st.mxf4_kind.source == "default"
    assert config.DG_FP4_ACTS not in os.environ
    assert config.default_sm100_mode() == "fp8xfp4"


def test_project_variables_forward_to_dg(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "1")
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "true")
    st = config.forward_env()
    assert os.environ[config.DG_FP4_ACTS] == "1"
    assert os.environ[config.DG_MXF4_KIND] == "1"
    assert set(st.forwarded) == {(config.DG_FP4_ACTS, "1"), (config.DG_MXF4_KIND, "1")}
    assert st.fp4_acts.source == "JAX_MEGAMOE_USE_FP4_ACTS"
    assert config.default_sm100_mode() == "mxf4xmxf4"


def test_sglang_aliases_forward(clean_env):
    clean_env.setenv("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS", "1")
    clean_env.setenv("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_MXF4_KIND", "1")
    st = config.forward_env()
    assert st.mxf4_kind.source == "SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_MXF4_KIND"
    assert config.default_sm100_mode() == "mxf4xmxf4"


def test_project_name_beats_sglang_name(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "0")
    clean_env.setenv("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS", "1")
    st = config.forward_env()
    assert st.fp4_acts.value is False
    assert os.environ[config.DG_FP4_ACTS] == "0"


def test_explicit_dg_value_wins(clean_env):
    clean_env.setenv(config.DG_FP4_ACTS, "1")
    clean_env.setenv(config.DG_MXF4_KIND, "1")
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "0")
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "0")
    st = config.forward_env()
    assert st.forwarded == ()
    assert os.environ[config.DG_FP4_ACTS] == "1"
    assert st.fp4_acts.source == config.DG_FP4_ACTS
    assert config.default_sm100_mode() == "mxf4xmxf4"


def test_forwarding_happens_once(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "1")
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "1")
    first = config.forward_env()
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "0")
    clean_env.delenv(config.DG_FP4_ACTS)
    second = config.forward_env()
    assert second is first
    assert config.DG_FP4_ACTS not in os.environ  # not re-forwarded
    assert config.default_sm100_mode() == "mxf4xmxf4"


def test_forwarding_is_thread_safe(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "1")
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "1")
    results = []
    barrier = threading.Barrier(16)

    def work():
        barrier.wait()
        results.append(config.forward_env())

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
        config.default_sm100_mode()


def test_fp4_acts_without_mxf4_kind_is_an_error(clean_env):
    clean_env.setenv("SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS", "1")
    with pytest.raises(ValueError, match="0.2.x no longer has"):
        config.default_sm100_mode()


def test_bad_boolean_names_the_variable(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_FP4_ACTS", "maybe")
    with pytest.raises(ValueError, match="JAX_MEGAMOE_USE_FP4_ACTS"):
        config.forward_env()


def test_explicit_mode_beats_environment(clean_env):
    clean_env.setenv("JAX_MEGAMOE_USE_MXF4_KIND", "1")  # impossible combination in the environment
    assert config.resolve_mode("fp8xfp4") == "fp8xfp4"
    assert config.resolve_mode("mxf4xmxf4", arch=9) == "mxf4xmxf4"
    assert config.resolve_mode(None, arch=9) == "fp8"
    with pytest.raises(ValueError):
        config.resolve_mode(None, arch=10)


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="mode: 'w4a16'"):
        config.check_mode("w4a16")


def test_register_forwards_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in ALL_VARS}
    env.update(JAX_MEGAMOE_USE_FP4_ACTS="1", SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_MXF4_KIND="1", JAX_PLATFORMS="cpu")
    code = (
        "import os, jax_megamoe as m; from jax_megamoe import config as c; m.register(); m.register();"
        "print(os.environ['DG_USE_FP4_ACTS'], os.environ['DG_USE_MXF4_KIND'], c.default_sm100_mode())"
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


def test_token_cap_alignment_and_config():
    assert config.align_token_cap(1, "fp8xfp4") == 1920
    assert config.align_token_cap(1921, "mxf4xmxf4") == 3840
    assert config.align_token_cap(129, "fp8") == 256
    cfg = config.MegaMoEConfig(4096, 2048, 256, 6, 1000, "fp8", activation_clamp=10.0)
    assert cfg.capacity == 1024 and cfg.act_group == 128
    assert config.MegaMoEConfig(4096, 2048, 256, 6, 1, "fp8xfp4").capacity == 1920
    assert hash(cfg) == hash(config.MegaMoEConfig(4096, 2048, 256, 6, 1000, "fp8", activation_clamp=10.0))
    with pytest.raises(ValueError, match="activation_clamp"):
        config.MegaMoEConfig(4096, 2048, 256, 6, 1000, "fp8", activation_clamp=-1.0)
