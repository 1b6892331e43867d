#!/usr/bin/env bash
# benchmarks.decode_step in ONE device call (H100/H200): the shared device setup
# (tests/gpu/device_env.sh: carried .whl/*.whl into a target dir on PYTHONPATH, DG_JIT_CACHE_DIR=.jitcache,
# editable build of the FFI library), the bench wheels (.whl/bench/*.whl: tokamax and its missing
# dependencies), then benchmarks.decode_step with a deadline 40 s before BENCH_LIMIT_S (default 570 s; the
# device machine stops a command at 600 s). Everything lands in $OUT/bench: decode_step.{json,png,log}
# (decode_step_pro.{json,png} with --model pro),
# RESULTS.md (a fresh one with the decode_step section), nvidia-smi.txt, and jitcache.tgz (the
# kernel JIT cache, to carry next time as .jitcache, when under 48 MB); the build log is $OUT/build.log.
#
# Usage, from the repo root on the GPU machine (extra arguments go to benchmarks.decode_step):
#   bash benchmarks/run_decode_on_device.sh [--tokens 1,8,64] [--layers-distinct 4] [--loop unroll] ...
# XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.92 here (8 V4-Flash FP8 weight sets are 48 GiB).
set -uo pipefail
T0=$(date +%s)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LIMIT_S=${BENCH_LIMIT_S:-570}
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# shellcheck source=../tests/gpu/device_env.sh
source "$ROOT/tests/gpu/device_env.sh" \
  || echo "warning: device setup failed (see above / build.log): the ffi path will be skipped"
cd "$ROOT"
site=/tmp/jmm_site
case ":${PYTHONPATH:-}:" in *":$site:"*) ;; *) export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
export DG_JIT_CACHE_DIR="${DG_JIT_CACHE_DIR:-$PWD/.jitcache}"
mkdir -p "$site" "$DG_JIT_CACHE_DIR"
B="${OUT:-/tmp/jmm_out}/bench"
mkdir -p "$B"

shopt -s nullglob
bench_whls=(.whl/bench/*.whl)
if [ ${#bench_whls[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${bench_whls[@]}" \
    || echo "warning: installing .whl/bench failed (tokamax_ragged will be skipped)"
fi
python3 -c "import tokamax; print('tokamax', tokamax.__version__)" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv > "$B/nvidia-smi.txt" 2>&1 || true
rm -f "$B/RESULTS.md"   # a fresh file: the scripts fill their sections into the template

left=$(( T0 + LIMIT_S - $(date +%s) ))
deadline=$(( T0 + LIMIT_S - 40 ))   # benchmarks.decode_step starts no new work after this
echo "== decode_step (${left} s left) =="
timeout -s KILL $(( left - 10 )) python3 -m benchmarks.decode_step --deadline "$deadline" --out "$B" \
  --write-results "$B/RESULTS.md" "$@" > "$B/decode_step.log" 2>&1
rc=$?
echo "decode_step exit $rc"
json=$(ls -t "$B"/decode_step*.json 2>/dev/null | head -1)   # decode_step.json, or decode_step_pro.json for --model pro
if [ $rc -ne 0 ] && [ $rc -ne 2 ] && [ -n "$json" ]; then   # killed or failed: render what the JSON has
  timeout 60 python3 -m benchmarks.decode_step --from-json "$json" --write-results "$B/RESULTS.md" \
    >> "$B/decode_step.log" 2>&1
fi

if [ -d "$DG_JIT_CACHE_DIR" ] && [ "$(du -sm "$DG_JIT_CACHE_DIR" | cut -f1)" -lt 48 ]; then
  tar czf "$B/jitcache.tgz" -C "$DG_JIT_CACHE_DIR" . 2>/dev/null || true
fi
echo "== total $(( $(date +%s) - T0 )) s; files in $B =="
ls -la "$B"
echo "== decode_step log (tail) =="
tail -45 "$B/decode_step.log"
exit $rc
