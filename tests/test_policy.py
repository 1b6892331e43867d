"""The process policy (jax_megamoe._src.numerics.policy): read once, frozen, precedence, passed explicitly."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe._src.kernels import ops
from jax_megamoe._src.numerics import config
from jax_megamoe._src.numerics import policy as policy_mod
from jax_megamoe._src.numerics.policy import Policy
from jax_megamoe.ops import MoEOptions


def test_precedence_project_name_over_sglang_alias_over_default():
    env = {
        "JAX_MEGAMOE_NUM_MAX_TOKENS": "300",
        "SGLANG_OPT_DEEPGEMM_MEGA_MOE_NUM_MAX_TOKENS_PER_RANK": "700",
        "SGLANG_OPT_DEEPGEMM_MEGA_MOE_RESERVED_SMS": "5",
        "JAX_MEGAMOE_GRAPH_TARGETS": "on",
    }
    p = Policy.from_environ(env)
    assert p.num_max_tokens == 300 and p.source("num_max_tokens") == "JAX_MEGAMOE_NUM_MAX_TOKENS"
    assert p.reserved_sms == 5 and p.source("reserved_sms") == "SGLANG_OPT_DEEPGEMM_MEGA_MOE_RESERVED_SMS"
    assert p.graph_targets is True and p.sm100_mega is False and p.source("sm100_mega") == "default"
    assert p.fused_ep is True and p.sm100_mode == "fp8xfp4"
    # An explicit change wins over everything and says so.
    q = p.replace(num_max_tokens=64)
    assert q.num_max_tokens == 64 and q.source("num_max_tokens") == "explicit" and q.reserved_sms == 5
    # The defaults with nothing set.
    d = Policy.from_environ({})
    assert (d.num_max_tokens, d.reserved_sms, d.graph_targets, d.sm100_mega, d.fused_ep) == (
        1024,
        2,
        False,
        False,
        True,
    )


def test_sm100_mode_from_flags_and_dg_wins():
    assert (
        Policy.from_environ({"JAX_MEGAMOE_USE_FP4_ACTS": "1", "JAX_MEGAMOE_USE_MXF4_KIND": "1"}).sm100_mode
        == "mxf4xmxf4"
    )
    assert Policy.from_environ({
        "SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_FP4_ACTS": "1", "SGLANG_OPT_DEEPGEMM_MEGA_MOE_USE_MXF4_KIND": "1",
        "DG_USE_FP4_ACTS": "0", "DG_USE_MXF4_KIND": "0",
    }).sm100_mode == "fp8xfp4"  # fmt: skip


def test_policy_is_frozen_hashable_and_sources_do_not_change_equality():
    a = Policy.from_environ({"JAX_MEGAMOE_NUM_MAX_TOKENS": "256"})
    b = Policy().replace(num_max_tokens=256)
    assert a == b and hash(a) == hash(b) and a.sources != b.sources
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.num_max_tokens = 3  # type: ignore[misc]
    assert len({a, b, Policy()}) == 2


@pytest.mark.parametrize("env, match", [
    ({"JAX_MEGAMOE_NUM_MAX_TOKENS": "many"}, "JAX_MEGAMOE_NUM_MAX_TOKENS='many' is not an integer"),
    ({"JAX_MEGAMOE_NUM_MAX_TOKENS": "0"}, "JAX_MEGAMOE_NUM_MAX_TOKENS: num_max_tokens: 0 must be an integer >= 1"),
    ({"JAX_MEGAMOE_FUSED_EP": "perhaps"}, "JAX_MEGAMOE_FUSED_EP='perhaps' is not a boolean"),
])  # fmt: skip
def test_bad_values_name_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        Policy.from_environ(env)


def test_bad_fields_name_the_argument():
    with pytest.raises(ValueError, match="sm100_mode: 'fp8' is not an sm_100 mode"):
        Policy(sm100_mode="fp8")
    with pytest.raises(TypeError, match="graph_targets: 1 must be a bool"):
        Policy(graph_targets=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown fields"):
        Policy().replace(num_tokens=3)
    with pytest.raises(TypeError, match="policy: expected a jax_megamoe.policy.Policy"):
        policy_mod.resolve({"num_max_tokens": 3})


def _fresh_process(code: str) -> str:
    """stdout of ``code`` run by a new Python (CPU JAX, an environment of its own)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_process_policy_is_read_once():
    """Set before the first read: seen; changed afterwards: not seen (no stale trace either way)."""
    code = (
        "import os\n"
        "os.environ['JAX_MEGAMOE_NUM_MAX_TOKENS'] = '96'\n"
        "os.environ['JAX_MEGAMOE_GRAPH_TARGETS'] = '1'\n"
        "import jax_megamoe\n"
        "from jax_megamoe import policy\n"
        "from jax_megamoe._src.kernels import ops\n"
        "jax_megamoe.register()\n"
        "os.environ['JAX_MEGAMOE_NUM_MAX_TOKENS'] = '4000'\n"
        "os.environ['JAX_MEGAMOE_GRAPH_TARGETS'] = '0'\n"
        "p = policy.current()\n"
        "assert p is policy.current()\n"
        "print(p.num_max_tokens, p.graph_targets, ops.default_num_max_tokens(), ops.graph_targets_enabled())\n"
        "print('num_max_tokens = 96  (JAX_MEGAMOE_NUM_MAX_TOKENS)' in jax_megamoe.describe())\n"
    )
    out = _fresh_process(code)
    assert out.split() == ["96", "True", "96", "True", "True"], out


