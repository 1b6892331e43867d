"""Static token buckets of the Flax block's kernel path."""

from __future__ import annotations

import pytest

from jax_megamoe._src.models.deepseek_v4.moe import token_bucket


@pytest.mark.parametrize(
    "t, cap, want",
    [(1, 1024, 16), (16, 1024, 16), (17, 1024, 32), (600, 1000, 1000), (1000, 1000, 1000), (1025, 1024, 1025)],
)
def test_token_bucket(t, cap, want):
    assert token_bucket(t, cap) == want


def test_buckets_cover_every_count_and_are_few():
    cap = 1024
    buckets = {token_bucket(t, cap) for t in range(1, cap + 1)}
    assert all(token_bucket(t, cap) >= t for t in range(1, cap + 1))
    assert buckets == {16, 32, 64, 128, 256, 512, 1024}
