#include "handlers/symmetric.h"

#include <map>
#include <mutex>
#include <utility>

#include "common/status.h"
#include "layout/rank_table.h"

namespace ffi = xla::ffi;

namespace jmm::host {
namespace {

using GroupKey = std::pair<std::vector<CUcontext>, std::vector<int64_t>>;
std::mutex g_registry_mu;
std::map<GroupKey, std::weak_ptr<SymmetricGroup>> g_registry;

// Allocates and zeroes (synchronously, on a private stream) one rank's buffer in its context.
ffi::Error AllocateZeroed(const cuda::Driver* d, const DriverExt* x, SymmetricGroup* g, size_t r,
                          const char* target) {
  if (CUresult rc = d->CtxPushCurrent(g->ctx[r]); rc != CUDA_SUCCESS) {
    return ffi::Error::Internal(
        cat(target, ": cuCtxPushCurrent for rank ", r, " failed: ", cuda::error_string(d, rc)));
  }
  CUresult rc = x->MemAlloc(&g->ptr[r], static_cast<size_t>(g->bytes));
  if (rc != CUDA_SUCCESS) {
    g->ptr[r] = 0;
    CUcontext popped = nullptr;
    d->CtxPopCurrent(&popped);
    return ffi::Error::Internal(
        cat(target, ": cuMemAlloc of the ", g->bytes, "-byte symmetric buffer of rank ", r,
            " (CUDA device ", g->device[r], ") failed: ", cuda::error_string(d, rc),
            " (leave room next to XLA's pool: XLA_PYTHON_CLIENT_MEM_FRACTION or "
            "XLA_PYTHON_CLIENT_PREALLOCATE=false)"));
  }
  // A private non-blocking stream, never the legacy default stream (which would serialise with
  // XLA's streams); waited for here, so the buffer is zero before anyone can launch.
  CUstream s = nullptr;
  rc = x->StreamCreate(&s, CU_STREAM_NON_BLOCKING);
  if (rc == CUDA_SUCCESS) rc = d->MemsetD8Async(g->ptr[r], 0, static_cast<size_t>(g->bytes), s);
  if (rc == CUDA_SUCCESS) rc = x->StreamSynchronize(s);
  if (s != nullptr) x->StreamDestroy(s);
  CUcontext popped = nullptr;
  d->CtxPopCurrent(&popped);
  if (rc != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(target, ": zeroing the symmetric buffer of rank ", r,
                                    " failed: ", cuda::error_string(d, rc)));
  }
  return ffi::Error::Success();
}

// Lets every rank's context reach every other rank's buffer (NVLink / PCIe peer access).
ffi::Error EnablePeerAccess(const cuda::Driver* d, const DriverExt* x, const SymmetricGroup& g,
                            const char* target) {
  const size_t n = g.ctx.size();
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) {
      if (i == j || g.ctx[i] == g.ctx[j]) continue;
      int can = 0;
      if (CUresult rc = x->DeviceCanAccessPeer(&can, g.device[i], g.device[j]);
          rc != CUDA_SUCCESS || can == 0) {
        return ffi::Error::InvalidArgument(
            cat(target, ": CUDA device ", g.device[i], " cannot access the memory of device ",
                g.device[j], rc != CUDA_SUCCESS ? cat(" (", cuda::error_string(d, rc), ")") : "",
                "; the fused expert-parallel kernel needs peer access (NVLink) between all ranks; "
                "use ep_moe's collective dispatch ('ragged' or 'padded') instead"));
      }
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (CUresult rc = d->CtxPushCurrent(g.ctx[i]); rc != CUDA_SUCCESS) {
      return ffi::Error::Internal(
          cat(target, ": cuCtxPushCurrent failed: ", cuda::error_string(d, rc)));
    }
    ffi::Error err = ffi::Error::Success();
    for (size_t j = 0; j < n && err.success(); ++j) {
      if (i == j || g.ctx[i] == g.ctx[j]) continue;
      CUresult rc = x->CtxEnablePeerAccess(g.ctx[j], 0);
      if (rc != CUDA_SUCCESS && rc != CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED) {
        err = ffi::Error::Internal(cat(target, ": cuCtxEnablePeerAccess(device ", g.device[i],
                                       " -> device ", g.device[j],
                                       ") failed: ", cuda::error_string(d, rc)));
      }
    }
    CUcontext popped = nullptr;
    d->CtxPopCurrent(&popped);
    if (!err.success()) return err;
  }
  return ffi::Error::Success();
}

}  // namespace

