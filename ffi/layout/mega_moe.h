// What the sm_90 and sm_100 Mega-MoE layouts share (layout/sm90_mega_moe.h, sm100_mega_moe.h):
// the problem description, the checks both archs make the same way with their own limits, and
// DeepGEMM's pool-size formula (get_num_max_pool_tokens[_sm90], layout/mega_moe.cuh).
#pragma once

#include <cstdint>
#include <string>

namespace jmm::layout {

// Static problem description of one symmetric buffer.
struct MegaShape {
  int64_t num_ranks = 1;
  int64_t num_experts = 0;   // global experts E
  int64_t capacity = 0;      // token capacity per rank P (kNumMaxTokensPerRank)
  int64_t top_k = 0;         // K
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I
};

// The limits an arch puts on a shape.
struct MegaShapeLimits {
  const char* arch = "";  // "sm_90", "sm_100" (in messages)
  int64_t max_ranks = 0;
  int64_t max_experts = 0;  // 0: no limit of its own
  int64_t max_local_experts = 0;
  int64_t token_alignment = 0;  // the capacity must be a multiple of it
};

// num_ranks in [1, max_ranks], num_experts positive (at most max_experts) and divisible by
// num_ranks, at most max_local_experts per rank. false + *error (a sentence) when violated.
bool mega_experts_valid(const MegaShape& s, const MegaShapeLimits& lim, std::string* error);

// top_k in [1, 32] and <= hidden / 8 (the pre-dispatch kernel's threads), capacity a positive
// multiple of token_alignment.
bool mega_top_k_capacity_valid(const MegaShape& s, const MegaShapeLimits& lim, std::string* error);

// One call: 0 < num_tokens <= capacity, activation_clamp >= 0 (+inf: no clamp).
bool mega_call_valid(const MegaShape& s, int64_t num_tokens, float activation_clamp,
                     std::string* error);

// get_num_max_pool_tokens: every routed (token, expert) pair of every rank plus one partial
// block per local expert, aligned to the LCM of the candidate BLOCK_M.
int64_t mega_max_pool_tokens(int64_t ranks, int64_t cap, int64_t topk, int64_t e_local,
                             int64_t max_block_m, int64_t lcm_block_m);

}  // namespace jmm::layout
