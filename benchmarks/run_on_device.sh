#!/usr/bin/env bash
# The benchmarks in ONE device call (H100/H200): install the carried wheels, build the FFI library,
# run benchmarks.ffi_overhead, then benchmarks.moe_layer until a deadline that keeps the whole call under
# BENCH_LIMIT_S (default 570 s; the device machine stops a command at 600 s). Everything lands in
# $OUT/bench: moe_layer.{json,png,log}, ffi_overhead.{json,log}, RESULTS.md (a fresh template with
# both sections filled), build.log, describe.txt, nvidia-smi.txt, and jitcache.tgz (the kernel JIT
# cache, to carry next time as .jitcache so nvcc is skipped).
#
# Usage, from the repo root on the GPU machine:
#   bash benchmarks/run_on_device.sh [--quick] [more benchmarks.moe_layer arguments, e.g. --models flash]
# BENCH_SKIP_OVERHEAD=1 skips benchmarks.ffi_overhead (a moe_layer-only call, e.g. the large-T points).
# Carry: .whl (sgl-deep-gemm wheel at .whl/*.whl; tokamax and its missing dependencies at
# .whl/bench/*.whl) and, if you have it, .jitcache.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
LIMIT_S=${BENCH_LIMIT_S:-570}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jmm_out}
B="$OUT/bench"
mkdir -p "$B"
QUICK=()
if [ "${1:-}" = "--quick" ]; then QUICK=(--quick); shift; fi

site=/tmp/jmm_site
mkdir -p "$site"
shopt -s nullglob
whls=(.whl/*.whl .whl/bench/*.whl)
if [ ${#whls[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${whls[@]}" \
    || echo "warning: installing the carried wheels failed"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export DG_JIT_CACHE_DIR="${DG_JIT_CACHE_DIR:-$PWD/.jitcache}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"
mkdir -p "$DG_JIT_CACHE_DIR"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv | tee "$B/nvidia-smi.txt"
t=$(date +%s)
if python3 -m pip install -q --no-build-isolation --no-deps -e . > "$B/build.log" 2>&1; then
  echo "build: $(( $(date +%s) - t )) s"
else
  echo "build FAILED after $(( $(date +%s) - t )) s (the FFI paths will be skipped); tail of build.log:"
  tail -20 "$B/build.log"
fi
python3 -c "import jax_megamoe as m; print(m.describe())" 2>&1 | tee "$B/describe.txt"
python3 -c "import tokamax; print('tokamax', tokamax.__version__)" 2>&1 | tail -1

rm -f "$B/RESULTS.md"   # a fresh file: the scripts fill their sections into the template

remaining() { echo $(( T0 + LIMIT_S - $(date +%s) )); }

if [ "${BENCH_SKIP_OVERHEAD:-0}" = 1 ]; then
  echo "== ffi_overhead skipped (BENCH_SKIP_OVERHEAD=1) =="
else
  echo "== ffi_overhead ($(remaining) s left) =="
  timeout 150 python3 -m benchmarks.ffi_overhead ${QUICK[@]+"${QUICK[@]}"} --out "$B" --write-results "$B/RESULTS.md" \
    > "$B/ffi_overhead.log" 2>&1
  echo "ffi_overhead exit $?"; tail -12 "$B/ffi_overhead.log"
fi

left=$(remaining)
echo "== moe_layer (${left} s left) =="
deadline=$(( $(date +%s) + left - 40 ))   # stop starting new work 40 s before the limit
timeout $(( left - 10 )) python3 -m benchmarks.moe_layer ${QUICK[@]+"${QUICK[@]}"} --deadline "$deadline" --out "$B" \
  --write-results "$B/RESULTS.md" "$@" > "$B/moe_layer.log" 2>&1
rc=$?
echo "moe_layer exit $rc"
if [ $rc -ne 0 ] && [ -f "$B/moe_layer.json" ]; then   # killed or failed: render what the JSON has
  timeout 60 python3 -m benchmarks.moe_layer --from-json "$B/moe_layer.json" --write-results "$B/RESULTS.md" \
    >> "$B/moe_layer.log" 2>&1
fi

if [ -d "$DG_JIT_CACHE_DIR" ] && [ "$(du -sm "$DG_JIT_CACHE_DIR" | cut -f1)" -lt 48 ]; then
  tar czf "$B/jitcache.tgz" -C "$DG_JIT_CACHE_DIR" . 2>/dev/null || true
fi
echo "== total $(( $(date +%s) - T0 )) s; files in $B =="
ls -la "$B"
echo "== moe_layer log (tail) =="
tail -40 "$B/moe_layer.log"
exit $rc
