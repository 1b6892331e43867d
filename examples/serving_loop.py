"""A serving-style decode loop over one DeepSeek V4 MoE layer, jitted with static token buckets.

Each step a variable number of requests (tokens) arrives. The batch is padded up to the next bucket
(powers of two up to ``--max-batch``), so the jitted step sees only a few static shapes and never
recompiles in the loop; padded rows get ``topk_idx = -1`` (the experts skip them, kernel and
reference alike) and the output is sliced back to the real rows. Every bucket is compiled in a
warm-up pass first; then the loop reports steady-state latency percentiles per step and per bucket.

    python examples/serving_loop.py                      # V4-Flash layer on a GPU, tiny layer on CPU
    python examples/serving_loop.py --quick              # CI smoke test: tiny layer, buckets 1..8
    python examples/serving_loop.py --model flash --experts 64 --max-batch 256 --steps 200

``--backend auto`` runs the routed experts through the FFI kernels where the GPU matches the mode
and the pure-JAX reference elsewhere (as ``jax_megamoe.ops.mega_moe`` decides).
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


def buckets_up_to(max_batch: int) -> list[int]:
    """1, 2, 4, ... and ``max_batch`` itself (the last bucket)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} tokens exceed the largest bucket {buckets[-1]}")


def make_step(graphdef, mode: str, backend: str):
    """``step(state, x_pad bf16[B, H], n_valid int32) -> bf16[B, H]``: gate, mask the pad rows, routed
    experts through ``ops.mega_moe``, shared expert (the ``DeepseekV4MoE`` block's own sequence)."""

    @jax.jit
    def step(state, x_pad, n_valid):
        block = nnx.merge(graphdef, state)
        cfg = block.config
        idx, w = block.gate(x_pad)
        valid = (jnp.arange(x_pad.shape[0]) < n_valid)[:, None]
        idx = jnp.where(valid, idx, -1)
        w = jnp.where(valid, w, 0.0)
        y = ops.mega_moe(
            x_pad, idx, w, block.moe_weights, mode=mode, activation_clamp=cfg.activation_clamp, backend=backend
        )
        if block.shared_experts is not None:
            y = (y.astype(jnp.float32) + block.shared_experts(x_pad)).astype(jnp.bfloat16)
        return y

    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="CI smoke test: tiny layer, max batch 8, 24 steps")
    p.add_argument(
        "--model",
        choices=("tiny", "flash", "pro"),
        default=None,
        help="layer shapes (default flash on GPU, tiny on CPU)",
    )
    p.add_argument("--experts", type=int, default=None, help="override the routed expert count (e.g. to fit memory)")
    p.add_argument("--max-batch", type=int, default=None, help="largest bucket (default 64; --quick 8)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 100; --quick 24)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--mode", choices=MODES, default=None, help="kernel mode (default: from device/env)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    if a.model is None:
        a.model = "tiny" if (a.quick or on_cpu) else "flash"
    if a.max_batch is None:
        a.max_batch = 8 if a.quick else 64
    if a.steps is None:
        a.steps = 24 if a.quick else 100
    if a.max_batch < 1 or a.steps < 2:
        p.error("--max-batch must be >= 1 and --steps >= 2")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {} if args.experts is None else {"n_routed_experts": args.experts}
    cfg = {"tiny": DeepseekV4Config.tiny, "flash": DeepseekV4Config.v4_flash, "pro": DeepseekV4Config.v4_pro}[
        args.model
    ](**overrides)
    mode = policy.resolve_mode(args.mode, ops.device_arch())
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind})")
    t0 = time.perf_counter()
    block = DeepseekV4MoE(cfg, 3, backend=args.backend, mode=mode, rngs=nnx.Rngs(args.seed))
    try:
        chosen = ops.choose_backend(args.backend, mode, op="mega_moe")
    except ops.BackendUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"layer: {args.model} (hidden {cfg.hidden_size}, intermediate {cfg.moe_intermediate_size}, {cfg.n_routed_experts} "
        f"experts top-{cfg.num_experts_per_tok}), mode {mode!r}; routed experts run on: {chosen} "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )
    graphdef, state = nnx.split(block)
    step = make_step(graphdef, mode, args.backend)
    buckets = buckets_up_to(args.max_batch)
    rng = np.random.default_rng(args.seed + 1)
    h = cfg.hidden_size

    def padded(x_rows: np.ndarray, bucket: int) -> jax.Array:
        buf = np.zeros((bucket, h), x_rows.dtype)
        buf[: len(x_rows)] = x_rows
        return jnp.asarray(buf)

    def requests(n: int) -> np.ndarray:
        return rng.standard_normal((n, h), dtype=np.float32).astype(jnp.bfloat16)

    t0 = time.perf_counter()
    compile_s = {}
    for b in buckets:
        t1 = time.perf_counter()
        jax.block_until_ready(step(state, padded(requests(b), b), jnp.int32(b)))
        compile_s[b] = time.perf_counter() - t1
    print(
        f"warm-up: compiled {len(buckets)} buckets {buckets} in {time.perf_counter() - t0:.1f} s "
        f"({', '.join(f'{b}: {s:.1f}s' for b, s in compile_s.items())})"
    )

    cache0 = step._cache_size() if hasattr(step, "_cache_size") else None
    lat: dict[int, list[float]] = {b: [] for b in buckets}
    all_lat, n_tokens, n_padded = [], 0, 0
    last = None
    for _ in range(args.steps):
        n = int(rng.integers(1, args.max_batch + 1))
        b = bucket_for(n, buckets)
        x_rows = requests(n)
        t1 = time.perf_counter()
        y = step(state, padded(x_rows, b), jnp.int32(n))[:n]
        y = jax.block_until_ready(y)
        dt = time.perf_counter() - t1
        lat[b].append(dt)
        all_lat.append(dt)
        n_tokens += n
        n_padded += b
        last = (x_rows, y)
    recompiles = (step._cache_size() - cache0) if cache0 is not None else "unknown"
    a = np.asarray(all_lat)
    print(
        f"steady-state latency over {args.steps} steps: p50 {np.percentile(a, 50) * 1e3:.2f} ms, "
        f"p90 {np.percentile(a, 90) * 1e3:.2f} ms, max {a.max() * 1e3:.2f} ms; {n_tokens / a.sum():.1f} tokens/s; "
        f"padding overhead {100 * (n_padded - n_tokens) / n_padded:.0f}% of rows; recompiles during loop: {recompiles}"
    )
    print(f"{'bucket':>7} {'steps':>6} {'p50 ms':>9} {'p90 ms':>9}")
    for b in buckets:
        if lat[b]:
            v = np.asarray(lat[b])
            print(f"{b:>7} {len(v):>6} {np.percentile(v, 50) * 1e3:>9.2f} {np.percentile(v, 90) * 1e3:>9.2f}")

    # The padded, masked, sliced result equals the block run on the real rows alone.
    x_rows, y = last
    y_ref = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x_rows))
    y32, r32 = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    rel = float(np.linalg.norm(y32 - r32) / max(np.linalg.norm(r32), 1e-30))
    ok = np.all(np.isfinite(y32)) and rel < 1e-2
    print(
        f"padding check (last step, {len(x_rows)} rows vs the unpadded block): rel L2 {rel:.2e} {'ok' if ok else 'FAIL'}"
    )
    if recompiles not in (0, "unknown"):
        print(f"error: {recompiles} recompiles inside the loop", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
