#!/usr/bin/env bash
# Expert parallelism in ONE device call on a multi-GPU machine (nvidia-h100-x2/x4): build, the fused
# EP GPU tests (tests/gpu/test_ep_fused_gpu.py) and then benchmarks/ep_step.py until a deadline that
# keeps the call under EP_LIMIT_S (default 570 s). Files land in $OUT: gpu_tests.log, ep_step.{json,png,log}.
#   bash benchmarks/run_ep_on_device.sh [ep_step.py arguments, e.g. --ep 1,2,4 --collective]
# Carry .whl (sgl-deep-gemm wheel) and .jitcache.
set -uo pipefail
T0=$(date +%s)
LIMIT_S=${EP_LIMIT_S:-570}
source "$(dirname "$0")/../tests/gpu/device_env.sh" || exit 1
left() { echo $(( T0 + LIMIT_S - $(date +%s) )); }
echo "== EP tests ($(left) s left) =="
timeout -s KILL "${EP_TEST_S:-300}" python3 -m pytest -m gpu -q -rA -p no:cacheprovider -x \
  tests/gpu/test_ep_fused_gpu.py ${EP_TEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
trc=$?
tail -25 "$OUT/gpu_tests.log"
echo "== table =="
grep -h "^TABLE" "$OUT/gpu_tests.log" | sed 's/^TABLE //' | tr '|' '\t' || true
l=$(left)
echo "== ep_step ($l s left) =="
if [ "$l" -gt 60 ]; then
  timeout -s KILL $(( l - 15 )) python3 benchmarks/ep_step.py --out "$OUT" --write-results "$OUT/RESULTS.md" "$@" \
    > "$OUT/ep_step.log" 2>&1
  echo "ep_step exit $?"
  grep -v "^\s*$" "$OUT/ep_step.log" | grep -v Traceback | tail -30
fi
echo "== total $(( $(date +%s) - T0 )) s =="
exit $trc
