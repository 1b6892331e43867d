// sm_90 (H100/H200) Mega MoE: symmetric-buffer layout and launch heuristics.
//
// Host-side port of the arithmetic in sgl-deep-gemm 0.2.5:
//   deep_gemm/layout/sm90_mega_moe.cuh   get_num_max_pool_tokens_sm90,
//   SM90Workspace::get_num_bytes,
//                                        get_sm90_tile_table_entries_compact
//   deep_gemm/layout/mega_moe.cuh        get_num_sf_ring_tokens, Data / Buffer (region sizes)
//   deep_gemm/impls/sm90_fp8_mega_moe.cuh  the slicing of the buffer after the workspace, the
//                                        shared-memory layout, the L1-output TMA store box
// and of the host heuristics DeepGEMM 0.2.5 runs before every fp8_mega_moe launch
// (get_mega_moe_config_sm90 and the flags of its launcher; the public sources of
// sgl-project/DeepGEMM are an older revision, the 0.2.5 rules were checked against the
// wheel's compiled host code). No CUDA, no GPU: plain integer arithmetic, unit-tested
// from Python (tests/test_mega_layout_sm90.py) through the jmm_sm90_mega_* C API.
//
// The symmetric buffer, from its base (every region follows the previous one directly;
// P = token capacity (kNumMaxTokensPerRank), D = data-pool tokens, S = padded SF-pool tokens):
//   workspace        SM90Workspace (barrier signals, launch-parity banked counters, arrival
//                    and ring semaphores, source-token table, TokenSrcMetadata, flags), 1 KiB
//                    aligned
//   x                e4m3 [P, H]                       <- pre-dispatch
//   x_sf             f32  [P, H/128]                   <- pre-dispatch
//   topk_idx         i64  [P, K]                       <- pre-dispatch
//   topk_weights     f32  [P, K]                       <- pre-dispatch
//   l1_acts          e4m3 [D, H]                       (TMA: A operand of L1)
//   l1_acts_sf       f32  [H/128][S]  (MN-major)       (TMA: SFA of L1)
//   l1_topk_weights  f32  [D]
//   l2_acts          e4m3 [D, I]                       (TMA: L1 output store, A operand of L2)
//   l2_acts_sf       f32  [I/128][S]  (MN-major)       (TMA: SFA of L2)
//   combine          bf16 [K, P, H]
// Only one ring mode is implemented: the full pool (D = pool tokens, kNumRingTokens = pool),
// which is what DeepGEMM 0.2.5 allocates for capacities below 1024 tokens. For capacities of
// 1024 and more DeepGEMM sizes a smaller "L2-lag" ring; jax_megamoe keeps the full pool there
// too (more memory, the wave schedule, kL2LagUnits = 0): the renderer spells both constants
// (jit/mega_kernels.cc), no field carries them.
#pragma once

#include <cstdint>
#include <string>

#include "layout/mega_moe.h"

