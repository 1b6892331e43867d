#!/usr/bin/env bash
# Probe for the large-T gap (2026-12-07): at T=4096 the default 64-row sm_90 tile
# reads every expert's weights once per 64-row M-block (1.9x / 2.4x the floor for V4-Flash / V4-Pro
# on an H100). narrow_pair.patch lets the 64-row tile use the 2-CTA cluster with the B (weight)
# multicast that DeepGEMM only enables for its 128-row tile, behind JMM_PROBE_NARROW_PAIR (read by
# the patched C++ only; main reads no environment variable for kernel choices). One build, then:
#   1. benchmarks.moe_layer --paths ffi at --tokens (default 4096) for V4-Flash and V4-Pro, without and with
#      the switch (same card, same call);
#   2. the sm_90 GPU tests whose shapes reach >= 64 expected rows per expert, with the switch.
# The patch is reverted at the end. Compile-checked on CPU (nvcc 13.0, sm_90a): the paired 64-row
# instantiations build for V4-Flash, V4-Pro and the small test shape. Not yet run on a GPU.
# Usage on the GPU machine (repo root; carry .whl and .jitcache):
#   bash benchmarks/probes/run_narrow_pair_probe.sh [--tokens 4096] [--limit-s 130]
# Output in $OUT: narrow_pair_{off,on}.json (moe_layer results), narrow_pair_tests.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/jmm_out}; mkdir -p "$OUT"
tokens=4096; limit=130
while [ $# -gt 0 ]; do
  case "$1" in
    --tokens) tokens=$2; shift 2 ;;
    --limit-s) limit=$2; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
patch_file=benchmarks/probes/narrow_pair.patch
if [ -d .git ]; then apply=(git apply); revert=(git apply -R); else apply=(patch -p1 -s); revert=(patch -p1 -s -R); fi
"${apply[@]}" "$patch_file" || { echo "narrow_pair.patch does not apply to this tree"; exit 1; }
trap '"${revert[@]}" "$patch_file"' EXIT
rc=0
for v in off on; do
  if [ $v = on ]; then export JMM_PROBE_NARROW_PAIR=1; else unset JMM_PROBE_NARROW_PAIR; fi
  OUT=/tmp/narrow_pair_$v BENCH_SKIP_OVERHEAD=1 BENCH_LIMIT_S=$limit timeout $(( limit + 10 )) \
    bash benchmarks/run_on_device.sh --models flash,pro --tokens "$tokens" --paths ffi > "/tmp/narrow_pair_$v.txt" 2>&1 || rc=1
  cp "/tmp/narrow_pair_$v/bench/moe_layer.json" "$OUT/narrow_pair_$v.json" 2>/dev/null || rc=1
  echo "== JMM_PROBE_NARROW_PAIR=$v"
  grep -E "T=[0-9]+:|  ffi|CHECK" "/tmp/narrow_pair_$v/bench/moe_layer.log" 2>/dev/null | sed 's/^\[ *[0-9.]*s\] *//'
done
export JMM_PROBE_NARROW_PAIR=1
OUT=/tmp/narrow_pair_tests timeout 200 bash tests/gpu/run_on_device.sh tests/gpu/test_mega_moe_sm90_gpu.py \
  -k "prefill_tile or 4096" > "$OUT/narrow_pair_tests.log" 2>&1 || rc=1
echo "== GPU tests with the switch"
grep -E "passed|failed|rel_l2=" "$OUT/narrow_pair_tests.log" | tail -12
exit $rc
