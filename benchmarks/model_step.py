"""The whole DeepSeek V4 model on one GPU: prefill and per-token decode steps of V4-Flash-shaped layers,
time split into attention / MoE / rest, for the routed experts on our kernels vs the reference.

    python -m benchmarks.model_step                       # GPU: 4 real V4-Flash layers (4..7), B = 1,4,16,64, prefill 512
    python -m benchmarks.model_step --layers 6 --batch 1,64 --budget-s 200
    python -m benchmarks.model_step --cpu-smoke           # CPU seconds: DeepseekV4Config.tiny(), 2 layers
    python -m benchmarks.model_step --from-json benchmarks/results/model_step.json   # re-draw PNG + table

**Model.** ``DeepseekV4Config.v4_flash()`` with ``--layers`` N layers cut from the real 43-layer
schedule starting at ``--first-layer`` (default 4: CSA, HCA, CSA, ... gate-routed, as 40 of the 43 layers
are; ``--first-layer 0`` takes the two sliding-window hash layers first; the config's ``compress_ratios``
/ ``num_hash_layers`` are the real ones of those layers), plus the real
embedding, mHC head, norm and LM head (vocab 129280). Random weights are built on the device in the
model's own formats (each block by its jitted constructor: bf16 Linear weights, f32 norms / mHC,
MXFP4 experts generated on the device and converted to the sm_90 FP8 ``MoEWeights``), no checkpoint
file. All N layers are distinct (N x ~6.8 GiB), unrolled in one jitted step; N is reduced when it does
not fit 80% of the pool. ``--cpu-smoke`` (implied on a CPU device) runs ``DeepseekV4Config.tiny()``.

**Steps.** Decode: ``B`` sequences, one token each at position ``--context - 1`` of a cache of
``--context`` positions (fixed shapes: the cost does not depend on the cache's contents). Prefill:
``--prefill-batch`` sequences of ``--prefill-len`` tokens into an empty cache of that length. The step
is ``jax.jit(forward)`` with the cache donated and threaded from call to call (as a decode loop does;
the tokens and positions repeat, so every call rewrites the same cache slots).

**Split.** Four programs per point, each jitted separately on the same weights and cache:
``full`` (per backend), ``no_routed`` (every block's routed experts replaced by zeros; its gate
and shared expert kept), ``no_moe`` (every block's MoE replaced by zeros) and ``none`` (MoE and
attention replaced by zeros; the cache passes through). Then ``moe = full - no_moe`` (ffn_norm,
gate, routed experts, shared expert), ``routed = full - no_routed`` (the routed experts alone),
``attn = no_moe - none`` (attn_norm, attention with its compressor / indexer and cache update) and
``rest = none`` (embedding, mHC mixing, final norm, LM head, the logits). ``no_routed``, ``no_moe``
and ``none`` do not depend on the experts' backend, so they are measured once per point. The split
assumes the parts' times add (they run one after the other in one stream); XLA may fuse a little
across the cut (e.g. the bf16 cast before the MoE), which stays in whichever part keeps it.
``routed_per_layer_s`` (= routed / N) is the number to hold against ``benchmarks.decode_step``'s
per-layer time at T = B tokens (both time the routed experts alone; the model routes by its gate,
hash layers by token id); ``moe_per_layer_s`` also holds the gate and the shared expert.

**Backends.** ``ffi``: ``backend="ffi"``, mode ``fp8`` (DeepGEMM's sm_90 Mega MoE, T padded to the
block's token buckets 16, 32, ...; a decode step of T * K at or under the crossover runs the decode
kernels, unpadded); ``reference``: ``backend="reference"`` (pure JAX, one expert at a
time). Both read the same ``MoEWeights``. ``tokamax`` (when it imports): every block's MoE swapped for
:class:`RoutedBF16MoE` -- the block's own gate and shared expert, the routed experts as
``tokamax.ragged_dot`` (Mosaic GPU kernel, as ``benchmarks.baselines.tokamax_ragged``) on bf16 copies
of the same experts (12 GiB per V4-Flash layer, made once when they fit 80% of the free pool; bf16
activations, so its logits differ from the FP8 reference by that quantization, not checked against
a bound). Each point compares the first call's logits of every backend with the reference's
(relative L2); the FFI model's must be within ``LOGITS_TOL`` (exit code 2 otherwise).

**Timing.** The first call (trace, compile, kernel JIT) is timed apart and excluded; then samples of
n threaded calls blocked on the last (n chosen so a sample lasts ``--sample-s``), median / p10 / p90
of the per-call time. ``--budget-s`` stops starting new points (and programs) once spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import _common as C
from benchmarks import baselines as B
from jax_megamoe.models.deepseek_v4 import (
    DeepseekV4Block,
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    ModelOptions,
    forward,
)

SCHEMA = "jax_megamoe.benchmarks.model_step/1"
DEFAULT_OUT = str(C.RESULTS_DIR)
BACKENDS = ("ffi", "reference", "tokamax")
#: tokamax's ragged_dot configuration (the one benchmarks.decode_step found running on an H100).
TOKAMAX_IMPL = ("mosaic", jnp.float32)
GIB = C.GIB
#: Relative L2 of the FFI model's logits vs the reference model's that a point calls "pass": a gross-
#: error check (wrong weights or layout give O(1)). A random bf16 model amplifies a 1e-2 per-layer
#: difference to ~8e-2 in the logits after two tiny layers; the measured bound per layer count is
#: tests/gpu/test_model_gpu.py's.
LOGITS_TOL = 0.1


# =============================================================================================
# The model
# =============================================================================================


def model_config(*, smoke: bool, layers: int, first_layer: int) -> DeepseekV4Config:
    """``layers`` consecutive layers of V4-Flash's schedule from ``first_layer`` (tiny() on smoke runs)."""
    base = DeepseekV4Config.tiny() if smoke else DeepseekV4Config.v4_flash()
    total = base.num_hidden_layers
    if not 0 <= first_layer < total or first_layer + layers > total:
        raise ValueError(f"--first-layer/--layers: {first_layer}+{layers} is outside the model's {total} layers")
    ratios = tuple(base.layer_compress_ratio(i) for i in range(first_layer, first_layer + layers))
    n_hash = min(layers, max(0, base.num_hash_layers - first_layer))  # hash layers come first
    return dataclasses.replace(
        base, num_hidden_layers=layers, compress_ratios=ratios, num_hash_layers=n_hash, num_nextn_predict_layers=0
    )


