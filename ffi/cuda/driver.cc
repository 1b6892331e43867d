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
  void* lib = nullptr;  // for entry_point()
  GetProcAddressV2 gpa2 = nullptr;
  GetProcAddressV1 gpa1 = nullptr;
};

template <typename Fn>
bool resolve(void* lib, GetProcAddressV2 gpa2, GetProcAddressV1 gpa1, const char* base_name,
             const char* versioned_name, Fn* out) {
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
  L->lib = lib, L->gpa2 = gpa2, L->gpa1 = gpa1;
  Driver& d = L->table;
  std::string missing;
#define JMM_RESOLVE(member, versioned)                                                      \
  note_missing(resolve(lib, gpa2, gpa1, "cu" #member, #versioned, &d.member), "cu" #member, \
               &missing);
  JMM_CUDA_DRIVER_ENTRIES(JMM_RESOLVE)
#undef JMM_RESOLVE
#define JMM_RESOLVE_OPTIONAL(member, versioned) \
  resolve(lib, gpa2, gpa1, "cu" #member, #versioned, &d.member);
  JMM_CUDA_DRIVER_OPTIONAL_ENTRIES(JMM_RESOLVE_OPTIONAL)
#undef JMM_RESOLVE_OPTIONAL
  if (lacks_entries(missing, "update the NVIDIA driver (CUDA 12.4 or newer, CUDA 13 recommended)",
                    &L->error)) {
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

Loader* loader() {
  static Loader* l = load();  // thread-safe static initialisation
  return l;
}

}  // namespace

const Driver* driver(std::string* error) {
  Loader* L = loader();
  if (!L->ok) {
    if (error != nullptr) *error = L->error;
    return nullptr;
  }
  return &L->table;
}

void* entry_point(const char* base_name, const char* versioned_name) {
  Loader* L = loader();
  void* p = nullptr;
  if (L->ok) resolve(L->lib, L->gpa2, L->gpa1, base_name, versioned_name, &p);
  return p;
}

void note_missing(bool found, const char* name, std::string* missing) {
  if (!found) *missing += missing->empty() ? std::string(name) : cat(", ", name);
}

bool lacks_entries(const std::string& missing, const char* remedy, std::string* error) {
  if (missing.empty()) return false;
  *error = cat("the CUDA driver (libcuda.so.1) lacks ", missing, "; ", remedy);
  return true;
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
