# Sourced by the device-call scripts (tests/gpu/run_on_device.sh, benchmarks/run_ep_on_device.sh):
# install the carried wheels (.whl/*.whl: sgl-deep-gemm for the kernel headers), point the JIT cache
# at the carried .jitcache, build the FFI library (editable install) and print what was found.
# Leaves OUT (default /tmp/jmm_out), PYTHONPATH, DG_JIT_CACHE_DIR and XLA_PYTHON_CLIENT_MEM_FRACTION set.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jmm_out}; mkdir -p "$OUT"
site=/tmp/jmm_site; mkdir -p "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl || return 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export DG_JIT_CACHE_DIR="${DG_JIT_CACHE_DIR:-$PWD/.jitcache}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"
export NCCL_NVLS_ENABLE=0  # never NVLink multicast (SHARP) in XLA's collectives
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -8
_t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
echo "build: $(( $(date +%s) - _t0 )) s"
python3 -c "import jax_megamoe as m; print(m.describe())"
