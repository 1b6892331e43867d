// Host-side CUDA glue the FFI handlers share (pre_dispatch.cc, decode_moe_sm90.cc,
// mega_moe_sm90.cc, mega_moe_sm100.cc): the driver entry points beyond cuda/driver.h's table, the
// process-wide primary contexts, the "make the stream's context current" scope, compiling and
// loading a library kernel, and making its CUfunction in the current context (once, or cached per
// context). Everything reports errors
// as ffi::Error prefixed with the target name.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda/driver.h"
#include "jit/kernels.h"
#include "jit/loader.h"
#include "xla/ffi/api/ffi.h"

namespace jmm::host {

// Driver entry points the handlers need beyond cuda/driver.h's table, X(member, versioned symbol)
// as there, resolved the same way (cuda::entry_point, after cuda::driver() ran cuInit); all
// required.
#define JMM_CUDA_DRIVER_EXT_ENTRIES(X)                        \
  X(CtxGetDevice, cuCtxGetDevice)                             \
  X(CtxEnablePeerAccess, cuCtxEnablePeerAccess)               \
  X(DeviceCanAccessPeer, cuDeviceCanAccessPeer)               \
  X(DeviceGetAttribute, cuDeviceGetAttribute)                 \
  X(MemAlloc, cuMemAlloc_v2)                                  \
  X(MemFree, cuMemFree_v2)                                    \
  X(MemcpyHtoDAsync, cuMemcpyHtoDAsync_v2)                    \
  X(MemsetD32Async, cuMemsetD32Async)                         \
  X(StreamCreate, cuStreamCreate)                             \
  X(StreamDestroy, cuStreamDestroy_v2)                        \
  X(StreamSynchronize, cuStreamSynchronize)                   \
  X(FuncSetAttribute, cuFuncSetAttribute)                     \
  X(LaunchKernelEx, cuLaunchKernelEx)                         \
  X(TensorMapEncodeTiled, cuTensorMapEncodeTiled)             \
  X(OccupancyMaxActiveClusters, cuOccupancyMaxActiveClusters) \
  X(OccupancyMaxActiveBlocksPerMultiprocessor, cuOccupancyMaxActiveBlocksPerMultiprocessor)

struct DriverExt {
  JMM_CUDA_DRIVER_EXT_ENTRIES(JMM_CUDA_ENTRY_MEMBER)
};

// The table (loaded once per process), or nullptr with *error saying what is missing.
const DriverExt* driver_ext(std::string* error);

// The primary context of CUDA device `ordinal`, retained once for the process. XLA's GPU client
// runs every device in its primary context, so this is the context of XLA's streams.
xla::ffi::Error PrimaryContext(const cuda::Driver* d, int32_t ordinal, CUcontext* out,
                               const char* target);

// Makes the stream's context current for the scope (pushing only when needed; popped on exit).
// While the stream is being captured into a CUDA graph cuStreamGetCtx is unreliable (jaxlib's
// Triton handler works around the same CUDA bug): the current context is XLA's then. With no
// context anywhere, the device's primary context.
class ContextScope {
 public:
  ContextScope() = default;
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;
  ~ContextScope();
  xla::ffi::Error Enter(const cuda::Driver* d, CUstream stream, int32_t device, CUcontext* ctx_out,
                        const char* target);

 private:
  const cuda::Driver* d_ = nullptr;
  bool pushed_ = false;
};

// What every stage needs before it touches the device: the driver tables and the stream's context
// made current for `scope`'s lifetime.
xla::ffi::Error Begin(CUstream stream, int32_t device, const char* target, ContextScope* scope,
                      const cuda::Driver** d, const DriverExt** x, CUcontext* ctx);

// An error when `stream` is being captured into a CUDA graph (the initialize stage allocates and
// synchronises, which capture forbids).
xla::ffi::Error RefuseCapture(const cuda::Driver* d, CUstream stream, const char* target);

// Counts the execute stages of the mega-kernel targets by whether XLA's stream was being captured
// into a CUDA graph (a replayed graph runs no handler at all). Cheap (one query, one atomic add);
// read through jmm_execute_stats, so tests can tell that a target was really recorded.
void CountExecute(const cuda::Driver* d, CUstream stream);

// JIT-compiles `src` (disk + memory cache; nvcc runs as a subprocess, nothing is enqueued; no GPU
// needed) and loads the cubin (cuLibrary: context independent, cached for the process) into *out.
xla::ffi::Error CompileAndLoad(const jit::KernelSource& src, const char* target,
                               std::shared_ptr<const jit::LoadedKernel>* out);

// What an instantiate stage returns: `state` with its `kernel` member compiled and loaded from
// `src` (CompileAndLoad), or the error.
template <class State>
xla::ffi::ErrorOr<std::unique_ptr<State>> WithKernel(std::unique_ptr<State> state,
                                                     const jit::KernelSource& src,
                                                     const char* target) {
  if (xla::ffi::Error e = CompileAndLoad(src, target, &state->kernel); !e.success()) {
    return xla::ffi::Unexpected<xla::ffi::Error>(std::move(e));
  }
  return state;
}

// The CUfunction of library kernel `k` in the current context, with its module loaded now
// (cuFuncLoad) so that no lazy load happens later on a launch path.
xla::ffi::Error FunctionOf(const cuda::Driver* d, const jit::LoadedKernel& k, CUfunction* fn,
                           const char* target);

// The CUfunctions of one library kernel, one per context, made on first use (thread-safe). A
// handler's state keeps one; its initialize stage normally fills it, outside any capture. If
// execute gets there first while XLA is capturing a CUDA graph, the one-off module load runs with
// this thread's capture mode switched to relaxed (the TE trick), so the load's implicit work is
// legal; nothing is enqueued on a stream.
class FunctionCache {
 public:
  // Runs once on a newly made CUfunction, before it is cached (e.g. to raise its shared-memory
  // limit); an error leaves nothing cached.
  using Setup = std::function<xla::ffi::Error(CUfunction)>;

  // The CUfunction of `k` in context `ctx` (the current one): the cached one, or FunctionOf then
  // `setup` (both under the relaxed capture mode).
  xla::ffi::Error Get(const cuda::Driver* d, const jit::LoadedKernel& k, CUcontext ctx,
                      const char* target, CUfunction* fn, const Setup& setup = nullptr);

 private:
  std::mutex mu_;
  std::vector<std::pair<CUcontext, CUfunction>> functions_;  // guarded by mu_
};

}  // namespace jmm::host
