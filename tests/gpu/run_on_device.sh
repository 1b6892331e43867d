#!/usr/bin/env bash
# One device call: install the carried wheels, build the FFI library, warm the JIT, run the GPU
# tests and print a short table. Usage (from the repo root, on the GPU machine):
#   bash tests/gpu/run_on_device.sh [pytest args...]
# Carry `.whl` (sgl-deep-gemm wheel, from ../shared/tools/gpu-wheels.sh) and `.jitcache`.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jmm_out}; mkdir -p "$OUT"
site=/tmp/jmm_site; mkdir -p "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export DG_JIT_CACHE_DIR="${DG_JIT_CACHE_DIR:-$PWD/.jitcache}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import jax_megamoe as m; print(m.describe())"
python3 -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}
echo "== table =="
grep -h "^TABLE" "$OUT/gpu_tests.log" | sed 's/^TABLE //' | tr '|' '\t' || true
exit $rc
