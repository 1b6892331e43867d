"""Expert-parallel checks that need several (virtual) CPU devices; run by tests/test_parallel.py.

jax reads ``XLA_FLAGS`` once, when its CPU backend starts, and the pytest process has already
started it with one device; so these checks run here, in a fresh interpreter:

    python tests/parallel_worker.py single                        # 8 virtual devices, one process
    python tests/parallel_worker.py multi --process-id I --port P  # 2 processes x 4 devices (jax.distributed)
    python tests/parallel_worker.py gpu                            # every visible GPU, ragged and padded dispatch

Every check prints one line ``CHECK <name> ok|FAIL <details>``; the exit code is 0 only if all pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jax_megamoe.ops import MoEOptions
from jax_megamoe.parallel import EPOptions


def _setup(devices: int) -> None:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


FAILED: list[str] = []


def check(name: str, ok: bool, details: str = "") -> None:
    print(f"CHECK {name} {'ok' if ok else 'FAIL'} {details}".rstrip(), flush=True)
    if not ok:
        FAILED.append(name)


# ------------------------------------------------------------------------------------------------
# Problem construction (numpy, identical in every process)
# ------------------------------------------------------------------------------------------------

T, K = 32, 4


def make_weights(mode: str):
    from jax_megamoe.layout import MoEWeights
    from jax_megamoe.models.deepseek_v4 import DeepseekV4Config, random_moe_checkpoint

    cfg = DeepseekV4Config.tiny()  # H 512, I 256, E 16, K 4: valid in every mode
    ckpt = random_moe_checkpoint(cfg, 1234)
    return MoEWeights.from_checkpoint(*ckpt, mode=mode)


def make_routing(n: int, num_experts: int, seed: int):
    """Skewed routing for ``n`` shards of T tokens: hot experts, device 0's tokens routed nowhere
    (all ``-1``), no pair routed to device n-1's experts, plus stray ``-1`` slots, an id ``>= E``
    (skipped) and a token naming one expert twice."""
    import numpy as np

    rng = np.random.default_rng(seed)
    e, el, tl = num_experts, num_experts // n, T // n
    usable = np.arange(e - el)  # experts of devices 0 .. n-2
    hot = np.array([0, 1, e - el - 1])
    idx = np.empty((T, K), np.int32)
    for t in range(T):
        first = rng.choice(hot, size=2, replace=False)
        rest = rng.choice(np.setdiff1d(usable, first), size=K - 2, replace=False)
        idx[t] = np.concatenate([first, rest])
    idx[:tl] = -1  # device 0: every token routed nowhere
    idx[tl + 1, 2] = -1
    idx[-1, 0] = -1
    idx[tl + 2, 3] = e + 3  # out of range: skipped like -1
    idx[-2, 1] = idx[-2, 0]  # the same expert in two slots
    w = rng.uniform(0.05, 1.0, (T, K)).astype(np.float32)
    x = (rng.standard_normal((T, 512)) * 2.0).astype(np.float32)
    x[3] *= 40.0  # large activations: the SwiGLU clamp bites
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16), idx, w


def same_bits(a, b) -> tuple[bool, str]:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False, f"shape {a.shape} vs {b.shape}"
    ua, ub = a.view(np.uint16), b.view(np.uint16)
    bad = int(np.sum(ua != ub))
    diff = float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)))) if a.size else 0.0
    return bad == 0, f"differing={bad} max_abs_diff={diff:g} nonzero_rows={int(np.any(a != 0, axis=1).sum())}"


def expected_drops(idx, n: int, e: int, cap: int):
    """The routing ep_moe computes with a capacity: per source device, the first ``cap`` valid pairs
    (in t * K + k order) to each destination are kept, the rest become -1."""

    el, tl = e // n, T // n
    kept = idx.copy()
    dropped = 0
    for s in range(n):
        used = [0] * n
        for t in range(s * tl, (s + 1) * tl):
            for k in range(K):
                v = idx[t, k]
                if 0 <= v < e:
                    d = v // el
                    if used[d] >= cap:
                        kept[t, k] = -1
                        dropped += 1
                    used[d] += 1
    return kept, dropped


# ------------------------------------------------------------------------------------------------
# One process, 8 virtual devices
# ------------------------------------------------------------------------------------------------


def run_single() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from jax_megamoe import reference
    from jax_megamoe._src.kernels import parallel

    devs = jax.devices()
    check("devices", len(devs) == 8, f"{len(devs)} {devs[0].platform}")
    print(f"PATH dispatch_path(auto)={parallel.dispatch_path(jax.make_mesh((8,), ('ep',)))}", flush=True)
    clamp = 10.0
    cases = [(2, "fp8xfp4", 1.0), (4, "mxf4xmxf4", 1.5), (8, "fp8", 1.0)]
    weights = {}
    for n, mode, rsf in cases:
        t0 = time.perf_counter()
        w_all = weights.setdefault(mode, make_weights(mode))
        x, idx, w = make_routing(n, w_all.num_experts, seed=n)
        ref = reference.mega_moe(
            jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), w_all,
            mode=mode, activation_clamp=clamp, options=MoEOptions(routed_scaling_factor=rsf)
        )  # fmt: skip
        mesh = jax.make_mesh((n,), ("ep",), devices=devs[:n])  # Explicit axis
        y = parallel.ep_moe(
            jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), w_all, mesh=mesh, mode=mode,
            options=EPOptions(activation_clamp=clamp, routed_scaling_factor=rsf)
        )  # fmt: skip
        ok, info = same_bits(y, ref)
        el, tl = w_all.num_experts // n, T // n
        sane = (
            bool(np.all(np.asarray(y)[:tl] == 0))  # device 0's tokens go nowhere
            and not np.any((idx >= (n - 1) * el) & (idx < w_all.num_experts))  # nobody routes to device n-1
            and y.sharding.spec[0] == "ep"
        )
        check(f"ep{n}_{mode}", ok and sane, f"{info} sharding={y.sharding.spec} {time.perf_counter() - t0:.1f}s")

    # Auto-typed mesh (jax.sharding.Mesh), weights already sharded, everything under an outer jit.
    t0 = time.perf_counter()
    n, mode = 8, "fp8"
    w_all = weights[mode]
    x, idx, w = make_routing(n, w_all.num_experts, seed=n)
    mesh = Mesh(np.array(devs), ("ep",))
    w_sh = parallel.shard_weights(w_all, mesh)
    check("shard_weights", w_sh.l1.sharding.spec[0] == "ep" and w_sh.l1.addressable_shards[0].data.shape[0] == 2)
    f = jax.jit(
        lambda a, b, c, ww: parallel.ep_moe(
            a, b, c, ww, mesh=mesh, mode=mode, options=EPOptions(activation_clamp=clamp)
        )
    )
    y = f(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), w_sh)
    ref = reference.mega_moe(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), w_all, mode=mode, activation_clamp=clamp)
    ok, info = same_bits(y, ref)
    check("ep8_fp8_auto_mesh_jit", ok, f"{info} {time.perf_counter() - t0:.1f}s")

    # Capacity below the exact worst case: the drops are counted and are exactly the pairs past it.
    t0 = time.perf_counter()
    n, mode, cap = 4, "mxf4xmxf4", 5
    w_all = weights[mode]
    x, idx, w = make_routing(n, w_all.num_experts, seed=n)
    mesh = jax.make_mesh((n,), ("ep",), devices=devs[:n])
    y, dropped = parallel.ep_moe(
        jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), w_all, mesh=mesh, mode=mode,
        options=EPOptions(activation_clamp=clamp, pair_capacity=cap, return_overflow=True)
    )  # fmt: skip
    kept, want = expected_drops(idx, n, w_all.num_experts, cap)
    ref = reference.mega_moe(
        jnp.asarray(x), jnp.asarray(kept), jnp.asarray(w), w_all, mode=mode, activation_clamp=clamp
    )
    ok, info = same_bits(y, ref)
    check("capacity_overflow", ok and int(dropped) == want > 0, f"dropped={int(dropped)} want={want} {info}")
    _, none = parallel.ep_moe(
        jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), w_all, mesh=mesh, mode=mode,
        options=EPOptions(activation_clamp=clamp, return_overflow=True)
    )  # fmt: skip
    check("exact_capacity_no_drop", int(none) == 0, f"{time.perf_counter() - t0:.1f}s")

    # dispatch="padded" named explicitly: the same bits as the reference (and as "auto" on CPU) on
    # random routing with nonzero output; "dense" (a name that was never released) is an error.
    t0 = time.perf_counter()
    args = (jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), w_all)
    y_padded = parallel.ep_moe(
        *args, mesh=mesh, mode=mode, options=EPOptions(activation_clamp=clamp, dispatch="padded")
    )
    y_auto = parallel.ep_moe(*args, mesh=mesh, mode=mode, options=EPOptions(activation_clamp=clamp))
    ref = reference.mega_moe(*args, mode=mode, activation_clamp=clamp)
    ok, info = same_bits(y_auto, y_padded)
    ok_ref, _ = same_bits(y_padded, ref)
    nonzero = int(np.any(np.asarray(y_padded) != 0, axis=1).sum())
    try:
        parallel.ep_path(mesh, "ep", mode, T // n, options=EPOptions(dispatch="dense"))
        dense_err = ""
    except ValueError as err:
        dense_err = str(err)
    check(
        "padded_dispatch_same_bits",
        ok and ok_ref and nonzero > 0 and "dispatch: 'dense' is not one of" in dense_err,
        f"{info} dense={dense_err!r} {time.perf_counter() - t0:.1f}s",
    )  # fmt: skip

    # EPOptions(pad_tokens=True): T not a multiple of the axis size (the batch is padded with rows
    # routed nowhere and cut back): the reference's bits.
    t0 = time.perf_counter()
    cut = T - 3  # T is a multiple of n; T - 3 is not
    uneven = (jnp.asarray(x[:cut]), jnp.asarray(idx[:cut]), jnp.asarray(w[:cut]), w_all)
    y_any = parallel.ep_moe(*uneven, mesh=mesh, mode=mode, options=EPOptions(activation_clamp=clamp, pad_tokens=True))
    ref = reference.mega_moe(*uneven, mode=mode, activation_clamp=clamp)
    ok, info = same_bits(y_any, ref)
    nonzero = int(np.any(np.asarray(y_any) != 0, axis=1).sum())
    check(
        "any_tokens_uneven_batch",
        cut % n != 0 and y_any.shape == (cut, x.shape[1]) and ok and nonzero > 0,
        f"{info} {time.perf_counter() - t0:.1f}s",
    )  # fmt: skip

    # Forcing the ragged path on CPU fails with a clear error before XLA does.
    try:
        parallel.ep_moe(
            jnp.asarray(x),
            jnp.asarray(idx),
            jnp.asarray(w),
            w_all,
            mesh=mesh,
            mode=mode,
            options=EPOptions(dispatch="ragged"),
        )
        check("ragged_on_cpu_error", False, "no error")
    except ValueError as err:
        check("ragged_on_cpu_error", "dispatch" in str(err) and "ragged" in str(err), str(err)[:80])

    run_fused_lowering(devs)
    run_block(devs)


def run_fused_lowering(devs) -> None:
    """The fused path as XLA would get it on GPUs: one sm_90 mega-kernel custom call per device with
    the device's own tokens and E/n experts, the whole rank table, and no collective; lowered for
    cuda from the 8 CPU devices (a 2 x 4 dp x ep mesh: two groups of four ranks)."""
    import re

    import jax
    import numpy as np

    from jax_megamoe._src.kernels import parallel

    mesh = jax.make_mesh((2, 4), ("dp", "ep"), devices=devs)
    w_all = make_weights("fp8")
    x, idx, w = make_routing(4, w_all.num_experts, seed=4)
    f = jax.jit(
        lambda a, b, c, ww: parallel.ep_moe(
            a,
            b,
            c,
            ww,
            mesh=mesh,
            mode="fp8",
            options=EPOptions(activation_clamp=10.0, routed_scaling_factor=1.5, dispatch="fused"),
        )
    )
    specs = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in (x, idx, w)]
    wspec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), w_all)
    text = f.trace(*specs, wspec).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "@jax_megamoe_mega_moe_sm90" in line]
    table = parallel.rank_table(mesh, "ep")
    want_table = "rank_devices = dense<[" + ", ".join(str(v) for v in table.reshape(-1)) + "]>"
    line = calls[0] if calls else ""
    ok = (
        len(calls) == 1
        and table.shape == (2, 4)
        and sorted(table.reshape(-1).tolist()) == sorted(d.id for d in devs)
        and all(table[g, r] == mesh.devices[g, r].id for g in range(2) for r in range(4))
        and "num_ranks = 4" in line
        and "num_experts = 16" in line
        and want_table in line
        and "routed_scaling_factor = 1.000000e+00" in line  # already multiplied into the weights
        and "(tensor<8x512xbf16>, tensor<8x4xi32>, tensor<8x4xf32>, tensor<4x512x512xf8E4M3FN>" in line
        and "-> tensor<8x512xbf16>" in line
        and not re.search(r"all_to_all|all_gather|ragged", text)
    )
    check("fused_lowers_for_cuda", ok, line[:200] if not ok else f"table={table.tolist()}")
    # sm_100 (never run: compile-checked only): the same entry reaches the sm_100 target, 8 ranks.
    mesh8 = jax.make_mesh((8,), ("ep",), devices=devs)
    w4 = make_weights("mxf4xmxf4")
    x8, idx8, wt8 = make_routing(8, w4.num_experts, seed=8)
    f4 = jax.jit(
        lambda a, b, c, ww: parallel.ep_moe(
            a, b, c, ww, mesh=mesh8, mode="mxf4xmxf4", options=EPOptions(dispatch="fused")
        )
    )
    specs = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in (x8, idx8, wt8)]
    text4 = (
        f4.trace(*specs, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), w4))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    line4 = next((ln for ln in text4.splitlines() if "@jax_megamoe_mega_moe_sm100" in ln), "")
    ok4 = (
        "num_ranks = 8" in line4
        and "mma_kind = 2" in line4
        and "capacity = 1920" in line4
        and "tensor<2x512x256xui8>" in line4
        and not re.search(r"all_to_all|ragged", text4)
    )
    check("fused_sm100_lowers_for_cuda", ok4, line4[:300])
    # On CPU devices "auto" keeps the collective path; the reason is named.
    path = parallel.ep_path(mesh, "ep", "fp8", 8)
    avail, why = parallel.fused_available(mesh, "ep", "fp8")
    check("fused_auto_on_cpu_is_collective", path == "padded" and not avail and "cpu" in why, f"{path} {why}")


def run_block(devs) -> None:
    """DeepseekV4MoE with and without a mesh: the same params give the same bits (T not divisible by n)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jax_megamoe.models.deepseek_v4 import DeepseekV4Config, DeepseekV4MoE, MoEBlockOptions

    t0 = time.perf_counter()
    cfg = DeepseekV4Config.tiny()
    mesh = jax.make_mesh((8,), ("ep",), devices=devs)
    plain = DeepseekV4MoE(cfg, 1, mode="fp8xfp4", rngs=nnx.Rngs(3))
    ep = DeepseekV4MoE(
        cfg, 1, mode="fp8xfp4", rngs=nnx.Rngs(3), options=MoEBlockOptions(weights=plain.moe_weights, mesh=mesh)
    )
    nnx.update(ep, nnx.state(plain, nnx.Param))  # same gate and shared expert
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((30, cfg.hidden_size)), jnp.bfloat16)
    want = nnx.jit(lambda m, a: m(a))(plain, x)
    got = nnx.jit(lambda m, a: m(a))(ep, x)
    ok, info = same_bits(got, want)
    placed = ep.moe_weights.l1.sharding.spec[0] == "ep"
    check("block_mesh", ok and placed, f"{info} {time.perf_counter() - t0:.1f}s")


