#!/usr/bin/env bash
# The whole DeepSeek V4 model on one GPU (H100/H200) in ONE device call, under MODEL_LIMIT_S (default
# 360 s): the shared device setup (tests/gpu/device_env.sh: carried .whl/*.whl, DG_JIT_CACHE_DIR=.jitcache,
# editable build of the FFI library), then tests/gpu/test_model_gpu.py (FFI-expert model == reference-
# expert model per layer count, generate.py on the GPU; at most MODEL_TEST_S, default 190 s), then
# benchmarks.model_step with a deadline 25 s before the limit (it starts no new program after it).
# Files (7, one folder level): $OUT/build.log and, in $OUT/model, model_gpu_tests.log, model_step.json,
# model_step.png, model_step.log, RESULTS.md (the model_step section) and jitcache.tgz (the kernel JIT
# cache, to carry next time as .jitcache, when under 48 MB).
#
# Usage, from the repo root on the GPU machine (extra arguments go to benchmarks.model_step; none given:
# --layers 2, i.e. real layers 4 and 5, B = 1,4,16,64 and a 512-token prefill):
#   bash tests/gpu/run_model_on_device.sh [--layers 4] [--batch 1,4,16,64] [--prefill-len 512] ...
# MODEL_GPU_FLASH=0 skips the two-layer V4-Flash test point (saves its build and compiles, ~1 min).
# Carry .whl (sgl-deep-gemm wheel; .whl/bench/*.whl for the tokamax experts) and, if you have one, .jitcache.
set -uo pipefail
T0=$(date +%s)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LIMIT_S=${MODEL_LIMIT_S:-360}
TEST_S=${MODEL_TEST_S:-190}
# shellcheck source=device_env.sh
source "$ROOT/tests/gpu/device_env.sh" \
  || echo "warning: device setup failed (see above / build.log): the ffi experts will be skipped"
cd "$ROOT"
M="${OUT:-/tmp/jmm_out}/model"
mkdir -p "$M"
shopt -s nullglob
bench_whls=(.whl/bench/*.whl)   # tokamax and its missing dependencies (benchmarks/README.md)
if [ ${#bench_whls[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/jmm_site "${bench_whls[@]}" \
    || echo "warning: installing .whl/bench failed (the tokamax experts will be skipped)"
fi
python3 -c "import tokamax; print('tokamax', tokamax.__version__)" 2>&1 | tail -1
echo "setup: $(( $(date +%s) - T0 )) s"

left() { echo $(( T0 + LIMIT_S - $(date +%s) )); }

t=$(( $(left) - 120 )); [ "$t" -gt "$TEST_S" ] && t=$TEST_S; [ "$t" -lt 30 ] && t=30
echo "== tests/gpu/test_model_gpu.py (at most $t s; $(left) s left) =="
timeout -s KILL "$t" python3 -m pytest -m gpu -q -s -rA -p no:cacheprovider tests/gpu/test_model_gpu.py \
  > "$M/model_gpu_tests.log" 2>&1
trc=$?
echo "tests exit $trc"
tail -15 "$M/model_gpu_tests.log"
echo "== table =="
grep -ho "TABLE .*" "$M/model_gpu_tests.log" | sed 's/^TABLE //' | tr '|' '\t' || true   # -s: lines survive a kill

deadline=$(( T0 + LIMIT_S - 25 ))
# Default: 2 real layers (4: CSA, 5: HCA), so the compiles (4 programs per point) leave time for every point.
if [ $# -eq 0 ]; then set -- --layers 2; fi
echo "== benchmarks.model_step ($(left) s left) =="
XLA_PYTHON_CLIENT_MEM_FRACTION=${MODEL_MEM_FRACTION:-0.85} timeout -s KILL $(( $(left) - 8 )) \
  python3 -m benchmarks.model_step --deadline "$deadline" --out "$M" --write-results "$M/RESULTS.md" "$@" \
  > "$M/model_step.log" 2>&1
brc=$?
echo "model_step exit $brc"
if [ $brc -ne 0 ] && [ $brc -ne 2 ] && [ -f "$M/model_step.json" ]; then   # killed: render what the JSON has
  timeout 30 python3 -m benchmarks.model_step --from-json "$M/model_step.json" --write-results "$M/RESULTS.md" \
    >> "$M/model_step.log" 2>&1
fi
if [ -d "$DG_JIT_CACHE_DIR" ] && [ "$(du -sm "$DG_JIT_CACHE_DIR" | cut -f1)" -lt 48 ]; then
  tar czf "$M/jitcache.tgz" -C "$DG_JIT_CACHE_DIR" . 2>/dev/null || true
fi
echo "== total $(( $(date +%s) - T0 )) s; files in $M =="
ls -la "$M"
echo "== model_step log (tail) =="
tail -40 "$M/model_step.log"
[ $trc -ne 0 ] && exit $trc
exit $brc
