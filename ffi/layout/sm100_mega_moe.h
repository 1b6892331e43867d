// sm_100 (B200) Mega MoE: symmetric-buffer layout and launch heuristics.
//
// NOTHING HERE HAS RUN ON A B200: this project has no sm_100 GPU. The arithmetic is
// unit-tested on the CPU (tests/test_mega_layout_sm100.py) against the DeepGEMM headers'
// own host-callable functions compiled with nvcc, and the configurations it picks are
// compile-checked for sm_100f (tests/test_mega_compile_sm100.py,
// tools/compile_sm100_matrix.py).
//
// Host-side port of the arithmetic in sgl-deep-gemm 0.2.5:
//   deep_gemm/layout/mega_moe.cuh        MegaMoESignals, Workspace::get_num_bytes,
//                                        get_num_max_pool_tokens, get_num_sf_ring_tokens,
//                                        MegaMoEBuffer (region order and sizes)
//   deep_gemm/scheduler/mega_moe.cuh     get_num_max_live_pool_blocks (ring capacity)
//   deep_gemm/impls/sm100_fp8_fp4_mega_moe.cuh  SharedStorage (shared-memory layout), the
//                                        static_asserts on the template constants
// and of the host code DeepGEMM 0.2.5 runs around every fp8_fp4_mega_moe launch. The public
// sources of sgl-project/DeepGEMM and deepseek-ai/DeepGEMM are older than 0.2.5 (no
// STORE_BLOCK_M_L1/L2, no ring buffer, BLOCK_M <= 192); the 0.2.5 rules below were read from
// the wheel's compiled host code (deep_gemm/_C.so: get_block_config_for_mega_moe,
// get_mega_moe_config, get_symm_buffer_size_for_mega_moe, sm100_fp8_fp4_mega_moe,
// make_tma_*_desc), see the comments in sm100_mega_moe.cc.
//
// The symmetric buffer, from its base (each region follows the previous one directly; no
// shared experts, DG_USE_FP8_COMBINE off; P = token capacity (kNumMaxTokensPerRank, a
// multiple of 1920), R = ring tokens, Rsf = SF ring tokens, b = 4 (mxf4xmxf4) or 8 (fp8xfp4)
// bits per activation):
//   workspace        MegaMoESignals (21,140,864 B), source token-topk indices (E*P u32),
//                    TokenSrcMetadata (pool * 12 B), post-norm partial sums (P*K f32), 16 B aligned
//   x                [P, H*b/8] bytes (packed E2M1 or e4m3)   <- pre-dispatch
//   x_sf             s32 [P, H/128] (4 UE8M0 per word)         <- pre-dispatch
//   topk_idx         s64 [P, K]                                <- pre-dispatch
//   topk_weights     f32 [P, K]                                <- pre-dispatch
//   l1               [R, H*b/8]          (TMA: A operand of L1)
//   l1_sf            s32 [H/128][Rsf] (MN-major)  (TMA: SFA of L1)
//   l1_topk_weights  f32 [R]
//   l2               [R, I*b/8]          (TMA: L1 output store, A operand of L2)
//   l2_sf            s32 [I/128][Rsf] (MN-major)  (TMA: SFA of L2)
//   combine          bf16 [K, P, H]
//   input_x_scales   f32 [P]    (NVFP4 only; sized anyway)
//   l1_x_scales      f32 [R]
#pragma once

#include <cstdint>
#include <string>

#include "common/mma_kind.h"
#include "layout/mega_moe.h"

