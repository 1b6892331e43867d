"""Per-expert and per-scale-block checks of a Mega MoE output against a reference (imported by
tests, not collected): tests/test_expert_checks.py (CPU, the reference against a float64 oracle),
tests/gpu/test_mega_moe_sm90_gpu.py and tests/gpu/test_decode_gpu.py (the kernels against the
reference).

A relative L2 bound over the whole output ``[T, H]`` is blind to a local fault: one expert of 256
with a 10% error, or one wrong 128x128 weight-scale block, moves it by well under 1e-2. So route
every token to exactly **one** expert (:func:`single_expert_routing`): then each output row is one
expert's FFN, and :func:`check_per_expert` bounds the relative error of every expert's rows and of
every ``(expert, 128-column block)`` cell (the output columns one ``l2_sf`` scale row covers).
:func:`plant_scale_block` corrupts one 128x128 scale block, to show that the check catches it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

BLOCK = 128


def single_expert_routing(experts, rows_per_expert: int, top_k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(topk_idx int32 [T, K], topk_weights f32 [T, K])``, ``T = len(experts) * rows_per_expert``:
    each token routed to one expert, in a random slot (the other slots ``-1``), every expert of
    ``experts`` getting exactly ``rows_per_expert`` tokens, in shuffled order; weights in
    ``[0.5, 1.5)``."""
    experts = np.asarray(experts, np.int32)
    if experts.ndim != 1 or experts.size == 0 or len(set(experts.tolist())) != experts.size:
        raise ValueError(f"experts: expected distinct expert ids, got {experts.tolist()}")
    if rows_per_expert < 1 or top_k < 1:
        raise ValueError(f"rows_per_expert={rows_per_expert}, top_k={top_k}: both must be >= 1")
    rng = np.random.default_rng(seed)
    owner = rng.permutation(np.repeat(experts, rows_per_expert))
    t = owner.size
    idx = np.full((t, top_k), -1, np.int32)
    slot = rng.integers(0, top_k, size=t)
    idx[np.arange(t), slot] = owner
    w = np.zeros((t, top_k), np.float32)
    w[np.arange(t), slot] = rng.uniform(0.5, 1.5, size=t).astype(np.float32)
    return idx, w


def expert_of_rows(idx) -> np.ndarray:
    """The one expert each row is routed to (``-1``: none; a row may name it in several slots);
    ValueError for a row routed to several experts."""
    idx = np.asarray(idx)
    valid = idx >= 0
    hi = np.max(np.where(valid, idx, -1), axis=1)
    lo = np.min(np.where(valid, idx, np.iinfo(idx.dtype).max), axis=1)
    several = valid.any(axis=1) & (hi != lo)
    if several.any():
        r = int(np.flatnonzero(several)[0])
        raise ValueError(f"topk_idx: row {r} is routed to {idx[r][valid[r]].tolist()}; the per-expert check "
                         "needs one expert per row (single_expert_routing)")  # fmt: skip
    return np.where(valid.any(axis=1), hi, -1)


def _rel(g: np.ndarray, r: np.ndarray) -> float:
    return float(np.linalg.norm(g - r) / max(float(np.linalg.norm(r)), 1e-30))


@dataclasses.dataclass(frozen=True)
class ExpertErrors:
    """Relative L2 errors: ``per_expert[e]`` over expert ``e``'s rows, ``per_block[e][b]`` over its
    rows and output columns ``[b * 128, (b + 1) * 128)``, ``overall`` over the whole output."""

    per_expert: dict[int, float]
    per_block: dict[int, np.ndarray]
    overall: float

    def worst(self) -> tuple[int, float, int, float]:
        """``(expert, its error, column block, that cell's error)`` of the largest cell error."""
        e = max(self.per_block, key=lambda k: float(self.per_block[k].max()))
        b = int(np.argmax(self.per_block[e]))
        return e, self.per_expert[e], b, float(self.per_block[e][b])


