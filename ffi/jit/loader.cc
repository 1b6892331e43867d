#include "jit/loader.h"

#include <map>
#include <mutex>
#include <vector>

#include "common/status.h"
#include "cuda/driver.h"

namespace jmm::jit {

std::shared_ptr<const LoadedKernel> load_kernel(const std::string& cubin_path,
                                                const std::string& symbol, std::string* error) {
  static std::mutex mu;
  static auto* cache = new std::map<std::string, std::shared_ptr<const LoadedKernel>>();
  std::lock_guard<std::mutex> lock(mu);
  const std::string key = cubin_path + '\n' + symbol;
  if (auto it = cache->find(key); it != cache->end()) return it->second;

  std::string why;
  const cuda::Driver* d = cuda::driver(&why);
  if (d == nullptr) {
    *error = why;
    return nullptr;
  }
  auto k = std::make_shared<LoadedKernel>();
  k->cubin_path = cubin_path;
  if (CUresult r = d->LibraryLoadFromFile(&k->library, cubin_path.c_str(), nullptr, nullptr, 0,
                                          nullptr, nullptr, 0);
      r != CUDA_SUCCESS) {
    *error = cat("cuLibraryLoadFromFile('", cubin_path, "') failed: ", cuda::error_string(d, r),
                 " (driver ", d->driver_version / 1000, ".", (d->driver_version % 1000) / 10,
                 "; cubins from nvcc 13 need a CUDA 13 driver)");
    return nullptr;
  }
  if (!symbol.empty()) {
    if (CUresult r = d->LibraryGetKernel(&k->kernel, k->library, symbol.c_str());
        r != CUDA_SUCCESS) {
      *error = cat("cuLibraryGetKernel('", symbol, "') in '", cubin_path,
                   "' failed: ", cuda::error_string(d, r));
      d->LibraryUnload(k->library);
      return nullptr;
    }
  } else {
    unsigned int count = 0;
    if (d->LibraryGetKernelCount == nullptr || d->LibraryEnumerateKernels == nullptr ||
        d->LibraryGetKernelCount(&count, k->library) != CUDA_SUCCESS || count != 1 ||
        d->LibraryEnumerateKernels(&k->kernel, 1, k->library) != CUDA_SUCCESS) {
      *error = cat("cannot find the single kernel of '", cubin_path, "' (", count, " kernels)");
      d->LibraryUnload(k->library);
      return nullptr;
    }
  }
  k->symbol = symbol;
  (*cache)[key] = k;
  return k;
}

}  // namespace jmm::jit
