"""One DeepSeek V4-Flash MoE layer with its routed experts sharded over every visible device.

Builds ``DeepseekV4MoE`` (gate + routed MXFP4 experts + shared expert) with a 1-D mesh ``("ep",)``
over all devices: the experts live E/n per device and the routed part runs through
``jax_megamoe.parallel.ep_moe`` (tokens sharded over the same axis). On sm_90 GPUs driven by this
one process with mode fp8 that is the fused intranode kernel (DeepGEMM's multi-rank Mega MoE with
peer-mapped buffers, no XLA collective); elsewhere all-to-all dispatch and combine around each
device's expert math. Times the jitted layer and prints per-step time and tokens/s.

    python examples/ep_moe.py                              # V4-Flash layer (256 experts, top-6)
    python examples/ep_moe.py --cpu-devices 8 --quick      # 8 virtual CPU devices, small layer, < 1 min
    python examples/ep_moe.py --cpu-devices 8 --quick --check   # ... and compare with one device, bit for bit

``--cpu-devices N`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (and
``JAX_PLATFORMS=cpu``) before jax is imported. On CPU the dispatch is ``"padded"``, an ``all_to_all``
of the fixed-capacity buffer (XLA:CPU has no ``ragged_all_to_all``) and each device runs the pure-JAX reference expert math;
on GPU the dispatch is ``ragged_all_to_all``. ``--quick`` is the V4 layer shape shrunk to
hidden 512, intermediate 256, 16 experts, top-4 (``DeepseekV4Config.tiny``).

``--check`` compares (a) the routed experts alone, ``ep_moe`` against ``reference.mega_moe`` on one
device for the same routing (collective path: bit-exact, CPU and 2 x H200 at V4-Flash size; fused
path: the same bits as the single-GPU kernel ``ops.mega_moe(backend="ffi")`` and within the kernel's
tolerance, rel. L2 <= 1e-2, of the reference), and (b) the whole layer
against the same layer without a mesh. (b) is bit-exact on CPU; on GPU the gate and shared expert
GEMMs run over T/n rows instead of T and cuBLAS may pick another algorithm, so (b) can differ there
by bf16 rounding (seen: 1.7% of values, max 0.03, V4-Flash on 2 x H200) while (a) stays exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jax_megamoe.ops import MoEOptions
from jax_megamoe.parallel import EPOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu-devices", type=int, default=None, help="run on N virtual CPU devices")
    p.add_argument("--quick", action="store_true", help="small V4-like layer (tiny config), few tokens: < 60 s on CPU")
    p.add_argument(
        "--tokens", type=int, default=None, help="tokens per step over all devices (rounded up to a multiple of n)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default 3; --quick 5)")
    p.add_argument("--experts", type=int, default=None, help="routed experts (default: the config's)")
    p.add_argument(
        "--mode", choices=("mxf4xmxf4", "fp8xfp4", "fp8"), default=None, help="kernel mode (default: from device/env)"
    )
    p.add_argument("--dispatch", choices=("auto", "fused", "ragged", "padded"), default="auto")
    p.add_argument("--layer", type=int, default=3, help="layer index (< num_hash_layers: hash-routed; default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="also run the layer on one device and compare bit for bit")
    args = p.parse_args(argv)
    if args.cpu_devices is not None and args.cpu_devices < 1:
        p.error("--cpu-devices must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.tokens is not None and args.tokens < 1:
        p.error("--tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_devices is not None:  # must happen before jax starts its CPU backend
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.cpu_devices}"])
        os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jax_megamoe import ops, parallel, policy
    from jax_megamoe.layout import MoEWeights
    from jax_megamoe.models.deepseek_v4 import (
        DeepseekV4Config,
        DeepseekV4MoE,
        MoEBlockOptions,
        random_moe_checkpoint,
    )

    t_start = time.perf_counter()
    devices = jax.devices()
    n = len(devices)
    mesh = jax.make_mesh((n,), ("ep",), devices=devices)
    on_cpu = devices[0].platform == "cpu"
    base = DeepseekV4Config.tiny if args.quick else DeepseekV4Config.v4_flash
    cfg = base(**({} if args.experts is None else {"n_routed_experts": args.experts}))
    if args.layer < cfg.num_hash_layers:
        print(f"error: --layer {args.layer} is hash-routed; use a layer >= {cfg.num_hash_layers}", file=sys.stderr)
        return 2
    e = cfg.n_routed_experts
    if e % n:
        print(f"error: {e} experts are not divisible by {n} devices", file=sys.stderr)
        return 2
    steps = args.steps or (5 if args.quick else 3)
    tokens = args.tokens or ((4 * n if on_cpu else 64 * n) if args.quick else (2 * n if on_cpu else 256 * n))
    tokens = -(-tokens // n) * n
    mode = policy.resolve_mode(args.mode, ops.device_arch())
    path = parallel.ep_path(mesh, "ep", mode, tokens // n, options=EPOptions(dispatch=args.dispatch))
    print(f"jax {jax.__version__}: {n} x {devices[0].platform} ({devices[0].device_kind}); mesh ('ep': {n})")
    print(
        f"layer {args.layer}: hidden {cfg.hidden_size}, intermediate {cfg.moe_intermediate_size}, {e} experts "
        f"({e // n} per device), top-{cfg.num_experts_per_tok}, mode {mode!r}; dispatch {path!r}; "
        f"{tokens} tokens per step ({tokens // n} per device)"
    )

    t0 = time.perf_counter()
    ckpt = random_moe_checkpoint(cfg, args.seed)
    weights = MoEWeights.from_checkpoint(*ckpt, mode=mode)
    del ckpt
    block = DeepseekV4MoE(
        cfg,
        args.layer,
        mode=mode,
        rngs=nnx.Rngs(args.seed),
        options=MoEBlockOptions(weights=weights, mesh=mesh, ep_dispatch=args.dispatch),
    )
    jax.block_until_ready(block.moe_weights)
    print(f"experts built and sharded ({weights.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")

    graphdef, state = nnx.split(block)

    @jax.jit
    def step(state, x):
        return nnx.merge(graphdef, state)(x)

    rng = np.random.default_rng(args.seed + 1)
    x_host = np.asarray(jnp.asarray(rng.standard_normal((tokens, cfg.hidden_size)), jnp.bfloat16))
    x = jax.device_put(x_host, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("ep")))
    t0 = time.perf_counter()
    y = jax.block_until_ready(step(state, x))
    print(f"warm-up (compile + run): {time.perf_counter() - t0:.2f} s")
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        y = jax.block_until_ready(step(state, x))
        dt = time.perf_counter() - t0
        times.append(dt)
        print(f"step {i}: {dt * 1e3:9.1f} ms  {tokens / dt:10.1f} tokens/s")
    med = float(np.median(times))
    print(f"median: {med * 1e3:.1f} ms/step, {tokens / med:.1f} tokens/s ({n} devices, {tokens} tokens/step)")
    yh = np.asarray(y).astype(np.float32)
    if not np.all(np.isfinite(yh)):
        print("error: non-finite output", file=sys.stderr)
        return 1

    if args.check:
        from jax_megamoe import reference

        def diff(a, b) -> str:
            a, b = np.asarray(a), np.asarray(b)
            bad = int(np.sum(a.view(np.uint16) != b.view(np.uint16)))
            if bad == 0:
                return "bit-exact"
            return f"MISMATCH ({bad} of {a.size} values, max |diff| {np.max(np.abs(a.astype(np.float32) - b.astype(np.float32))):g})"

        # (a) Routed experts alone, on the same routing: ep_moe vs reference.mega_moe on one device.
        x1 = jax.device_put(x_host, devices[0])
        topk_idx, topk_w = jax.jit(lambda m, a: m.gate(a))(nnx.merge(graphdef, state), x1)
        topk_idx, topk_w = np.asarray(topk_idx), np.asarray(topk_w)
        ref = reference.mega_moe(
            x1, jax.device_put(topk_idx, devices[0]), jax.device_put(topk_w, devices[0]), weights,
            mode=mode, activation_clamp=cfg.activation_clamp,
        )  # fmt: skip
        ep = parallel.ep_moe(
            x, topk_idx, topk_w, block.moe_weights, mesh=mesh, mode=mode,
            options=EPOptions(activation_clamp=cfg.activation_clamp, dispatch=args.dispatch)
        )  # fmt: skip
        if path == "fused":
            # The fused kernel follows the kernel's numerics, not the reference's: compare it with the
            # single-GPU kernel (same bits expected) and with the reference (within 1e-2).
            one = ops.mega_moe(
                x1, jax.device_put(topk_idx, devices[0]), jax.device_put(topk_w, devices[0]), weights,
                activation_clamp=cfg.activation_clamp, backend="ffi",options=MoEOptions(num_max_tokens=tokens)
            )  # fmt: skip
            a, b = np.asarray(ep, np.float64), np.asarray(ref, np.float64)
            rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
            routed = diff(ep, one)
            print(
                f"check routed experts (fused ep_moe vs the single-GPU kernel): {routed}; "
                f"vs reference.mega_moe: rel. L2 {rel:.2e}"
            )
            if rel > 1e-2:
                return 1
        else:
            routed = diff(ep, ref)
            print(f"check routed experts (ep_moe vs reference.mega_moe on one device): {routed}")
        # (b) The whole layer. Gate and shared expert are ordinary XLA matmuls over T/n rows here and
        # T rows there; a backend may pick a different GEMM algorithm per shape (cuBLAS does), so
        # only (a) is a statement about expert parallelism.
        single = DeepseekV4MoE(
            cfg, args.layer, mode=mode, rngs=nnx.Rngs(args.seed), options=MoEBlockOptions(weights=weights)
        )
        nnx.update(single, nnx.state(block, nnx.Param))
        want = nnx.jit(lambda m, a: m(a))(single, x1)
        print(f"check whole layer vs one device: {diff(y, want)}")
        if routed != "bit-exact":
            return 1
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
