#!/usr/bin/env bash
# Expert parallelism in ONE device call. Carry .whl (sgl-deep-gemm wheel) and .jitcache.
#
#   bash benchmarks/run_ep_on_device.sh --simulated-receive [benchmarks.ep_recv_sim arguments]
#       ONE GPU: the token-form collective path's expert stage on a simulated
#       receive buffer of T=4096-equivalent pairs vs the single-GPU kernel on the same pairs
#       (benchmarks.ep_recv_sim), plus the 1-GPU hier tests. Files: ep_recv_sim.{json,png,log}.
#   bash benchmarks/run_ep_on_device.sh [benchmarks.ep_step arguments]
#       SEVERAL GPUs (nvidia-h100-x2/x4/x8): the fused and hier EP GPU tests
#       (tests/gpu/test_ep_fused_gpu.py, test_ep_hier_gpu.py), then benchmarks.ep_step over EP 1/2/4/8
#       and every path: fused, ragged_ffi (pair form), grouped_ffi (token form), hier (("host","ep") =
#       (2, n/2): a simulated host axis over XLA collectives x the fused kernel per half). Default
#       ep_step arguments: --ep 1,2,4,8 --tokens 256,1024,4096 --paths fused,ragged_ffi,grouped_ffi,hier
#       Files: gpu_tests.log, ep_step.{json,png,log}, RESULTS.md (ep_step section).
# Everything stops before EP_LIMIT_S (default 570 s); EP_TEST_S bounds the tests (default 240 s).
set -uo pipefail
T0=$(date +%s)
LIMIT_S=${EP_LIMIT_S:-570}
source "$(dirname "$0")/../tests/gpu/device_env.sh" || exit 1
left() { echo $(( T0 + LIMIT_S - $(date +%s) )); }
if [ "${1:-}" = "--simulated-receive" ]; then
  shift
  echo "== hier 1-GPU test ($(left) s left) =="
  timeout -s KILL "${EP_TEST_S:-120}" python3 -m pytest -m gpu -q -rA -p no:cacheprovider \
    tests/gpu/test_ep_hier_gpu.py ${EP_TEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
  trc=$?
  tail -8 "$OUT/gpu_tests.log"
  grep -h "^TABLE" "$OUT/gpu_tests.log" | sed 's/^TABLE //' | tr '|' '\t' || true
  l=$(left)
  echo "== ep_recv_sim ($l s left) =="
  timeout -s KILL $(( l - 10 )) python3 -m benchmarks.ep_recv_sim --out "$OUT" --write-results "$OUT/RESULTS.md" \
    --time-limit $(( l - 70 )) "$@" \
    > "$OUT/ep_recv_sim.log" 2>&1
  src=$?
  echo "ep_recv_sim exit $src (0: every EP size within 1.3x; 3: not)"
  grep -v "^\s*$" "$OUT/ep_recv_sim.log" | grep -v Traceback | tail -30
  echo "== total $(( $(date +%s) - T0 )) s =="
  [ $trc -ne 0 ] && exit $trc
  exit $src
fi
echo "== EP tests ($(left) s left) =="
timeout -s KILL "${EP_TEST_S:-240}" python3 -m pytest -m gpu -q -rA -p no:cacheprovider \
  tests/gpu/test_ep_fused_gpu.py tests/gpu/test_ep_hier_gpu.py ${EP_TEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
trc=$?
tail -25 "$OUT/gpu_tests.log"
echo "== table =="
grep -h "^TABLE" "$OUT/gpu_tests.log" | sed 's/^TABLE //' | tr '|' '\t' || true
l=$(left)
echo "== ep_step ($l s left) =="
if [ $# -eq 0 ]; then set -- --ep 1,2,4,8 --tokens 256,1024,4096 --paths fused,ragged_ffi,grouped_ffi,hier; fi
if [ "$l" -gt 60 ]; then
  timeout -s KILL $(( l - 15 )) python3 -m benchmarks.ep_step --out "$OUT" --write-results "$OUT/RESULTS.md" \
    --time-limit $(( l - 75 )) "$@" \
    > "$OUT/ep_step.log" 2>&1
  echo "ep_step exit $?"
  grep -v "^\s*$" "$OUT/ep_step.log" | grep -v Traceback | tail -40
fi
echo "== total $(( $(date +%s) - T0 )) s =="
exit $trc
