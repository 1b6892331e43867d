"""Generate tokens with the whole DeepSeek V4 model: one jitted prefill, then one jitted decode step per token.

    python examples/generate.py                          # --tiny: random weights, 3 layers, CPU seconds
    python examples/generate.py --temperature 0.8 --top-p 0.9 --new-tokens 32
    python examples/generate.py --checkpoint /path/to/DeepSeek-V4-Flash --prompt 0,523,88
    python examples/generate.py --mtp                    # speculative greedy with the MTP block

The tiny model (``DeepseekV4Config.tiny_model()`` cut to ``--layers``: sliding, CSA and HCA layers,
hash routing) runs exact experts (dense f32) so it works on any CPU; ``--experts quantized`` needs
the kernels' alignments (``--config tiny``: hidden 512). Prefill and every decode step have fixed
shapes (the cache is allocated for prompt + new tokens), so the loop compiles twice whatever its
length. Sampling: greedy at ``--temperature 0``, else temperature then top-p (nucleus) sampling.
Prints a progress line, prefill time, decode tokens/s (steps after the first) and the ids.
``--mtp``: greedy decoding with MTP block 0 drafting one token per step
(:func:`~jax_megamoe.models.deepseek_v4.speculative_greedy`: the same ids as plain greedy, in fewer
main-model steps when drafts are accepted); prints the steps, drafts, acceptance rate and replays.
Random weights draft almost nothing right; a real checkpoint's MTP block is what makes it pay.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_megamoe.models.deepseek_v4 import (
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    jit_forward,
    speculative_greedy,
)


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids ``[B]`` from ``logits`` f32 ``[B, V]``: greedy at temperature 0, else the
    smallest set of tokens whose probability reaches ``top_p`` (the most likely always kept)."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits / temperature
    order = jnp.argsort(-z, axis=-1)
    zs = jnp.take_along_axis(z, order, axis=-1)
    probs = jax.nn.softmax(zs, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before this token below top_p
    zs = jnp.where(keep, zs, -jnp.inf)
    pick = jax.random.categorical(key, zs, axis=-1)
    return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


def build_model(args: argparse.Namespace) -> DeepseekV4ForCausalLM:
    if args.checkpoint:
        try:
            from jax_megamoe.models.deepseek_v4 import (
                load_checkpoint,  # the checkpoint loader, when present
            )
        except ImportError:
            raise SystemExit(
                "--checkpoint: this build of jax_megamoe has no whole-model checkpoint loader "
                "(jax_megamoe.models.deepseek_v4.load_checkpoint); use --tiny"
            ) from None
        dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
        return load_checkpoint(args.checkpoint, experts=args.experts, param_dtype=dtype, progress=True)
    if args.config == "tiny_model":
        base = DeepseekV4Config.tiny_model()
    else:
        base = DeepseekV4Config.tiny()
    n = min(args.layers, base.num_hidden_layers)
    extra = {"num_nextn_predict_layers": 1} if args.mtp else {}  # --mtp: the tiny model gets an MTP block
    cfg = (
        DeepseekV4Config.tiny_model(num_hidden_layers=n, **extra)
        if args.config == "tiny_model"
        else DeepseekV4Config.tiny(num_hidden_layers=n, **extra)
    )
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    return DeepseekV4ForCausalLM(
        cfg, experts=args.experts, backend=args.backend, param_dtype=dtype, rngs=nnx.Rngs(args.seed)
    )


def print_sequences(prompt: np.ndarray, gen: np.ndarray) -> None:
    for r in range(min(len(prompt), 2)):
        print(f"sequence {r}: prompt {prompt[r].tolist()} -> generated {gen[r].tolist()}")


def run_mtp(model: DeepseekV4ForCausalLM, prompt: np.ndarray, new_tokens: int, t0: float) -> int:
    """Speculative greedy decoding (the compiles included in its time: it is one call)."""
    b = prompt.shape[0]
    t = time.perf_counter()
    try:
        res = speculative_greedy(model, prompt, new_tokens)
    except ValueError as e:  # e.g. a checkpoint without an MTP block: its own message, no traceback
        raise SystemExit(f"--mtp: {e}") from None
    dt = time.perf_counter() - t
    print(
        f"mtp: {new_tokens} tokens x {b} sequences in {res.steps} verify steps after the prefill; "
        f"drafted {res.drafted}, accepted {res.accepted} (acceptance {res.acceptance_rate:.2f}), "
        f"replays {res.replays}; {dt:.2f} s (compiles included)"
    )
    print_sequences(prompt, res.tokens)
    print(f"total {time.perf_counter() - t0:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tiny", action="store_true", help="random weights (the default)")
    src.add_argument("--checkpoint", metavar="DIR", help="a DeepSeek V4 checkpoint folder")
    p.add_argument("--config", choices=("tiny_model", "tiny"), default="tiny_model", help="tiny preset")
    p.add_argument("--layers", type=int, default=3, help="layers of the tiny model (its first N)")
    p.add_argument("--experts", choices=("exact", "quantized"), default="exact")
    p.add_argument("--backend", default="auto", help="routed-expert backend (quantized experts)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="param dtype (default: float32 for --tiny, bfloat16 for --checkpoint)",
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", default=None, help="comma-separated prompt ids (default: random, --prompt-len)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mtp", action="store_true", help="speculative greedy decoding with the MTP block (greedy only)")
    args = p.parse_args(argv)
    if args.mtp and args.temperature != 0:
        p.error("--mtp: speculative decoding here is greedy; use --temperature 0")
    if args.new_tokens < 1 or args.batch < 1 or args.layers < 1:
        p.error("--new-tokens, --batch and --layers must be >= 1")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")

    t0 = time.perf_counter()
    model = build_model(args)
    cfg = model.config
    rng = np.random.default_rng(args.seed)
    if args.prompt:
        ids = [int(v) for v in args.prompt.split(",")]
        prompt = np.tile(np.asarray(ids, np.int32)[None], (args.batch, 1))
    else:
        prompt = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        p.error(f"--prompt: ids must be in [0, {cfg.vocab_size})")
    b, plen = prompt.shape
    print(
        f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"compress ratios {[cfg.layer_compress_ratio(i) for i in range(cfg.num_hidden_layers)]}, "
        f"experts {args.experts}; built in {time.perf_counter() - t0:.2f} s"
    )

    if args.mtp:
        return run_mtp(model, prompt, args.new_tokens, t0)
    step = jit_forward(model)
    sampler = jax.jit(sample, static_argnums=(2, 3))
    key = jax.random.key(args.seed)
    cache = model.init_cache(b, plen + args.new_tokens)

    t = time.perf_counter()
    pos = jnp.broadcast_to(jnp.arange(plen, dtype=jnp.int32)[None], (b, plen))
    logits, cache = step(cache, jnp.asarray(prompt), pos)
    key, sub = jax.random.split(key)
    tok = sampler(logits[:, -1], sub, args.temperature, args.top_p)
    tok.block_until_ready()
    t_prefill = time.perf_counter() - t
    print(f"prefill: {b} x {plen} = {b * plen} tokens in {t_prefill * 1e3:.1f} ms (compile included)")

    out = [np.asarray(tok)]
    t_steady = None
    for i in range(1, args.new_tokens):
        if i == 2:
            t_steady = time.perf_counter()  # after the first (compiling) decode step
        pos = jnp.full((b, 1), plen + i - 1, jnp.int32)
        logits, cache = step(cache, tok[:, None], pos)
        key, sub = jax.random.split(key)
        tok = sampler(logits[:, -1], sub, args.temperature, args.top_p)
        out.append(np.asarray(tok))
        done = i + 1
        rate = "" if t_steady is None or i < 2 else f", {(i - 1) * b / (time.perf_counter() - t_steady):.1f} tokens/s"
        print(
            f"\rgenerating: {done}/{args.new_tokens} tokens x {b} sequences{rate}", end="", file=sys.stderr, flush=True
        )
    print(file=sys.stderr)
    steady_steps = args.new_tokens - 2
    if t_steady is not None and steady_steps > 0:
        dt = time.perf_counter() - t_steady
        print(
            f"decode: {steady_steps} timed steps x {b} sequences: {steady_steps * b / dt:.1f} tokens/s "
            f"({dt / steady_steps * 1e3:.2f} ms/step)"
        )
    print_sequences(prompt, np.stack(out, axis=1))
    print(f"total {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
