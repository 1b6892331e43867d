"""Static token buckets of the Flax block's kernel path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jax_megamoe._src.kernels import ops
from jax_megamoe._src.models.deepseek_v4 import moe
from jax_megamoe._src.models.deepseek_v4.moe import token_bucket
from jax_megamoe.layout import MoEWeights
from jax_megamoe.models.deepseek_v4 import DeepseekV4Config, random_moe_checkpoint
from jax_megamoe.policy import Policy


@pytest.mark.parametrize(
    "t, cap, want",
    [
        (1, 1024, 16),
        (16, 1024, 16),
        (17, 1024, 32),
        (600, 1000, 1000),
        (1000, 1000, 1000),
        (1025, 1024, 2048),  # above the cap: whole chunks of it
        (4097, 4096, 8192),
        (10000, 4096, 12288),
    ],
)
def test_token_bucket(t, cap, want):
    assert token_bucket(t, cap) == want


def test_buckets_cover_every_count_and_are_few():
    cap = 1024
    buckets = {token_bucket(t, cap) for t in range(1, cap + 1)}
    assert all(token_bucket(t, cap) >= t for t in range(1, cap + 1))
    assert buckets == {16, 32, 64, 128, 256, 512, 1024}


@pytest.mark.parametrize(
    "t, seen",
    [
        (1, 1),  # T * K = 6 <= 48: the decode kernels, which take any T (a bucket of 16 would not)
        (8, 8),
        (9, 16),  # 54 pairs: the fused kernel, on a bucket
        (1500, 2048),  # above the policy's 1024: the raised cap's bucket
        (5000, 8192),  # above the prefill cap 4096: whole chunks of it
    ],
)
def test_the_block_pads_only_what_the_fused_kernel_runs(monkeypatch, t, seen):
    """The routed experts of the Flax block, on a (simulated) GPU: the token count ops.mega_moe is
    called with, and the rows that come back are the first ``t``."""
    weights = MoEWeights.from_checkpoint(*random_moe_checkpoint(DeepseekV4Config.tiny(), 3), mode="fp8")  # E 16, H 512
    rng = np.random.default_rng(t)
    x = jnp.asarray(rng.standard_normal((t, 512)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(16, 6, replace=False) for _ in range(t)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (t, 6)), jnp.float32)
    calls = []

    def fake(x, topk_idx, topk_weights, weights, **kw):
        calls.append(x.shape[0])
        return x * 2  # each row its own: a padded row could only come back as itself

    monkeypatch.setattr(ops, "choose_backend", lambda backend, mode, op: "ffi")
    monkeypatch.setattr(ops, "mega_moe", fake)
    y = moe._routed_experts(x, idx, w, weights, "auto", activation_clamp=10.0, policy=Policy())
    assert calls == [seen]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x * 2))