namespace jmm::layout {

// Static problem description of one symmetric buffer (capacity: a multiple of 1920) and the
// MMA kind: MmaKind::kMXFP8FP4 (fp8xfp4) or kMXFP4 (mxf4xmxf4).
struct Sm100MegaShape : MegaShape {
  MmaKind mma_kind = MmaKind::kMXFP4;
};

// Checks the limits of DeepGEMM 0.2.5's host code and the kernel's static_asserts (ranks in
// [1, 72], E % ranks, E <= 2048, E/ranks <= 512, K in [1, 32] and K <= H/8, H % 256 and
// H <= 8192, I % 128 (I % 256 for mxf4xmxf4: BLOCK_K = 256), the combine chunking of H,
// P % 1920 and P <= 262144). false + *error (a sentence) when violated.
bool sm100_mega_shape_valid(const Sm100MegaShape& s, std::string* error);

// Byte offsets (from the buffer base) and sizes of every region, for `num_sms` SMs (the ring
// capacity depends on the SM count; DeepGEMM sizes with the SM count it later launches with).
struct Sm100MegaLayout {
  int64_t num_sms = 0;  // SM count the ring was sized for
  int64_t num_experts_per_rank = 0;
  int64_t elem_bits = 0;            // 4 or 8
  int64_t num_max_pool_tokens = 0;  // get_num_max_pool_tokens
  int64_t num_ring_tokens = 0;      // R (kNumRingTokens)
  int64_t num_sf_ring_tokens = 0;   // Rsf (kNumSFRingTokens)
  bool ring_is_full_pool = false;   // capacity >= 6144: R = pool
  uint64_t workspace_bytes = 0;     // Workspace::get_num_bytes()
  uint64_t x = 0, x_sf = 0, topk_idx = 0, topk_weights = 0;
  uint64_t l1 = 0, l1_sf = 0, l1_topk_weights = 0;
  uint64_t l2 = 0, l2_sf = 0;
  uint64_t combine = 0;
  uint64_t input_x_scales = 0, l1_x_scales = 0;
  uint64_t num_bytes = 0;  // MegaMoEBuffer::get_num_bytes()
};

// Requires sm100_mega_shape_valid(s). false + *error when num_sms is invalid (even, >= 2) or
// the ring exceeds the kernel's signal arrays (2^20 blocks of 8 tokens).
bool sm100_mega_layout(const Sm100MegaShape& s, int64_t num_sms, Sm100MegaLayout* out,
                       std::string* error);

// deep_gemm::sched::get_num_max_live_pool_blocks (scheduler/mega_moe.cuh), for tests.
int64_t sm100_max_live_pool_blocks(int64_t num_total_m_blocks, int64_t num_sms, int64_t hidden,
                                   int64_t intermediate);

// Every template constant of deep_gemm::sm100_fp8_fp4_mega_moe_impl, in template order, plus the
// launch geometry and the TMA box parameters. Filled by sm100_mega_config().
struct Sm100MegaConfig {
  // template arguments 1-23
  int64_t num_max_tokens_per_rank = 0, hidden = 0, intermediate = 0, num_experts = 0;
  int64_t num_shared_experts = 0, top_k = 0;
  int64_t block_m = 0, block_n = 0, block_k = 0;
  int64_t store_block_m_l1 = 0, store_block_m_l2 = 0;
  int64_t sf_block_m = 0, sf_block_n = 0;
  MmaKind mma_kind = MmaKind::kMXFP4;
  int64_t num_ring_tokens = 0, num_sf_ring_tokens = 0;
  int64_t num_stages = 0, num_bytes_per_pull = 0;
  int64_t num_dispatch_threads = 0, num_non_epilogue_threads = 0, num_epilogue_threads = 0;
  int64_t num_sms = 0, num_ranks = 0;
  // 24-33
  float activation_clamp = 0.0f;  // +inf: no clamp
  float swiglu_alpha = 0.0f;      // 0: plain SwiGLU
  bool use_situ = false;
  bool fast_math = true;
  bool use_x_scales = false, with_l1_alphas = false, with_l2_alphas = false;
  bool with_l2_act_scales = false, use_fp8_combine = false;
  // weight_dtype_t: always cutlass::detail::float_e2m1_unpacksmem_t (FP4 weights; what 0.2.5
  // renders for kPackedFP4 weights in both modes)
  // 34-40 (spelled out with DeepGEMM's defaults)
  float situ_beta = 4.0f, situ_linear_beta = 25.0f;
  bool post_expert_norm = false, post_norm_weight_first = false, post_norm_has_weight = false;
  float post_norm_eps = 0.0f;
  bool use_trtllm_weights = false;

  // derived
  float expected_tokens_per_expert = 0.0f;     // T * ranks * K / E (f32, as the host computes it)
  int64_t elem_bits = 0;                       // activation bits: 4 or 8
  int64_t block_k_bytes = 0;                   // BLOCK_K * elem_bits / 8 (= 128)
  int64_t load_block_m = 0, load_block_n = 0;  // BLOCK_M / 2 (A is split over the 2 CTAs), BLOCK_N
  int64_t gran_k = 0;                          // 32 (UE8M0 per 32 K elements)
  int64_t swizzle_acts_mode = 0, swizzle_weights_mode = 0;  // 128, 128
  int64_t l1_out_block_n_bytes = 0;  // L1 output TMA store box inner bytes (= its swizzle mode)
  int64_t num_locality_domains = 0;  // 2 when 2I and H are multiples of 512, else 1
  int64_t combine_chunks = 0;        // the combine's H split (1 or 2)
  int64_t num_tmem_cols = 0;
  // launch
  int64_t cluster_size = 0;         // 2
  int64_t num_threads = 0;          // dispatch + non-epilogue + epilogue
  int64_t smem_size = 0;            // dynamic shared memory bytes (cuFuncSetAttribute + launch)
  int64_t host_smem_size = 0;       // DeepGEMM 0.2.5's figure (get_pipeline_config_for_mega_moe)
  int64_t kernel_smem_bytes = 0;    // end of the last SharedStorage member the kernel uses
  int64_t reusable_smem_bytes = 0;  // offsetof(SharedStorage, dispatch_barriers)
};

// Heuristics of DeepGEMM 0.2.5 for one call of `num_tokens` tokens per rank (0 < num_tokens <=
// capacity) on l.num_sms SMs. false + *error when no valid configuration exists.
bool sm100_mega_config(const Sm100MegaShape& s, const Sm100MegaLayout& l, int64_t num_tokens,
                       float activation_clamp, bool fast_math, Sm100MegaConfig* out,
                       std::string* error);

constexpr int64_t kSm100SmemCapacity = 232448;        // SM100ArchSpec::smem_capacity (227 KiB)
constexpr int64_t kSm100TokenAlignment = 1920;        // layout::kLCMCandidateBlockM
constexpr int64_t kSm100SymBufferBytes = 592;         // sizeof(layout::SymBuffer<N>)
constexpr int64_t kSm100MegaSignalsBytes = 21140864;  // sizeof(layout::MegaMoESignals)
constexpr int64_t kSm100FullPoolCapacity = 6144;      // capacity from which R = the full pool

}  // namespace jmm::layout
