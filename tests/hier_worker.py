"""Checks of jax_megamoe._src.kernels.parallel_hier that need several (virtual) CPU devices; run by
tests/test_parallel_hier.py in fresh interpreters (jax reads the device count once):

    python tests/hier_worker.py single                         # 8 virtual devices, one process
    python tests/hier_worker.py multi --process-id I --port P   # 2 processes x 4 devices: a 2 x 4 mesh

Every check prints ``CHECK <name> ok|FAIL <details>``; the exit code is 0 only if all pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jax_megamoe.ops import MoEOptions
from jax_megamoe.parallel import EPOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_worker import FAILED, T, _setup, check, make_routing, make_weights, same_bits  # noqa: E402

CLAMP = 10.0
#: ``axes=`` of one level (every device its own "host").
ONE_LEVEL = ("ep", None)


def oracle(x, idx, w, w_all, *, mode: str, n_hosts: int, rsf: float = 1.0):
    """What ep_moe_hier computes with the reference backend, from reference.mega_moe alone: per host
    the sum of the token's slots on that host (bf16, the reference's own per-slot bits: same chunk),
    then f32 adds from +0 in ascending host order, bf16. Also the per-slot |o_k| sums (for the bound)."""
    import jax.numpy as jnp
    import numpy as np

    from jax_megamoe import reference

    e = w_all.num_experts
    eh = e // n_hosts
    k = idx.shape[1]
    chunk = reference.default_chunk_rows(idx.shape[0] * k, e)
    valid = (idx >= 0) & (idx < e)

    def ref(ids):
        return np.asarray(
            reference.mega_moe(
                jnp.asarray(x),
                jnp.asarray(ids.astype(np.int32)),
                jnp.asarray(w),
                w_all,
                mode=mode,
                activation_clamp=CLAMP,
                options=MoEOptions(routed_scaling_factor=rsf, chunk_rows=chunk),
            )  # fmt: skip
        ).astype(np.float32)

    acc = np.zeros((idx.shape[0], x.shape[1]), np.float32)
    for h in range(n_hosts):
        on = valid & (idx // eh == h)
        if on.any():
            acc = acc + ref(np.where(on, idx, -1))
    abs_sum = np.zeros_like(acc)
    for kk in range(k):
        only = np.full_like(idx, -1)
        only[:, kk] = idx[:, kk]
        abs_sum += np.abs(ref(only))
    import ml_dtypes

    return acc.astype(ml_dtypes.bfloat16), abs_sum, ref(idx).astype(ml_dtypes.bfloat16)


def one_host_rows(idx, e: int, n_hosts: int):
    import numpy as np

    valid = (idx >= 0) & (idx < e)
    host = np.where(valid, idx // (e // n_hosts), -1)
    return np.array([len(set(row[row >= 0].tolist())) <= 1 for row in host])


def expected_rows(idx, e: int, n_hosts: int, n_dev: int, cap: int):
    """(rows moved, rows past cap, pairs in those rows, max rows per pair) as ep_moe_hier counts them."""
    import numpy as np

    valid = (idx >= 0) & (idx < e)
    host = np.where(valid, idx // (e // n_hosts), -1)
    tl = idx.shape[0] // n_dev
    rows = over = over_pairs = peak = 0
    for s in range(n_dev):
        for d in range(n_hosts):
            sel = [t for t in range(s * tl, (s + 1) * tl) if (host[t] == d).any()]
            rows += len(sel)
            peak = max(peak, len(sel))
            for t in sel[cap:]:
                over += 1
                over_pairs += int((host[t] == d).sum())
    return rows, over, over_pairs, peak


def verify(name, y, x, idx, w, w_all, *, mode, n_hosts, rsf=1.0, stats=None, cap=None, n_dev=8, extra=True):
    import numpy as np

    want, abs_sum, ref = oracle(x, idx, w, w_all, mode=mode, n_hosts=n_hosts, rsf=rsf)
    ok, info = same_bits(y, want)
    yf = np.asarray(y).astype(np.float32)
    err = np.abs(yf - np.asarray(ref).astype(np.float32))
    bound_ok = bool(np.all(err <= 2.0**-6 * abs_sum))
    single = one_host_rows(idx, w_all.num_experts, n_hosts)
    exact_single, _ = same_bits(np.asarray(y)[single], np.asarray(ref)[single])
    nonzero = int(np.any(yf != 0, axis=1).sum())
    details = f"{info} bound={bound_ok} single_host_rows={int(single.sum())} exact={exact_single} nonzero={nonzero}"
    good = ok and bound_ok and exact_single and nonzero > 0
    if stats is not None:
        got = tuple(int(v) for v in stats)
        exp = expected_rows(idx, w_all.num_experts, n_hosts, n_dev, cap if cap is not None else T)
        good = good and got == exp
        details += f" stats={got} want={exp}"
    check(name, good, details)
    return want


# ------------------------------------------------------------------------------------------------


def empty_host_routing(n_dev: int, e: int, seed: int):
    """Every valid slot names an expert of host 0 (host 1 receives nothing) except device 1's
    tokens, which route nowhere; device 0 holds experts nobody names."""
    import numpy as np

    x, idx, w = make_routing(n_dev, e, seed)
    rng = np.random.default_rng(seed + 100)
    tl = T // n_dev
    half = e // 2
    for t in range(T):
        idx[t] = rng.choice(np.arange(e // n_dev, half), size=idx.shape[1], replace=False)
    idx[tl : 2 * tl] = -1
    return x, idx, w


def run_single() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_megamoe._src.kernels import parallel_hier as PH

    devs = jax.devices()
    check("devices", len(devs) == 8, f"{len(devs)} {devs[0].platform}")
    mode = "fp8"
    w_all = make_weights(mode)
    e = w_all.num_experts
    mesh = jax.make_mesh((2, 4), ("host", "ep"), devices=devs)
    path = PH.hier_path(mesh, "host", "ep", mode, T // 8)
    print(f"PATH {path}", flush=True)
    check("path_cpu", path.dispatch == "padded" and path.intranode == "collective" and "cpu" in path.reason, str(path))

    # Skewed routing, 2 x 4: device 0's tokens nowhere, no pair for device 7's experts.
    t0 = time.perf_counter()
    x, idx, w = make_routing(8, e, seed=21)
    args = (jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w))
    y, st = PH.ep_moe_hier(
        *args, w_all, mesh=mesh, mode=mode, options=EPOptions(activation_clamp=CLAMP, return_stats=True)
    )
    exact = verify("hier2x4_skewed", y, x, idx, w, w_all, mode=mode, n_hosts=2, stats=st)
    check(
        "hier2x4_sharding",
        tuple(y.sharding.spec)[0] == ("host", "ep") and bool(np.all(np.asarray(y)[: T // 8] == 0)),
        f"{y.sharding.spec} {time.perf_counter() - t0:.1f}s",
    )

    # Capacity 1 (way below the skew): a second pass, the same bits, counted.
    y2, st2 = PH.ep_moe_hier(
        *args,
        w_all,
        mesh=mesh,
        mode=mode,
        options=EPOptions(activation_clamp=CLAMP, pair_capacity=1, return_stats=True),
    )
    ok, info = same_bits(y2, exact)
    exp = expected_rows(idx, e, 2, 8, 1)
    got = tuple(int(v) for v in st2)
    check("hier2x4_second_pass", ok and got == exp and exp[1] > 0, f"{info} stats={got} want={exp}")

    # An empty host (nothing routed to host 1), a device whose tokens route nowhere, under an outer jit
    # with weights already sharded, another mode and a routed scaling factor.
    t0 = time.perf_counter()
    mode2 = "fp8xfp4"
    w2 = make_weights(mode2)
    x, idx, w = empty_host_routing(8, e, seed=5)
    w_sh = jax.tree.map(
        lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("host", "ep")))), w2
    )
    f = jax.jit(
        lambda a, b, c, ww: PH.ep_moe_hier(
            a,
            b,
            c,
            ww,
            mesh=mesh,
            mode=mode2,
            options=EPOptions(activation_clamp=CLAMP, routed_scaling_factor=1.5, return_stats=True),
        )
    )
    y, st = f(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), w_sh)
    verify("hier2x4_empty_host", y, x, idx, w, w2, mode=mode2, n_hosts=2, rsf=1.5, stats=st)
    check(
        "hier2x4_empty_host_rows", bool(np.all(np.asarray(y)[T // 8 : T // 4] == 0)), f"{time.perf_counter() - t0:.1f}s"
    )

    # One level (ep_moe_hier, axes=("ep", None)) over 8 devices and over 4, with and without a second pass.
    t0 = time.perf_counter()
    x, idx, w = make_routing(8, e, seed=8)
    args = (jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w))
    m8 = jax.make_mesh((8,), ("ep",), devices=devs)
    check("grouped_path", PH.hier_path(m8, "ep", None, mode, 4).intranode == "local")
    y, st = PH.ep_moe_hier(
        *args, w_all, mesh=m8, axes=ONE_LEVEL, mode=mode, options=EPOptions(activation_clamp=CLAMP, return_stats=True)
    )
    exact = verify("grouped_ep8", y, x, idx, w, w_all, mode=mode, n_hosts=8, stats=st)
    y2, st2 = PH.ep_moe_hier(
        *args,
        w_all,
        mesh=m8,
        axes=ONE_LEVEL,
        mode=mode,
        options=EPOptions(activation_clamp=CLAMP, pair_capacity=2, return_stats=True),
    )
    ok, info = same_bits(y2, exact)
    exp = expected_rows(idx, e, 8, 8, 2)
    got = tuple(int(v) for v in st2)
    check("grouped_ep8_second_pass", ok and got == exp and exp[1] > 0, f"{info} stats={got} want={exp}")
    # dispatch="padded" named explicitly: the bits of "auto" (padded on CPU) and of the exact
    # per-host sums, one level and two; "dense" (never released) is an error.
    y_p = PH.ep_moe_hier(
        *args, w_all, mesh=m8, axes=ONE_LEVEL, mode=mode, options=EPOptions(activation_clamp=CLAMP, dispatch="padded")
    )
    ok_e, info_g = same_bits(y_p, exact)
    y_h = PH.ep_moe_hier(*args, w_all, mesh=mesh, mode=mode, options=EPOptions(activation_clamp=CLAMP))
    y_hp = PH.ep_moe_hier(
        *args, w_all, mesh=mesh, mode=mode, options=EPOptions(activation_clamp=CLAMP, dispatch="padded")
    )
    ok_h, _ = same_bits(y_h, y_hp)
    p_d = PH.hier_path(mesh, "host", "ep", mode, T // 8, options=EPOptions(dispatch="padded"))
    try:
        PH.hier_path(mesh, "host", "ep", mode, T // 8, options=EPOptions(dispatch="dense"))
        dense_err = ""
    except ValueError as err:
        dense_err = str(err)
    check(
        "padded_dispatch_same_bits",
        ok_e and ok_h and p_d.dispatch == "padded" and "dispatch: 'dense' is not one of" in dense_err
        and bool(np.any(np.asarray(y_p) != 0)),
        f"{info_g} hier={ok_h} dense={dense_err!r}",
    )  # fmt: skip
    x4, idx4, w4 = make_routing(4, e, seed=4)
    m4 = jax.make_mesh((4,), ("ep",), devices=devs[:4])
    y4 = PH.ep_moe_hier(
        jnp.asarray(x4),
        jnp.asarray(idx4),
        jnp.asarray(w4),
        w_all,
        mesh=m4,
        axes=ONE_LEVEL,
        mode=mode,
        options=EPOptions(activation_clamp=CLAMP),
    )
    verify("grouped_ep4", y4, x4, idx4, w4, w_all, mode=mode, n_hosts=4, n_dev=4)
    print(f"grouped {time.perf_counter() - t0:.1f}s", flush=True)

    # The GPU structure, lowered for cuda: one all-to-all exchange over 'host', then per device one
    # sm_90 mega-kernel custom call with 4 ranks (the fused intranode stage), no collective over 'ep'.
    f = jax.jit(
        lambda a, b, c, ww: PH.ep_moe_hier(a, b, c, ww, mesh=mesh, mode=mode, options=EPOptions(intranode="fused"))
    )
    specs = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in (x, idx, w)]
    text = (
        f.trace(*specs, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), w_all))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    line = next((ln for ln in text.splitlines() if "@jax_megamoe_mega_moe_sm90" in ln), "")
    n_a2a = text.count("all_to_all")
    check(
        "hier_fused_lowers_for_cuda",
        "num_ranks = 4" in line and n_a2a >= 4 and "ragged" not in text,
        f"a2a={n_a2a} {line[:240]}",
    )
    f = jax.jit(
        lambda a, b, c, ww: PH.ep_moe_hier(
            a, b, c, ww, mesh=mesh, mode=mode, options=EPOptions(intranode="fused", num_max_tokens=200, pair_capacity=2)
        )
    )
    text = (
        f.trace(*specs, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), w_all))
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    calls = [ln for ln in text.splitlines() if "@jax_megamoe_mega_moe_sm90" in ln]
    caps = sorted(int(ln.split("capacity = ")[1].split(" ")[0]) for ln in calls)
    # Two passes (pair_capacity 2 of 4 rows per pair): the first sized by num_max_tokens (aligned to 128),
    # the second by its own 2 x 2 rows; both inside the step, the second under a conditional.
    check("hier_fused_second_pass_lowered", caps == [128, 256] and "case" in text, f"caps={caps}")

    # Errors that need concrete CPU devices.
    try:
        PH.ep_moe_hier(*args, w_all, mesh=mesh, mode=mode, options=EPOptions(dispatch="ragged"))
        check("ragged_on_cpu_error", False, "no error")
    except ValueError as err:
        check("ragged_on_cpu_error", "dispatch: 'ragged'" in str(err), str(err)[:100])
    bad = jax.sharding.Mesh(np.array(devs).reshape(4, 2).T, ("host", "ep"))  # fine: one process
    check("fused_groups_one_process", PH._groups_in_one_process(bad, "ep")[0])


def run_multi(process_id: int, port: int, num_processes: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id,
        initialization_timeout=60,
    )  # fmt: skip
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_megamoe._src.kernels import parallel_hier as PH

    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    check("devices", len(devs) == 8 and len(jax.local_devices()) == 4, f"{len(devs)}")
    mesh = jax.sharding.Mesh(np.array(devs).reshape(2, 4), ("host", "ep"))  # one process per host
    check("hosts_are_processes", all(len({d.process_index for d in row}) == 1 for row in mesh.devices))
    mode = "fp8"
    w_all = make_weights(mode)
    sh = NamedSharding(mesh, P(("host", "ep")))

    def glob(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sh, lambda i: a[i])

    wg = jax.tree.map(glob, w_all)
    for name, (x, idx, w), cap in (
        ("skewed", make_routing(8, w_all.num_experts, seed=31), 2),
        ("empty_host", empty_host_routing(8, w_all.num_experts, seed=6), None),
    ):
        y, st = PH.ep_moe_hier(
            glob(x),
            glob(idx),
            glob(w),
            wg,
            mesh=mesh,
            mode=mode,
            options=EPOptions(activation_clamp=CLAMP, pair_capacity=cap, return_stats=True),
        )
        want, _, _ = oracle(x, idx, w, w_all, mode=mode, n_hosts=2)
        shards = sorted(y.addressable_shards, key=lambda s: s.index[0].start)
        mine = np.concatenate([np.asarray(s.data) for s in shards])
        ref = np.concatenate([np.asarray(want)[s.index] for s in shards])
        ok, info = same_bits(mine, ref)
        exp = expected_rows(idx, w_all.num_experts, 2, 8, cap if cap else T)
        got = tuple(int(np.asarray(v.addressable_data(0))) for v in st)
        check(f"multi_{name}_p{process_id}", ok and len(shards) == 4 and got == exp, f"{info} stats={got} want={exp}")
    jax.distributed.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("single", "multi"))
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    if a.what == "single":
        _setup(8)
        run_single()
    else:
        _setup(4)
        run_multi(a.process_id, a.port, a.num_processes)
    print(f"DONE {a.what} failed={FAILED} {time.perf_counter() - t0:.1f}s", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
