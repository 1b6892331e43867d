#include "layout/rank_table.h"

#include <set>

#include "common/export.h"
#include "common/status.h"

namespace jmm::layout {

bool rank_table_valid(const int64_t* table, int64_t size, int64_t num_ranks, std::string* error) {
  const auto fail = [&](std::string m) {
    if (error) *error = std::move(m);
    return false;
  };
  if (num_ranks < 1 || num_ranks > 32) {
    return fail(cat("attribute num_ranks=", num_ranks, " must be in [1, 32]"));
  }
  if (size < 0 || (size == 0 && num_ranks > 1) || size % num_ranks != 0) {
    return fail(cat("attribute rank_devices has ", size,
                    " entries; expected a positive multiple of "
                    "num_ranks=",
                    num_ranks, " (rows of CUDA device ordinals, one row per group)"));
  }
  std::set<int64_t> seen;
  for (int64_t i = 0; i < size; ++i) {
    if (table[i] < 0) {
      return fail(cat("attribute rank_devices[", i, "]=", table[i], " is not a device ordinal"));
    }
    if (!seen.insert(table[i]).second) {
      return fail(cat("attribute rank_devices lists CUDA device ", table[i],
                      " twice; each device is one rank of one group"));
    }
  }
  return true;
}

bool rank_table_find(const int64_t* table, int64_t size, int64_t num_ranks, int64_t device,
                     int64_t* group, int64_t* rank) {
  for (int64_t i = 0; i < size; ++i) {
    if (table[i] == device) {
      *group = i / num_ranks;
      *rank = i % num_ranks;
      return true;
    }
  }
  return false;
}

}  // namespace jmm::layout
