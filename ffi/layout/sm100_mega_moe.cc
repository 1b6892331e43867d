#include "layout/sm100_mega_moe.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/int_math.h"
#include "common/status.h"

// Provenance of the rules (sgl-deep-gemm 0.2.5; "_C.so" = the wheel's compiled host code,
// disassembled with objdump; the public upstream sources are older and differ where noted):
//   buffer sizing  get_symm_buffer_size_for_mega_moe (_C.so 0x90380): ring = max over the
//                  BLOCK_M candidates of get_num_max_live_pool_blocks(ceil(P*ranks*min(K,E_loc)
//                  / bm) + E_loc, num_sms, H, I) * bm, aligned to 1920; the full pool when
//                  P >= 6144 (cmpl $0x17ff); SF ring = max over bm of (R/bm)*align(bm,128).
//                  Same as sgl-project/DeepGEMM csrc/apis/mega_moe.hpp.
//   BLOCK_M etc.   get_block_config_for_mega_moe (_C.so 0x7ea60) -- NOT the public version
//                  (which has fixed bands up to 192): bands on e = T*ranks*K/E (f32):
//                  e <= 10: 16/8; e <= 24: 32/16; else covered = e + sqrt(e), n = ceil(covered
//                  / 240), and the smallest of 64, 128, 192 with n*bm >= covered, else 240;
//                  n == 1 with covered > 192 and E_loc <= 13 takes 128 (n = 2). STORE_BLOCK_M
//                  = bm/4 (16 -> 8, 32 -> 16, 64 -> 16, 192 -> 48, 240 -> 40); for fp8xfp4 at
//                  240: L1 24, L2 8. BLOCK_K = 1024 / bits (128 B). cluster 2, 256 epilogue
//                  threads. (DG_MEGA_MOE_TILES overrides are not supported.)
//   pipeline       get_mega_moe_config (_C.so 0x8c070): pull bytes halved from H*bits/8 while >
//                  8192 (the public version: 4096); the shared-memory accounting below.
//   descriptors    sm100_fp8_fp4_mega_moe (_C.so 0x9eaf0), see handlers/mega_moe_sm100.cc.
namespace jmm::layout {
namespace {

// layout::kCandidateBlockM / kLCMCandidateBlockM / kMaxCandidateBlockM / kMinCandidateBlockM
constexpr int64_t kCandidateBlockM[] = {8, 16, 32, 64, 96, 128, 192, 240};
constexpr int64_t kLcmBlockM = 1920;
constexpr int64_t kMaxCandidateBlockM = 240;
constexpr int64_t kMinCandidateBlockM = 8;
constexpr int64_t kTokenSrcMetadataBytes = 12;           // {rank, token, topk} u32
constexpr int64_t kNumMaxRingBlocks = int64_t{1} << 20;  // MegaMoESignals::kNumMaxRingBlocks
constexpr int64_t kNumMaxSharedL2Blocks = int64_t{1} << 15;
constexpr int64_t kMegaMoEBlockN = 128;
constexpr int64_t kNumCTAsPerCluster = 2;
constexpr int64_t kPullThreshold = 8192;  // 0.2.5 (public source: 4096)
constexpr int64_t kSmemAlignment = 1024;
constexpr int64_t kNumEpilogueStages = 2;
constexpr int64_t kNumTMAStoreStages = 2;
constexpr int64_t kNumScheduleStages = 2;
constexpr int64_t kTaskInfoBytes = 32;  // sizeof(sched::TaskInfo<false>)
constexpr int64_t kBarrierBytes = 8;    // ClusterTransactionBarrier

constexpr MegaShapeLimits kLimits{"sm_100", /*max_ranks=*/72, /*max_experts=*/2048,
                                  /*max_local_experts=*/512, kSm100TokenAlignment};

int64_t elem_bits_of(MmaKind mma_kind) { return mma_kind == MmaKind::kMXFP4 ? 4 : 8; }

// layout::get_num_max_pool_tokens
int64_t max_pool_tokens(int64_t ranks, int64_t cap, int64_t topk, int64_t e_local) {
  return mega_max_pool_tokens(ranks, cap, topk, e_local, kMaxCandidateBlockM, kLcmBlockM);
}

// sched::get_num_l1_warmup_waves
int64_t l1_warmup_waves(int64_t total_m_blocks, int64_t clusters, int64_t l1_n, int64_t l2_n) {
  const int64_t first_l2_wave_m_blocks = ceil_div(clusters, l2_n);
  const int64_t for_first_l2_wave = ceil_div(first_l2_wave_m_blocks * l1_n, clusters);
  const int64_t diff = l1_n > l2_n ? l1_n - l2_n : 0;
  const int64_t for_interleave = ceil_div(l1_n + (total_m_blocks - 1) * diff, clusters) + 1;
  return std::max(for_first_l2_wave, for_interleave);
}

// Workspace::get_num_bytes()
uint64_t workspace_bytes(int64_t experts, int64_t cap, int64_t topk, int64_t pool) {
  int64_t n = kSm100MegaSignalsBytes;
  n += experts * cap * 4;              // source token-topk [E_loc][rank][token]
  n += pool * kTokenSrcMetadataBytes;  // TokenSrcMetadata
  n += cap * topk * 4;                 // post-norm partial sums (always sized)
  return static_cast<uint64_t>(align_up(n, 16));
}

// The members of the kernel's SharedStorage (impls/sm100_fp8_fp4_mega_moe.cuh), laid out with
// their alignments: {offset of dispatch_barriers, end of tmem_ptr_in_smem}.
struct SmemLayout {
  int64_t reusable = 0;
  int64_t used_end = 0;
};
SmemLayout kernel_smem(int64_t experts, int64_t dispatch_warps, int64_t pull, int64_t wgs,
                       int64_t epi_warps, int64_t sl1, int64_t l1_out_bytes, int64_t sl2,
                       int64_t block_n, int64_t stages, int64_t load_bm, int64_t load_bn,
                       int64_t bk_bytes, int64_t sf_bm, int64_t sf_bn, int64_t sf_chunks) {
  int64_t o = experts * 4;                        // expert_token_count
  o = align_up(o, 1024) + dispatch_warps * pull;  // dispatch_send_buffer
  const int64_t d_l1 = wgs * kNumTMAStoreStages * sl1 * l1_out_bytes;
  const int64_t d_l2 = wgs * sl2 * block_n * 2;
  o = align_up(o, 1024) + align_up(std::max(d_l1, d_l2), 1024);  // smem_d (union, alignas 1024)
  o = align_up(o, 1024) + stages * load_bm * bk_bytes;           // smem_a
  o = align_up(o, 1024) + stages * load_bn * bk_bytes;           // smem_b
  o = align_up(o, 4) + stages * sf_bm * sf_chunks * 4;           // smem_sfa
  o += stages * sf_bn * sf_chunks * 4;                           // smem_sfb
  o = align_up(o, 8) + epi_warps * (sl1 / 2) * 8;                // amax_reduction (float2)
  o = align_up(o, 16) + kNumScheduleStages * kTaskInfoBytes;     // task_infos
  o = align_up(o, 8);
  SmemLayout l;
  l.reusable = o;  // dispatch_barriers
  o += (dispatch_warps + 2 * stages + 2 * kNumEpilogueStages + 2 * epi_warps +
        2 * kNumScheduleStages) *
       kBarrierBytes;  // all barriers
  o += 4;              // tmem_ptr_in_smem
  l.used_end = o;      // then float nvfp4_sf_inv_lut[1]: only read by NVFP4 kernels
  return l;
}

}  // namespace

int64_t sm100_max_live_pool_blocks(int64_t total_m_blocks, int64_t num_sms, int64_t hidden,
                                   int64_t intermediate) {
  const int64_t clusters = num_sms / kNumCTAsPerCluster;
  const int64_t l1_n = intermediate * 2 / (kNumCTAsPerCluster * kMegaMoEBlockN);
  const int64_t l2_n = hidden / (kNumCTAsPerCluster * kMegaMoEBlockN);
  const int64_t l1_clusters = total_m_blocks * l1_n;
  const int64_t l1_waves = ceil_div(l1_clusters, clusters);
  const int64_t warmup = std::min(l1_warmup_waves(total_m_blocks, clusters, l1_n, l2_n), l1_waves);
  const int64_t warmup_clusters = std::min(warmup * clusters, l1_clusters);
  const int64_t live_after_warmup = ceil_div(warmup_clusters, l1_n);
  const int64_t frontier_growth = l2_n > l1_n ? ceil_div(total_m_blocks * (l2_n - l1_n), l2_n) : 0;
  const int64_t wave_margin = ceil_div(clusters, std::min(l1_n, l2_n));
  return std::min(total_m_blocks, live_after_warmup + frontier_growth + wave_margin);
}

bool sm100_mega_shape_valid(const Sm100MegaShape& s, std::string* error) {
  const auto fail = [&](std::string m) {
    if (error) *error = std::move(m);
    return false;
  };
  if (!mma_kind_valid(100, s.mma_kind, error) || !mega_experts_valid(s, kLimits, error)) {
    return false;
  }
  if (s.hidden <= 0 || s.hidden % 256 != 0 || s.hidden > 8192) {
    return fail(cat("hidden=", s.hidden,
                    " must be a positive multiple of 256 and at most 8192 (sm_100 Mega MoE: "
                    "2-CTA 128-wide N tiles; pre-dispatch: one thread per 8 columns)"));
  }
  // The combine splits a bf16 row into 1 or 2 chunks of whole 512-byte warp loads.
  if (s.hidden > 4096 && s.hidden % 512 != 0) {
    return fail(cat("hidden=", s.hidden,
                    " must be a multiple of 512 above 4096 (the sm_100 "
                    "combine splits rows in halves of whole 512-byte warp loads)"));
  }
  const bool fp4 = s.mma_kind == MmaKind::kMXFP4;
  const int64_t i_align = fp4 ? 256 : 128;
  if (s.intermediate <= 0 || s.intermediate % i_align != 0) {
    return fail(cat("intermediate=", s.intermediate, " must be a positive multiple of ", i_align,
                    " (sm_100 Mega MoE, ", fp4 ? "mxf4xmxf4: BLOCK_K = 256" : "fp8xfp4", ")"));
  }
  if (!mega_top_k_capacity_valid(s, kLimits, error)) return false;
  if (ceil_div(s.capacity, kMinCandidateBlockM) > kNumMaxSharedL2Blocks) {
    return fail(cat("capacity=", s.capacity, " exceeds the kernel's signal arrays (at most ",
                    kNumMaxSharedL2Blocks * kMinCandidateBlockM, " tokens)"));
  }
  // 32-bit token / slot / pool indexing in the kernels.
  const int64_t e_local = s.num_experts / s.num_ranks;
  const int64_t i32max = std::numeric_limits<int32_t>::max();
  if (s.num_ranks * s.capacity * s.top_k > i32max || s.num_experts * s.capacity > i32max ||
      max_pool_tokens(s.num_ranks, s.capacity, s.top_k, e_local) * 64 > i32max) {
    return fail(cat("capacity=", s.capacity, " is too large for 32-bit pool indexing"));
  }
  return true;
}

bool sm100_mega_layout(const Sm100MegaShape& s, int64_t num_sms, Sm100MegaLayout* out,
                       std::string* error) {
  const auto fail = [&](std::string m) {
    if (error) *error = std::move(m);
    return false;
  };
  if (num_sms < 2 || num_sms % 2 != 0) {
    return fail(cat("num_sms=", num_sms, " must be even and at least 2 (2-CTA clusters)"));
  }
  Sm100MegaLayout l;
  const int64_t ranks = s.num_ranks, E = s.num_experts, P = s.capacity, K = s.top_k;
  const int64_t H = s.hidden, I = s.intermediate;
  l.num_sms = num_sms;
  l.num_experts_per_rank = E / ranks;
  l.elem_bits = elem_bits_of(s.mma_kind);
  const int64_t e_local = l.num_experts_per_rank;
  l.num_max_pool_tokens = max_pool_tokens(ranks, P, K, e_local);

  // Ring capacity: worst-case live pool blocks over all candidate BLOCK_M.
  const int64_t routed = P * ranks * std::min(K, e_local);
  int64_t ring = 0;
  for (int64_t bm : kCandidateBlockM) {
    const int64_t pool_blocks = ceil_div(routed, bm) + e_local;
    ring = std::max(ring, sm100_max_live_pool_blocks(pool_blocks, num_sms, H, I) * bm);
  }
  ring = align_up(ring, kLcmBlockM);
  l.ring_is_full_pool = P >= kSm100FullPoolCapacity;
  if (l.ring_is_full_pool) ring = l.num_max_pool_tokens;  // the non-wrapping prefill path
  l.num_ring_tokens = ring;
  if (ring > kNumMaxRingBlocks * kMinCandidateBlockM) {
    return fail(cat("the ring of ", ring, " tokens exceeds the kernel's signal arrays (",
                    kNumMaxRingBlocks * kMinCandidateBlockM, "); lower the capacity"));
  }
  for (int64_t bm : kCandidateBlockM) {
    l.num_sf_ring_tokens = std::max(l.num_sf_ring_tokens, (ring / bm) * align_up(bm, 128));
  }

  // Regions in MegaMoEBuffer order (no shared experts, BF16 combine).
  const int64_t bits = l.elem_bits, R = ring, Rsf = l.num_sf_ring_tokens;
  l.workspace_bytes = workspace_bytes(E, P, K, l.num_max_pool_tokens);
  uint64_t o = l.workspace_bytes;
  const auto take = [&](uint64_t* field, int64_t bytes) {
    *field = o;
    o += static_cast<uint64_t>(bytes);
  };
  take(&l.x, P * (H * bits / 8));    // [P, H*b/8]
  take(&l.x_sf, P * (H / 32));       // s32 [P, H/128]
  take(&l.topk_idx, P * K * 8);      // s64 [P, K]
  take(&l.topk_weights, P * K * 4);  // f32 [P, K]
  take(&l.l1, R * (H * bits / 8));   // [R, H*b/8]
  take(&l.l1_sf, Rsf * (H / 32));    // s32 [H/128][Rsf]
  take(&l.l1_topk_weights, R * 4);   // f32 [R]
  take(&l.l2, R * (I * bits / 8));   // [R, I*b/8]
  take(&l.l2_sf, Rsf * (I / 32));    // s32 [I/128][Rsf]
  take(&l.combine, K * P * H * 2);   // bf16 [K, P, H] (+ 0 bytes of FP8-combine SF)
  take(&l.input_x_scales, P * 4);    // f32 [P]
  take(&l.l1_x_scales, R * 4);       // f32 [R]
  l.num_bytes = o;
  *out = l;
  return true;
}

bool sm100_mega_config(const Sm100MegaShape& s, const Sm100MegaLayout& l, int64_t num_tokens,
                       float activation_clamp, bool fast_math, Sm100MegaConfig* out,
                       std::string* error) {
  const auto fail = [&](std::string m) {
    if (error) *error = std::move(m);
    return false;
  };
  if (!mega_call_valid(s, num_tokens, activation_clamp, error)) return false;
  const int64_t ranks = s.num_ranks, E = s.num_experts, P = s.capacity, K = s.top_k;
  const int64_t H = s.hidden, I = s.intermediate, e_local = l.num_experts_per_rank;

  Sm100MegaConfig c;
  c.num_max_tokens_per_rank = P;
  c.hidden = H;
  c.intermediate = I;
  c.num_experts = E;
  c.num_shared_experts = 0;
  c.top_k = K;
  c.mma_kind = s.mma_kind;
  c.num_sms = l.num_sms;
  c.num_ranks = ranks;
  c.activation_clamp = activation_clamp;
  c.fast_math = fast_math;
  c.elem_bits = l.elem_bits;

  // get_block_config_for_mega_moe (0.2.5): f32 arithmetic exactly as the host does it.
  // The token buckets: T is static at trace time, so each band below is one instantiation and one
  // cubin. Compile-checked with `tools/compile_sm100_matrix.py --caps 1920 --ranks 1,8 --buckets
  // --tokens 1,2,4,8,16,32,64,128,256,512,1024,1920` (nvcc 13.0, 148 SMs; 96 configurations, 34
  // cubins, all compile): at decode sizes every T up to 256 (V4-Flash) / 512 (V4-Pro) on one rank,
  // 32 / 64 with 8 ranks, is BLOCK_M 16. These are DeepGEMM's bands, kept as they are: no B200 is
  // lent here to measure a better choice.
  float expected = static_cast<float>(num_tokens) * static_cast<float>(ranks);
  expected = static_cast<float>(K) * expected;
  expected = expected / static_cast<float>(E);
  c.expected_tokens_per_expert = expected;
  int64_t bm = 0, store = 0;
  if (expected <= 10.0f) {
    bm = 16, store = 8;  // really few tokens per expert: smallest tile, larger BLOCK_K
  } else if (expected <= 24.0f) {
    bm = 32, store = 16;
  } else {
    // Cover the mean plus one standard deviation (Poisson) with n blocks, n counted in 240-row
    // blocks; then the smallest of 64/128/192 rows that still covers it with n blocks.
    const float covered = expected + std::sqrt(expected);
    int64_t n = static_cast<int64_t>(std::ceil(covered / 240.0f));
    bool skip_64 = false;
    if (n == 1 && covered > 192.0f && e_local <= 13) {
      n = 2;  // few local experts: two 128-row blocks instead of one 240-row block
      skip_64 = true;
    }
    if (!skip_64 && static_cast<float>(n * 64) >= covered) {
      bm = 64, store = 16;
    } else if (static_cast<float>(n * 128) >= covered) {
      bm = 128, store = 32;
    } else if (static_cast<float>(n * 192) >= covered) {
      bm = 192, store = 48;
    } else {
      bm = 240, store = 40;
    }
  }
  c.block_m = bm;
  c.store_block_m_l1 = c.store_block_m_l2 = store;
  if (bm == 240 && s.mma_kind == MmaKind::kMXFP8FP4) {
    c.store_block_m_l1 = 24;  // 0.2.5: FP8 acts at BLOCK_M 240 store L1 in 24 rows, L2 in 8
    c.store_block_m_l2 = 8;
  }
  c.block_n = 128;
  c.block_k = 1024 / c.elem_bits;  // 128 bytes of activations per K block
  c.block_k_bytes = c.block_k * c.elem_bits / 8;
  c.cluster_size = 2;
  c.num_dispatch_threads = 128;
  c.num_non_epilogue_threads = 128;
  c.num_epilogue_threads = 256;
  c.num_threads = c.num_dispatch_threads + c.num_non_epilogue_threads + c.num_epilogue_threads;
  c.load_block_m = bm / 2;  // multicast on A: each CTA of the pair loads half the rows
  c.load_block_n = c.block_n;
  c.sf_block_m = align_up(bm, 128);  // SM100ArchSpec::get_sf_uttcp_aligned_block_sizes
  c.sf_block_n = align_up(c.block_n, 128);
  c.gran_k = 32;
  c.swizzle_acts_mode = 128;
  c.swizzle_weights_mode = 128;
  c.l1_out_block_n_bytes = (c.block_n / 2) * c.elem_bits / 8;
  c.num_ring_tokens = l.num_ring_tokens;
  c.num_sf_ring_tokens = l.num_sf_ring_tokens;
  if (c.num_ring_tokens % bm != 0) {
    return fail(cat("ring of ", c.num_ring_tokens, " tokens is not a multiple of BLOCK_M=", bm));
  }
  c.num_locality_domains =
      ((2 * I) % (c.block_n * 2 * 2) == 0 && H % (c.block_n * 2 * 2) == 0) ? 2 : 1;

  // Dispatch pull: the token's bytes halved until at most 8192.
  const int64_t token_bytes = H * c.elem_bits / 8;
  c.num_bytes_per_pull = token_bytes;
  while (c.num_bytes_per_pull > kPullThreshold) {
    if (c.num_bytes_per_pull % 2 != 0) return fail("num_bytes_per_pull must stay even");
    c.num_bytes_per_pull /= 2;
  }
  if (c.num_bytes_per_pull % 16 != 0 || token_bytes % c.num_bytes_per_pull != 0) {
    return fail(cat("num_bytes_per_pull=", c.num_bytes_per_pull,
                    " must be a multiple of 16 "
                    "dividing the ",
                    token_bytes, " token bytes"));
  }

  // get_pipeline_config_for_mega_moe (0.2.5 accounting).
  const int64_t dispatch_warps = c.num_dispatch_threads / 32;
  const int64_t epi_warps = c.num_epilogue_threads / 32;
  const int64_t wgs = epi_warps / 4;
  const int64_t sf_chunks = c.block_k / (c.gran_k * 4);
  const int64_t dispatch = align_up(E * 4, kSmemAlignment) +
                           align_up(dispatch_warps * c.num_bytes_per_pull, kSmemAlignment);
  const int64_t cd_l1 =
      wgs * c.store_block_m_l1 * (c.block_n / 2) * kNumTMAStoreStages * c.elem_bits / 8;
  const int64_t cd_l2 = wgs * c.store_block_m_l2 * c.block_n * 2;
  const int64_t cd = align_up(std::max(cd_l1, cd_l2), kSmemAlignment);
  const int64_t barriers =
      (dispatch_warps + kNumEpilogueStages * 2 + epi_warps * 2 + kNumScheduleStages * 2) *
      kBarrierBytes;
  const int64_t amax = c.store_block_m_l1 * epi_warps * 4;
  const int64_t tail = 4 + kNumScheduleStages * kTaskInfoBytes;  // tmem pointer + task infos
  const int64_t a_stage = c.load_block_m * c.block_k_bytes;
  const int64_t b_stage = c.load_block_n * c.block_k_bytes;
  if (a_stage % 1024 != 0 || b_stage % 1024 != 0) {
    return fail("A/B stage tiles must be 1024-byte multiples (128B swizzle atoms)");
  }
  const int64_t sfa_stage = c.sf_block_m * (c.block_k / c.gran_k);
  const int64_t sfb_stage = c.sf_block_n * (c.block_k / c.gran_k);
  const int64_t per_stage = a_stage + b_stage + sfa_stage + sfb_stage + 2 * kBarrierBytes;
  const int64_t fixed = dispatch + cd + amax + barriers + tail;
  c.num_stages = (kSm100SmemCapacity - fixed) / per_stage;
  if (c.num_stages < 2) {
    return fail(cat("shared memory: only ", c.num_stages, " pipeline stages fit (hidden=", H,
                    ", experts=", E, ")"));
  }
  c.host_smem_size = fixed + c.num_stages * per_stage;

  const SmemLayout k = kernel_smem(E, dispatch_warps, c.num_bytes_per_pull, wgs, epi_warps,
                                   c.store_block_m_l1, c.l1_out_block_n_bytes, c.store_block_m_l2,
                                   c.block_n, c.num_stages, c.load_block_m, c.load_block_n,
                                   c.block_k_bytes, c.sf_block_m, c.sf_block_n, sf_chunks);
  c.kernel_smem_bytes = k.used_end;
  c.reusable_smem_bytes = k.reusable;
  c.smem_size = std::max(c.host_smem_size, c.kernel_smem_bytes);
  if (c.smem_size > kSm100SmemCapacity) {
    return fail(cat("shared memory: ", c.smem_size, " bytes needed, the sm_100 limit is ",
                    kSm100SmemCapacity));
  }

  // Combine: bf16 rows in 1 or 2 chunks staged in the reusable shared memory (kernel asserts).
  const int64_t row_bytes = H * 2;
  c.combine_chunks = (3 * epi_warps * row_bytes <= c.reusable_smem_bytes && H <= 32 * 128) ? 1 : 2;
  if (3 * epi_warps * row_bytes / c.combine_chunks > c.reusable_smem_bytes ||
      (row_bytes / c.combine_chunks) % 512 != 0) {
    return fail(cat("hidden=", H, " does not fit the combine's shared-memory staging"));
  }

  // Tensor memory: two accumulator stages of BLOCK_M columns plus the SF columns.
  const int64_t tmem = bm * kNumEpilogueStages + c.sf_block_m / 32 + c.sf_block_n / 32;
  c.num_tmem_cols = 32;
  while (c.num_tmem_cols < tmem) c.num_tmem_cols *= 2;
  if (c.num_tmem_cols > 512) return fail("tensor memory: more than 512 columns");
  *out = c;
  return true;
}

}  // namespace jmm::layout