def expert_errors(got, want, idx, *, block: int = BLOCK) -> ExpertErrors:
    """Per-expert and per-(expert, column block) relative L2 errors of ``got`` against ``want``
    (both ``[T, H]``) for one-expert-per-row routing ``idx``."""
    g = np.asarray(got, np.float32).astype(np.float64)
    r = np.asarray(want, np.float32).astype(np.float64)
    if g.shape != r.shape or g.ndim != 2:
        raise ValueError(f"got/want: expected two equal [T, H] shapes, got {g.shape} and {r.shape}")
    if g.shape[1] % block:
        raise ValueError(f"block: {block} does not divide H={g.shape[1]}")
    owner = expert_of_rows(idx)
    if owner.shape[0] != g.shape[0]:
        raise ValueError(f"topk_idx: {owner.shape[0]} rows for an output of {g.shape[0]}")
    per_expert, per_block = {}, {}
    nb = g.shape[1] // block
    for e in np.unique(owner[owner >= 0]).tolist():
        rows = owner == e
        ge, re_ = g[rows], r[rows]
        per_expert[e] = _rel(ge, re_)
        gb, rb = ge.reshape(-1, nb, block), re_.reshape(-1, nb, block)
        per_block[e] = np.array([_rel(gb[:, b], rb[:, b]) for b in range(nb)])
    return ExpertErrors(per_expert, per_block, _rel(g, r))


def check_per_expert(got, want, idx, *, tol: float, block_tol: float | None = None, what: str = "") -> ExpertErrors:
    """Assert every expert's relative L2 error ``<= tol`` and every (expert, 128-column block)
    cell's ``<= block_tol`` (default ``2 * tol``), and that rows routed nowhere are exactly 0.
    The AssertionError lists the experts and cells over their bound. Returns the errors."""
    block_tol = 2 * tol if block_tol is None else block_tol
    g = np.asarray(got, np.float32)
    owner = expert_of_rows(idx)
    assert np.isfinite(g).all(), f"{what}: non-finite outputs"
    assert (g[owner < 0] == 0).all(), f"{what}: rows routed nowhere must be exactly 0"
    errs = expert_errors(got, want, idx)
    bad_e = {e: v for e, v in errs.per_expert.items() if not v <= tol}
    bad_b = {(e, int(b)): float(v[b]) for e, v in errs.per_block.items() for b in np.flatnonzero(~(v <= block_tol))}
    assert not bad_e and not bad_b, (
        f"{what}: experts over rel. L2 {tol:g}: {_fmt(bad_e)}; (expert, column block) cells over {block_tol:g}: "
        f"{_fmt(bad_b)} (whole output: {errs.overall:.2e})"
    )
    return errs


def _fmt(d: dict) -> str:
    items = sorted(d.items(), key=lambda kv: -kv[1])
    s = ", ".join(f"{k}: {v:.2e}" for k, v in items[:8])
    return "{" + s + (f", ... {len(items) - 8} more" if len(items) > 8 else "") + "}"


def plant_scale_block(
    weights, *, expert: int, leaf: str = "l2_sf", block: tuple[int, int] = (0, 0), factor: float = 2.0
):
    """A copy of mode-``fp8`` ``weights`` whose one 128x128 scale block ``block`` (row block, column
    block) of ``leaf`` (``"l1_sf"``: ``[E, 2I/128, H/128]``, ``"l2_sf"``: ``[E, H/128, I/128]``) of
    local expert ``expert`` is multiplied by ``factor``; the other leaves are shared, not copied.
    ``l2_sf`` block ``(r, c)`` scales the contribution of intermediate columns ``[c*128, (c+1)*128)``
    to output columns ``[r*128, (r+1)*128)``."""
    if weights.mode != "fp8":
        raise ValueError(f"weights: plant_scale_block needs mode 'fp8' (128x128 f32 scales), got {weights.mode!r}")
    if leaf not in ("l1_sf", "l2_sf"):
        raise ValueError(f"leaf: {leaf!r} is not 'l1_sf' or 'l2_sf'")
    sf = getattr(weights, leaf)
    r, c = block
    if not (0 <= expert < sf.shape[0] and 0 <= r < sf.shape[1] and 0 <= c < sf.shape[2]):
        raise ValueError(f"expert/block: ({expert}, {r}, {c}) is outside {leaf}'s shape {list(sf.shape)}")
    bad = jnp.asarray(sf).at[expert, r, c].multiply(jnp.float32(factor))
    return dataclasses.replace(weights, **{leaf: bad})