namespace jmm::layout {

// Static problem description of one symmetric buffer (capacity: a multiple of 128).
using Sm90MegaShape = MegaShape;

// Checks the limits the 0.2.5 host code and the kernel assert (H % 512, I % 256, I <= 4096,
// H <= 8192 for the pre-dispatch kernel, K <= 32 and K <= H/8, capacity % 128, ranks <= 32,
// E % ranks). false + *error (a sentence) when violated.
bool sm90_mega_shape_valid(const Sm90MegaShape& s, std::string* error);

// Byte offsets (from the buffer base) and sizes of every region.
struct Sm90MegaLayout {
  int64_t num_experts_per_rank = 0;
  int64_t num_max_pool_tokens = 0;   // get_num_max_pool_tokens_sm90
  int64_t num_data_pool_tokens = 0;  // D = the pool (the ring is the full pool)
  int64_t num_padded_sf_pool_tokens =
      0;                         // S = max over BLOCK_M in {64,128} of (D/bm)*align(bm,128)
  uint64_t workspace_bytes = 0;  // SM90Workspace::get_num_bytes()
  uint64_t x = 0, x_sf = 0, topk_idx = 0, topk_weights = 0;
  uint64_t l1_acts = 0, l1_acts_sf = 0, l1_topk_weights = 0;
  uint64_t l2_acts = 0, l2_acts_sf = 0;
  uint64_t combine = 0;
  uint64_t num_bytes = 0;  // total size (end of the combine region)
};

// Requires sm90_mega_shape_valid(s).
Sm90MegaLayout sm90_mega_layout(const Sm90MegaShape& s);

// Every template constant of deep_gemm::sm90_fp8_mega_moe_impl, in template order, plus the
// launch geometry. Filled by sm90_mega_config().
struct Sm90MegaConfig {
  // template arguments 1-18
  int64_t num_max_tokens_per_rank = 0, hidden = 0, intermediate = 0, num_experts = 0, top_k = 0;
  int64_t num_experts_per_wave = 0;
  int64_t block_m = 0, block_n = 0, block_k = 0;
  int64_t num_max_pool_tokens = 0, num_padded_sf_pool_tokens = 0;  // kNumRingTokens = the pool
  int64_t num_stages = 0;
  int64_t num_dispatch_threads = 0, num_non_epilogue_threads = 0, num_epilogue_threads = 0;
  int64_t num_sms = 0, num_ranks = 0;
  // 19-36
  float activation_clamp = 0.0f;  // +inf: no clamp
  bool fast_math = true;
  int64_t epilogue_register_budget =
      0;  // 0: the kernel's default (168, or 200 on the 128x256 tile)
  bool reuse_accum_as_final = false;
  bool l2_arrival_counter = false;
  bool l2_epilogue_requires_full_sync = false;
  bool half_l2_cd = false;
  int64_t cluster_size = 1;
  bool multicast_on_b = false;
  // kL2LagUnits: always 0 (the wave schedule), spelled by the renderer
  int64_t l2_cd_passes = 0;
  bool trace = false, trace_epi = false;
  int64_t l2_stage_mode = 0;
  bool pdl = false;  // DeepGEMM forces PDL for <= 256 tokens; jax_megamoe never uses PDL
  int64_t early_combine = 0;
  int64_t pull_publish_batch = 1;
  bool pull_eager_publish = false;
  // launch
  int64_t num_threads = 0;        // dispatch + non-epilogue + epilogue
  int64_t smem_size = 0;          // dynamic shared memory bytes (cuFuncSetAttribute + launch)
  int64_t host_smem_size = 0;     // the host heuristic's figure (smem_size may exceed it, see .cc)
  int64_t kernel_smem_bytes = 0;  // the kernel's own shared-memory layout end
  int64_t tile_table_entries = 0;
  // TMA store box of the L1 output (post-SwiGLU e4m3 into l2_acts) and its swizzle (0 or 128)
  int64_t l1_output_box_n = 0, l1_output_box_m = 0, l1_output_swizzle = 0;
  int64_t weight_tma_block_n = 0;  // box rows of the weight descriptors (min(BLOCK_N, 256))
};

// Heuristics of DeepGEMM 0.2.5 for one call of `num_tokens` tokens (0 < num_tokens <=
// capacity) on `num_sms` SMs (even, >= 2), with `num_tokens_bound` = 0 (the call's own count).
// `sm90_wide_tile` (the policy's sm90_wide_tile, JAX_MEGAMOE_SM90_WIDE_TILE=1, passed down as the
// target's attribute of that name): allow DeepGEMM's 128-row tile (faster prefill, K sum kept in
// the FP8 accumulator, rel. L2 ~1.3e-2 vs the reference at H=4096); false: always the 64-row tile.
// false + *error when no valid configuration exists (e.g. too little shared memory).
bool sm90_mega_config(const Sm90MegaShape& s, const Sm90MegaLayout& l, int64_t num_tokens,
                      int64_t num_sms, float activation_clamp, bool fast_math, bool sm90_wide_tile,
                      Sm90MegaConfig* out, std::string* error);

constexpr int64_t kSm90SmemCapacity = 232448;  // SM90ArchSpec::smem_capacity (227 KiB)
constexpr int64_t kSm90TokenAlignment = 128;   // layout::kSM90LCMBlockM
constexpr int64_t kSm90SymBufferBytes =
    592;  // sizeof(layout::SymBuffer<N>) (int64 base, 72 offsets, rank)

}  // namespace jmm::layout
