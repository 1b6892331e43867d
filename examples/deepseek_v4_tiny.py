"""A tiny DeepSeek-V4-shaped language model that generates tokens with a jitted decode step.

Embedding -> L x [RMSNorm -> token mixer -> residual -> RMSNorm -> ``DeepseekV4MoE`` -> residual]
-> RMSNorm -> LM head, greedy decoding. The MoE blocks are the real thing (gate with sqrtsoftplus
scores and the selection bias, hash routing by token id on the first ``num_hash_layers`` layers,
routed experts through ``jax_megamoe``, shared expert); V4's attention is replaced by a stand-in: a
causal mean of the normed hidden states so far, through one linear layer (its decode state is one
running sum per layer, so the step needs no KV cache).

The prompt is processed in one jitted prefill call (``batch x prompt`` tokens through every MoE
block at once), then one jitted step per new token (``batch`` tokens per MoE call).

    python examples/deepseek_v4_tiny.py                  # 4 layers, batch 4, prompt 8, 16 new tokens
    python examples/deepseek_v4_tiny.py --quick          # CI smoke test: 2 layers, batch 2, 4 new tokens
    python examples/deepseek_v4_tiny.py --backend reference --layers 6 --new-tokens 32

``--backend auto`` runs the routed experts through the FFI kernels where the GPU matches the mode
(H100/H200: mode ``fp8``) and the pure-JAX reference elsewhere. Prints the prefill and decode times,
decode tokens/s (after the first, compiling step) and the generated ids of the first sequence.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_megamoe import MODES, ops, policy
from jax_megamoe.models.deepseek_v4 import BACKENDS, DeepseekV4Config, DeepseekV4MoE

_List = getattr(nnx, "List", list)  # nnx.List (flax >= 0.12) holds submodules; older flax takes a plain list


class Block(nnx.Module):
    """One layer: causal-mean mixer (attention stand-in) and the V4 MoE block, each pre-normed and residual."""

    def __init__(self, cfg: DeepseekV4Config, layer_idx: int, *, backend: str, mode: str, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.mix_norm = nnx.RMSNorm(h, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.mixer = nnx.Linear(h, h, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)
        self.moe_norm = nnx.RMSNorm(h, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.moe = DeepseekV4MoE(cfg, layer_idx, backend=backend, mode=mode, rngs=rngs)

    def _moe(self, h: jax.Array, token_ids: jax.Array) -> jax.Array:
        shape = h.shape
        flat = self.moe_norm(h.reshape(-1, shape[-1])).astype(jnp.bfloat16)
        return self.moe(flat, token_ids.reshape(-1)).reshape(shape)

    def prefill(self, h: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``h`` f32 [B, S, H] -> (h, running sum [B, H] of the normed states)."""
        n = self.mix_norm(h)
        sums = jnp.cumsum(n, axis=1)
        mean = sums / jnp.arange(1, h.shape[1] + 1, dtype=jnp.float32)[None, :, None]
        h = h + self.mixer(mean.astype(jnp.bfloat16)).astype(jnp.float32)
        h = h + self._moe(h, token_ids).astype(jnp.float32)
        return h, sums[:, -1]

    def step(self, h: jax.Array, token_ids: jax.Array, s: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One new token per sequence: ``h`` f32 [B, H], ``s`` the running sum, ``pos`` tokens before it."""
        s = s + self.mix_norm(h)
        mean = s / (pos + 1).astype(jnp.float32)
        h = h + self.mixer(mean.astype(jnp.bfloat16)).astype(jnp.float32)
        h = h + self._moe(h, token_ids).astype(jnp.float32)
        return h, s


class TinyV4(nnx.Module):
    def __init__(self, cfg: DeepseekV4Config, num_layers: int, *, backend: str, mode: str, rngs: nnx.Rngs):
        h, v = cfg.hidden_size, cfg.vocab_size
        self.embed = nnx.Embed(v, h, dtype=jnp.float32, param_dtype=jnp.bfloat16, rngs=rngs)
        self.layers = _List([Block(cfg, i, backend=backend, mode=mode, rngs=rngs) for i in range(num_layers)])
        self.norm = nnx.RMSNorm(h, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.head = nnx.Linear(h, v, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)

    def logits(self, h: jax.Array) -> jax.Array:
        return self.head(self.norm(h).astype(jnp.bfloat16)).astype(jnp.float32)

    def prefill(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``tokens`` int32 [B, S] -> (logits of the last position [B, V], running sums [L, B, H])."""
        h = self.embed(tokens)
        sums = []
        for layer in self.layers:
            h, s = layer.prefill(h, tokens)
            sums.append(s)
        return self.logits(h[:, -1]), jnp.stack(sums)

    def step(self, tokens: jax.Array, sums: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``tokens`` int32 [B] at position ``pos`` -> (logits [B, V], updated sums)."""
        h = self.embed(tokens)
        new = []
        for i, layer in enumerate(self.layers):
            h, s = layer.step(h, tokens, sums[i], pos)
            new.append(s)
        return self.logits(h), jnp.stack(new)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="CI smoke test: 2 layers, batch 2, prompt 4, 4 new tokens")
    p.add_argument("--layers", type=int, default=None, help="layers (default 4; --quick 2); layer 0 is hash-routed")
    p.add_argument("--batch", type=int, default=None, help="sequences decoded together (default 4; --quick 2)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length (default 8; --quick 4)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 16; --quick 4)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--mode", choices=MODES, default=None, help="kernel mode (default: from device/env)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name, full, quick in (("layers", 4, 2), ("batch", 4, 2), ("prompt", 8, 4), ("new_tokens", 16, 4)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first step compiles and is not timed)")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = DeepseekV4Config.tiny()
    mode = policy.resolve_mode(args.mode, ops.device_arch())
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind})")
    t0 = time.perf_counter()
    model = TinyV4(cfg, args.layers, backend=args.backend, mode=mode, rngs=nnx.Rngs(args.seed))
    try:
        chosen = ops.choose_backend(args.backend, mode, op="mega_moe")
    except ops.BackendUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"model: {args.layers} layers (first {min(cfg.num_hash_layers, args.layers)} hash-routed), hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared, "
        f"mode {mode!r}; routed experts run on: {chosen} (built in {time.perf_counter() - t0:.1f} s)"
    )
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens):
        logits, sums = nnx.merge(graphdef, state).prefill(tokens)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), sums

    @jax.jit
    def step(state, tokens, sums, pos):
        logits, sums = nnx.merge(graphdef, state).step(tokens, sums, pos)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), sums

    rng = np.random.default_rng(args.seed + 1)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.prompt)), jnp.int32)
    t0 = time.perf_counter()
    tok, sums = jax.block_until_ready(prefill(state, prompt))
    t_prefill_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok, sums = jax.block_until_ready(prefill(state, prompt))
    t_prefill = time.perf_counter() - t0
    n_prompt = args.batch * args.prompt
    print(
        f"prefill: {args.batch} x {args.prompt} = {n_prompt} tokens in {t_prefill * 1e3:.1f} ms "
        f"({n_prompt / t_prefill:.1f} tokens/s; first call incl. compile {t_prefill_first:.1f} s)"
    )

    generated = [np.asarray(tok)]
    step_times = []
    t_first = None
    for i in range(args.new_tokens - 1):
        pos = jnp.int32(args.prompt + i)
        t0 = time.perf_counter()
        tok, sums = step(state, tok, sums, pos)
        tok = jax.block_until_ready(tok)
        dt = time.perf_counter() - t0
        if t_first is None:
            t_first = dt
        else:
            step_times.append(dt)
        generated.append(np.asarray(tok))
    ids = np.stack(generated, axis=1)  # [B, new_tokens]
    if step_times:
        per = float(np.median(step_times))
        total = float(np.sum(step_times))
        print(
            f"decode: {len(step_times)} timed steps x {args.batch} sequences: {len(step_times) * args.batch / total:.1f} tokens/s "
            f"(step p50 {per * 1e3:.2f} ms; first step incl. compile {t_first:.1f} s)"
        )
    else:
        print(f"decode: 1 step (compile) in {t_first:.1f} s; tokens/s needs --new-tokens >= 3")
    print(f"sequence 0: prompt {np.asarray(prompt[0]).tolist()} -> generated {ids[0].tolist()}")
    if not (np.all(ids >= 0) and np.all(ids < cfg.vocab_size)):
        print("error: generated ids outside the vocabulary", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
