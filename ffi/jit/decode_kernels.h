// The low-latency decode kernels (ours, not DeepGEMM's): two memory-bound FP8 GEMV passes for
// sm_90 that stream only the selected experts' weights. DeepGEMM's persistent mega kernel pays a
// fixed cost (pre-dispatch, grid barriers, per-expert scheduling over every expert, the
// GEMM1 -> GEMM2 drain) that dominates when a step has a handful of tokens; these kernels have
// none of it, so they reach the HBM floor for T*K small (ops.py chooses them from a measured
// table).
//
// Numerics are those of reference.mega_moe for mode "fp8" (the same activation quantisation and
// the same per-128 requantisation of the SwiGLU output, f32 accumulation):
//   l1:  per token t: x[t] -> e4m3 per 128 (scale amax/448) in shared memory; for every valid slot
//   k
//        (expert e = topk_idx[t, k] in [0, E)) and every intermediate column j:
//        g, u = W1[e] rows (gate j, up j) . xq  (f32; 128x128 block scales)
//        a[t*K+k, j] = ((silu(clamp(g)) * clamp(u)) * (topk_weights[t, k] * rsf))     (f32 out)
//   l2:  per token t: every valid a[t*K+k] -> e4m3 per 128 (sf = max(amax,1e-10) * (1/448));
//        y[t, n] = bf16(sum_k f32(bf16(W2[e_k] row n . aq_k)))  in ascending k (0 if no valid slot)
// Each cubin holds exactly one entry function (the JIT's symbol contract, see kernels.h).
#pragma once

#include <cstdint>
#include <string>

#include "jit/kernels.h"

namespace jmm::jit {

enum class DecodePass : int { kL1 = 1, kL2 = 2 };

// Threads per block of both passes (8 warps; one warp per output row pair).
constexpr int kDecodeThreads = 256;
// l1: one block covers 8 intermediate columns (one 16-row interleave group of W1) of one token.
constexpr int kDecodeL1ColsPerBlock = 8;
// l2: one block covers 16 hidden rows of W2 of one token.
constexpr int kDecodeL2RowsPerBlock = 16;

KernelSource decode_source(DecodePass pass);

// Dynamic shared memory of a pass, in bytes.
int64_t decode_smem_bytes(DecodePass pass, int64_t hidden, int64_t intermediate, int64_t top_k);

// Launch signatures, in kernel parameter order (must match the rendered source).
struct DecodeL1Args {
  const void* x;             // const __nv_bfloat16* [T, H]
  const void* topk_idx;      // const int32_t*       [T, K]
  const void* topk_weights;  // const float*         [T, K]
  const void* l1;            // const uint8_t*       [E, 2I, H] e4m3, gate/up interleaved by 8 rows
  const void* l1_sf;         // const float*         [E, 2I/128, H/128] ([gate | up] block order)
  void* act;                 // float*               [T*K, I]
  uint32_t num_tokens;       // T
  uint32_t hidden;           // H
  uint32_t intermediate;     // I
  uint32_t num_experts;      // E
  uint32_t top_k;            // K
  float routed_scaling_factor;
  float activation_clamp;  // +inf: no clamp
};

struct DecodeL2Args {
  const void* act;       // const float*         [T*K, I]
  const void* topk_idx;  // const int32_t*       [T, K]
  const void* l2;        // const uint8_t*       [E, H, I] e4m3
  const void* l2_sf;     // const float*         [E, H/128, I/128]
  void* y;               // __nv_bfloat16*       [T, H]
  uint32_t num_tokens;
  uint32_t hidden;
  uint32_t intermediate;
  uint32_t num_experts;
  uint32_t top_k;
};

}  // namespace jmm::jit
