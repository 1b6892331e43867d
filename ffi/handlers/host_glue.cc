#include "handlers/host_glue.h"

#include <atomic>
#include <map>
#include <mutex>
#include <type_traits>

#include "common/c_api.h"
#include "common/export.h"
#include "common/status.h"
#include "jit/compiler.h"

namespace ffi = xla::ffi;

namespace jmm::host {
namespace {

struct ExtLoader {
  DriverExt table;
  std::string error;
  bool ok = false;
};

ExtLoader* load_ext() {
  auto* L = new ExtLoader();  // intentionally leaked: lives for the process
  std::string why;
  if (cuda::driver(&why) == nullptr) {
    L->error = why;
    return L;
  }
  std::string missing;
  DriverExt& d = L->table;
#define JMM_RESOLVE_EXT(member, versioned)                                                      \
  d.member = reinterpret_cast<decltype(d.member)>(cuda::entry_point("cu" #member, #versioned)); \
  cuda::note_missing(d.member != nullptr, "cu" #member, &missing);
  JMM_CUDA_DRIVER_EXT_ENTRIES(JMM_RESOLVE_EXT)
#undef JMM_RESOLVE_EXT
  if (cuda::lacks_entries(missing,
                          "the jax_megamoe kernels need a CUDA 12.8+ driver (CUDA 13 recommended)",
                          &L->error)) {
    return L;
  }
  L->ok = true;
  return L;
}

std::atomic<uint64_t> g_executes_eager{0};
std::atomic<uint64_t> g_executes_captured{0};

std::mutex g_primary_mu;
std::map<int32_t, CUcontext> g_primary;  // device ordinal -> retained primary context

}  // namespace

const DriverExt* driver_ext(std::string* error) {
  static ExtLoader* loader = load_ext();
  if (!loader->ok) {
    if (error) *error = loader->error;
    return nullptr;
  }
  return &loader->table;
}

ffi::Error PrimaryContext(const cuda::Driver* d, int32_t ordinal, CUcontext* out,
                          const char* target) {
  std::lock_guard<std::mutex> lock(g_primary_mu);
  auto it = g_primary.find(ordinal);
  if (it == g_primary.end()) {
    CUdevice dev = 0;
    if (CUresult r = d->DeviceGet(&dev, ordinal); r != CUDA_SUCCESS) {
      return ffi::Error::Internal(
          cat(target, ": cuDeviceGet(", ordinal, ") failed: ", cuda::error_string(d, r)));
    }
    CUcontext primary = nullptr;
    if (CUresult r = d->DevicePrimaryCtxRetain(&primary, dev); r != CUDA_SUCCESS) {
      return ffi::Error::Internal(cat(target, ": cuDevicePrimaryCtxRetain(", ordinal,
                                      ") failed: ", cuda::error_string(d, r)));
    }
    it = g_primary.emplace(ordinal, primary).first;  // kept for the process
  }
  *out = it->second;
  return ffi::Error::Success();
}

ContextScope::~ContextScope() {
  if (pushed_) {
    CUcontext popped = nullptr;
    d_->CtxPopCurrent(&popped);
  }
}

ffi::Error ContextScope::Enter(const cuda::Driver* d, CUstream stream, int32_t device,
                               CUcontext* ctx_out, const char* target) {
  d_ = d;
  CUcontext current = nullptr;
  if (CUresult r = d->CtxGetCurrent(&current); r != CUDA_SUCCESS) {
    return ffi::Error::Internal(
        cat(target, ": cuCtxGetCurrent failed: ", cuda::error_string(d, r)));
  }
  CUcontext ctx = nullptr;
  if (stream != nullptr) {
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
    if (d->StreamIsCapturing(stream, &capture) == CUDA_SUCCESS &&
        capture == CU_STREAM_CAPTURE_STATUS_NONE && d->StreamGetCtx(stream, &ctx) != CUDA_SUCCESS) {
      ctx = nullptr;
    }
  }
  if (ctx == nullptr) ctx = current;
  if (ctx == nullptr) {
    if (ffi::Error e = PrimaryContext(d, device, &ctx, target); !e.success()) return e;
  }
  if (ctx != current) {
    if (CUresult r = d->CtxPushCurrent(ctx); r != CUDA_SUCCESS) {
      return ffi::Error::Internal(
          cat(target, ": cuCtxPushCurrent failed: ", cuda::error_string(d, r)));
    }
    pushed_ = true;
  }
  *ctx_out = ctx;
  return ffi::Error::Success();
}

ffi::Error Begin(CUstream stream, int32_t device, const char* target, ContextScope* scope,
                 const cuda::Driver** d, const DriverExt** x, CUcontext* ctx) {
  std::string why;
  if ((*d = cuda::driver(&why)) == nullptr) return ffi::Error::Internal(cat(target, ": ", why));
  if ((*x = driver_ext(&why)) == nullptr) return ffi::Error::Internal(cat(target, ": ", why));
  return scope->Enter(*d, stream, device, ctx, target);
}

ffi::Error RefuseCapture(const cuda::Driver* d, CUstream stream, const char* target) {
  CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
  if (stream != nullptr && d->StreamIsCapturing(stream, &capture) == CUDA_SUCCESS &&
      capture != CU_STREAM_CAPTURE_STATUS_NONE) {
    return ffi::Error::Internal(cat(target,
                                    ": the initialize stage ran during CUDA-graph capture; "
                                    "the library's device memory cannot be allocated there"));
  }
  return ffi::Error::Success();
}

void CountExecute(const cuda::Driver* d, CUstream stream) {
  CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
  if (stream != nullptr && d->StreamIsCapturing(stream, &capture) == CUDA_SUCCESS &&
      capture == CU_STREAM_CAPTURE_STATUS_ACTIVE) {
    g_executes_captured.fetch_add(1, std::memory_order_relaxed);
  } else {
    g_executes_eager.fetch_add(1, std::memory_order_relaxed);
  }
}

ffi::Error CompileAndLoad(const jit::KernelSource& src, const char* target,
                          std::shared_ptr<const jit::LoadedKernel>* out) {
  jit::CompiledKernel compiled;
  std::string why;
  if (!jit::jit_compile(src, &compiled, &why)) return ffi::Error::Internal(cat(target, ": ", why));
  *out = jit::load_kernel(compiled.cubin_path, compiled.symbol, &why);
  if (!*out) return ffi::Error::Internal(cat(target, ": ", why));
  return ffi::Error::Success();
}

ffi::Error FunctionOf(const cuda::Driver* d, const jit::LoadedKernel& k, CUfunction* fn,
                      const char* target) {
  CUresult r = d->KernelGetFunction(fn, k.kernel);
  if (r == CUDA_SUCCESS && d->FuncLoad != nullptr) r = d->FuncLoad(*fn);
  if (r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(target, ": loading kernel ", k.symbol,
                                    " into the context failed: ", cuda::error_string(d, r)));
  }
  return ffi::Error::Success();
}

ffi::Error FunctionCache::Get(const cuda::Driver* d, const jit::LoadedKernel& k, CUcontext ctx,
                              const char* target, CUfunction* fn, const Setup& setup) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [c, f] : functions_) {
    if (c == ctx) {
      *fn = f;
      return ffi::Error::Success();
    }
  }
  CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
  d->ThreadExchangeStreamCaptureMode(&mode);
  ffi::Error err = FunctionOf(d, k, fn, target);
  if (err.success() && setup) err = setup(*fn);
  d->ThreadExchangeStreamCaptureMode(&mode);  // restore
  if (!err.success()) return err;
  functions_.emplace_back(ctx, *fn);
  return ffi::Error::Success();
}

}  // namespace jmm::host

// [eager executes, executes recorded into a CUDA graph] of the mega-kernel targets since load.
JMM_EXPORT int jmm_execute_stats(uint64_t* out, int n) {
  const uint64_t v[2] = {jmm::host::g_executes_eager.load(), jmm::host::g_executes_captured.load()};
  int i = 0;
  for (; out != nullptr && i < n && i < 2; ++i) out[i] = v[i];
  return i;
}
