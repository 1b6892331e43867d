// Kernel catalogue entry for DeepGEMM's sm_90 fused Mega MoE kernel,
// deep_gemm::sm90_fp8_mega_moe_impl<...> (sgl-deep-gemm 0.2.5,
// deep_gemm/impls/sm90_fp8_mega_moe.cuh), and the host-side argument block the FFI
// handler marshals for it.
//
// The rendered translation unit (see mega_moe_sm90_source) includes the impl header,
// static_asserts that the kernel's function type equals the parameter list below and that
// SymBuffer<1> / cute::TmaDescriptor have the sizes of the host structs, and holds exactly one
// explicit instantiation with all 36 leading template arguments spelled out (the trailing
// derived ones keep their defaults). Float template arguments (kActivationClamp) need C++20.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <string>

#include "jit/kernels.h"
#include "layout/sm100_mega_moe.h"
#include "layout/sm90_mega_moe.h"

namespace jmm::jit {

// Host mirror of deep_gemm::layout::SymBuffer<kNumRanks> (layout/sym_buffer.cuh): passed to the
// kernel BY VALUE. base = this rank's buffer address, offsets[r] = ptr[r] - base, rank_idx.
struct Sm90SymBuffer {
  int64_t base;
  int64_t offsets[72];  // layout::kNumMaxRanks
  uint32_t rank_idx;
};
static_assert(sizeof(Sm90SymBuffer) == layout::kSm90SymBufferBytes, "SymBuffer<N> is 592 bytes");
static_assert(alignof(Sm90SymBuffer) == 8, "SymBuffer<N> is 8-byte aligned");
static_assert(sizeof(CUtensorMap) == 128, "cute::TmaDescriptor is a 128-byte CUtensorMap");

// Kernel parameters, in order (sm90_fp8_mega_moe_impl's signature; top-level const dropped):
//   void* y, int* cumulative_local_expert_recv_stats, uint32_t num_tokens,
//   SymBuffer<kNumRanks> sym_buffer (__grid_constant__),
//   TmaDescriptor l1_acts, l1_acts_sf, l1_weights, const float* l1_weights_sf,
//   TmaDescriptor l1_output, l2_acts, l2_acts_sf, l2_weights, const float* l2_weights_sf,
//   uint64_t* trace
struct Sm90MegaMoeArgs {
  void* y;                                  // bf16 [T, H] (XLA result)
  int* cumulative_local_expert_recv_stats;  // nullptr
  uint32_t num_tokens;                      // T
  Sm90SymBuffer sym_buffer;
  CUtensorMap l1_acts;         // e4m3 [D, H] in the buffer, box (128, BLOCK_M), 128B swizzle
  CUtensorMap l1_acts_sf;      // f32 [H/128][S] in the buffer, box (BLOCK_M, 1)
  CUtensorMap l1_weights;      // e4m3 [E*2I, H] (operand l1), box (128, 256), 128B swizzle
  const float* l1_weights_sf;  // f32 [E, 2I/128, H/128] (operand l1_sf)
  CUtensorMap l1_output;       // e4m3 [D, I] in the buffer (TMA store)
  CUtensorMap l2_acts;         // e4m3 [D, I] in the buffer, box (128, BLOCK_M), 128B swizzle
  CUtensorMap l2_acts_sf;      // f32 [I/128][S] in the buffer, box (BLOCK_M, 1)
  CUtensorMap l2_weights;      // e4m3 [E*H, I] (operand l2), box (128, 256), 128B swizzle
  const float* l2_weights_sf;  // f32 [E, H/128, I/128] (operand l2_sf)
  uint64_t* trace;             // nullptr (kTrace = false)
};
constexpr int kSm90MegaMoeNumParams = 14;

// "0x1.4p+3f" for finite values, "cute::numeric_limits<float>::infinity()" for +inf.
std::string float_template_literal(float v);

// The 36 leading template arguments, comma-separated, in the kernel's order.
std::string mega_moe_sm90_template_args(const layout::Sm90MegaConfig& c);

// kernel.cu for `c` (arch sm_90a). name = "sm90_mega_moe", symbol hint
// "sm90_fp8_mega_moe_impl".
KernelSource mega_moe_sm90_source(const layout::Sm90MegaConfig& c);

// ---------------------------------------------------------------------------------------------
// sm_100 (B200): deep_gemm::sm100_fp8_fp4_mega_moe_impl<...> (sgl-deep-gemm 0.2.5,
// deep_gemm/impls/sm100_fp8_fp4_mega_moe.cuh). Compile-checked for sm_100f only: no B200 has run
// it in this project. The rendered translation unit holds one explicit instantiation with all
// 40 template arguments spelled out (as DeepGEMM 0.2.5's host renders them; the trailing derived
// ones keep their defaults) and static_asserts the function type against the list below.
// ---------------------------------------------------------------------------------------------

// Same by-value struct as on sm_90 (SymBuffer<N> is 592 bytes for every N).
using Sm100SymBuffer = Sm90SymBuffer;
static_assert(sizeof(Sm100SymBuffer) == layout::kSm100SymBufferBytes, "SymBuffer<N> is 592 bytes");

// The 18 tensor maps, in kernel parameter order (the shared-expert slots are unused by
// jax_megamoe; like DeepGEMM 0.2.5 it passes copies of the routed descriptors there, which the
// kernel only prefetches).
enum Sm100TensorMap : int {
  kSm100L1Acts = 0,
  kSm100L1ActsSf,
  kSm100L1Weights,
  kSm100L1WeightsSf,
  kSm100L1Output,
  kSm100L2Acts,
  kSm100L2ActsSf,
  kSm100L2Weights,
  kSm100L2WeightsSf,
  kSm100SharedL1Acts,
  kSm100SharedL1ActsSf,
  kSm100SharedL1Weights,
  kSm100SharedL1WeightsSf,
  kSm100SharedL1Output,
  kSm100SharedL2Acts,
  kSm100SharedL2ActsSf,
  kSm100SharedL2Weights,
  kSm100SharedL2WeightsSf,
  kSm100NumTensorMaps
};
static_assert(kSm100NumTensorMaps == 18, "sm100_fp8_fp4_mega_moe_impl takes 18 tensor maps");

// Kernel parameters, in order (sm100_fp8_fp4_mega_moe_impl's signature; top-level const and
// __restrict__ dropped):
//   void* y, int* cumulative_local_expert_recv_stats, const float* l1_alphas, l2_alphas,
//   l2_act_scales, post_expert_norm_weight, uint32_t num_tokens,
//   SymBuffer<kNumRanks> sym_buffer (__grid_constant__), 18 x TmaDescriptor (__grid_constant__),
//   const uint8_t* sm_locality_domains
struct Sm100MegaMoeArgs {
  void* y;                                  // bf16 [T, H] (XLA result)
  int* cumulative_local_expert_recv_stats;  // nullptr
  const float* l1_alphas;                   // nullptr (NVFP4 only)
  const float* l2_alphas;                   // nullptr (NVFP4 only)
  const float* l2_act_scales;               // nullptr (NVFP4 only)
  const float* post_expert_norm_weight;     // nullptr (no post-expert norm)
  uint32_t num_tokens;                      // T
  Sm100SymBuffer sym_buffer;
  CUtensorMap maps[kSm100NumTensorMaps];  // see Sm100TensorMap
  const uint8_t* sm_locality_domains;     // device u8 [>= physical SM count]
};
constexpr int kSm100MegaMoeNumParams = 7 + 1 + kSm100NumTensorMaps + 1;  // 26

// The 40 template arguments, comma-separated, in the kernel's order.
std::string mega_moe_sm100_template_args(const layout::Sm100MegaConfig& c);

// kernel.cu for `c` (arch sm_100f). name = "sm100_mega_moe", symbol hint
// "sm100_fp8_fp4_mega_moe_impl".
KernelSource mega_moe_sm100_source(const layout::Sm100MegaConfig& c);

}  // namespace jmm::jit
