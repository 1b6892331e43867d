"""Issue 15 probe (GPU, not collected by pytest): does the kernel's error against the reference
depend on the tile the JIT picks? The sm_90 config takes BLOCK_M 128 (2-CTA cluster, accumulator
reused as the final sum) once T*K/E >= 64, else BLOCK_M 64. With few experts the switch happens at
small T, so both tiles are compared at the same hidden size and token counts without V4's 256
experts. Prints one TABLE line per point: shape, T, T*K/E, tile, rel. L2 vs reference, max abs.
``--flash``: V4-Flash (E=256) at T = 1024, 2048, 4096 (cap = T): time per call inside one program
and rel. L2 on 64 rows against the reference (run on the GPU at HIGHEST precision). Run it once
with and once without ``JAX_MEGAMOE_SM90_WIDE_TILE=1`` to compare the tiles (read once, into the
process policy; the probe passes ``policy.sm90_wide_tile`` as the target's ``sm90_wide_tile``).

    python tests/gpu/probe_block_m.py [--flash]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax.numpy as jnp  # noqa: E402

from tests.gpu import test_mega_moe_sm90_gpu as g  # noqa: E402


def _wide() -> bool:
    from jax_megamoe._src.numerics import policy

    return policy.current().sm90_wide_tile


def flash() -> int:
    from jax_megamoe import reference

    wide = _wide()
    h, i, e, k = 4096, 2048, 256, 6
    weights = g._weights(11, H=h, I=i, E=e)
    experts = np.arange(e)
    for t in (1024, 2048, 4096):
        idx, w = g._routing(300 + t, t, k, experts)
        x = g._x(400 + t, t, h)
        y = np.asarray(g.mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), weights, cap=t, wide_tile=wide))
        y = y.astype(np.float64)
        rows = np.unique(np.linspace(0, t - 1, 64).round().astype(np.int64))
        r = np.asarray(reference.mega_moe(x[rows], jnp.asarray(idx[rows]), jnp.asarray(w[rows]), weights, mode="fp8"))
        r = r.astype(np.float64)
        rel = float(np.linalg.norm(y[rows] - r) / np.linalg.norm(r))
        dt = g._time_device(x, jnp.asarray(idx), jnp.asarray(w), weights, cap=t, wide_tile=wide)
        tile = 128 if wide and t * k / e >= 64 else 64
        print(
            f"TABLE flash|WIDE_TILE={int(wide)}|T={t}|TK/E={t * k / e:.0f}|BLOCK_M {tile}|rel_l2={rel:.2e}|"
            f"{dt * 1e6:.1f} us/call in-program|{g._card()}",
            flush=True,
        )
    return 0


def main() -> int:
    if "--flash" in sys.argv:
        return flash()
    rows = []
    wide = _wide()
    for h, i in ((512, 256), (2048, 1024), (4096, 2048)):
        e, k = 16, 6
        weights = g._weights(7, H=h, I=i, E=e)
        experts = np.arange(e)
        cpu_w = g._cpu_weights(weights, experts)
        for t in (96, 160, 256, 512):  # T*K/E = 36, 60 (BLOCK_M 64) | 96, 192 (BLOCK_M 128)
            idx, w = g._routing(100 + t, t, k, experts)
            x = g._x(200 + t, t, h)
            cap = max(128, 1 << (t - 1).bit_length())
            y = np.asarray(g.mega_moe_ffi(x, jnp.asarray(idx), jnp.asarray(w), weights, cap=cap, wide_tile=wide))
            y = y.astype(np.float64)
            r = g._reference(x, idx, w, cpu_w, experts, clamp=float("inf"), rsf=1.0).astype(np.float64)
            rel = float(np.linalg.norm(y - r) / np.linalg.norm(r))
            per_row = np.linalg.norm(y - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-30)
            tile = 128 if wide and t * k / e >= 64 else 64
            rows.append((h, i, t, t * k / e, tile, rel, float(np.median(per_row)), float(per_row.max())))
            print(
                f"TABLE probe|H={h} I={i} E={e} K={k}|T={t}|TK/E={t * k / e:.0f}|BLOCK_M {tile}|rel_l2={rel:.2e}|"
                f"row median {np.median(per_row):.2e} max {per_row.max():.2e}",
                flush=True,
            )
        del weights, cpu_w
    return 0


if __name__ == "__main__":
    sys.exit(main())
