#include "layout/sm90_mega_moe.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/int_math.h"
#include "common/status.h"

namespace jmm::layout {

namespace {

// layout::kSM90MaxCandidateBlockM / kSM90LCMBlockM / kMinCandidateBlockM (mega_moe.cuh)
constexpr int64_t kMaxCandidateBlockM = 128;
constexpr int64_t kLcmBlockM = 128;
constexpr int64_t kMinCandidateBlockM = 8;
constexpr int64_t kTokenSrcMetadataBytes = 12;  // {rank, token, topk} u32
constexpr int64_t kBarrierSignalBytes = 32;     // SM90Workspace::kNumBarrierSignalBytes
constexpr MegaShapeLimits kLimits{"sm_90", /*max_ranks=*/32, /*max_experts=*/0,
                                  /*max_local_experts=*/1024, kSm90TokenAlignment};

// get_num_max_pool_tokens_sm90
int64_t max_pool_tokens(int64_t ranks, int64_t cap, int64_t topk, int64_t e_local) {
  return mega_max_pool_tokens(ranks, cap, topk, e_local, kMaxCandidateBlockM, kLcmBlockM);
}

// SM90Workspace(base, ranks, E, cap, topk, ring = 0).get_num_bytes(): the full-pool ring.
uint64_t workspace_bytes(int64_t ranks, int64_t experts, int64_t cap, int64_t topk) {
  const int64_t e_local = experts / ranks;
  const int64_t recv_per_expert = ranks * cap;
  const int64_t pool = max_pool_tokens(ranks, cap, topk, e_local);
  const int64_t pool_blocks = pool / kMinCandidateBlockM;
  const int64_t ring_blocks = pool_blocks;
  uint64_t n = 0;
  n += kBarrierSignalBytes;
  n += experts * 8 * 2;                        // send counts + recv counts (bank 0)
  n += e_local * 8;                            // unused u64 tail of bank 0
  n += align_up(pool_blocks, 2) * 4;           // L1 arrival counts
  n += pool_blocks * 8;                        // L2 arrival masks
  n += ring_blocks * 4 * 2;                    // ring empty semaphores
  n += e_local * ranks * recv_per_expert * 4;  // source token-topk indices
  n += pool * kTokenSrcMetadataBytes;          // TokenSrcMetadata
  const int64_t flag_words = experts + e_local + 1 + ranks;
  const int64_t bank1_offset = align_up(flag_words * 4, 8);
  const int64_t bank1_bytes = (experts + e_local) * 8 + flag_words * 4;
  n += align_up(bank1_bytes + bank1_offset, 1024);  // flags, tile counts, epoch, bank 1
  return align_up(static_cast<int64_t>(n), 1024);
}

// get_num_experts_per_wave_for_mega_moe_sm90_legacy, the occupancy heuristic. DeepGEMM first
// lowers the wave's expert count until get_num_wave_pool_tokens_for_mega_moe_sm90 fits the ring;
// with the full-pool ring that loop never lowers it (a wave of every local expert holds at most
// align(ranks*cap*min(K, E_loc) + E_loc*(BLOCK_M-1), BLOCK_M) <= pool tokens for BLOCK_M <= 128),
// so the sweep starts from e_local.
int64_t experts_per_wave_occupancy(int64_t e_local, int64_t num_tokens, int64_t topk, int64_t inter,
                                   int64_t block_m, int64_t block_n, int64_t num_sms) {
  const int64_t max_epw = e_local;
  constexpr int64_t kImbalanceFactor = 2;
  const float expected = static_cast<float>(num_tokens * topk) / static_cast<float>(e_local);
  const int64_t m_blocks =
      std::max<int64_t>(ceil_div(static_cast<int64_t>(std::ceil(expected)), block_m), 1);
  const int64_t l1_n_blocks = (2 * inter) / block_n;
  const int64_t blocks_per_expert = m_blocks * l1_n_blocks;
  int64_t min_fill = ceil_div(kImbalanceFactor * num_sms, blocks_per_expert);
  if (expected < 1.0f) min_fill = e_local;
  if (min_fill >= max_epw) return max_epw;
  if (blocks_per_expert >= num_sms) return min_fill;
  const int64_t sweep_max = std::min(max_epw, min_fill * 2);
  int64_t best = min_fill;
  float best_tail = -1.0f;
  for (int64_t epw = min_fill; epw <= sweep_max; ++epw) {
    const int64_t rem = e_local % epw;
    const float tail = rem == 0 ? 1.0f : static_cast<float>(rem) / static_cast<float>(epw);
    if (tail > best_tail) {
      best_tail = tail;
      best = epw;
    }
  }
  return best;
}

// get_num_experts_per_wave_for_mega_moe_sm90, full-pool buffer (ring == pool).
int64_t experts_per_wave(int64_t e_local, int64_t num_tokens, int64_t topk, int64_t inter,
                         int64_t block_m, int64_t block_n, int64_t num_sms) {
  // decode single wave: BLOCK_M 64 and at most 256 tokens
  if (block_m == 64 && num_tokens <= 256) return e_local;
  const float expected =
      static_cast<float>(num_tokens) * static_cast<float>(topk) / static_cast<float>(e_local);
  if (block_m == 64 && expected > 4.0f) {
    const int64_t n_blocks = (2 * inter) / block_n;
    const int64_t wave = std::max<int64_t>(1, num_sms / std::max<int64_t>(1, n_blocks));
    return std::min(wave, e_local);
  }
  if (expected < 1.0f || expected > 4.0f) return e_local;
  if (block_m == 64 && inter >= 3072) {
    const int64_t n_blocks = (2 * inter) / block_n;
    if (e_local * n_blocks >= 4 * num_sms) return e_local;
  }
  return experts_per_wave_occupancy(e_local, num_tokens, topk, inter, block_m, block_n, num_sms);
}

// The host's shared-memory accounting (get_pipeline_config_for_mega_moe_sm90 of 0.2.5 with the
// per-128 L2 activation scale, no swap-AB): {num_stages, smem_size}.
struct Pipeline {
  int64_t num_stages = 0;
  int64_t smem_size = 0;
};
Pipeline host_pipeline(int64_t experts, int64_t hidden, int64_t inter, int64_t block_m,
                       int64_t block_n, int64_t block_k, int64_t dispatch_warps,
                       int64_t epilogue_warps, bool half_l2_cd, int64_t l2_cd_passes,
                       int64_t tile_table_entries, bool early_combine_smem,
                       int64_t pull_publish_batch) {
  constexpr int64_t kAlign = 1024;
  const int64_t passes = l2_cd_passes != 0 ? l2_cd_passes : (half_l2_cd ? 2 : 1);
  const int64_t expert_count_bytes = experts * 4;
  const int64_t send = align_up(hidden * dispatch_warps, kAlign);
  const int64_t cd_l1 = block_m * (block_n / 2);
  const int64_t cd_l2 = block_m * (block_n / passes) * 2;
  const int64_t cd = align_up(std::max(cd_l1, cd_l2), kAlign);
  const int64_t sfa_per_stage = align_up(block_m * 4, 128);  // per-128 L2 act SF: one float per row
  const int64_t per_stage = block_m * block_k + block_n * block_k + sfa_per_stage;
  const int64_t wgs = epilogue_warps / 4;
  const int64_t wg_block_n = (block_m == 64 && wgs > 1)
                                 ? block_n / wgs
                                 : ((block_m == 128 && block_n == 256 && wgs == 4) ? 128 : block_n);
  const int64_t sf_groups = wg_block_n >= 128 ? wg_block_n / 128 : 1;
  const int64_t sf_floats = std::max(2 * (hidden / 128), sf_groups * (inter / 128));
  const int64_t weight_sf = align_up(wgs * sf_floats * 4, 128);
  const int64_t barriers_fixed = (dispatch_warps + 2 * epilogue_warps) * 8;
  const int64_t barriers_per_stage = 2 * 8;
  const int64_t ec = early_combine_smem ? dispatch_warps * 8 + 64 + 8 : 0;
  const int64_t table_region = std::max(tile_table_entries * 8, expert_count_bytes) + 8;
  const int64_t pull =
      pull_publish_batch > 1 ? align_up(dispatch_warps * pull_publish_batch * 4, 16) + 8 : 0;
  const int64_t fixed = send + cd + weight_sf + barriers_fixed + ec + table_region + pull;
  Pipeline p;
  p.num_stages = (kSm90SmemCapacity - fixed) / (per_stage + barriers_per_stage);
  p.smem_size = fixed + p.num_stages * (per_stage + barriers_per_stage);
  return p;
}

// End of the kernel's own shared-memory layout (SMEM_PULL_PENDING_OFFSET + SIZE in
// impls/sm90_fp8_mega_moe.cuh), for the chosen template constants.
int64_t kernel_smem_end(const Sm90MegaConfig& c) {
  const int64_t dispatch_warps = c.num_dispatch_threads / 32;
  const int64_t epilogue_warps = c.num_epilogue_threads / 32;
  const int64_t wgs = epilogue_warps / 4;
  const int64_t send = align_up(c.hidden * dispatch_warps, 1024);
  const int64_t a_stage = c.block_m * c.block_k;  // LOAD_BLOCK_M == BLOCK_M
  const int64_t b_stage = c.block_n * c.block_k;  // LOAD_BLOCK_N == BLOCK_N
  const int64_t sfa_stage = align_up(c.block_m * 4, 128);
  const bool split_n =
      c.block_m == 64 && c.block_n % wgs == 0 && (c.block_n / wgs == 64 || c.block_n / wgs == 128);
  const int64_t wg_block_n = c.block_n / (split_n ? wgs : 1);
  const int64_t sf_groups = wg_block_n >= 128 ? wg_block_n / 128 : 1;
  const int64_t sf_floats = std::max(2 * (c.hidden / 128), sf_groups * (c.intermediate / 128));
  const int64_t weight_sf = align_up(wgs * sf_floats * 4, 128);
  const int64_t passes = c.l2_cd_passes != 0 ? c.l2_cd_passes : (c.half_l2_cd ? 2 : 1);
  const int64_t cd =
      align_up(std::max(c.block_m * (c.block_n / 2), c.block_m * (c.block_n / passes) * 2), 1024);
  const int64_t barriers = dispatch_warps + c.num_stages * 2 + epilogue_warps * 2;
  const int64_t table_offset = align_up(
      send + cd + c.num_stages * (a_stage + b_stage + sfa_stage) + weight_sf + barriers * 8, 16);
  const int64_t table_region = std::max(c.tile_table_entries * 8, c.num_experts * 4);
  const int64_t ec_offset = align_up(table_offset + table_region, 8);
  const int64_t ec_bytes = c.early_combine != 0 ? dispatch_warps * 8 + 64 : 0;
  const int64_t pull_offset = align_up(ec_offset + ec_bytes, 16);
  const int64_t pull_size =
      c.pull_publish_batch > 1 ? align_up(dispatch_warps * c.pull_publish_batch * 4, 16) : 0;
  return pull_offset + pull_size;
}

}  // namespace

bool sm90_mega_shape_valid(const Sm90MegaShape& s, std::string* error) {
  const auto fail = [&](std::string m) {
    if (error) *error = std::move(m);
    return false;
  };
  if (!mega_experts_valid(s, kLimits, error)) return false;
  if (s.hidden <= 0 || s.hidden % 512 != 0 || s.hidden > 8192) {
    return fail(cat("hidden=", s.hidden,
                    " must be a positive multiple of 512 and at most 8192 (sm_90 Mega MoE: "
                    "256-wide N tiles in pairs; pre-dispatch: one thread per 8 columns)"));
  }
  if (s.intermediate <= 0 || s.intermediate % 256 != 0 || s.intermediate > 4096) {
    return fail(cat("intermediate=", s.intermediate,
                    " must be a positive multiple of 256 and at most 4096 (sm_90 Mega MoE)"));
  }
  if (!mega_top_k_capacity_valid(s, kLimits, error)) return false;
  // 32-bit token / slot / pool indexing in the kernels.
  const Sm90MegaLayout l = sm90_mega_layout(s);
  const int64_t i32max = std::numeric_limits<int32_t>::max();
  if (s.num_ranks * s.capacity * s.top_k > i32max || l.num_padded_sf_pool_tokens * 64 > i32max ||
      s.top_k * s.capacity * s.hidden * 2 > (int64_t{1} << 40)) {
    return fail(cat("capacity=", s.capacity, " is too large for 32-bit pool indexing"));
  }
  return true;
}

Sm90MegaLayout sm90_mega_layout(const Sm90MegaShape& s) {
  Sm90MegaLayout l;
  const int64_t ranks = s.num_ranks, E = s.num_experts, P = s.capacity, K = s.top_k;
  const int64_t H = s.hidden, I = s.intermediate;
  l.num_experts_per_rank = E / ranks;
  l.num_max_pool_tokens = max_pool_tokens(ranks, P, K, l.num_experts_per_rank);
  l.num_data_pool_tokens = l.num_max_pool_tokens;  // the full-pool ring
  // get_num_padded_sf_pool_tokens_sm90: max over the SM90 BLOCK_M candidates {64, 128}
  const int64_t D = l.num_data_pool_tokens;
  l.num_padded_sf_pool_tokens =
      std::max((D / 64) * align_up(64, 128), (D / 128) * align_up(128, 128));
  const int64_t S = l.num_padded_sf_pool_tokens;
  l.workspace_bytes = workspace_bytes(ranks, E, P, K);
  // Regions in the order the kernel slices them (each follows the previous one).
  uint64_t o = l.workspace_bytes;
  l.x = o;
  o += static_cast<uint64_t>(P) * H;  // e4m3 [P, H]
  l.x_sf = o;
  o += static_cast<uint64_t>(P) * (H / 32);  // f32 [P, H/128]
  l.topk_idx = o;
  o += static_cast<uint64_t>(P) * K * 8;  // i64 [P, K]
  l.topk_weights = o;
  o += static_cast<uint64_t>(P) * K * 4;  // f32 [P, K]
  l.l1_acts = o;
  o += static_cast<uint64_t>(D) * H;  // e4m3 [D, H]
  l.l1_acts_sf = o;
  o += static_cast<uint64_t>(S) * (H / 32);  // f32 [H/128][S]
  l.l1_topk_weights = o;
  o += static_cast<uint64_t>(D) * 4;  // f32 [D]
  l.l2_acts = o;
  o += static_cast<uint64_t>(D) * I;  // e4m3 [D, I]
  l.l2_acts_sf = o;
  o += static_cast<uint64_t>(S) * (I * 4 / 128);  // f32 [I/128][S]
  l.combine = o;
  o += static_cast<uint64_t>(K) * P * H * 2;  // bf16 [K, P, H]
  l.num_bytes = o;
  return l;
}

bool sm90_mega_config(const Sm90MegaShape& s, const Sm90MegaLayout& l, int64_t num_tokens,
                      int64_t num_sms, float activation_clamp, bool fast_math, bool sm90_wide_tile,
                      Sm90MegaConfig* out, std::string* error) {
  const auto fail = [&](std::string m) {
    if (error) *error = std::move(m);
    return false;
  };
  if (!mega_call_valid(s, num_tokens, activation_clamp, error)) return false;
  if (num_sms < 2 || num_sms % 2 != 0) {
    return fail(cat("num_sms=", num_sms, " must be even and at least 2"));
  }
  const int64_t ranks = s.num_ranks, E = s.num_experts, P = s.capacity, K = s.top_k;
  const int64_t H = s.hidden, I = s.intermediate, e_local = l.num_experts_per_rank;
  const int64_t T = num_tokens;
  const int64_t rule_tokens = T;  // num_tokens_bound == 0: the call's own count

  Sm90MegaConfig c;
  c.num_max_tokens_per_rank = P;
  c.hidden = H;
  c.intermediate = I;
  c.num_experts = E;
  c.top_k = K;
  c.num_ranks = ranks;
  c.num_sms = num_sms;
  c.activation_clamp = activation_clamp;
  c.fast_math = fast_math;

  // Block shape (get_block_config_for_mega_moe_sm90 + get_block_mn_config_for_mega_moe_sm90):
  // 64 or more expected tokens per expert -> the 128x256 tile, two math warpgroups split along M;
  // otherwise the 64-row decode tile whose two warpgroups split the 256 columns along N.
  //
  // The 128-row tile is opt-in (sm90_wide_tile, DeepGEMM's own rule then): its
  // warpgroup tile spans two weight-SF blocks, which forces kReuseAccumAsFinal, so the whole K sum
  // stays in the FP8 WGMMA accumulator (rescaled per k-block) instead of being promoted to fp32
  // per k-block. Measured on an H100 (tests/gpu/probe_block_m.py, E=16 K=6): rel. L2 against the
  // reference 6.4e-3 / 9.5e-3 / 1.31e-2 at H = 512 / 2048 / 4096 with it, 1.5e-3 to 4.9e-3 with
  // the 64-row tile; it breaks the 1e-2 contract for V4 (issue 15).
  const float expected_global = static_cast<float>(T) * static_cast<float>(ranks) *
                                static_cast<float>(K) / static_cast<float>(E);
  c.block_m = (expected_global >= 64.0f && sm90_wide_tile) ? 128 : 64;
  c.num_epilogue_threads = 256;
  c.block_k = 128;
  // With the per-128 L2 activation scale only the 256-wide tile is valid (2I and H multiples
  // of 512; sm90_mega_shape_valid guarantees it).
  c.block_n = 256;
  const bool split_m2 = c.block_m == 128;
  // dispatch / non-epilogue warps shrink to 2 + 2 for every 256-thread epilogue topology
  c.num_dispatch_threads = 64;
  c.num_non_epilogue_threads = 64;
  c.num_threads = c.num_dispatch_threads + c.num_non_epilogue_threads + c.num_epilogue_threads;

  // 2-CTA cluster multicasting the weights: the 128x256 tile with even N block counts.
  const bool cluster_pairing_valid = num_sms % 2 == 0 && ((2 * I) / c.block_n) % 2 == 0 &&
                                     (H / c.block_n) % 2 == 0 && (2 * I) % c.block_n == 0 &&
                                     H % c.block_n == 0;
  c.cluster_size = (c.block_m == 128 && c.block_n == 256 && cluster_pairing_valid) ? 2 : 1;
  c.multicast_on_b = c.cluster_size == 2;

  c.num_max_pool_tokens = l.num_max_pool_tokens;
  c.num_padded_sf_pool_tokens = l.num_padded_sf_pool_tokens;

  c.num_experts_per_wave = experts_per_wave(e_local, T, K, I, c.block_m, c.block_n, num_sms);
  if (c.num_experts_per_wave < 1 || c.num_experts_per_wave > e_local) {
    return fail(cat("no valid experts-per-wave count for ", T, " tokens"));
  }

  // Early combine: hidden >= 512 x topk and at most 32 token stripes per combine warp
  // (kNumECTokenStripes = ceil(capacity / (num_sms x 8 combine warps))).
  const int64_t ec_stripes = ceil_div(P, num_sms * (c.num_epilogue_threads / 32));
  const bool early_combine_smem = H >= 512 * K && ec_stripes <= 32;
  c.tile_table_entries =
      ceil_div((c.num_max_pool_tokens / c.block_m) * ((2 * I) / c.block_n + H / c.block_n),
               num_sms) +
      2;  // get_sm90_tile_table_entries_compact
  // Pull publish batch: 16 rows per release fence from 8192 tokens per rank on.
  c.pull_publish_batch = rule_tokens >= 8192 ? 16 : 1;

  if (split_m2) {
    // Row-pass L2 staging on the quarter-width buffer: stmatrix (mode 4) when a warpgroup's
    // weight-SF slot holds >= 256 bytes, else plain shared stores (mode 2).
    const int64_t slot_bytes = std::max(2 * (H / 128), 2 * (I / 128)) * 4;
    c.l2_stage_mode = slot_bytes >= 256 ? 4 : 2;
    c.l2_cd_passes = 4;
    c.half_l2_cd = true;
  }
  const Pipeline p =
      host_pipeline(E, H, I, c.block_m, c.block_n, c.block_k, c.num_dispatch_threads / 32,
                    c.num_epilogue_threads / 32, c.half_l2_cd, c.l2_cd_passes, c.tile_table_entries,
                    early_combine_smem, c.pull_publish_batch);
  if (p.num_stages < 2) {
    return fail(cat("shared memory: only ", p.num_stages, " pipeline stages fit (hidden=", H,
                    ", intermediate=", I, ", experts=", E, ", capacity=", P, ")"));
  }
  c.num_stages = p.num_stages;
  c.host_smem_size = p.smem_size;
  // The early-combine signal reads the k-block kNumStages ahead: both GEMMs need more k-blocks.
  c.early_combine =
      (early_combine_smem && H / c.block_k > c.num_stages && I / c.block_k > c.num_stages) ? 1 : 0;

  // Launcher flags (fp8_mega_moe of 0.2.5).
  c.epilogue_register_budget = 0;
  // The 128-row tile must reuse its WGMMA accumulators as the final sum: the two-level promotion
  // (kReuseAccumAsFinal = false) is a static_assert there (two weight-SF groups per warpgroup) and
  // would need 128 more f32 registers per thread than the 168 it uses (ptxas, V4-Flash, sm_90a;
  // benchmarks/RESULTS.md, 2026-12-08).
  c.reuse_accum_as_final = c.block_m == 128;
  c.l2_arrival_counter =
      c.block_m == 128 ? c.block_n == 256 : (c.block_n == 256 && T >= 4 && T <= 128);
  c.l2_epilogue_requires_full_sync = !c.l2_arrival_counter;
  c.pdl = false;
  c.pull_eager_publish = c.pull_publish_batch == 1 && rule_tokens <= 256;
  c.trace = c.trace_epi = false;

  // L1 output TMA store box (the kernel stages it per warpgroup, or jointly for the split-N tile).
  const int64_t wgs = c.num_epilogue_threads / 128;
  const bool split_n =
      c.block_m == 64 && c.block_n % wgs == 0 && (c.block_n / wgs == 64 || c.block_n / wgs == 128);
  if (split_n) {
    // the two N-split warpgroups share one L2 act-SF group and one unswizzled staging tile
    c.l1_output_box_n = c.block_n / 2;
    c.l1_output_box_m = c.block_m;
    c.l1_output_swizzle = 0;
  } else {
    c.l1_output_box_n = c.block_n / 2;
    c.l1_output_box_m = c.block_m / wgs;
    c.l1_output_swizzle = c.l1_output_box_n == 128 ? 128 : 0;
  }
  c.weight_tma_block_n = std::min<int64_t>(c.block_n, 256);

  c.kernel_smem_bytes = kernel_smem_end(c);
  c.smem_size = std::max(c.host_smem_size, c.kernel_smem_bytes);
  if (c.smem_size > kSm90SmemCapacity) {
    return fail(cat("shared memory: ", c.smem_size, " bytes needed, the sm_90 limit is ",
                    kSm90SmemCapacity));
  }
  *out = c;
  return true;
}

}  // namespace jmm::layout
