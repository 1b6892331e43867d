"""benchmarks/ep_recv_sim.py on CPU (reference math, tiny shape): the simulated receive buffer is the
collective path's layout, its real rows give the same bits as the compact call, JSON + table written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ep_recv_sim_cpu_smoke(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ep_recv_sim.py"), "--smoke", "--backend", "reference", "--ep", "2,4",
         "--pairs-tokens", "64", "--no-ep1", "--budget", "0.05", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode in (0, 3), proc.stdout[-2000:] + proc.stderr[-3000:]  # 3: a CPU ratio above 1.3x
    res = json.loads((tmp_path / "ep_recv_sim.json").read_text())
    pts = {p["what"]: p for p in res["points"] if p["ep"] == 2}
    assert set(pts) == {"recv_exact", "recv_declared", "kernel_same", "pairs_top1"}, pts
    assert all("median_s" in p for p in pts.values()), pts
    # 2 sources x 64 tokens, experts [0, 8) of 16: about half the tokens reach rank 0.
    same = pts["kernel_same"]
    assert pts["recv_exact"]["rows"] == 128 and 0 < same["real_rows"] < 128 and same["pairs"] > same["real_rows"]
    assert same["bitwise_recv_vs_same"] is True and same["rel_l2_recv_vs_same"] == 0.0
    assert pts["pairs_top1"]["rows"] == same["pairs"]
    assert pts["recv_declared"]["capacity"] <= 64
    assert "EP4: skipped" in proc.stdout + proc.stderr  # 16 experts over 4: fewer than K=6 per device
    assert "| 2 | 8 |" in proc.stdout and "accept" in proc.stdout
