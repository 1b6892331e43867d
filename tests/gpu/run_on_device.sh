#!/usr/bin/env bash
# One device call: install the carried wheels, build the FFI library, run the GPU tests and print a
# short table. Usage (from the repo root, on the GPU machine):
#   bash tests/gpu/run_on_device.sh [test files or pytest args...]   (default: all of tests/gpu)
# Carry `.whl` (sgl-deep-gemm wheel, from ../shared/tools/gpu-wheels.sh) and `.jitcache`.
set -uo pipefail
source "$(dirname "$0")/device_env.sh" || exit 1
targets=("$@")
if [ ${#targets[@]} -eq 0 ] || [[ "${targets[0]}" == -* ]]; then targets=(tests/gpu "${targets[@]}"); fi
python3 -m pytest -m gpu -q -rA -p no:cacheprovider "${targets[@]}" 2>&1 | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}
echo "== table =="
grep -h "^TABLE" "$OUT/gpu_tests.log" | sed 's/^TABLE //' | tr '|' '\t' || true
exit $rc