# ------------------------------------------------------------------------------------------------
# Two processes x 4 devices over jax.distributed (localhost)
# ------------------------------------------------------------------------------------------------


def run_multi(process_id: int, port: int, num_processes: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_megamoe import reference
    from jax_megamoe._src.kernels import parallel

    devs = jax.devices()
    n = len(devs)
    check(
        "devices",
        n == 4 * num_processes and len(jax.local_devices()) == 4,
        f"global={n} local={len(jax.local_devices())}",
    )
    mode, clamp = "fp8xfp4", 10.0
    w_all = make_weights(mode)  # same bytes in every process (seeded numpy)
    x, idx, w = make_routing(n, w_all.num_experts, seed=11)
    local = jax.local_devices()[0]
    ref = reference.mega_moe(
        jax.device_put(x, local), jax.device_put(idx, local), jax.device_put(w, local), w_all,
        mode=mode, activation_clamp=clamp,
    )  # fmt: skip
    mesh = jax.make_mesh((n,), ("ep",))
    sh = NamedSharding(mesh, P("ep"))

    def glob(a):
        import numpy as np

        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sh, lambda i: a[i])

    wg = jax.tree.map(glob, w_all)
    y = parallel.ep_moe(
        glob(x), glob(idx), glob(w), wg, mesh=mesh, mode=mode, options=EPOptions(activation_clamp=clamp)
    )
    import numpy as np

    ref = np.asarray(ref)
    shards = sorted(y.addressable_shards, key=lambda s: s.index[0].start)
    mine = np.concatenate([np.asarray(s.data) for s in shards])
    want = np.concatenate([ref[s.index] for s in shards])
    ok, info = same_bits(mine, want)
    check(f"multiprocess_p{process_id}", ok and len(shards) == 4, f"rows={mine.shape[0]} {info}")
    jax.distributed.shutdown()


