// Loads cubins with the context-independent cuLibrary API.
#pragma once

#include <cuda.h>

#include <memory>
#include <string>

namespace jmm::jit {

struct LoadedKernel {
  CUlibrary library = nullptr;
  CUkernel kernel = nullptr;  // usable in any context (cuKernelGetFunction / cuLaunchKernel)
  std::string symbol;
  std::string cubin_path;
};

// Loads (once per process, then cached; never unloaded) the cubin and looks up
// `symbol` in it. If `symbol` is empty, the library must hold exactly one kernel.
// Needs the CUDA driver, not a current context.
std::shared_ptr<const LoadedKernel> load_kernel(const std::string& cubin_path,
                                                const std::string& symbol, std::string* error);

}  // namespace jmm::jit
