#!/usr/bin/env bash
# Probe for prefill beyond T = 4096 (issue: every T to 16384 within 1.2x of the floor). Two
# benchmarks.moe_layer runs on the same card in one call, V4-Flash and V4-Pro:
#   1. cap = T (moe_layer's default: each point's own buffer cap), with the baselines: the kernel at
#      caps no GPU has run yet (8192, 16384) against xla_capacity / tokamax_ragged;
#   2. --ffi-num-max-tokens 4096 (ffi only): what ops.mega_moe does by default above the policy's
#      prefill_token_cap (4096): the fused kernel in chunks of 4096 through one buffer.
# benchmarks.report shows run 2 as a variant ("ffi buffer cap 4096"). Whichever is faster per T
# decides policy.prefill_token_cap's default (jax_megamoe/_src/numerics/policy.py), with the
# measurement next to it. Not yet run on a GPU.
# Usage on the GPU machine (repo root; carry .whl, .whl/bench and .jitcache):
#   bash benchmarks/probes/run_large_t_probe.sh [--tokens 8192,16384] [--models flash,pro] [--limit-s 280]
# Output in $OUT: large_t_cap_t.json, large_t_chunked.json (moe_layer results) and their logs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/jmm_out}; mkdir -p "$OUT"
tokens=8192,16384; models=flash,pro; limit=280
while [ $# -gt 0 ]; do
  case "$1" in
    --tokens) tokens=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --limit-s) limit=$2; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
rc=0
run() {  # name, then moe_layer arguments
  local name=$1; shift
  OUT=/tmp/large_t_$name BENCH_SKIP_OVERHEAD=1 BENCH_LIMIT_S=$limit timeout $(( limit + 15 )) \
    bash benchmarks/run_on_device.sh --models "$models" --tokens "$tokens" "$@" > "$OUT/large_t_$name.txt" 2>&1 || rc=1
  cp "/tmp/large_t_$name/bench/moe_layer.json" "$OUT/large_t_$name.json" 2>/dev/null || rc=1
  cp "/tmp/large_t_$name/bench/moe_layer.log" "$OUT/large_t_$name.log" 2>/dev/null
  echo "== $name: $*"
  grep -E "T=[0-9]+:|  ffi|  xla|  tokamax|CHECK" "/tmp/large_t_$name/bench/moe_layer.log" 2>/dev/null \
    | sed 's/^\[ *[0-9.]*s\] *//'
}
run cap_t --paths ffi,xla_capacity,tokamax_ragged
run chunked --paths ffi --ffi-num-max-tokens 4096
exit $rc