# ------------------------------------------------------------------------------------------------
# Real accelerators (not run by the CPU test suite): both dispatch paths, every mode
# ------------------------------------------------------------------------------------------------


def run_gpu() -> None:
    import jax
    import jax.numpy as jnp

    from jax_megamoe import reference
    from jax_megamoe._src.kernels import parallel

    devs = jax.devices()
    n = len(devs)
    print(f"DEVICES {n} x {devs[0].device_kind} jax {jax.__version__}", flush=True)
    mesh = jax.make_mesh((n,), ("ep",))
    print(f"PATH dispatch_path(auto)={parallel.dispatch_path(mesh)}", flush=True)
    for mode in ("fp8", "fp8xfp4", "mxf4xmxf4"):
        w_all = make_weights(mode)
        x, idx, w = make_routing(n, w_all.num_experts, seed=n)
        args = (jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w))
        ref = reference.mega_moe(*args, w_all, mode=mode, activation_clamp=10.0)
        for dispatch in ("ragged", "padded"):
            y = parallel.ep_moe(
                *args, w_all, mesh=mesh, mode=mode, options=EPOptions(activation_clamp=10.0, dispatch=dispatch)
            )
            ok, info = same_bits(y, ref)
            check(f"gpu_ep{n}_{mode}_{dispatch}", ok, info)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("single", "multi", "gpu"))
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    if a.what == "single":
        _setup(8)
        run_single()
    elif a.what == "multi":
        _setup(4)
        run_multi(a.process_id, a.port, a.num_processes)
    else:
        run_gpu()
    print(f"DONE {a.what} failed={FAILED} {time.perf_counter() - t0:.1f}s", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
