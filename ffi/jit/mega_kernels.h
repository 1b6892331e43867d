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
  void* y;                                 // bf16 [T, H] (XLA result)
  int* cumulative_local_expert_recv_stats; // nullptr
  uint32_t num_tokens;                     // T
  Sm90SymBuffer sym_buffer;
  CUtensorMap l1_acts;                     // e4m3 [D, H] in the buffer, box (128, BLOCK_M), 128B swizzle
  CUtensorMap l1_acts_sf;                  // f32 [H/128][S] in the buffer, box (BLOCK_M, 1)
  CUtensorMap l1_weights;                  // e4m3 [E*2I, H] (operand l1), box (128, 256), 128B swizzle
  const float* l1_weights_sf;              // f32 [E, 2I/128, H/128] (operand l1_sf)
  CUtensorMap l1_output;                   // e4m3 [D, I] in the buffer (TMA store)
  CUtensorMap l2_acts;                     // e4m3 [D, I] in the buffer, box (128, BLOCK_M), 128B swizzle
  CUtensorMap l2_acts_sf;                  // f32 [I/128][S] in the buffer, box (BLOCK_M, 1)
  CUtensorMap l2_weights;                  // e4m3 [E*H, I] (operand l2), box (128, 256), 128B swizzle
  const float* l2_weights_sf;              // f32 [E, H/128, I/128] (operand l2_sf)
  uint64_t* trace;                         // nullptr (kTrace = false)
};
constexpr int kSm90MegaMoeNumParams = 14;

// "0x1.4p+3f" for finite values, "cute::numeric_limits<float>::infinity()" for +inf.
std::string float_template_literal(float v);

// The 36 leading template arguments, comma-separated, in the kernel's order.
std::string mega_moe_sm90_template_args(const layout::Sm90MegaConfig& c);

// kernel.cu for `c` (arch sm_90a). name = "sm90_mega_moe", symbol hint
// "sm90_fp8_mega_moe_impl".
KernelSource mega_moe_sm90_source(const layout::Sm90MegaConfig& c);

}  // namespace jmm::jit
