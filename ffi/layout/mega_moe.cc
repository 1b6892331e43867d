#include "layout/mega_moe.h"

#include <algorithm>
#include <cmath>

#include "common/int_math.h"
#include "common/status.h"

namespace jmm::layout {
namespace {

bool fail(std::string* error, std::string m) {
  if (error) *error = std::move(m);
  return false;
}

}  // namespace

bool mega_experts_valid(const MegaShape& s, const MegaShapeLimits& lim, std::string* error) {
  if (s.num_ranks < 1 || s.num_ranks > lim.max_ranks) {
    return fail(error, cat("num_ranks=", s.num_ranks, " must be in [1, ", lim.max_ranks, "]"));
  }
  const bool too_many = lim.max_experts > 0 && s.num_experts > lim.max_experts;
  if (s.num_experts < 1 || s.num_experts % s.num_ranks != 0 || too_many) {
    const std::string range = lim.max_experts > 0 ? cat("in [1, ", lim.max_experts, "] and")
                                                  : std::string("positive and");
    return fail(error, cat("num_experts=", s.num_experts, " must be ", range,
                           " divisible by num_ranks=", s.num_ranks));
  }
  if (s.num_experts / s.num_ranks > lim.max_local_experts) {
    return fail(error, cat("num_experts / num_ranks = ", s.num_experts / s.num_ranks,
                           " local experts: at most ", lim.max_local_experts, " are supported"));
  }
  return true;
}

bool mega_top_k_capacity_valid(const MegaShape& s, const MegaShapeLimits& lim, std::string* error) {
  if (s.top_k < 1 || s.top_k > 32 || s.top_k > s.hidden / 8) {
    return fail(error, cat("top_k=", s.top_k, " must be in [1, 32]"));
  }
  if (s.capacity <= 0 || s.capacity % lim.token_alignment != 0) {
    return fail(error, cat("capacity=", s.capacity, " must be a positive multiple of ",
                           lim.token_alignment, " (the ", lim.arch, " token alignment)"));
  }
  return true;
}

bool mega_call_valid(const MegaShape& s, int64_t num_tokens, float activation_clamp,
                     std::string* error) {
  if (num_tokens < 1 || num_tokens > s.capacity) {
    return fail(error,
                cat("num_tokens=", num_tokens, " must be in [1, capacity=", s.capacity, "]"));
  }
  if (std::isnan(activation_clamp) || activation_clamp < 0.0f) {
    return fail(error,
                cat("activation_clamp=", activation_clamp, " must be >= 0 (or +inf: no clamp)"));
  }
  return true;
}

int64_t mega_max_pool_tokens(int64_t ranks, int64_t cap, int64_t topk, int64_t e_local,
                             int64_t max_block_m, int64_t lcm_block_m) {
  return align_up(ranks * cap * std::min(topk, e_local) + e_local * (max_block_m - 1), lcm_block_m);
}

}  // namespace jmm::layout