def _abstract(cfg: DeepseekV4Config, backend: str) -> DeepseekV4ForCausalLM:
    return nnx.eval_shape(
        lambda: DeepseekV4ForCausalLM(
            cfg, backend=backend, experts="quantized", mode="fp8", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
        )
    )


def param_bytes(module: nnx.Module) -> int:
    """Bytes of every array of ``module`` (works on an abstract, ``nnx.eval_shape`` one)."""
    leaves = jax.tree_util.tree_leaves(nnx.state(module))
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves if hasattr(a, "shape")))


def estimate_bytes(cfg: DeepseekV4Config) -> tuple[int, int]:
    """(bytes of one typical layer, bytes of everything but the layers) of the model, from its shapes."""
    m = _abstract(dataclasses.replace(cfg, num_hidden_layers=1, compress_ratios=(4,), num_hash_layers=0), "reference")
    per_layer = param_bytes(m.layers[0])
    return per_layer, param_bytes(m) - per_layer


def _top_value(name: str, shape: tuple[int, ...], dtype: Any, key: jax.Array) -> jax.Array:
    """The random top-level parameters as the model initialises them (embedding N(0,1), head
    N(0,1/H), hc fn N(0, 0.02^2), hc base 0, hc scale and norm weight 1)."""
    if name.endswith("scale") or name.startswith("norm"):
        return jnp.ones(shape, dtype)
    if name.endswith("base"):
        return jnp.zeros(shape, dtype)
    std = 0.02 if name.startswith("hc_") else (shape[-1] ** -0.5 if name.startswith("head") else 1.0)
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def build_model(cfg: DeepseekV4Config, *, seed: int, on_device: bool, log=C.log) -> DeepseekV4ForCausalLM:
    """The model with random weights and ``backend="ffi"`` blocks (mode fp8, quantized experts).

    ``on_device``: each block by its jitted constructor (the MXFP4 experts are drawn and converted on
    the device, one layer's temporaries at a time) and the top-level parameters drawn on the device;
    else the ordinary eager constructor (numpy-drawn experts; fine for tiny configs)."""
    kw = {"backend": "ffi", "experts": "quantized", "mode": "fp8", "param_dtype": jnp.bfloat16}
    if not on_device:
        return DeepseekV4ForCausalLM(cfg, rngs=nnx.Rngs(seed), **kw)
    model = _abstract(cfg, "ffi")
    options = ModelOptions(**kw)
    for i in range(cfg.num_hidden_layers):
        t0 = time.perf_counter()
        block = nnx.jit(lambda i=i: DeepseekV4Block(cfg, i, rngs=nnx.Rngs(seed + 1 + i), options=options))()
        jax.block_until_ready(nnx.state(block))
        model.layers[i] = block
        log(
            f"layer {i} (ratio {cfg.layer_compress_ratio(i)}, {'hash' if cfg.is_hash_layer(i) else 'gate'}) built "
            f"on the device in {time.perf_counter() - t0:.1f} s"
        )
    key = jax.random.key(seed)
    for j, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model))):
        if path[0] == "layers":
            continue
        a = var.get_value()
        name = ".".join(str(p) for p in path)
        val = jax.jit(_top_value, static_argnums=(0, 1, 2))(
            name, tuple(a.shape), np.dtype(a.dtype), jax.random.fold_in(key, j)
        )
        _set(model, path, val)
    return model


