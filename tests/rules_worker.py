"""Sharding-rule checks that need 8 (virtual) CPU devices; run by tests/test_rules.py.

jax reads ``XLA_FLAGS`` once, when its CPU backend starts, so these run in a fresh interpreter:

    python tests/rules_worker.py

Every check prints one line ``CHECK <name> ok|FAIL <details>``; the exit code is 0 only if all pass.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8"])
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_megamoe import (  # noqa: E402
    ShardingError,  # noqa: E402
    ops,
    reference,
)
from jax_megamoe.layout import MoEWeights  # noqa: E402
from jax_megamoe.ops import MoEOptions  # noqa: E402

FAILED: list[str] = []
T, H, I, E, K = 32, 512, 256, 16, 4


def check(name: str, ok: bool, details: str = "") -> None:
    print(f"CHECK {name} {'ok' if ok else 'FAIL'} {details}".rstrip(), flush=True)
    if not ok:
        FAILED.append(name)


def inputs(seed: int):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, H)) * 3, jnp.bfloat16)
    idx = jnp.asarray(rng.integers(-1, E, size=(T, K)), jnp.int32)
    w = jnp.asarray(rng.random((T, K)), jnp.float32)
    return x, idx, w


def weights(mode: str, seed: int = 0) -> MoEWeights:
    rng = np.random.default_rng(seed)
    w13 = rng.integers(0, 256, size=(E, 2 * I, H // 2), dtype=np.uint8)
    w13s = rng.integers(118, 124, size=(E, 2 * I, H // 32), dtype=np.uint8)
    w2 = rng.integers(0, 256, size=(E, H, I // 2), dtype=np.uint8)
    w2s = rng.integers(118, 124, size=(E, H, I // 32), dtype=np.uint8)
    return MoEWeights.from_checkpoint(w13, w13s, w2, w2s, mode=mode)


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def put(a, mesh, spec):
    return jax.device_put(a, NamedSharding(mesh, spec))


def compiled_text(f, *args) -> str:
    return f.lower(*args).compile().as_text()


def run(name, fn) -> None:
    try:
        fn()
    except Exception as e:  # a check that raises fails, with its traceback
        traceback.print_exc()
        check(name, False, f"{type(e).__name__}: {str(e)[:300]}")


def token_sharded(kind: AxisType) -> None:
    """x, topk_idx, topk_weights sharded on tokens over 8 devices, weights replicated: plain jit runs
    the op per shard (no all-gather, no collective at all), result equal to one device's bit for
    bit and still token-sharded; every mode, mega_moe and pre_dispatch."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    x, idx, w = inputs(1)
    for mode in ("fp8", "fp8xfp4", "mxf4xmxf4"):
        wts = weights(mode, seed=2)
        want = reference.mega_moe(x, idx, w, wts, mode=mode, options=MoEOptions(routed_scaling_factor=1.5))
        args = [put(a, mesh, P("data")) for a in (x, idx, w)]
        f = jax.jit(lambda a, b, c: ops.mega_moe(a, b, c, wts, options=MoEOptions(routed_scaling_factor=1.5)))
        y = f(*args)
        text = compiled_text(f, *args)
        collectives = [c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if c in text]
        ok = np.array_equal(bits(y), bits(want)) and float(jnp.abs(want.astype(jnp.float32)).sum()) > 0
        spec = getattr(y.sharding, "spec", None)
        check(f"token_sharded_{kind.name}_{mode}", ok and not collectives and spec is not None and spec[0] == "data",
              f"equal={ok} collectives={collectives} out={y.sharding}")  # fmt: skip
        want_pd = reference.pre_dispatch(x, idx, w, mode=mode, num_max_tokens=T, routed_scaling_factor=2.0)
        g = jax.jit(
            lambda a, b, c: tuple(ops.pre_dispatch(a, b, c, mode=mode, num_max_tokens=T, routed_scaling_factor=2.0))
        )
        got = g(*args)
        eq = [np.array_equal(bits(p), bits(q)) for p, q in zip(got, want_pd)]
        text = compiled_text(g, *args)
        check(f"pre_dispatch_token_sharded_{kind.name}_{mode}", all(eq) and "all-gather" not in text, f"equal={eq}")