def _inputs(t=7, h=512, e=8, k=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
    return x, idx, w


def _fp8_weights(seed, e=8, h=512, i=256):
    """Random FP4-checkpoint experts converted to mode ``fp8`` weights."""
    from jax_megamoe._src.numerics.layout import MoEWeights

    rng = np.random.default_rng(seed)
    w13 = rng.integers(0, 256, (e, 2 * i, h // 2), dtype=np.uint8)
    s13 = rng.integers(118, 124, (e, 2 * i, h // 32), dtype=np.uint8)
    w2 = rng.integers(0, 256, (e, h, i // 2), dtype=np.uint8)
    s2 = rng.integers(118, 124, (e, h, i // 32), dtype=np.uint8)
    return MoEWeights.from_checkpoint(w13, s13, w2, s2, mode="fp8")


def test_an_explicit_policy_is_what_the_ops_trace_with(monkeypatch):
    """The cap and graph choice come from the ``policy=`` passed, never from os.environ at trace time."""
    weights = _fp8_weights(3)
    x, idx, w = _inputs()

    def lower(p):
        fn = jax.jit(
            lambda x, i, w: ops.mega_moe(x, i, w, weights, backend="ffi", options=MoEOptions(kernel="fused", policy=p))
        )
        return fn.trace(x, idx, w).lower(lowering_platforms=("cuda",)).as_text()

    monkeypatch.setenv("JAX_MEGAMOE_GRAPH_TARGETS", "1")  # ignored: the policy is explicit
    base = Policy()
    text = lower(base)
    assert "@jax_megamoe_mega_moe_sm90(" in text and "_graph" not in text
    text = lower(base.replace(graph_targets=True, num_max_tokens=200))
    assert "@jax_megamoe_mega_moe_sm90_graph(" in text
    assert f"capacity = {config.align_token_cap(200, 'fp8')} : i64" in text
    # above the policy's cap (the policy's, not the default 1024) the buffer grows to the power
    # of two >= T, up to the policy's prefill_token_cap; above that the kernel runs in chunks
    x, idx, w = _inputs(t=300)
    text = lower(base.replace(num_max_tokens=4))
    assert text.count("@jax_megamoe_mega_moe_sm90(") == 1
    assert f"capacity = {config.align_token_cap(512, 'fp8')} : i64" in text
    text = lower(base.replace(num_max_tokens=4, prefill_token_cap=200))
    assert f"capacity = {config.align_token_cap(200, 'fp8')} : i64" in text
    assert text.count("@jax_megamoe_mega_moe_sm90(") == 2  # 256 + 44 rows


def _wide_tile_attr(text: str) -> str:
    """The sm90_wide_tile attribute of the one sm_90 mega-kernel custom call in ``text``."""
    import re

    lines = [ln for ln in text.splitlines() if "@jax_megamoe_mega_moe_sm90" in ln]
    assert len(lines) == 1, lines
    m = re.search(r"sm90_wide_tile = (true|false)", lines[0])
    assert m, lines[0]
    return m.group(1)


def test_policy_wide_tile_reaches_the_lowered_attribute(monkeypatch):
    """``policy.replace(sm90_wide_tile=True)`` becomes the custom call's ``sm90_wide_tile = true``
    (the C++ reads nothing else); the environment at trace time does not matter."""
    e = 8
    weights = _fp8_weights(5, e=e)
    x, idx, w = _inputs(seed=5)

    def lower(p):
        fn = jax.jit(
            lambda x, i, w: ops.mega_moe(x, i, w, weights, backend="ffi", options=MoEOptions(kernel="fused", policy=p))
        )
        return fn.trace(x, idx, w).lower(lowering_platforms=("cuda",)).as_text()

    monkeypatch.setenv("JAX_MEGAMOE_SM90_WIDE_TILE", "1")  # ignored: the policy is explicit
    assert _wide_tile_attr(lower(Policy())) == "false"
    monkeypatch.setenv("JAX_MEGAMOE_SM90_WIDE_TILE", "0")
    assert _wide_tile_attr(lower(Policy().replace(sm90_wide_tile=True))) == "true"
    # the bare custom call takes it in its call spec too
    for wide in (True, False):
        spec = ops.MegaMoECall("fp8", num_experts=e, capacity=128, sm90_wide_tile=wide)
        text = jax.jit(lambda a, b, c, spec=spec: ops.mega_moe_target_call(a, b, c, weights, spec)).trace(
            x, idx, w).lower(lowering_platforms=("cuda",)).as_text()  # fmt: skip
        assert _wide_tile_attr(text) == str(wide).lower()
    with pytest.raises(TypeError, match="call: expected a MegaMoECall"):
        ops.mega_moe_target_call(x, idx, w, weights, {"sm90_wide_tile": True})


def test_a_traced_function_keeps_the_wide_tile_it_was_read_with():
    """JAX_MEGAMOE_SM90_WIDE_TILE is read once, into the process policy: changing it afterwards
    changes neither an already jitted function (lowered again) nor a new one."""
    code = (
        "import os\n"
        "os.environ['JAX_MEGAMOE_SM90_WIDE_TILE'] = '1'\n"
        "import re\n"
        "import jax, jax.numpy as jnp, numpy as np\n"
        "import jax_megamoe\n"
        "from jax_megamoe import policy\n"
        "from jax_megamoe._src.kernels import ops\n"
        "from jax_megamoe._src.numerics.layout import MoEWeights\n"
        "jax_megamoe.register()\n"
        "rng = np.random.default_rng(9)\n"
        "e, h, i = 8, 512, 256\n"
        "u = lambda *s: rng.integers(0, 256, s, dtype=np.uint8)\n"
        "sf = lambda *s: rng.integers(118, 124, s, dtype=np.uint8)\n"
        "wts = MoEWeights.from_checkpoint(u(e, 2 * i, h // 2), sf(e, 2 * i, h // 32), u(e, h, i // 2),\n"
        "                                 sf(e, h, i // 32), mode='fp8')\n"
        "x = jnp.asarray(rng.standard_normal((7, h)), jnp.bfloat16)\n"
        "idx = jnp.asarray(np.stack([rng.choice(e, 2, replace=False) for _ in range(7)]), jnp.int32)\n"
        "w = jnp.asarray(rng.uniform(0.1, 1.0, (7, 2)), jnp.float32)\n"
        "mk = lambda: jax.jit(lambda x, i, w: ops.mega_moe(x, i, w, wts, backend='ffi', options=ops.MoEOptions(kernel='fused')))\n"
        "attr = lambda f: re.findall(r'sm90_wide_tile = (true|false)',\n"
        "                            f.trace(x, idx, w).lower(lowering_platforms=('cuda',)).as_text())\n"
        "f = mk()\n"
        "before = attr(f)\n"
        "os.environ['JAX_MEGAMOE_SM90_WIDE_TILE'] = '0'\n"
        "print(policy.current().sm90_wide_tile, before, attr(f), attr(mk()))\n"
    )
    out = _fresh_process(code)
    assert out.split() == ["True", "['true']", "['true']", "['true']"], out