def _set(model: nnx.Module, path: tuple[Any, ...], value: jax.Array) -> None:
    obj: Any = model
    for p in path[:-1]:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    getattr(obj, path[-1]).set_value(value)


class ZeroAttention(nnx.Module):
    """Stands in for a block's attention: zeros, the cache passed through unchanged."""

    def __call__(self, x: jax.Array, positions: jax.Array, cache: Any = None) -> tuple[jax.Array, Any]:
        return jnp.zeros_like(x), cache


class ZeroMoE(nnx.Module):
    """Stands in for a block's MoE: zeros (bf16 in, as the quantized experts' input)."""

    expert_kind = "quantized"

    def __call__(self, x: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        return jnp.zeros_like(x)


class NoRoutedMoE(nnx.Module):
    """A block's MoE without its routed experts: its gate and shared expert, so that
    ``full - no_routed`` is the routed experts alone (what ``benchmarks.decode_step`` times per
    layer). The gate's outputs feed a zero (``* 0.0``, which XLA keeps for floats), so the gate is
    still computed here and stays out of the difference."""

    expert_kind = "quantized"

    def __init__(self, moe: Any) -> None:
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts

    def __call__(self, x: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        idx, w = self.gate(x, token_ids)
        y = jnp.zeros(x.shape, jnp.float32) + (jnp.sum(w) + jnp.sum(idx).astype(jnp.float32)) * 0.0
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.astype(jnp.bfloat16)


class RoutedBF16MoE(nnx.Module):
    """A block's MoE with its routed experts on bf16 copies of its ``MoEWeights`` (exact: e4m3 times a
    power of two) through ``routed(x, idx, w, w13t, w2t, clamp=...)`` (e.g. tokamax's ragged_dot, see
    ``benchmarks.baselines.tokamax_ragged``); the block's own gate and shared expert, added as
    ``DeepseekV4MoE`` does. bf16 activations into the experts (no FP8 activation quantization)."""

    expert_kind = "quantized"

    def __init__(self, moe: Any, w13t: jax.Array, w2t: jax.Array, routed: Any) -> None:
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        self.w13t, self.w2t = nnx.Variable(w13t), nnx.Variable(w2t)
        self.routed = routed
        self.clamp = moe.config.activation_clamp

    def __call__(self, x: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        idx, w = self.gate(x, token_ids)
        y = self.routed(x, idx, w, self.w13t.get_value(), self.w2t.get_value(), clamp=self.clamp)
        if self.shared_experts is not None:
            y = (y.astype(jnp.float32) + self.shared_experts(x)).astype(jnp.bfloat16)
        return y


def tokamax_routed():
    """``benchmarks.baselines.tokamax_ragged`` with :data:`TOKAMAX_IMPL` bound."""
    import functools

    impl, dt = TOKAMAX_IMPL
    return functools.partial(B.tokamax_ragged, implementation=impl, out_dtype=dt)


VARIANTS = ("full", "no_routed", "no_moe", "none")


def split_variant(
    model: DeepseekV4ForCausalLM,
    variant: str,
    backend: str = "ffi",
    bf16: tuple[Any, list[tuple[jax.Array, jax.Array]]] | None = None,
) -> tuple[Any, Any]:
    """``nnx.split`` of ``model`` as ``variant``: ``full`` with every block's experts on ``backend``,
    ``no_routed`` (MoE -> :class:`NoRoutedMoE`: gate and shared expert only), ``no_moe`` (MoE ->
    :class:`ZeroMoE`), ``none`` (also attention -> :class:`ZeroAttention`).
    ``bf16 = (routed, [(w13t, w2t) per layer])``: ``full`` with every MoE a :class:`RoutedBF16MoE`
    instead (``backend`` is then only a name). The model is left as it was (its modules and
    backends are put back)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
    saved = [(layer.attn, layer.ffn, layer.ffn.backend) for layer in model.layers]
    try:
        for i, layer in enumerate(model.layers):
            if variant == "full" and bf16 is not None:
                layer.ffn = RoutedBF16MoE(layer.ffn, *bf16[1][i], bf16[0])
            elif variant == "full":
                layer.ffn.backend = backend
            elif variant == "no_routed":
                layer.ffn = NoRoutedMoE(layer.ffn)
            else:
                layer.ffn = ZeroMoE()
                if variant == "none":
                    layer.attn = ZeroAttention()
        return nnx.split(model)
    finally:
        for layer, (attn, ffn, be) in zip(model.layers, saved, strict=True):
            layer.attn, layer.ffn = attn, ffn
            ffn.backend = be


def ffi_unavailable() -> str:
    """Why ``backend="ffi"`` cannot run here ('' when it can): the sm_90 kernels need an H100/H200
    and the built FFI library."""
    from jax_megamoe import ops

    if ops.device_arch() != 9:
        return f"the FFI kernels need an sm_90 GPU (device: {jax.devices()[0].device_kind})"
    try:
        ops.choose_backend("ffi", "fp8", op="mega_moe")
    except Exception as e:  # noqa: BLE001 - e.g. the FFI library is not built
        return f"{type(e).__name__}: {C.first_line(e)}"
    return ""


def make_step(graphdef: Any):
    """``jax.jit(step(state, cache, tokens, positions) -> (logits, cache))`` with the cache donated."""

    def step(state, cache, tokens, positions):
        return forward(nnx.merge(graphdef, state), cache, tokens, positions)

    return jax.jit(step, donate_argnums=(1,))


# =============================================================================================
# Timing (the cache threaded through the calls)
# =============================================================================================


def time_threaded(
    step, state, cache, tokens, positions, *, budget_s: float, sample_s: float, min_samples: int
) -> tuple[C.Timing, np.ndarray]:
    """Time ``step`` with its (donated) cache threaded through; returns the timing and the first
    call's logits (f32 numpy)."""
    t0 = time.perf_counter()
    logits, cache = step(state, cache, tokens, positions)
    first_logits = np.asarray(logits, dtype=np.float32)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(2):
        logits, cache = step(state, cache, tokens, positions)
    jax.block_until_ready(logits)
    est = max((time.perf_counter() - t0) / 2, 1e-7)
    n = int(min(1000, max(1, round(sample_s / est))))
    if est > 0.05:  # a slow program (the reference experts at prefill): fewer samples, not a blown budget
        min_samples = min(min_samples, 3)
    samples = int(min(100, max(min_samples, budget_s / (n * est))))
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(n):
            logits, cache = step(state, cache, tokens, positions)
        jax.block_until_ready(logits)
        times.append((time.perf_counter() - t0) / n)
    del cache
    t = np.asarray(times)
    timing = C.Timing(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)), samples, n, first)
    return timing, first_logits


# =============================================================================================
# The run
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class Point:
    kind: str  # "decode" or "prefill"
    batch: int
    seq: int  # tokens per sequence in the step
    max_len: int  # cache positions
    position: int  # first position written

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def label(self) -> str:
        return f"decode B={self.batch}" if self.kind == "decode" else f"prefill {self.batch}x{self.seq}"


def points_of(args: argparse.Namespace) -> list[Point]:
    """Decode at the smallest batch, prefill, decode at the largest batch, then the others from large
    to small (so a short budget still measures both ends and the prefill)."""
    bs = sorted(set(args.batch))
    order = bs[:1] + bs[:0:-1]
    dec = [Point("decode", b, 1, args.context, args.context - 1) for b in order]
    pre = [] if args.prefill_len <= 0 else [Point("prefill", args.prefill_batch, args.prefill_len, args.prefill_len, 0)]
    return dec[:1] + pre + dec[1:]


class Run:
    def __init__(self, args: argparse.Namespace, model: DeepseekV4ForCausalLM, result: dict[str, Any]):
        self.args, self.model, self.result = args, model, result
        self.t_start = time.time()
        self.deadline = args.deadline if args.deadline is not None else self.t_start + args.budget_s
        self.sticky: dict[str, str] = {}  # backend -> why it cannot run (skips it at every later point)
        self.bf16: list[tuple[jax.Array, jax.Array]] | None = None  # the tokamax backend's expert copies
        if "tokamax" in args.backends:
            why = B.tokamax_import_error()
            if why:
                self.sticky["tokamax"] = why
                C.log(f"tokamax: skipped ({why})")
        if "ffi" in args.backends:
            why = ffi_unavailable()
            if why:
                self.sticky["ffi"] = why
                C.log(f"ffi: skipped ({why})")

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        C.write_json(Path(self.args.out) / "model_step.json", self.result)

    def inputs(self, p: Point, seed: int) -> tuple[jax.Array, jax.Array]:
        rng = np.random.default_rng(seed)
        vocab = self.model.config.vocab_size
        tok = jnp.asarray(rng.integers(0, vocab, (p.batch, p.seq)), jnp.int32)
        pos = jnp.asarray(np.broadcast_to(p.position + np.arange(p.seq), (p.batch, p.seq)), jnp.int32)
        return tok, pos

    def program(self, p: Point, variant: str, backend: str, tok, pos, rec: dict[str, Any]) -> np.ndarray | None:
        """Measure one program into ``rec[name]``; returns its first logits (None when it did not run)."""
        name = variant if variant != "full" else f"full_{backend}"
        if self.left() <= 0:
            rec[name] = {"status": "skipped", "reason": "time budget exhausted"}
            return None
        try:
            bf16 = None
            if variant == "full" and backend == "tokamax":
                bf16 = (tokamax_routed(), self.bf16_copies())
            gd, state = split_variant(self.model, variant, backend, bf16)
            cache = self.model.init_cache(p.batch, p.max_len, self.args.cache_dtype)
            budget = min(self.args.time_per_program, max(0.0, self.left()))
            timing, logits = time_threaded(
                make_step(gd),
                state,
                cache,
                tok,
                pos,
                budget_s=budget,
                sample_s=self.args.sample_s,
                min_samples=self.args.min_samples,
            )
        except Exception as e:  # noqa: BLE001 - recorded; the run goes on
            why = f"{type(e).__name__}: {C.first_line(e)}"
            if "BackendUnavailableError" in str(e):
                why = "BackendUnavailableError: " + str(e).split("BackendUnavailableError:", 1)[1].strip()[:300]
            rec[name] = {"status": "failed", "reason": why}
            if variant == "full" and (
                "BackendUnavailableError" in why
                or "bf16 copies" in why
                or backend == "tokamax"
                or "RESOURCE_EXHAUSTED" in why
                or "out of memory" in why
            ):
                self.sticky[backend] = why
            if self.args.verbose:
                traceback.print_exc()
            gc.collect()
            C.log(f"  {p.label} {name}: {why}")
            return None
        rec[name] = {"status": "ok", **timing.as_dict()}
        self.save()
        C.log(
            f"  {p.label} {name}: {C.fmt_time(timing.median_s)} (first call {timing.first_call_s:.1f} s, "
            f"{timing.samples}x{timing.calls_per_sample})"
        )
        return logits

    def bf16_copies(self) -> list[tuple[jax.Array, jax.Array]]:
        """bf16 ``(W13t [E, H, 2I], W2t [E, I, H])`` of every layer's experts, made once (when they fit)."""
        if self.bf16 is None:
            cfg = self.model.config
            need = (
                cfg.num_hidden_layers
                * cfg.n_routed_experts
                * B.bytes_per_expert("bf16", cfg.hidden_size, cfg.moe_intermediate_size)
            )
            stats = jax.devices()[0].memory_stats() or {}
            if stats.get("bytes_limit"):
                free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
                if need > 0.8 * free:
                    raise MemoryError(f"bf16 copies of the experts need {C.fmt_bytes(need)}, {C.fmt_bytes(free)} free")
            self.bf16 = [B.dequantize_all_bf16(layer.ffn.moe_weights) for layer in self.model.layers]
        return self.bf16

    def point(self, p: Point) -> dict[str, Any]:
        q: dict[str, Any] = {
            "kind": p.kind,
            "label": p.label,
            "batch": p.batch,
            "seq": p.seq,
            "tokens": p.tokens,
            "max_len": p.max_len,
            "position": p.position,
            "programs": {},
            "backends": {},
        }
        self.result["points"].append(q)  # in place: saved after every program (a killed run keeps them)
        tok, pos = self.inputs(p, self.args.seed + p.tokens)
        progs = q["programs"]
        firsts: dict[str, np.ndarray] = {}
        split_done = False
        for be in self.args.backends:  # the split programs right after the first full one that ran
            if be in self.sticky:
                progs[f"full_{be}"] = {"status": "skipped", "reason": self.sticky[be]}
                continue
            y = self.program(p, "full", be, tok, pos, progs)
            if y is not None:
                firsts[be] = y
                if not split_done:
                    split_done = True
                    for v in VARIANTS[1:]:
                        self.program(p, v, "", tok, pos, progs)
        ok = {k: r["median_s"] for k, r in progs.items() if r.get("status") == "ok"}
        n = self.model.config.num_hidden_layers
        for be in self.args.backends:
            full = ok.get(f"full_{be}")
            r: dict[str, Any] = {"status": "ok" if full else progs.get(f"full_{be}", {}).get("status", "skipped")}
            if not full:
                r["reason"] = progs.get(f"full_{be}", {}).get("reason", "")
                q["backends"][be] = r
                continue
            r.update(
                step_s=full,
                tokens_per_s=p.tokens / full,
                step_p10_s=progs[f"full_{be}"]["p10_s"],
                step_p90_s=progs[f"full_{be}"]["p90_s"],
            )
            if "no_moe" in ok and "none" in ok:
                r.update(moe_s=full - ok["no_moe"], attn_s=ok["no_moe"] - ok["none"], rest_s=ok["none"])
                r["moe_per_layer_s"] = r["moe_s"] / n
                r["attn_per_layer_s"] = r["attn_s"] / n
            if "no_routed" in ok:
                r["routed_s"] = full - ok["no_routed"]
                r["routed_per_layer_s"] = r["routed_s"] / n
            if be in firsts and "reference" in firsts:
                rel = C.rel_l2(firsts[be], firsts["reference"])
                r["logits_rel_l2_vs_reference"] = rel
                if be == "ffi":  # tokamax runs bf16 activations (no FP8 quantization): not the same numerics
                    r["logits_pass"] = bool(math.isfinite(rel) and rel <= LOGITS_TOL)
            if be in firsts:
                r["logits_finite"] = bool(np.isfinite(firsts[be]).all())
            q["backends"][be] = r
        return q

    def run(self) -> None:
        for p in points_of(self.args):
            if self.left() <= 0:
                self.result["points"].append(
                    {
                        "kind": p.kind,
                        "label": p.label,
                        "batch": p.batch,
                        "seq": p.seq,
                        "tokens": p.tokens,
                        "skipped": "time budget exhausted",
                    }
                )
                C.log(f"{p.label}: skipped (time budget exhausted)")
                continue
            C.log(f"{p.label} ({p.tokens} tokens, cache {p.max_len}; {self.left():.0f} s left)")
            self.point(p)
            self.save()
            gc.collect()


# =============================================================================================
# Output: markdown table, PNG
# =============================================================================================


def table(result: dict[str, Any]) -> str:
    n = result["model"]["layers"]
    lines = [
        "| point | backend | step | tokens/s | attn | MoE | rest | MoE per layer | routed per layer | attn per layer "
        "| logits rel. L2 vs ref |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for q in result["points"]:
        if "skipped" in q:
            lines.append(f"| {q['label']} | - | {q['skipped']} | | | | | | | | |")
            continue
        for be, r in q["backends"].items():
            if r.get("status") != "ok":
                lines.append(
                    f"| {q['label']} | `{be}` | {r.get('status')}: {str(r.get('reason', ''))[:80]} | | | | | | | | |"
                )
                continue
            rel = r.get("logits_rel_l2_vs_reference")
            lines.append(
                f"| {q['label']} | `{be}` | {C.fmt_time(r['step_s'])} | {r['tokens_per_s']:.0f} | "
                f"{C.fmt_time(r.get('attn_s'))} | {C.fmt_time(r.get('moe_s'))} | {C.fmt_time(r.get('rest_s'))} | "
                f"{C.fmt_time(r.get('moe_per_layer_s'))} | {C.fmt_time(r.get('routed_per_layer_s'))} | "
                f"{C.fmt_time(r.get('attn_per_layer_s'))} | "
                + (f"{rel:.2e}" if rel is not None and be != "reference" else "-")
                + " |"
            )
    lines.append("")
    lines.append(
        f"{n} layers; attn = no_moe - none, MoE = full - no_moe, rest = none (embedding, mHC, norm, LM head); "
        "routed = full - no_routed (the routed experts alone: compare with decode_step's per-layer time). "
        "tokamax: bf16 expert copies, bf16 activations (its logits differ from the FP8 reference by that)."
    )
    return "\n".join(lines)


def results_markdown(result: dict[str, Any], png: str | None = None) -> str:
    m = result["model"]
    head = [
        "## Whole-model steps, attention / MoE / rest (`python -m benchmarks.model_step`)",
        "",
        (
            f"- {result['device']['kind']}, {result['date']}; `{result['command']}`"
            + (f"; **{result['shrink_note']}**" if result.get("shrink_note") else "")
            + (f"; {result['layers_note']}" if result.get("layers_note") else "")
        ),
        (
            f"- {m['name']}: layers {m['layer_ids']} (compress ratios {m['compress_ratios']}, {m['hash_layers']} hash-routed), "
            f"H={m['hidden']} E={m['experts']} K={m['top_k']} vocab={m['vocab']}; weights {C.fmt_bytes(m['param_bytes'])}; "
            f"decode at position {result['args']['context'] - 1} of a {result['args']['context']}-position cache"
        ),
        "",
    ]
    return "\n".join(head) + table(result) + (f"\n\n![model_step]({png})" if png else "")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for q in result["points"]:
        for be, r in q.get("backends", {}).items():
            if r.get("status") == "ok" and r.get("moe_s") is not None:
                bars.append((f"{q['label']}\n{be}", r["attn_s"] * 1e3, r["moe_s"] * 1e3, r["rest_s"] * 1e3))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(bars) + 2), 5))
    if bars:
        x = np.arange(len(bars))
        a, mo, re_ = (np.array([b[i] for b in bars]) for i in (1, 2, 3))
        ax.bar(x, a, label="attention", color="tab:blue")
        ax.bar(x, mo, bottom=a, label="MoE (gate + routed + shared)", color="tab:orange")
        ax.bar(x, re_, bottom=a + mo, label="rest (embed, mHC, head)", color="tab:gray")
        ax.set_xticks(x, [b[0] for b in bars], fontsize=7)
        ax.set_yscale("log")
    ax.set_ylabel("ms per step (stacked; log scale)")
    m = result["model"]
    ax.set_title(f"{m['name']} {m['layers']} layers, {result['device']['kind']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finalize(args: argparse.Namespace, result: dict[str, Any]) -> None:
    png = Path(args.out) / "model_step.png"
    try:
        plot(result, png)
    except Exception as e:  # noqa: BLE001 - the JSON and the table are worth more than the plot
        C.log(f"no PNG ({type(e).__name__}: {e})")
    if args.write_results:
        md = Path(args.write_results)
        link = os.path.relpath(png.resolve(), md.resolve().parent) if png.is_file() else None
        C.replace_section(md, "model_step", results_markdown(result, link))


# =============================================================================================
# CLI
# =============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.model_step",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--layers", type=int, default=None, help="layers (default 4; --cpu-smoke 2); reduced to fit")
    p.add_argument(
        "--first-layer",
        type=int,
        default=None,
        help="first real layer index (default 4: CSA, HCA, ... gate-routed, as 40 of the 43 layers; --cpu-smoke 0)",
    )
    p.add_argument("--batch", type=C.int_list, default=None, help="decode batch sizes (default 1,4,16,64; smoke 1,2)")
    p.add_argument(
        "--prefill-len", type=int, default=None, help="prefill tokens per sequence (default 512; smoke 16; 0: none)"
    )
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--context", type=int, default=None, help="decode cache positions (default 4096; smoke 64)")
    p.add_argument("--backends", default="ffi,reference,tokamax", help="comma list of " + ", ".join(BACKENDS))
    p.add_argument("--cache-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--cpu-smoke", action="store_true", help="DeepseekV4Config.tiny() (implied on a CPU device)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting new programs after this many seconds (default 240; smoke 120)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="same as --budget-s, as a Unix time (wins; counts the model build too)",
    )
    p.add_argument(
        "--time-per-program",
        type=float,
        default=None,
        help="seconds of timed samples per program (default 0.4; smoke 0.02)",
    )
    p.add_argument("--sample-s", type=float, default=None, help="target length of one sample (default 0.02 s)")
    p.add_argument("--min-samples", type=int, default=5)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (model_step.json, model_step.png)")
    p.add_argument("--write-results", default=None, help="also fill the model_step section of this markdown file")
    p.add_argument("--from-json", default=None, help="no measuring: re-draw the PNG and the table from this JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    a.backends = [s.strip() for s in a.backends.split(",") if s.strip()]
    bad = [b for b in a.backends if b not in BACKENDS]
    if bad:
        p.error(f"--backends: unknown {bad}; choose from {', '.join(BACKENDS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.model_step``; 2 when the FFI model's logits miss the reference's."""
    C.set_gpu_memory_fraction("0.85")
    args = parse_args(argv)
    if args.from_json:
        src = Path(args.from_json)
        args.out = str(src.parent) if args.out == DEFAULT_OUT else args.out
        result = json.loads(src.read_text())
        finalize(args, result)
        print(table(result))
        return 0
    dev = C.device_info()
    smoke = args.cpu_smoke or dev["platform"] == "cpu"
    args.layers = args.layers or (2 if smoke else 4)
    args.first_layer = args.first_layer if args.first_layer is not None else (0 if smoke else 4)
    args.batch = args.batch or ([1, 2] if smoke else [1, 4, 16, 64])
    args.prefill_len = args.prefill_len if args.prefill_len is not None else (16 if smoke else 512)
    args.context = args.context or (64 if smoke else 4096)
    args.budget_s = args.budget_s if args.budget_s is not None else (120.0 if smoke else 240.0)
    args.time_per_program = args.time_per_program if args.time_per_program is not None else (0.02 if smoke else 0.4)
    args.sample_s = args.sample_s or 0.02
    if smoke:
        args.min_samples = min(args.min_samples, 2)
    shrink_note = "CPU smoke run: DeepseekV4Config.tiny() layers; numbers say nothing about V4-Flash" if smoke else ""
    if shrink_note:
        C.log(shrink_note)
    cfg = model_config(smoke=smoke, layers=args.layers, first_layer=args.first_layer)
    per_layer, top = estimate_bytes(cfg)
    lim = dev["memory_bytes_limit"]
    layers_note = ""
    if lim and not smoke:
        fit = int((0.8 * lim - top) // per_layer)
        if fit < args.layers:
            if fit < 1:
                raise SystemExit(
                    f"model_step: one layer ({C.fmt_bytes(per_layer)}) + embed/head ({C.fmt_bytes(top)}) "
                    f"do not fit 80% of the {C.fmt_bytes(lim)} pool"
                )
            layers_note = f"--layers {args.layers} reduced to {fit}: {C.fmt_bytes(per_layer)} per layer in a {C.fmt_bytes(lim)} pool"
            C.log(layers_note)
            args.layers = fit
            cfg = model_config(smoke=smoke, layers=fit, first_layer=args.first_layer)
    cache_dtype = jnp.float32 if args.cache_dtype == "float32" else jnp.bfloat16
    args.cache_dtype_name, args.cache_dtype = args.cache_dtype, cache_dtype
    ids = list(range(args.first_layer, args.first_layer + args.layers))
    C.log(
        f"device {dev['kind']} ({dev['platform']}), pool {(lim or 0) / GIB:.1f} GiB; layers {ids} "
        f"(ratios {list(cfg.compress_ratios)}, {cfg.num_hash_layers} hash), {C.fmt_bytes(per_layer)} per layer + "
        f"{C.fmt_bytes(top)} embed/head; backends {args.backends}; budget {args.budget_s:.0f} s"
    )
    t0 = time.perf_counter()
    model = build_model(cfg, seed=args.seed, on_device=not smoke)
    build_s = time.perf_counter() - t0
    C.log(f"model built in {build_s:.1f} s")
    rec_args = {
        k: (v if not isinstance(v, type) and k != "cache_dtype" else args.cache_dtype_name)
        for k, v in vars(args).items()
    }
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "date": C.utc_now(),
        "command": C.command_line(),
        "device": dev,
        "versions": C.versions(),
        "smoke": smoke,
        "shrink_note": shrink_note,
        "layers_note": layers_note,
        "args": rec_args,
        "model": {
            "name": "tiny" if smoke else "v4_flash",
            "layers": args.layers,
            "layer_ids": ids,
            "compress_ratios": list(cfg.compress_ratios),
            "hash_layers": cfg.num_hash_layers,
            "hidden": cfg.hidden_size,
            "intermediate": cfg.moe_intermediate_size,
            "experts": cfg.n_routed_experts,
            "top_k": cfg.num_experts_per_tok,
            "vocab": cfg.vocab_size,
            "heads": cfg.num_attention_heads,
            "param_bytes": param_bytes(model),
            "per_layer_bytes": per_layer,
            "build_s": build_s,
        },
        "method": {
            "split": "moe = full - no_moe; routed = full - no_routed; attn = no_moe - none; rest = none "
            "(each program jitted separately; see the module docstring)",
            "timing": "jit, cache donated and threaded; first call excluded; samples of n calls blocked on the last; median/p10/p90",
            "decode": "B sequences x 1 token at position context-1 of a context-position cache",
            "prefill": "prefill_batch sequences x prefill_len tokens into an empty cache of prefill_len positions",
            "moe_per_layer_vs_decode_step": "moe_per_layer_s holds gate + routed + shared expert; decode_step's per-layer time is routed experts only, random routing",
        },
        "logits_tol": LOGITS_TOL,
        "tokamax": {
            "implementation": TOKAMAX_IMPL[0],
            "out_dtype": np.dtype(TOKAMAX_IMPL[1]).name,
            "weights": "bf16 copies of the same MoEWeights (exact), made once; bf16 activations",
        },
        "points": [],
    }
    run = Run(args, model, result)
    run.save()
    run.run()
    result["elapsed_s"] = time.time() - run.t_start
    result["skipped_backends"] = dict(run.sticky)
    run.save()
    C.log(f"wrote {Path(args.out) / 'model_step.json'}")
    finalize(args, result)
    print("== model_step ==")
    print(table(result))
    fails = [
        f"{q['label']} {be}: rel L2 {r['logits_rel_l2_vs_reference']:.2e} > {LOGITS_TOL}"
        for q in result["points"]
        for be, r in q.get("backends", {}).items()
        if r.get("logits_pass") is False
    ]
    if fails:
        print("CHECK FAILURES: " + "; ".join(fails))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
