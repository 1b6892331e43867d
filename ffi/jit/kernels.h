// Kernel catalogue: which DeepGEMM template instantiations the JIT renders,
// and the exact launch signature the FFI handlers marshal for each.
//
// How the compiled kernel is found again (the "stable symbol" problem):
// the rendered translation unit contains exactly ONE explicit instantiation
//   template __global__ void deep_gemm::<kernel><...>(<signature>);
// guarded by a static_assert that the kernel's function type equals the
// signature the handler marshals (so a DeepGEMM signature change is a compile
// error, not a silent misaligned launch). After nvcc, the cubin's ELF symbol
// table is scanned for CUDA entry functions (STT_FUNC, STB_GLOBAL, st_other
// bit STO_CUDA_ENTRY=0x10); exactly one must exist and its mangled name must
// contain the kernel's base name. That mangled name is recorded in meta.json
// and looked up at load time with cuLibraryGetKernel().
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "common/mma_kind.h"

namespace jmm::jit {

struct KernelSource {
  std::string name;         // cache tag, e.g. "sm90_pre_dispatch"
  std::string source;       // contents of kernel.cu
  std::string gpu_arch;     // nvcc --gpu-architecture value, e.g. "sm_90a"
  std::string impl_header;  // DeepGEMM header it includes (relative to the include dir)
  std::string symbol_hint;  // substring the mangled entry symbol must contain
};

// A kernel's identity: everything but its source, which the caller renders into `source`.
inline KernelSource kernel_named(std::string name, std::string gpu_arch, std::string impl_header,
                                 std::string symbol_hint) {
  KernelSource k;
  k.name = std::move(name);
  k.gpu_arch = std::move(gpu_arch);
  k.impl_header = std::move(impl_header);
  k.symbol_hint = std::move(symbol_hint);
  return k;
}

// Pre-dispatch kernels. arch: 90 (sm_90a) or 100 (sm_100f); mma_kind: kNone for
// arch 90, kMXFP8FP4 (FP8 acts) or kMXFP4 (packed FP4 acts) for arch 100 (mma_kind_valid).
KernelSource pre_dispatch_source(int arch, MmaKind mma_kind);

// Host-side argument blocks, in kernel parameter order. They MUST match the
// signatures rendered by pre_dispatch_source() (see kSm90PreDispatchSignature
// and kSm100PreDispatchSignature in kernels.cc).
struct Sm90PreDispatchArgs {
  const void* x;                            // const __nv_bfloat16*  [T, H]
  const void* topk_idx;                     // const int32_t*        [T, K]
  const void* topk_weights;                 // const float*          [T, K]
  void* buf_x;                              // __nv_fp8_e4m3*        [P, H]
  void* buf_x_sf;                           // float*                [P, H/128]
  void* buf_topk_idx;                       // int64_t*              [P, K]
  void* buf_topk_weights;                   // float*                [P, K]
  uint32_t num_tokens, padded_max, hidden;  // T, P, H
  uint32_t num_groups, top_k;               // H / 128, K
  float routed_scaling_factor;
};

struct Sm100PreDispatchArgs {
  const void* x;              // const __nv_bfloat16*  [T, H]
  const void* topk_idx;       // const int32_t*        [T, K]
  const void* topk_weights;   // const float*          [T, K]
  const void* expert_scales;  // const float*          (nullptr: unused)
  void* buf_x;                // void*                 [P, H/2] bytes (MXFP4) or e4m3 [P, H]
  void* buf_x_sf;             // int32_t*              [P, H/128] (4 UE8M0 bytes each)
  void* buf_x_scales;         // float*                (nullptr: NVFP4 only)
  void* buf_topk_idx;         // int64_t*              [P, K]
  void* buf_topk_weights;     // float*                [P, K]
  uint32_t num_tokens, padded_max, hidden;  // T, P, H
  uint32_t num_groups, top_k;               // H / 32, K
};

}  // namespace jmm::jit
