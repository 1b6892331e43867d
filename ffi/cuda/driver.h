// Lazily resolved CUDA driver API.
//
// libjax_megamoe_ffi.so links neither libcuda nor libcudart: `cuda.h` only
// provides types and prototypes, and the entry points are resolved on first
// use with dlopen("libcuda.so.1") + cuGetProcAddress. So the library loads
// with ctypes on machines without a GPU or driver; only the handlers' GPU
// stages need the driver, and they report a readable error when it is absent.
#pragma once

#include <cuda.h>

#include <string>

namespace jmm::cuda {

// The table's entry points, X(member, versioned symbol): member `M` has the type of cuda.h's cuM
// (`decltype` does not odr-use the prototype, so no link dependency on libcuda is created) and is
// resolved by its base name "cuM" with cuGetProcAddress, else by dlsym of the versioned symbol.
// Required: driver() fails naming the missing ones.
#define JMM_CUDA_DRIVER_ENTRIES(X)                                      \
  X(Init, cuInit)                                                       \
  X(DriverGetVersion, cuDriverGetVersion)                               \
  X(GetErrorName, cuGetErrorName)                                       \
  X(GetErrorString, cuGetErrorString)                                   \
  X(DeviceGet, cuDeviceGet)                                             \
  X(DevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain)                   \
  X(DevicePrimaryCtxRelease, cuDevicePrimaryCtxRelease_v2)              \
  X(CtxGetCurrent, cuCtxGetCurrent)                                     \
  X(CtxPushCurrent, cuCtxPushCurrent_v2)                                \
  X(CtxPopCurrent, cuCtxPopCurrent_v2)                                  \
  X(StreamGetCtx, cuStreamGetCtx)                                       \
  X(StreamIsCapturing, cuStreamIsCapturing)                             \
  X(LibraryLoadFromFile, cuLibraryLoadFromFile)                         \
  X(LibraryUnload, cuLibraryUnload)                                     \
  X(LibraryGetKernel, cuLibraryGetKernel)                               \
  X(KernelGetFunction, cuKernelGetFunction)                             \
  X(ThreadExchangeStreamCaptureMode, cuThreadExchangeStreamCaptureMode) \
  X(LaunchKernel, cuLaunchKernel)                                       \
  X(MemsetD8Async, cuMemsetD8Async)

// Optional (12.4+; used only as fallbacks): left null when the driver lacks them.
#define JMM_CUDA_DRIVER_OPTIONAL_ENTRIES(X)             \
  X(LibraryGetKernelCount, cuLibraryGetKernelCount)     \
  X(LibraryEnumerateKernels, cuLibraryEnumerateKernels) \
  X(FuncLoad, cuFuncLoad)

// X-macro helper: the member of one entry point.
#define JMM_CUDA_ENTRY_MEMBER(member, versioned) decltype(&::cu##member) member = nullptr;

struct Driver {
  JMM_CUDA_DRIVER_ENTRIES(JMM_CUDA_ENTRY_MEMBER)
  JMM_CUDA_DRIVER_OPTIONAL_ENTRIES(JMM_CUDA_ENTRY_MEMBER)

  int driver_version = 0;  // cuDriverGetVersion, e.g. 13000
};

// Returns the driver table (cuInit(0) already called), or nullptr with a
// readable reason in *error. Thread-safe; the first call does the work and its
// outcome (success or failure) is cached for the life of the process.
const Driver* driver(std::string* error);

// One more entry point, resolved as the table's are (cuGetProcAddress of `base_name` with the
// table's ABI, else dlsym of `versioned_name`); nullptr when absent or when driver() failed.
void* entry_point(const char* base_name, const char* versioned_name);

// Appends `name` to the ", "-separated *missing unless `found`: how both tables name what the
// driver lacks.
void note_missing(bool found, const char* name, std::string* missing);

// Whether *missing names any entry point; if so, *error says so and how to fix it (`remedy`):
// the one message both tables give.
bool lacks_entries(const std::string& missing, const char* remedy, std::string* error);

// "CUDA_ERROR_X (message)" for a CUresult.
std::string error_string(const Driver* d, CUresult r);

}  // namespace jmm::cuda
