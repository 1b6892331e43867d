"""One DeepSeek V4 routed-expert layer: FFI Mega MoE vs the best pure-XLA MoE, swept over tokens.

The command line of the sweep (run from the repository root; benchmarks/README.md has the details):

    python -m benchmarks.moe_layer                        # full sweep, both models (GPU)
    python -m benchmarks.moe_layer --quick                # < 3 min on an H100
    python -m benchmarks.moe_layer --quick --cpu-smoke    # tiny shapes on CPU, < 60 s (CI)
    python -m benchmarks.moe_layer --from-json benchmarks/results/moe_layer.json   # re-draw the PNG

The paths are :mod:`benchmarks.baselines`, the sweep (checks, timing, floors, JSON) is
:mod:`benchmarks.sweep`, the PNG and the tables are :mod:`benchmarks.report`.
"""

from __future__ import annotations

from benchmarks.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
