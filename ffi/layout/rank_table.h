// Rank table of the fused expert-parallel Mega MoE (one process, several GPUs of one host).
//
// The table is what jax_megamoe/parallel.py passes as the `rank_devices` attribute: CUDA device
// ordinals, `num_groups` rows of `num_ranks` each, row-major. A row is one expert-parallel group
// (the devices along the mesh's expert axis, for one position of the other mesh axes) in rank
// order: rank r of a group holds experts [r E/n, (r+1) E/n). Every device of the process that
// runs the call appears exactly once, so a device finds its group and its rank from its own
// ordinal. With num_ranks == 1 the table may be empty (the calling device is the only rank).
// Plain integer code, unit-tested from Python through jmm_rank_table_lookup.
#pragma once

#include <cstdint>
#include <string>

namespace jmm::layout {

// num_ranks in [1, 32] (the sm_90 kernel's limit), size a multiple of num_ranks (may be 0 only
// when num_ranks == 1), ordinals >= 0 and pairwise distinct. false + *error otherwise.
bool rank_table_valid(const int64_t* table, int64_t size, int64_t num_ranks, std::string* error);

// Group row and rank column of `device` in a valid table; false when it is not there.
bool rank_table_find(const int64_t* table, int64_t size, int64_t num_ranks, int64_t device,
                     int64_t* group, int64_t* rank);

}  // namespace jmm::layout
