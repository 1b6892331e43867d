#include "cuda/driver.h"

#include <dlfcn.h>

#include <mutex>

#include "common/status.h"

namespace jmm::cuda {
namespace {

// Driver ABI requested from cuGetProcAddress. 12.4 is the first version with
// every entry point used here (cuLibraryEnumerateKernels, cuFuncLoad), and for
// each of them the newest ABI <= 12.4 is the one cuda.h 13 declares under the
// base name, so the returned pointer matches the `decltype` of the declaration.
// Do NOT raise this to >= 12.5 without checking cudaTypedefs.h: "cuStreamGetCtx"
// then resolves to the 3-argument cuStreamGetCtx_v2 ABI (PFN_cuStreamGetCtx_v12050).
constexpr int kRequestedDriverAbi = 12040;

using GetProcAddressV2 = CUresult (*)(const char*, void**, int, cuuint64_t,
                                      CUdriverProcAddressQueryResult*);
using GetProcAddressV1 = CUresult (*)(const char*, void**, int, cuuint64_t);

struct Loader {
  Driver table;
  std::string error;  // empty on success
  bool ok = false;
};

template <typename Fn>
bool resolve(void* lib, GetProcAddressV2 gpa2, GetProcAddressV1 gpa1,
             const char* base_name, const char* versioned_name, Fn* out) {
  void* p = nullptr;
  if (gpa2 != nullptr) {
    CUdriverProcAddressQueryResult status = CU_GET_PROC_ADDRESS_SUCCESS;
    if (gpa2(base_name, &p, kRequestedDriverAbi, CU_GET_PROC_ADDRESS_DEFAULT, &status) !=
            CUDA_SUCCESS ||
        status != CU_GET_PROC_ADDRESS_SUCCESS) {
      p = nullptr;
    }
  } else if (gpa1 != nullptr) {
    if (gpa1(base_name, &p, kRequestedDriverAbi, CU_GET_PROC_ADDRESS_DEFAULT) != CUDA_SUCCESS) {
      p = nullptr;
    }
  }
  if (p == nullptr) p = dlsym(lib, versioned_name);
  *out = reinterpret_cast<Fn>(p);
  return p != nullptr;
}

Loader* load() {
  auto* L = new Loader();  // intentionally leaked: lives for the process
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    L->error = cat("the CUDA driver (libcuda.so.1) could not be loaded",
                   why ? cat(": ", why) : std::string(),
                   "; the jax_megamoe FFI kernels need an NVIDIA GPU with a CUDA 13 driver");
    return L;
  }
  auto gpa2 = reinterpret_cast<GetProcAddressV2>(dlsym(lib, "cuGetProcAddress_v2"));
  auto gpa1 = gpa2 ? nullptr : reinterpret_cast<GetProcAddressV1>(dlsym(lib, "cuGetProcAddress"));
  Driver& d = L->table;
  std::string missing;
#define JMM_RESOLVE(field, base, versioned)                                 \
  if (!resolve(lib, gpa2, gpa1, base, versioned, &d.field)) {              \
    missing += missing.empty() ? base : cat(", ", base);                   \
  }
  JMM_RESOLVE(Init, "cuInit", "cuInit")
  JMM_RESOLVE(DriverGetVersion, "cuDriverGetVersion", "cuDriverGetVersion")
  JMM_RESOLVE(GetErrorName, "cuGetErrorName", "cuGetErrorName")
  JMM_RESOLVE(GetErrorString, "cuGetErrorString", "cuGetErrorString")
  JMM_RESOLVE(DeviceGet, "cuDeviceGet", "cuDeviceGet")
  JMM_RESOLVE(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain")
  JMM_RESOLVE(DevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease", "cuDevicePrimaryCtxRelease_v2")
  JMM_RESOLVE(CtxGetCurrent, "cuCtxGetCurrent", "cuCtxGetCurrent")
  JMM_RESOLVE(CtxPushCurrent, "cuCtxPushCurrent", "cuCtxPushCurrent_v2")
  JMM_RESOLVE(CtxPopCurrent, "cuCtxPopCurrent", "cuCtxPopCurrent_v2")
  JMM_RESOLVE(StreamGetCtx, "cuStreamGetCtx", "cuStreamGetCtx")
  JMM_RESOLVE(StreamIsCapturing, "cuStreamIsCapturing", "cuStreamIsCapturing")
  JMM_RESOLVE(LibraryLoadFromFile, "cuLibraryLoadFromFile", "cuLibraryLoadFromFile")
  JMM_RESOLVE(LibraryUnload, "cuLibraryUnload", "cuLibraryUnload")
  JMM_RESOLVE(LibraryGetKernel, "cuLibraryGetKernel", "cuLibraryGetKernel")
  JMM_RESOLVE(KernelGetFunction, "cuKernelGetFunction", "cuKernelGetFunction")
  JMM_RESOLVE(ThreadExchangeStreamCaptureMode, "cuThreadExchangeStreamCaptureMode",
              "cuThreadExchangeStreamCaptureMode")
  JMM_RESOLVE(LaunchKernel, "cuLaunchKernel", "cuLaunchKernel")
  JMM_RESOLVE(MemsetD8Async, "cuMemsetD8Async", "cuMemsetD8Async")
#undef JMM_RESOLVE
  // Optional (only used as a fallback when the symbol name is unknown).
  resolve(lib, gpa2, gpa1, "cuLibraryGetKernelCount", "cuLibraryGetKernelCount",
          &d.LibraryGetKernelCount);
  resolve(lib, gpa2, gpa1, "cuLibraryEnumerateKernels", "cuLibraryEnumerateKernels",
          &d.LibraryEnumerateKernels);
  resolve(lib, gpa2, gpa1, "cuFuncLoad", "cuFuncLoad", &d.FuncLoad);
  if (!missing.empty()) {
    L->error = cat("the CUDA driver (libcuda.so.1) lacks ", missing,
                   "; update the NVIDIA driver (CUDA 12.4 or newer, CUDA 13 recommended)");
    return L;
  }
  if (CUresult r = d.Init(0); r != CUDA_SUCCESS) {
    L->error = cat("cuInit(0) failed: ", error_string(&d, r));
    return L;
  }
  d.DriverGetVersion(&d.driver_version);
  L->ok = true;
  return L;
}

}  // namespace

const Driver* driver(std::string* error) {
  static Loader* loader = load();  // thread-safe static initialisation
  if (!loader->ok) {
    if (error != nullptr) *error = loader->error;
    return nullptr;
  }
  return &loader->table;
}

std::string error_string(const Driver* d, CUresult r) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (d != nullptr && d->GetErrorName != nullptr) d->GetErrorName(r, &name);
  if (d != nullptr && d->GetErrorString != nullptr) d->GetErrorString(r, &text);
  return cat(name ? name : "CUresult", "(", static_cast<int>(r), ")",
             text ? cat(": ", text) : std::string());
}

}  // namespace jmm::cuda
