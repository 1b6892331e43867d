#!/usr/bin/env bash
# Builds benchmarks/probes/decode_kernels_probe.cu against the decode kernels' CUDA source (taken
# from ffi/jit/decode_kernels.cc, once per --depths value, passed as -DJMM_DECODE_DEPTH for a variant
# under test that reads it (the kernels on main do not; the l2-ring v2 variant that did lost on an
# H100, 2026-12-07, and was dropped); with --baseline-source FILE also from that decode_kernels.cc,
# e.g. `git show HEAD:ffi/jit/decode_kernels.cc`), runs every build and, with --ncu, profiles one l1
# and one l2 launch at T=1 and T=2 of each.
# Usage on the GPU machine (repo root): bash benchmarks/probes/run_decode_probe.sh [--depths 4,8]
#   [--baseline-source FILE] [--ncu] [-- probe args]. Output under $OUT/probe (JSON per build, ncu text).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/jmm_out}; P="$OUT/probe"; mkdir -p "$P"
depths=8; baseline=""; ncu=0; args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --depths) depths=$2; shift 2 ;;
    --baseline-source) baseline=$2; shift 2 ;;
    --ncu) ncu=1; shift ;;
    --) shift; args=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done
extract() {  # $1 decode_kernels.cc -> $2/decode_src.cuh (both passes: JMM_DECODE_PASS left undefined)
  mkdir -p "$2"
  python3 - "$1" "$2/decode_src.cuh" <<'PY'
import sys
s = open(sys.argv[1]).read()
src = s[s.index('R"CUDA(') + 7 : s.index(')CUDA"')]
src = src.replace("#if JMM_DECODE_PASS == 1", "#if !defined(JMM_DECODE_PASS) || JMM_DECODE_PASS == 1")
src = src.replace("#if JMM_DECODE_PASS == 2", "#if !defined(JMM_DECODE_PASS) || JMM_DECODE_PASS == 2")
open(sys.argv[2], "w").write(src)
PY
}
builds=()
if [ -n "$baseline" ]; then extract "$baseline" "$P/src_base"; builds+=("base:$P/src_base:0"); fi
extract ffi/jit/decode_kernels.cc "$P/src_new"
for d in ${depths//,/ }; do builds+=("d$d:$P/src_new:$d"); done
for b in "${builds[@]}"; do
  IFS=: read -r name dir depth <<< "$b"
  dflag=(); [ "$depth" != 0 ] && dflag=(-DJMM_DECODE_DEPTH="$depth")
  nvcc -O3 -std=c++17 -arch=sm_90a "${dflag[@]}" -I "$dir" -Xptxas -v \
    benchmarks/probes/decode_kernels_probe.cu -o "$P/probe_$name" > "$P/build_$name.log" 2>&1 \
    || { tail -20 "$P/build_$name.log"; exit 1; }
  echo "$name: $(grep -A2 'properties for jmm_decode' "$P/build_$name.log" | grep -oE 'Used [0-9]+ registers|[0-9]+ bytes spill stores' | tr '\n' ' ')"
done
for b in "${builds[@]}"; do
  IFS=: read -r name dir depth <<< "$b"
  echo "== $name =="
  "$P/probe_$name" --json "$P/probe_$name.json" "${args[@]}" 2>&1 | tee "$P/table_$name.txt"
done
if [ "$ncu" = 1 ] && command -v ncu > /dev/null; then
  for b in "${builds[@]}"; do
    IFS=: read -r name dir depth <<< "$b"
    for T in 1 2; do
      timeout 200 ncu --clock-control none -k regex:jmm_decode --launch-skip 20 --launch-count 2 --section WarpStateStats \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        "$P/probe_$name" --tokens "$T" --layers 12 --sets 2 --reps 2 > "$P/ncu_${name}_T$T.txt" 2>&1
      echo "== ncu $name T=$T =="
      grep -E "jmm_decode|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Waves Per" \
        "$P/ncu_${name}_T$T.txt" | head -24
    done
  done
elif [ "$ncu" = 1 ]; then echo "ncu not found"; fi
echo "== summary (per layer, us) =="
for b in "${builds[@]}"; do
  IFS=: read -r name dir depth <<< "$b"
  echo "-- $name"; cat "$P/table_$name.txt"
done
