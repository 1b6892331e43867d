// The mega kernels' symmetric buffers, owned by the library (never XLA memory: peers write into
// them and their barrier state carries from one launch to the next), shared by the sm_90 and
// sm_100 handlers.
//
// A *group* is one buffer per rank of an expert-parallel group, each on its rank's GPU, all the
// same size, all zeroed before any rank can launch, with peer access enabled between every pair
// of the group's contexts. A single rank is a group of one. Groups live in a process registry
// keyed by the ranks' contexts and the configuration, shared by every call site (shared_ptr; the
// buffers are freed when the last state using the group dies).
//
// ResolveGroup turns the rank table (layout/rank_table.h) into this device's rank and the
// devices/contexts of its group: every rank must be a GPU of the same architecture and SM count
// (every rank launches the same kernel configuration), and XLA's stream must be in its device's
// primary context (the contexts peers are mapped through).
#pragma once

#include <cuda.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cuda/driver.h"
#include "handlers/host_glue.h"
#include "xla/ffi/api/ffi.h"

namespace jmm::host {

struct SymmetricGroup {
  std::vector<CUcontext> ctx;    // per rank: the context the buffer lives in (XLA's)
  std::vector<CUdevice> device;  // per rank
  std::vector<CUdeviceptr> ptr;  // per rank (0: not allocated)
  uint64_t bytes = 0;
  ~SymmetricGroup();
};

// This device's place in its group.
struct RankPlacement {
  int64_t rank = 0;
  std::vector<CUdevice> devices;  // the group's devices, in rank order
  std::vector<CUcontext> ctx;     // their (primary) contexts; ctx[rank] is `own_ctx`
};

// num_ranks == 1: the calling device alone. Otherwise finds `own_device` in the table (size
// entries, rows of num_ranks) and checks every rank of its row.
xla::ffi::Error ResolveGroup(const cuda::Driver* d, const DriverExt* x, CUcontext own_ctx,
                             CUdevice own_device, int64_t num_ranks, const int64_t* table,
                             int64_t size, const char* target, RankPlacement* out);

// Finds or creates the group of `placement` for configuration `config` (any integers that tell
// configurations apart): every rank's buffer allocated (`bytes`, rounded up to 16) and zeroed,
// peer access enabled, all before this returns. Called from initialize only, outside any capture;
// the first rank to get here does the work for the whole group.
xla::ffi::ErrorOr<std::shared_ptr<SymmetricGroup>> AcquireGroup(const cuda::Driver* d,
                                                                const DriverExt* x,
                                                                const RankPlacement& placement,
                                                                const std::vector<int64_t>& config,
                                                                uint64_t bytes, const char* target);

// ResolveGroup + AcquireGroup, then this rank's SymBuffer<kNumRanks> (DeepGEMM's by-value pointer
// table: base = own buffer, offsets[r] = buffer of rank r - own buffer, rank_idx), into `sym`
// (jit::Sm90SymBuffer / jit::Sm100SymBuffer: the same layout).
template <typename Sym>
xla::ffi::Error JoinGroup(const cuda::Driver* d, const DriverExt* x, CUcontext own_ctx,
                          CUdevice own_device, int64_t num_ranks, const std::vector<int64_t>& table,
                          const std::vector<int64_t>& config, uint64_t bytes, const char* target,
                          std::shared_ptr<SymmetricGroup>* group, int64_t* rank, Sym* sym) {
  RankPlacement placement;
  if (xla::ffi::Error e = ResolveGroup(d, x, own_ctx, own_device, num_ranks, table.data(),
                                       static_cast<int64_t>(table.size()), target, &placement);
      !e.success()) {
    return e;
  }
  auto g = AcquireGroup(d, x, placement, config, bytes, target);
  if (g.has_error()) return g.error();
  *group = std::move(g.value());
  *rank = placement.rank;
  const int64_t base = static_cast<int64_t>((*group)->ptr[static_cast<size_t>(*rank)]);
  *sym = Sym{};
  sym->base = base;
  for (size_t r = 0; r < (*group)->ptr.size(); ++r) {
    sym->offsets[r] = static_cast<int64_t>((*group)->ptr[r]) - base;
  }
  sym->rank_idx = static_cast<uint32_t>(*rank);
  return xla::ffi::Error::Success();
}

}  // namespace jmm::host
