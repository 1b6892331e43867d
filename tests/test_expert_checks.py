"""The per-expert / per-scale-block check of the GPU suite (tests/expert_checks.py), on CPU.

The reference stands in for the kernel and the float64 emulating oracle of test_reference.py for
the reference: clean weights pass with every expert's error far below the bound; one planted wrong
128x128 scale block is caught, named by expert and column block, also where the whole-output
relative L2 bound of 1e-2 passes it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from expert_checks import check_per_expert, expert_errors, expert_of_rows, plant_scale_block, single_expert_routing
from test_reference import make_weights, make_x, np_moe, np_quantize_x

from jax_megamoe import reference

E, H, I, K = 16, 512, 256, 4
TOL = 1e-2  # the GPU suite's bound, per expert here


@pytest.fixture(scope="module")
def case():
    weights, w13, w2 = make_weights("fp8", E, H, I, seed=3)
    idx, w = single_expert_routing(np.arange(E), rows_per_expert=8, top_k=K, seed=4)
    t = idx.shape[0]
    x = make_x(np.random.default_rng(5), t, H, scale=4.0)
    _, _, xd = np_quantize_x(x, "fp8")
    oracle = np_moe(xd, idx, w.astype(np.float64), w13, w2, mode="fp8", clamp=None, emulate=True)
    return weights, x, idx, w, oracle


def _run(weights, x, idx, w):
    return np.asarray(reference.mega_moe(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), weights, mode="fp8"))


def test_routing_gives_each_expert_its_rows():
    idx, w = single_expert_routing([3, 7, 11], rows_per_expert=5, top_k=6, seed=0)
    owner = expert_of_rows(idx)
    assert sorted(owner.tolist()) == [3] * 5 + [7] * 5 + [11] * 5
    assert ((idx >= 0).sum(axis=1) == 1).all() and len(set(np.argmax(idx >= 0, axis=1).tolist())) > 1
    assert ((w > 0) == (idx >= 0)).all() and (w[idx >= 0] >= 0.5).all()
    with pytest.raises(ValueError, match="row 0 is routed to"):
        expert_of_rows(np.array([[1, 2], [3, -1]]))
    with pytest.raises(ValueError, match=r"row 1 is routed to \[4, 0\]"):
        expert_of_rows(np.array([[2, 2], [4, 0]], np.int32))
    # one expert named in several slots is still one expert per row; no slot at all is -1
    assert expert_of_rows(np.array([[5, -1, 5], [-1, -1, -1], [-1, 0, -1]], np.int32)).tolist() == [5, -1, 0]


def test_clean_weights_pass(case):
    weights, x, idx, w, oracle = case
    errs = check_per_expert(_run(weights, x, idx, w), oracle, idx, tol=TOL, what="clean")
    assert sorted(errs.per_expert) == list(range(E))
    assert max(errs.per_expert.values()) < 1e-3 and errs.overall < 1e-3  # far below: the bound has room
    assert all(v.shape == (H // 128,) for v in errs.per_block.values())


@pytest.mark.parametrize("leaf, block", [("l2_sf", (2, 1)), ("l1_sf", (1, 3))])
def test_planted_scale_block_is_caught(case, leaf, block):
    """A factor-2 error in one scale block of expert 5: that expert (and for l2_sf that one output
    column block) is named; no other expert moves."""
    weights, x, idx, w, oracle = case
    bad = plant_scale_block(weights, expert=5, leaf=leaf, block=block, factor=2.0)
    got = _run(bad, x, idx, w)
    with pytest.raises(AssertionError, match=r"experts over rel. L2 0.01: \{5: ") as info:
        check_per_expert(got, oracle, idx, tol=TOL, what="planted")
    errs = expert_errors(got, oracle, idx)
    assert [e for e, v in errs.per_expert.items() if v > TOL] == [5], str(info.value)
    if leaf == "l2_sf":
        assert np.flatnonzero(errs.per_block[5] > 2 * TOL).tolist() == [block[0]]
        assert errs.worst()[:1] + errs.worst()[2:3] == (5, block[0])


def test_subtle_planted_block_passes_the_whole_output_bound_but_not_the_per_expert_one(case):
    """10% off in one l2_sf block: rel. L2 over the whole output stays under 1e-2 (the old check
    passes it); the expert's rows and its column block do not."""
    weights, x, idx, w, oracle = case
    got = _run(plant_scale_block(weights, expert=9, leaf="l2_sf", block=(0, 0), factor=1.1), x, idx, w)
    errs = expert_errors(got, oracle, idx)
    assert errs.overall < TOL, errs.overall
    assert errs.per_expert[9] > TOL and errs.per_block[9][0] > 2 * TOL, (errs.per_expert[9], errs.per_block[9])
    with pytest.raises(AssertionError, match=r"\(9, 0\)"):
        check_per_expert(got, oracle, idx, tol=TOL)


def test_rows_routed_nowhere_must_be_zero(case):
    weights, x, idx, w, oracle = case
    got = _run(weights, x, idx, w)
    idx2 = idx.copy()
    idx2[0] = -1  # row 0 now counts as routed nowhere, but got[0] is an expert's output
    with pytest.raises(AssertionError, match="routed nowhere must be exactly 0"):
        check_per_expert(got, oracle, idx2, tol=TOL)


def test_plant_errors():
    weights, _, _ = make_weights("fp8xfp4", E, H, I, seed=3)
    with pytest.raises(ValueError, match="needs mode 'fp8'"):
        plant_scale_block(weights, expert=0)
    fp8, _, _ = make_weights("fp8", E, H, I, seed=3)
    with pytest.raises(ValueError, match=r"outside l2_sf's shape \[16, 4, 2\]"):
        plant_scale_block(fp8, expert=0, block=(0, 2))
    same = plant_scale_block(fp8, expert=1, block=(3, 1), factor=1.0)
    np.testing.assert_array_equal(np.asarray(same.l2_sf), np.asarray(fp8.l2_sf))
    assert same.l1 is fp8.l1  # the data leaves are shared
