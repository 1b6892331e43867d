"""DeepSeek V4's MTP block (multi-token prediction, ``mtp.k.*``) and speculative greedy decoding with it.

The block (DeepSeek's ``MTPBlock``, a decoder layer with a head): given the main model's hidden
streams ``h [B, S, hc, H]`` after its last layer (before the hyper-head) at positions ``t`` and the
tokens ``x[t + 1]`` that follow them,

    e = enorm(embed(x[t + 1]))                       (the main model's ``embed``)
    s = e_proj(e)[:, :, None] + h_proj(hnorm(h))     (every stream gets the same e_proj(e))
    s = Block(s, t)                                  (a whole decoder layer, its own attention cache)
    logits = head(norm(hc_head(s)))                  (its own hc_head_* and norm; the main ``head``)

predicts ``x[t + 2]``. The layer's index is ``num_hidden_layers + k`` (its compress ratio the
config's entry there, :func:`~jax_megamoe.checkpoint.mtp_compress_ratio`: 0 when unlisted), its
MoE never hash-routed. Checkpoint copies of the embedding/head under ``mtp.`` are not used (the
block has no such attributes; the loaders skip them). The attention cache of block ``k`` is
``ModelCache.mtp[k]``, written at the same positions as the main layers'.

Speculative greedy decoding (:func:`speculative_greedy`, one draft token per step): the state is
the accepted token ``a`` at position ``P`` (not yet in the caches) and the MTP's draft ``d`` for
``P + 1``. One jitted step runs the main model on ``[a, d]`` at ``[P, P + 1]`` (one 2-token
forward), takes its argmax ``m0, m1``, accepts when ``m0 == d`` (then ``d`` and ``m1`` are both
greedy tokens), and runs the MTP on the streams it just computed with the tokens ``[d or m0, m1]``
to draft the token after the new ``a`` (position index 1 when accepted, 0 when not).

Cache rollback on a rejected draft: ``d`` was written at ``P + 1`` in every layer's cache. The
sliding-window ring needs nothing (the slot of ``P + 1`` held position ``P + 1 - W``, which no later
query sees, and the next step rewrites it), nor do the compressors *unless* position ``P + 1``
completed a compression window (``(P + 2) % r == 0`` for a layer's ratio ``r``): then the
compressor already pooled an entry with ``d`` in it and moved its pending state on to the next
window, dropping the tokens the rewrite of ``P + 1`` needs. In that case only (a fraction of
about ``1/4`` of the rejects with CSA layers, main or MTP) the caches from before the step are kept
and the next step re-runs ``[a, m0]`` at ``[P, P + 1]`` with ``m0`` taken as accepted (a replay,
counted in :class:`SpeculativeResult`); otherwise the step's caches are kept and the next step
starts at ``P + 1``. Both ways, every position's logits are computed from exactly the tokens of
plain greedy decoding, so the generated tokens are the same (tests check this on random weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_megamoe._src.models.deepseek_v4.model import (
    DeepseekV4ForCausalLM,
    DeepseekV4MTPBlock,
    ModelCache,
    forward_streams,
)

__all__ = ["DeepseekV4MTPBlock", "SpeculativeResult", "jit_mtp_draft", "mtp_draft", "speculative_greedy"]


def _check_draft_inputs(model: Any, cache: Any, streams: Any, next_tokens: Any, positions: Any) -> None:
    if not isinstance(model, DeepseekV4ForCausalLM):
        raise TypeError(f"model: expected a DeepseekV4ForCausalLM, got {type(model).__name__}")
    if len(model.mtp) == 0:
        raise ValueError("model: has no MTP block (config.num_nextn_predict_layers is 0)")
    for name, a in (("next_tokens", next_tokens), ("positions", positions)):
        if not hasattr(a, "shape") or len(a.shape) != 2 or not jnp.issubdtype(a.dtype, jnp.integer):
            raise TypeError(f"{name}: expected an int32 array [batch, seq], got {getattr(a, 'shape', type(a))}")
    want = (*next_tokens.shape, model.spec.hc_mult, model.config.hidden_size)
    if not hasattr(streams, "shape") or tuple(streams.shape) != want:
        raise ValueError(
            f"streams: expected shape {want} (forward_streams' output), got {getattr(streams, 'shape', None)}"
        )
    if tuple(positions.shape) != tuple(next_tokens.shape):
        raise ValueError(
            f"positions: shape {tuple(positions.shape)} must equal next_tokens' {tuple(next_tokens.shape)}"
        )
    if cache is not None and (not isinstance(cache, ModelCache) or len(cache.mtp) != len(model.mtp)):
        raise TypeError("cache: expected a ModelCache with one entry per MTP block (model.init_cache)")


def mtp_draft(
    model: DeepseekV4ForCausalLM,
    cache: ModelCache | None,
    streams: jax.Array,
    next_tokens: jax.Array,
    positions: jax.Array,
) -> tuple[jax.Array, ModelCache | None]:
    """Draft logits f32 ``[B, S, vocab]`` of MTP block 0: row ``j`` predicts the token at
    ``positions[:, j] + 2`` from the main model's ``streams`` at ``positions`` (from
    :func:`~.model.forward_streams`) and ``next_tokens`` (the tokens at ``positions + 1``).

    With ``cache`` (``model.init_cache``): continues the MTP block's attention cache
    (``cache.mtp[0]``, the main layers' entries untouched) at ``positions[:, 0]``; fixed shapes, so
    one jitted function (:func:`jit_mtp_draft`) serves every position. ``cache=None``: causal over
    the S positions (a sequence from 0).
    """
    _check_draft_inputs(model, cache, streams, next_tokens, positions)
    next_tokens = next_tokens.astype(jnp.int32)
    block = model.mtp[0]
    embedded = model.embed(next_tokens)
    y, c = block(streams, embedded, positions.astype(jnp.int32), next_tokens, None if cache is None else cache.mtp[0])
    logits = model.head(y)
    return logits, (None if cache is None else cache._replace(mtp=(c, *cache.mtp[1:])))


def _merged_draft(graphdef: Any, state: Any, cache: Any, streams: jax.Array, tokens: jax.Array, positions: jax.Array):
    return mtp_draft(nnx.merge(graphdef, state), cache, streams, tokens, positions)


_jitted_draft = jax.jit(_merged_draft, static_argnums=0)


def jit_mtp_draft(
    model: DeepseekV4ForCausalLM,
) -> Callable[[ModelCache | None, jax.Array, jax.Array, jax.Array], tuple[jax.Array, ModelCache | None]]:
    """A jitted ``draft(cache, streams, next_tokens, positions) -> (logits, cache)`` (:func:`mtp_draft`)
    over ``model``'s current parameters, as :func:`~.model.jit_forward` does for the forward."""
    if not isinstance(model, DeepseekV4ForCausalLM):
        raise TypeError(f"model: expected a DeepseekV4ForCausalLM, got {type(model).__name__}")
    graphdef, state = nnx.split(model)

    def draft(
        cache: ModelCache | None, streams: jax.Array, next_tokens: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, ModelCache | None]:
        return _jitted_draft(graphdef, state, cache, streams, next_tokens, positions)

    return draft


# ---------------------------------------------------------------------------------------------
# Speculative greedy decoding
# ---------------------------------------------------------------------------------------------


class SpeculativeResult(NamedTuple):
    """What :func:`speculative_greedy` generated and how often the draft was right.

    ``tokens`` int32 ``[B, new_tokens]``; ``steps``: 2-token main forwards after the prefill;
    ``drafted`` / ``accepted``: drafts checked / accepted, summed over the rows; ``replays``: steps
    that re-ran a position after a rejected draft had completed a compression window (see the
    module docstring).
    """

    tokens: np.ndarray
    steps: int
    drafted: int
    accepted: int
    replays: int

    @property
    def acceptance_rate(self) -> float:
        """``accepted / drafted`` (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


def _spec_step(graphdef: Any, state: Any, cache: ModelCache, tokens: jax.Array, positions: jax.Array, force: jax.Array):
    """Verify ``tokens = [a, d]`` and draft the next token: ``(argmax [B, 2], accepted [B], draft [B], cache)``."""
    model = nnx.merge(graphdef, state)
    logits, streams, cache = forward_streams(model, cache, tokens, positions)
    m = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    acc = force | (m[:, 0] == tokens[:, 1])
    mtp_tokens = jnp.stack([jnp.where(acc, tokens[:, 1], m[:, 0]), m[:, 1]], axis=1)
    dl, cache = mtp_draft(model, cache, streams, mtp_tokens, positions)
    d = jnp.argmax(dl, axis=-1).astype(jnp.int32)
    return m, acc, jnp.where(acc, d[:, 1], d[:, 0]), cache


def _prefill(graphdef: Any, state: Any, cache: ModelCache, prompt: jax.Array):
    """Prompt through the main model and the MTP block: ``(first token [B], first draft [B], cache)``."""
    model = nnx.merge(graphdef, state)
    b, s = prompt.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
    logits, streams, cache = forward_streams(model, cache, prompt, pos)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    nxt = jnp.concatenate([prompt[:, 1:], first[:, None]], axis=1)
    dl, cache = mtp_draft(model, cache, streams, nxt, pos)
    return first, jnp.argmax(dl[:, -1], axis=-1).astype(jnp.int32), cache


def _select_rows(keep: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(keep.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


_jitted_step = jax.jit(_spec_step, static_argnums=0)
_jitted_prefill = jax.jit(_prefill, static_argnums=0)
_jitted_select = jax.jit(_select_rows)


def _ratios(model: DeepseekV4ForCausalLM) -> tuple[int, ...]:
    blocks = (*model.layers, *model.mtp)
    return tuple(sorted({int(b.attn.compress_ratio) for b in blocks if b.attn.compress_ratio}))


def speculative_greedy(
    model: DeepseekV4ForCausalLM,
    prompt: Any,
    new_tokens: int,
    *,
    cache_dtype: Any = jnp.float32,
) -> SpeculativeResult:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt`` int ``[B, S]`` with MTP block 0 as a
    one-token draft: the same tokens as plain greedy decoding with :func:`~.model.forward`, in
    fewer main-model steps when drafts are accepted (one 2-token forward + one MTP step per step;
    three compiles: prefill, step and a per-row cache select). Rows advance independently.
    ``cache_dtype``: as ``model.init_cache`` (float32 keeps the tokens equal to a float32-cache
    plain decode). See the module docstring for the cache rollback.
    """
    if not isinstance(model, DeepseekV4ForCausalLM):
        raise TypeError(f"model: expected a DeepseekV4ForCausalLM, got {type(model).__name__}")
    if len(model.mtp) == 0:
        raise ValueError("model: has no MTP block to draft with (config.num_nextn_predict_layers is 0)")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens: {new_tokens!r} must be a positive integer")
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.dtype.kind not in "iu":
        raise ValueError(f"prompt: expected integer token ids [batch, seq >= 1], got {prompt.dtype} {prompt.shape}")
    if prompt.min() < 0 or prompt.max() >= model.config.vocab_size:
        raise ValueError(f"prompt: ids must be in [0, {model.config.vocab_size})")
    b, plen = prompt.shape
    graphdef, state = nnx.split(model)
    cache = model.init_cache(b, plen + new_tokens + 2, cache_dtype)
    first, draft, cache = _jitted_prefill(graphdef, state, cache, jnp.asarray(prompt, jnp.int32))
    out = [[int(t)] for t in np.asarray(first)]
    pos = np.full((b,), plen, np.int64)  # P: position of the accepted token a
    tok = np.asarray(first).astype(np.int32)  # a
    dr = np.asarray(draft).astype(np.int32)  # d, for P + 1
    forced = np.zeros((b,), bool)
    ratios = _ratios(model)
    steps = drafted = accepted = replays = 0
    while min(len(o) for o in out) < new_tokens:
        active = np.array([len(o) < new_tokens for o in out])
        tokens = jnp.asarray(np.stack([tok, dr], axis=1))
        positions = jnp.asarray(np.stack([pos, pos + 1], axis=1).astype(np.int32))
        m, acc, nd, new_cache = _jitted_step(graphdef, state, cache, tokens, positions, jnp.asarray(forced))
        m, acc, nd = np.asarray(m), np.asarray(acc), np.asarray(nd)
        steps += 1
        keep = np.zeros((b,), bool)
        for r in np.flatnonzero(active):
            p = int(pos[r])
            if not forced[r]:
                drafted += 1
            if acc[r]:
                if not forced[r]:
                    accepted += 1
                    out[r].append(int(dr[r]))
                out[r].append(int(m[r, 1]))
                keep[r], pos[r], tok[r], dr[r], forced[r] = True, p + 2, m[r, 1], nd[r], False
            elif all((p + 2) % q for q in ratios):
                out[r].append(int(m[r, 0]))
                keep[r], pos[r], tok[r], dr[r] = True, p + 1, m[r, 0], nd[r]
            else:  # P + 1 closed a compression window: keep the old caches, replay [a, m0]
                out[r].append(int(m[r, 0]))
                dr[r], forced[r] = m[r, 0], True
                replays += 1
        cache = new_cache if keep.all() else _jitted_select(jnp.asarray(keep), new_cache, cache)
    tokens_out = np.asarray([o[:new_tokens] for o in out], np.int32)
    return SpeculativeResult(tokens_out, steps, drafted, accepted, replays)
