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

struct Driver {
  // The prototypes come from cuda.h; `decltype` does not odr-use them, so no
  // link dependency on libcuda is created.
  decltype(&::cuInit) Init = nullptr;
  decltype(&::cuDriverGetVersion) DriverGetVersion = nullptr;
  decltype(&::cuGetErrorName) GetErrorName = nullptr;
  decltype(&::cuGetErrorString) GetErrorString = nullptr;
  decltype(&::cuDeviceGet) DeviceGet = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) DevicePrimaryCtxRetain = nullptr;
  decltype(&::cuDevicePrimaryCtxRelease) DevicePrimaryCtxRelease = nullptr;
  decltype(&::cuCtxGetCurrent) CtxGetCurrent = nullptr;
  decltype(&::cuCtxPushCurrent) CtxPushCurrent = nullptr;
  decltype(&::cuCtxPopCurrent) CtxPopCurrent = nullptr;
  decltype(&::cuStreamGetCtx) StreamGetCtx = nullptr;
  decltype(&::cuStreamIsCapturing) StreamIsCapturing = nullptr;
  decltype(&::cuLibraryLoadFromFile) LibraryLoadFromFile = nullptr;
  decltype(&::cuLibraryUnload) LibraryUnload = nullptr;
  decltype(&::cuLibraryGetKernel) LibraryGetKernel = nullptr;
  decltype(&::cuLibraryGetKernelCount) LibraryGetKernelCount = nullptr;      // 12.4+, optional
  decltype(&::cuLibraryEnumerateKernels) LibraryEnumerateKernels = nullptr;  // 12.4+, optional
  decltype(&::cuKernelGetFunction) KernelGetFunction = nullptr;
  decltype(&::cuFuncLoad) FuncLoad = nullptr;  // 12.4+, optional (forces lazy loading)
  decltype(&::cuThreadExchangeStreamCaptureMode) ThreadExchangeStreamCaptureMode = nullptr;
  decltype(&::cuLaunchKernel) LaunchKernel = nullptr;
  decltype(&::cuMemsetD8Async) MemsetD8Async = nullptr;

  int driver_version = 0;  // cuDriverGetVersion, e.g. 13000
};

// Returns the driver table (cuInit(0) already called), or nullptr with a
// readable reason in *error. Thread-safe; the first call does the work and its
// outcome (success or failure) is cached for the life of the process.
const Driver* driver(std::string* error);

// "CUDA_ERROR_X (message)" for a CUresult.
std::string error_string(const Driver* d, CUresult r);

}  // namespace jmm::cuda