def without_the_rule_xla_gathers() -> None:
    """The property the rule buys, shown on the bare reference: the same call without it gathers."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x, idx, w = inputs(3)
    wts = weights("fp8", seed=4)
    args = [put(a, mesh, P("data")) for a in (x, idx, w)]
    bare = compiled_text(jax.jit(lambda a, b, c: reference.mega_moe(a, b, c, wts, mode="fp8")), *args)
    ruled = compiled_text(jax.jit(lambda a, b, c: ops.mega_moe(a, b, c, wts)), *args)
    check("without_the_rule_xla_gathers", "all-gather" in bare and "all-gather" not in ruled)


def expert_sharded(kind: AxisType) -> None:
    """Weights sharded on the expert dim: ShardingError naming the leaf and axis, pointing at ep_moe
    (the exception itself with Explicit axes, raised at trace time; inside XLA's JaxRuntimeError when
    XLA partitions an Auto mesh). Never a result computed from gathered experts."""
    mesh = jax.make_mesh((2, 4), ("data", "ep"), axis_types=(kind, kind))
    x, idx, w = inputs(5)
    wts = weights("fp8", seed=6)
    sharded = jax.tree.map(lambda a: put(a, mesh, P("ep")), wts)
    args = [put(a, mesh, P("data")) for a in (x, idx, w)]
    for backend in ("auto", "ffi"):
        f = jax.jit(lambda a, b, c, ww: ops.mega_moe(a, b, c, ww, backend=backend))
        try:
            f.lower(*args, sharded).compile()
            check(f"expert_sharded_{kind.name}_{backend}", False, "no error")
        except ShardingError as e:
            msg = str(e)
            ok = kind == AxisType.Explicit and "weights.l1" in msg and "'ep'" in msg and "parallel.ep_moe" in msg
            check(f"expert_sharded_{kind.name}_{backend}", ok, msg[:200])
        except jax.errors.JaxRuntimeError as e:
            msg = str(e)
            ok = kind == AxisType.Auto and "ShardingError: weights.l1" in msg and "'ep'" in msg and "ep_moe" in msg
            check(f"expert_sharded_{kind.name}_{backend}", ok, msg[:200])


def other_dims_sharded() -> None:
    """Hidden dim of x sharded, or pre_dispatch's padded buffer over a token-sharded batch:
    ShardingError naming what is sharded."""
    mesh = jax.make_mesh((8,), ("m",), axis_types=(AxisType.Explicit,))
    x, idx, w = inputs(7)
    wts = weights("fp8", seed=8)
    try:
        jax.jit(lambda a, b, c: ops.mega_moe(a, b, c, wts))(put(x, mesh, P(None, "m")), idx, w)
        check("hidden_sharded", False, "no error")
    except ShardingError as e:
        check("hidden_sharded", "x of jax_megamoe.mega_moe" in str(e) and "dim 1" in str(e) and "'m'" in str(e), str(e))
    args = [put(a, mesh, P("m")) for a in (x, idx, w)]
    try:
        jax.jit(lambda a, b, c: ops.pre_dispatch(a, b, c, mode="fp8", num_max_tokens=2 * T))(*args)
        check("pre_dispatch_padded_sharded", False, "no error")
    except ShardingError as e:
        check("pre_dispatch_padded_sharded", f"num_max_tokens={2 * T}" in str(e) and "shard_map" in str(e), str(e))
    # replicated operands over a multi-device mesh: every device runs the whole op, no collective
    rep = [put(a, mesh, P()) for a in (x, idx, w)]
    f = jax.jit(lambda a, b, c: ops.mega_moe(a, b, c, wts))
    y = f(*rep)
    want = reference.mega_moe(x, idx, w, wts, mode="fp8")
    check("replicated_runs_whole", np.array_equal(bits(y), bits(want)) and "all-gather" not in compiled_text(f, *rep))


def ffi_token_sharded_lowers_per_shard() -> None:
    """backend='ffi' (no GPU here): token-sharded operands compile per shard for this CPU mesh (the
    kernel call would fail at run time off the GPU) with no collective; the lowered module carries
    the Shardy rule on the partitioned call, token factor shared by x, the routing and the result."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x, idx, w = inputs(9)
    wts = weights("fp8", seed=10)
    args = [put(a, mesh, P("data")) for a in (x, idx, w)]
    f = jax.jit(lambda a, b, c: ops.mega_moe(a, b, c, wts, backend="ffi", options=MoEOptions(num_max_tokens=T)))
    lowered = f.lower(*args)
    text = lowered.as_text()
    line = next((ln for ln in text.splitlines() if "CustomSPMDPartitioning" in ln), "")
    m = re.search(
        r"sdy\.op_sharding_rule<\(\[(\w+), \w+\], \[(\w+), \w+\], \[(\w+), \w+\],.*->\(\[(\w+), \w+\]\)", line
    )
    rule_ok = m is not None and len(set(m.groups())) == 1  # one token factor
    # Compiling it for this CPU mesh partitions it per shard, and lowering the shard's kernel call
    # for the CPU raises BackendUnavailableError then: before anything runs.
    try:
        lowered.compile()
        err = ""
    except Exception as e:  # noqa: BLE001 - XLA wraps what the partitioner raised
        err = f"{type(e).__name__}: {e}"
    refused = "backend='ffi' for mega_moe runs DeepGEMM kernels" in err
    check("ffi_token_sharded_lowers_per_shard", rule_ok and refused and "all-gather" not in text,
          f"rule_ok={rule_ok} refused={refused} line={line[:300]} err={err[:300]}")  # fmt: skip


def main() -> int:
    check("devices", len(jax.devices()) == 8, str(jax.devices()))
    for kind in (AxisType.Auto, AxisType.Explicit):
        run(f"token_sharded_{kind.name}", lambda: token_sharded(kind))
        run(f"expert_sharded_{kind.name}", lambda: expert_sharded(kind))
    run("without_the_rule_xla_gathers", without_the_rule_xla_gathers)
    run("other_dims_sharded", other_dims_sharded)
    run("ffi_token_sharded_lowers_per_shard", ffi_token_sharded_lowers_per_shard)
    print("FAILED:", FAILED, flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