SymmetricGroup::~SymmetricGroup() {
  const cuda::Driver* d = cuda::driver(nullptr);
  const DriverExt* x = driver_ext(nullptr);
  if (d == nullptr || x == nullptr) return;
  for (size_t r = 0; r < ptr.size(); ++r) {
    // cuMemFree synchronises with the device work that may still use the buffer.
    if (ptr[r] == 0 || d->CtxPushCurrent(ctx[r]) != CUDA_SUCCESS) continue;
    x->MemFree(ptr[r]);
    CUcontext popped = nullptr;
    d->CtxPopCurrent(&popped);
  }
}

ffi::Error ResolveGroup(const cuda::Driver* d, const DriverExt* x, CUcontext own_ctx,
                        CUdevice own_device, int64_t num_ranks, const int64_t* table, int64_t size,
                        const char* target, RankPlacement* out) {
  out->rank = 0;
  out->devices = {own_device};
  out->ctx = {own_ctx};
  if (num_ranks <= 1) return ffi::Error::Success();
  int64_t group = 0, rank = 0;
  // CUdevice handles are the CUDA ordinals (cuDeviceGet(&h, i) gives h == i).
  if (!layout::rank_table_find(table, size, num_ranks, static_cast<int64_t>(own_device), &group,
                               &rank)) {
    return ffi::Error::InvalidArgument(
        cat(target, ": CUDA device ", own_device,
            " runs this call but is not in the rank table "
            "(attribute rank_devices); the fused expert-parallel path needs every device of the "
            "mesh in the table"));
  }
  int own_sms = 0, own_major = 0;
  x->DeviceGetAttribute(&own_sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, own_device);
  x->DeviceGetAttribute(&own_major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, own_device);
  out->rank = rank;
  out->devices.clear();
  out->ctx.clear();
  for (int64_t r = 0; r < num_ranks; ++r) {
    const int64_t ordinal = table[group * num_ranks + r];
    CUdevice peer = 0;
    if (CUresult rc = d->DeviceGet(&peer, static_cast<int>(ordinal)); rc != CUDA_SUCCESS) {
      return ffi::Error::InvalidArgument(
          cat(target, ": rank ", r, " of the group of device ", own_device, " is CUDA device ",
              ordinal, ", which does not exist: ", cuda::error_string(d, rc)));
    }
    // Every rank must launch the same kernel: same architecture, same SM count.
    int peer_sms = 0, peer_major = 0;
    x->DeviceGetAttribute(&peer_sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, peer);
    x->DeviceGetAttribute(&peer_major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, peer);
    if (peer_sms != own_sms || peer_major != own_major) {
      return ffi::Error::InvalidArgument(
          cat(target, ": the ranks' GPUs differ (device ", own_device, ": sm_", own_major,
              "x with ", own_sms, " SMs; device ", ordinal, ": sm_", peer_major, "x with ",
              peer_sms, " SMs); every rank must run the same kernel configuration"));
    }
    CUcontext primary = nullptr;
    if (ffi::Error e = PrimaryContext(d, static_cast<int32_t>(ordinal), &primary, target);
        !e.success()) {
      return e;
    }
    if (r == rank && primary != own_ctx) {
      return ffi::Error::Internal(
          cat(target, ": XLA's stream on device ", own_device,
              " is not in the device's primary "
              "context; the fused expert-parallel path maps peers through primary contexts"));
    }
    out->devices.push_back(peer);
    out->ctx.push_back(primary);
  }
  return ffi::Error::Success();
}

ffi::ErrorOr<std::shared_ptr<SymmetricGroup>> AcquireGroup(const cuda::Driver* d,
                                                           const DriverExt* x,
                                                           const RankPlacement& placement,
                                                           const std::vector<int64_t>& config,
                                                           uint64_t bytes, const char* target) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  const GroupKey key{placement.ctx, config};
  if (auto it = g_registry.find(key); it != g_registry.end()) {
    if (auto alive = it->second.lock()) return alive;
  }
  auto g = std::make_shared<SymmetricGroup>();
  g->ctx = placement.ctx;
  g->device = placement.devices;
  g->ptr.assign(placement.devices.size(), 0);
  g->bytes = (bytes + 15) / 16 * 16;
  for (size_t r = 0; r < g->ptr.size(); ++r) {
    if (ffi::Error e = AllocateZeroed(d, x, g.get(), r, target); !e.success()) {
      return ffi::Unexpected<ffi::Error>(std::move(e));
    }
  }
  if (g->ptr.size() > 1) {
    if (ffi::Error e = EnablePeerAccess(d, x, *g, target); !e.success()) {
      return ffi::Unexpected<ffi::Error>(std::move(e));
    }
  }
  g_registry[key] = g;
  return g;
}

}  // namespace jmm::host
