"""One DeepSeek V4-Flash-shaped MoE layer with random MXFP4 experts, run under ``jax.jit``.

Builds the routed experts (hidden 4096, intermediate 2048, 256 experts, top-6) as random
checkpoint-format MXFP4 bytes, converts them to the kernel layout of ``--mode``, wraps them in
``DeepseekV4MoE`` (gate + routed experts + shared expert) and times the jitted block for a few
token counts on the default JAX backend (``--backend auto``: the FFI kernels where the GPU
matches the mode, the pure-JAX reference elsewhere).

    python examples/moe_block.py                      # full V4-Flash layer, default token counts
    python examples/moe_block.py --quick              # CI smoke test: 16 experts, tokens 1,4
    python examples/moe_block.py --tokens 1,64 --experts 64 --mode fp8 --seed 3

Prints, per token count: shapes, a checksum (sum of |y| in f32 and the first 12 hex digits of
the SHA-256 of y's bytes) and the time per call after a warm-up call.

Default token counts: 1,8,32 on a GPU; 1,4,8 on CPU, where the pure-JAX reference dequantises
every expert a call routes to (about 0.2 s per expert for V4-Flash shapes on 2 cores), so the whole
run stays under two minutes there (measured about 1m30s on a 2-core VM, most of it generating
and converting the 3.2 GiB of experts).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_megamoe import MODES, ops, policy
from jax_megamoe.layout import MoEWeights
from jax_megamoe.models.deepseek_v4 import (
    BACKENDS,
    DeepseekV4Config,
    DeepseekV4MoE,
    MoEBlockOptions,
    random_moe_checkpoint,
)


def _tokens(s: str) -> list[int]:
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens: {s!r} is not a comma-separated list of integers") from None
    if not out or any(t < 1 for t in out):
        raise argparse.ArgumentTypeError(f"--tokens: {s!r} needs one or more counts >= 1")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tokens",
        type=_tokens,
        default=None,
        help="token counts to run (default 1,8,32 on GPU, 1,4,8 on CPU; --quick: 1,4)",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 16 experts (unless --experts), tokens 1,4")
    p.add_argument("--experts", type=int, default=None, help="routed experts (default 256, the V4-Flash value)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--mode", choices=MODES, default=None, help="kernel mode (default: from device/env)")
    p.add_argument("--layer", type=int, default=3, help="layer index (< 3: hash-routed; default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed calls per token count after one warm-up (default 1 on CPU, 10 on GPU)",
    )
    args = p.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    if args.tokens is None:
        args.tokens = [1, 4] if args.quick else ([1, 4, 8] if on_cpu else [1, 8, 32])
    if args.experts is None:
        args.experts = 16 if args.quick else 256
    if args.reps is None:
        args.reps = 1 if on_cpu else 10
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.experts < 6:
        p.error("--experts must be >= 6 (top-6 routing)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    cfg = DeepseekV4Config.v4_flash(n_routed_experts=args.experts)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}); backend={args.backend!r}")
    print(
        f"layer {args.layer}: hidden {cfg.hidden_size}, intermediate {cfg.moe_intermediate_size}, "
        f"{cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}, shared {cfg.n_shared_experts}, "
        f"rho {cfg.routed_scaling_factor}, swiglu_limit {cfg.swiglu_limit}"
    )

    t0 = time.perf_counter()
    ckpt = random_moe_checkpoint(cfg, args.seed, progress=True)  # the library's progress bar, on stderr
    t_gen = time.perf_counter() - t0
    nbytes = sum(a.nbytes for a in ckpt)
    print(f"generated {nbytes / 2**30:.2f} GiB of checkpoint-format experts in {t_gen:.1f} s")

    # The mode the ops would pick for this device when none is given.
    mode = policy.resolve_mode(args.mode, ops.device_arch())
    t0 = time.perf_counter()
    weights = jax.block_until_ready(MoEWeights.from_checkpoint(*ckpt, mode=mode))
    del ckpt
    print(
        f"converted to mode {mode!r} kernel layout ({weights.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s"
    )

    block = DeepseekV4MoE(
        cfg,
        args.layer,
        backend=args.backend,
        mode=mode,
        rngs=nnx.Rngs(args.seed),
        options=MoEBlockOptions(weights=weights),
    )
    try:
        chosen = ops.choose_backend(args.backend, mode, op="mega_moe")
        print(f"routed experts run on: {chosen}")
    except Exception as e:  # noqa: BLE001 - informational only
        print(f"routed experts backend: {args.backend} ({type(e).__name__}: {e})")

    graphdef, state = nnx.split(block)

    @jax.jit
    def forward(state, x, token_ids):
        return nnx.merge(graphdef, state)(x, token_ids)

    rng = np.random.default_rng(args.seed + 1)
    print(f"{'T':>5} {'x':>14} {'y':>14} {'sum|y|':>14} {'sha256':>12} {'first call':>11} {'per call':>11}")
    for t in args.tokens:
        x = jnp.asarray(rng.standard_normal((t, cfg.hidden_size)), jnp.bfloat16)
        tid = jnp.asarray(rng.integers(0, cfg.vocab_size, t), jnp.int32)
        t0 = time.perf_counter()
        y = jax.block_until_ready(forward(state, x, tid))
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.reps):
            y = jax.block_until_ready(forward(state, x, tid))
        per_call = (time.perf_counter() - t0) / args.reps
        yh = np.asarray(y)
        checksum = float(jnp.sum(jnp.abs(y.astype(jnp.float32))))
        digest = hashlib.sha256(yh.view(np.uint16).tobytes()).hexdigest()[:12]
        print(
            f"{t:>5} {str(list(x.shape)):>14} {str(list(y.shape)):>14} {checksum:>14.6g} {digest:>12} "
            f"{t_first * 1e3:>9.1f}ms {per_call * 1e3:>9.1f}ms"
        )
        if not np.all(np.isfinite(yh.astype(np.float32))):
            print(f"error: non-finite output for T={t}", file=sys.stderr)
            return 1
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
