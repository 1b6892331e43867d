"""The whole DeepSeek V4 model with its routed experts on the FFI kernels (backend="ffi", mode fp8,
experts="quantized") vs the same model on the pure-JAX reference experts (backend="reference"), and
examples/generate.py on the GPU.

GPU only (H100/H200). Both models share every weight (one model, its blocks' backend switched).
Prints ``TABLE`` lines (what, layer count, tokens, logits rel. L2, bound, card).

The bound is measured, not guessed: the kernel's contract for one routed-expert layer is rel. L2
<= 1e-2 vs the reference (``REL_TOL`` of tests/gpu/test_mega_moe_sm90_gpu.py; measured about 2.5e-3
at H=512). So each point also runs the reference model with every routed-expert output perturbed
by Gaussian noise of exactly that relative size (``NOISE_REL``), which shows how much the model (mHC
mixing, later gates re-routing near-ties, the LM head) amplifies a 1e-2 per-layer error by the time
it reaches the logits; the FFI model must stay within ``MARGIN`` times that (and within 1e-2 when
the noise control is smaller, e.g. at one layer).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_megamoe import ops
from jax_megamoe.models.deepseek_v4 import (
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    forward,
)

GPU_ARCH = ops.device_arch()
REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU_ARCH != 9, reason="sm_90 kernels need an H100/H200")]

NOISE_REL = 1e-2  # the per-layer kernel-vs-reference contract (test_mega_moe_sm90_gpu.REL_TOL)
MARGIN = 2.0
FLOOR = 1e-2


def _card() -> str:
    return jax.devices()[0].device_kind


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _set_backend(model, backend: str) -> None:
    for layer in model.layers:
        layer.ffn.backend = backend


class _Noisy:
    """While active, every routed-expert output gets Gaussian noise of relative size ``noise`` (the
    control of the module docstring; affects programs traced meanwhile)."""

    def __init__(self, noise: float):
        self.noise = noise

    def __enter__(self):
        from jax_megamoe._src.models.deepseek_v4 import moe as moe_mod

        self.mod, self.orig = moe_mod, moe_mod._routed_experts
        if not self.noise:
            return self
        orig, noise = self.orig, self.noise

        def noisy(x, idx, w, weights, backend, **kw):
            y = orig(x, idx, w, weights, backend, **kw).astype(jnp.float32)
            z = jax.random.normal(jax.random.key(x.shape[0] * 7919 + 1), y.shape, jnp.float32)
            rms = jnp.sqrt(jnp.mean(y * y))
            return (y + noise * rms * z).astype(jnp.bfloat16)

        moe_mod._routed_experts = noisy
        return self

    def __exit__(self, *exc):
        self.mod._routed_experts = self.orig


def _logits(model, tokens, noise: float = 0.0):
    """Plain forward (no cache) under a fresh jit (so ``noise`` reaches the trace)."""
    graphdef, state = nnx.split(model)

    def run(state, tokens):
        return forward(nnx.merge(graphdef, state), None, tokens)[0]

    with _Noisy(noise):
        return np.asarray(jax.jit(run)(state, tokens), np.float32)


def _compare(model, tokens, what: str) -> tuple[float, float]:
    _set_backend(model, "ffi")
    y_ffi = _logits(model, tokens)
    _set_backend(model, "reference")
    y_ref = _logits(model, tokens)
    y_noise = _logits(model, tokens, noise=NOISE_REL)
    _set_backend(model, "ffi")
    assert np.isfinite(y_ffi).all() and np.isfinite(y_ref).all()
    assert float(np.std(y_ref)) > 0.1
    rel, ctrl = _rel(y_ffi, y_ref), _rel(y_noise, y_ref)
    bound = max(MARGIN * ctrl, FLOOR)
    agree = float(np.mean(np.argmax(y_ffi, -1) == np.argmax(y_ref, -1)))
    print(
        f"TABLE model|{what}|T={tokens.size}|logits rel_l2 ffi vs reference={rel:.2e}|"
        f"control (1e-2 noise per MoE layer)={ctrl:.2e}|bound={bound:.2e}|argmax agree={agree:.3f}|{_card()}"
    )
    assert rel <= bound, (rel, ctrl)
    return rel, ctrl


# ---------------------------------------------------------------------------------------------
# FFI experts vs reference experts, per layer count
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_ffi_model_matches_reference_model(n_layers):
    """tiny(): H=512, I=256, E=16, K=4 (the kernels' alignments), layers sliding / CSA / HCA / CSA,
    one hash layer; bf16 parameters as the model runs for real; 2 x 24 tokens."""
    cfg = DeepseekV4Config.tiny(num_hidden_layers=n_layers)
    model = DeepseekV4ForCausalLM(
        cfg, backend="ffi", experts="quantized", mode="fp8", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(n_layers)
    )
    tokens = jnp.asarray(np.random.default_rng(n_layers).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    _compare(model, tokens, f"tiny L={n_layers}")


def test_ffi_model_cached_decode_matches_reference():
    """Prefill 8 tokens into a cache (16 rows: the fused kernel on the token bucket 16), then 4
    one-token decode steps (2 rows x 4 experts: the decode kernels, unpadded), ffi vs reference on
    the same tokens."""
    cfg = DeepseekV4Config.tiny(num_hidden_layers=2)
    model = DeepseekV4ForCausalLM(
        cfg, backend="ffi", experts="quantized", mode="fp8", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(7)
    )
    rng = np.random.default_rng(7)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    nxt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 4)), jnp.int32)

    def run(backend, noise=0.0):
        _set_backend(model, backend)
        graphdef, state = nnx.split(model)
        step = jax.jit(lambda s, c, t, p: forward(nnx.merge(graphdef, s), c, t, p))
        cache = model.init_cache(2, 16)
        pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
        with _Noisy(noise):
            logits, cache = step(state, cache, prompt, pos)
            outs = [np.asarray(logits[:, -1])]
            for i in range(4):
                logits, cache = step(state, cache, nxt[:, i : i + 1], jnp.full((2, 1), 8 + i, jnp.int32))
                outs.append(np.asarray(logits[:, -1]))
        return np.stack(outs)

    y_ffi, y_ref, y_noise = run("ffi"), run("reference"), run("reference", NOISE_REL)
    _set_backend(model, "ffi")
    assert np.isfinite(y_ffi).all()
    rel, ctrl = _rel(y_ffi, y_ref), _rel(y_noise, y_ref)
    rels = [_rel(a, b) for a, b in zip(y_ffi, y_ref)]
    bound = max(MARGIN * ctrl, FLOOR)
    print(
        f"TABLE model|tiny L=2 cached|prefill 2x8 + 4 decode steps|logits rel_l2={rel:.2e} (per step "
        + ",".join(f"{r:.2e}" for r in rels)
        + f")|control={ctrl:.2e}|bound={bound:.2e}|{_card()}"
    )
    assert rel <= bound, (rels, ctrl)


# ---------------------------------------------------------------------------------------------
# examples/generate.py on the GPU (a subprocess without preallocation, in what this process's pool leaves)
# ---------------------------------------------------------------------------------------------


def _generate(*args: str) -> str:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION="0.15")
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "generate.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return proc.stdout


@pytest.mark.parametrize(
    "extra",
    [
        ("--tiny",),  # tiny_model, exact experts
        (
            "--tiny",
            "--config",
            "tiny",
            "--experts",
            "quantized",
            "--backend",
            "ffi",
            "--dtype",
            "bfloat16",
        ),  # our kernels
    ],
    ids=["exact", "ffi"],
)
def test_generate_tiny_on_the_gpu(extra):
    out = _generate(*extra, "--new-tokens", "6", "--batch", "2", "--layers", "3")
    gens = re.findall(r"^sequence \d: prompt \[[\d, ]+\] -> generated \[([\d, ]+)\]$", out, re.MULTILINE)
    assert len(gens) == 2, out
    ids = [[int(v) for v in g.split(",")] for g in gens]
    vocab = 256 if "tiny" not in extra[1:] else 1000
    assert all(len(r) == 6 and all(0 <= v < vocab for v in r) for r in ids), (ids, out)
    rate = re.search(r"^decode: \d+ timed steps x 2 sequences: ([\d.]+) tokens/s", out, re.MULTILINE)
    assert rate and float(rate.group(1)) > 0, out
    print(f"TABLE generate.py|{' '.join(extra)}|6 tokens x 2|{rate.group(1)} tokens/s|{_card()}")


@pytest.mark.skipif(os.environ.get("MODEL_GPU_FLASH", "1") == "0", reason="MODEL_GPU_FLASH=0")
def test_ffi_model_matches_reference_v4_flash_two_layers():
    """Two real V4-Flash layers (2: CSA, hash-routed; 3: HCA), the real embedding / head, weights
    built on the device as benchmarks.model_step builds them; 1 x 16 tokens."""
    from benchmarks import model_step as MS

    cfg = MS.model_config(smoke=False, layers=2, first_layer=2)
    model = MS.build_model(cfg, seed=3, on_device=True, log=lambda m: None)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 16)), jnp.int32)
    _compare(model, tokens, "V4-Flash layers 2-3")
