#include "handlers/mega_moe_sm90.h"

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <string>
#include <tuple>

#include "handlers/buffer_checks.h"
#include "handlers/host_glue.h"
#include "handlers/symmetric.h"
#include "common/export.h"
#include "common/status.h"
#include "cuda/driver.h"
#include "jit/compiler.h"
#include "jit/kernels.h"
#include "jit/loader.h"
#include "jit/mega_kernels.h"
#include "layout/rank_table.h"

namespace ffi = xla::ffi;

namespace jmm {
namespace {

constexpr const char* kTarget = "jax_megamoe_mega_moe_sm90";

using host::driver_ext;
using host::DriverExt;

// ---------------------------------------------------------------------------
// TMA descriptors (host-only cuTensorMapEncodeTiled; DeepGEMM's make_tma_2d_desc conventions:
// 2-D, inner dim first, outer stride in bytes, 128B swizzle -> inner box = 128 bytes,
// L2 promotion 256B, no OOB fill).
// ---------------------------------------------------------------------------
ffi::Error Encode2D(const cuda::Driver* d, const DriverExt* x, CUtensorMap* out, const char* what,
                    CUtensorMapDataType dtype, int64_t elem_size, const void* base,
                    int64_t inner, int64_t outer, int64_t outer_stride_elems, int64_t box_inner,
                    int64_t box_outer, int swizzle_bytes) {
  if (swizzle_bytes != 0) box_inner = swizzle_bytes / elem_size;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(outer)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(outer_stride_elems * elem_size)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_inner), static_cast<cuuint32_t>(box_outer)};
  const cuuint32_t elem_strides[2] = {1, 1};
  CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_NONE;
  if (swizzle_bytes == 32) swizzle = CU_TENSOR_MAP_SWIZZLE_32B;
  if (swizzle_bytes == 64) swizzle = CU_TENSOR_MAP_SWIZZLE_64B;
  if (swizzle_bytes == 128) swizzle = CU_TENSOR_MAP_SWIZZLE_128B;
  std::memset(out, 0, sizeof(*out));
  CUresult r = x->TensorMapEncodeTiled(out, dtype, 2, const_cast<void*>(base), dims, strides, box,
                                       elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                       CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(kTarget, ": cuTensorMapEncodeTiled(", what, ": dims ", inner,
                                    "x", outer, ", box ", box_inner, "x", box_outer, ", swizzle ",
                                    swizzle_bytes, ", base ", base, ") failed: ",
                                    cuda::error_string(d, r)));
  }
  return ffi::Error::Success();
}

}  // namespace

// Per-device prepared launch.
struct MegaMoeSm90Device {
  int32_t device = -1;
  CUcontext ctx = nullptr;
  int64_t num_tokens = 0;
  layout::Sm90MegaConfig config;
  std::shared_ptr<const jit::LoadedKernel> mega;
  CUfunction mega_fn = nullptr;
  CUfunction pre_fn = nullptr;
  int64_t rank = 0;                       // this device's rank in its group
  std::shared_ptr<host::SymmetricGroup> buffer;  // the group's buffers; this rank's is ptr[rank]
  jit::Sm90SymBuffer sym{};
  CUtensorMap l1_acts{}, l1_acts_sf{}, l1_output{}, l2_acts{}, l2_acts_sf{};
  std::string cubin_path;
  // weight descriptors, cached by operand pointer
  std::mutex mu;
  const void* l1w_ptr = nullptr;
  const void* l2w_ptr = nullptr;
  CUtensorMap l1w{}, l2w{};
};

ffi::TypeId MegaMoeSm90State::id = XLA_FFI_UNKNOWN_TYPE_ID;

MegaMoeSm90State::~MegaMoeSm90State() = default;

namespace {

constexpr XLA_FFI_TypeInfo kMegaMoeSm90StateTypeInfo = ffi::MakeTypeInfo<MegaMoeSm90State>();

ffi::Error Expect(const char* role, const char* name, const ffi::AnyBuffer& b, ffi::DataType t,
                  std::initializer_list<int64_t> dims) {
  return ExpectBuffer(kTarget, role, name, b, t, dims);
}

// Checks every operand against the state; returns T in *t_out.
ffi::Error ValidateBuffers(const MegaMoeSm90State* st, const ffi::AnyBuffer& x,
                           const ffi::AnyBuffer& topk_idx, const ffi::AnyBuffer& topk_weights,
                           const ffi::AnyBuffer& l1, const ffi::AnyBuffer& l1_sf,
                           const ffi::AnyBuffer& l2, const ffi::AnyBuffer& l2_sf,
                           const ffi::AnyBuffer& y, int64_t* t_out) {
  const int64_t H = st->shape.hidden, I = st->shape.intermediate;
  const int64_t E = st->shape.num_experts / st->shape.num_ranks;  // the weights hold this rank's experts
  const int64_t K = st->shape.top_k, P = st->shape.capacity;
  const auto xd = x.dimensions();
  if (x.element_type() != ffi::DataType::BF16 || xd.size() != 2 || xd[1] != H) {
    return ffi::Error::InvalidArgument(cat(kTarget, ": operand 'x' must be bf16[T,", H, "], got ",
                                           Shape(x.element_type(), xd)));
  }
  const int64_t T = xd[0];
  if (T > P) {
    return ffi::Error::InvalidArgument(
        cat(kTarget, ": operand 'x' has T=", T, " tokens, more than capacity=", P));
  }
  ffi::Error e = Expect("operand", "topk_idx", topk_idx, ffi::DataType::S32, {T, K});
  if (e.success()) e = Expect("operand", "topk_weights", topk_weights, ffi::DataType::F32, {T, K});
  if (e.success()) e = Expect("operand", "l1", l1, ffi::DataType::F8E4M3FN, {E, 2 * I, H});
  if (e.success()) {
    e = Expect("operand", "l1_sf", l1_sf, ffi::DataType::F32, {E, 2 * I / 128, H / 128});
  }
  if (e.success()) e = Expect("operand", "l2", l2, ffi::DataType::F8E4M3FN, {E, H, I});
  if (e.success()) {
    e = Expect("operand", "l2_sf", l2_sf, ffi::DataType::F32, {E, H / 128, I / 128});
  }
  if (e.success()) e = Expect("result", "y", y, ffi::DataType::BF16, {T, H});
  if (!e.success()) return e;
  *t_out = T;
  return ffi::Error::Success();
}

ffi::ErrorOr<std::unique_ptr<MegaMoeSm90State>> Instantiate(
    int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k, int64_t capacity,
    float activation_clamp, bool fast_math, int64_t num_sms, int64_t reserved_sms, float rsf,
    int64_t num_ranks, ffi::Span<const int64_t> rank_devices) {
  const auto invalid = [](std::string m) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(cat(kTarget, ": ", m)));
  };
  std::string why;
  if (!layout::rank_table_valid(rank_devices.begin(), static_cast<int64_t>(rank_devices.size()),
                                num_ranks, &why)) {
    return invalid(why);
  }
  layout::Sm90MegaShape shape;
  shape.num_ranks = num_ranks;
  shape.num_experts = num_experts;
  shape.capacity = capacity;
  shape.top_k = top_k;
  shape.hidden = hidden;
  shape.intermediate = intermediate;
  if (!layout::sm90_mega_shape_valid(shape, &why)) return invalid(why);
  if (std::isnan(activation_clamp) || activation_clamp < 0.0f) {
    return invalid(cat("attribute activation_clamp=", activation_clamp,
                       " must be >= 0 (+inf: no clamp)"));
  }
  if (num_sms < 0 || (num_sms > 0 && (num_sms < 2 || num_sms % 2 != 0))) {
    return invalid(cat("attribute num_sms=", num_sms,
                       " must be 0 (device SM count minus reserved_sms) or even and >= 2"));
  }
  if (reserved_sms < 0) return invalid(cat("attribute reserved_sms=", reserved_sms, " must be >= 0"));
  if (!std::isfinite(rsf)) {
    return invalid(cat("attribute routed_scaling_factor=", rsf, " must be finite"));
  }
  jit::CompiledKernel compiled;
  if (!jit::jit_compile(jit::pre_dispatch_source(90, jit::kMmaNone), &compiled, &why)) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::Internal(cat(kTarget, ": ", why)));
  }
  auto pre = jit::load_kernel(compiled.cubin_path, compiled.symbol, &why);
  if (!pre) return ffi::Unexpected<ffi::Error>(ffi::Error::Internal(cat(kTarget, ": ", why)));
  auto st = std::make_unique<MegaMoeSm90State>();
  st->shape = shape;
  st->layout = layout::sm90_mega_layout(shape);
  st->activation_clamp = activation_clamp;
  st->fast_math = fast_math;
  st->num_sms_attr = num_sms;
  st->reserved_sms = reserved_sms;
  st->routed_scaling_factor = rsf;
  st->rank_devices.assign(rank_devices.begin(), rank_devices.end());
  st->pre_dispatch = std::move(pre);
  return st;
}

// Builds the device entry: config, compile + load, smem attribute, residency check, buffer, TMA.
ffi::Error Prepare(const cuda::Driver* d, const DriverExt* x, MegaMoeSm90State* st,
                   CUcontext ctx, int32_t device, int64_t T,
                   std::unique_ptr<MegaMoeSm90Device>* out) {
  auto e = std::make_unique<MegaMoeSm90Device>();
  e->device = device;
  e->ctx = ctx;
  e->num_tokens = T;
  CUdevice dev = 0;
  if (CUresult r = x->CtxGetDevice(&dev); r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(kTarget, ": cuCtxGetDevice failed: ", cuda::error_string(d, r)));
  }
  int sm_count = 0, major = 0;
  x->DeviceGetAttribute(&sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
  x->DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  if (major != 9) {
    return ffi::Error::InvalidArgument(cat(kTarget, ": needs an sm_90 GPU (H100/H200), device ",
                                           device, " has compute capability ", major, ".x"));
  }
  int64_t num_sms = st->num_sms_attr;
  if (num_sms == 0) {
    num_sms = sm_count - st->reserved_sms;
    num_sms -= num_sms % 2;
  }
  if (num_sms < 2 || num_sms > sm_count) {
    return ffi::Error::InvalidArgument(cat(kTarget, ": num_sms=", num_sms, " (attribute num_sms=",
                                           st->num_sms_attr, ", reserved_sms=", st->reserved_sms,
                                           ") must be in [2, ", sm_count,
                                           "] (the device's SM count)"));
  }
  std::string why;
  if (!layout::sm90_mega_config(st->shape, st->layout, std::max<int64_t>(T, 1), num_sms,
                                st->activation_clamp, st->fast_math, &e->config, &why)) {
    return ffi::Error::InvalidArgument(cat(kTarget, ": ", why));
  }
  const layout::Sm90MegaConfig& c = e->config;

  // Compile (disk/memory cache) and load the mega kernel.
  jit::CompiledKernel compiled;
  {
    // nvcc runs as a subprocess; nothing is enqueued on any stream.
    if (!jit::jit_compile(jit::mega_moe_sm90_source(c), &compiled, &why)) {
      return ffi::Error::Internal(cat(kTarget, ": ", why));
    }
  }
  e->cubin_path = compiled.cubin_path;
  e->mega = jit::load_kernel(compiled.cubin_path, compiled.symbol, &why);
  if (!e->mega) return ffi::Error::Internal(cat(kTarget, ": ", why));
  if (ffi::Error err = host::FunctionOf(d, *e->mega, &e->mega_fn, kTarget); !err.success()) return err;
  if (ffi::Error err = host::FunctionOf(d, *st->pre_dispatch, &e->pre_fn, kTarget); !err.success()) return err;
  if (CUresult r = x->FuncSetAttribute(e->mega_fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       static_cast<int>(c.smem_size));
      r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(kTarget, ": cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, ",
                                    c.smem_size, ") failed: ", cuda::error_string(d, r)));
  }

  // The kernel's grid barriers spin: all num_sms CTAs (clusters) must be resident at once.
  if (c.cluster_size > 1) {
    CUlaunchAttribute attr{};
    attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = static_cast<unsigned>(c.cluster_size);
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    CUlaunchConfig lc{};
    lc.gridDimX = static_cast<unsigned>(c.num_sms);
    lc.gridDimY = lc.gridDimZ = 1;
    lc.blockDimX = static_cast<unsigned>(c.num_threads);
    lc.blockDimY = lc.blockDimZ = 1;
    lc.sharedMemBytes = static_cast<unsigned>(c.smem_size);
    lc.attrs = &attr;
    lc.numAttrs = 1;
    int clusters = 0;
    if (CUresult r = x->OccupancyMaxActiveClusters(&clusters, e->mega_fn, &lc); r != CUDA_SUCCESS) {
      return ffi::Error::Internal(cat(kTarget, ": cuOccupancyMaxActiveClusters failed: ",
                                      cuda::error_string(d, r)));
    }
    if (static_cast<int64_t>(clusters) * c.cluster_size < c.num_sms) {
      return ffi::Error::InvalidArgument(
          cat(kTarget, ": only ", clusters, " clusters of ", c.cluster_size,
              " CTAs can be resident, the persistent kernel needs ", c.num_sms,
              " CTAs at once; lower num_sms (or raise reserved_sms)"));
    }
  } else {
    int blocks = 0;
    if (CUresult r = x->OccupancyMaxActiveBlocksPerMultiprocessor(
            &blocks, e->mega_fn, static_cast<int>(c.num_threads), static_cast<size_t>(c.smem_size));
        r != CUDA_SUCCESS || blocks < 1) {
      return ffi::Error::InvalidArgument(cat(kTarget, ": the kernel (", c.num_threads, " threads, ",
                                             c.smem_size, " B shared memory) cannot be resident: ",
                                             r != CUDA_SUCCESS ? cuda::error_string(d, r)
                                                               : std::string("0 blocks per SM")));
    }
  }

  // This device's rank and its group's buffers (allocated for the whole group at once).
  const std::vector<int64_t> config{90, st->shape.num_experts, st->shape.capacity, st->shape.top_k,
                                    st->shape.hidden, st->shape.intermediate, c.num_sms,
                                    st->shape.num_ranks};
  if (ffi::Error err = host::JoinGroup(d, x, ctx, dev, st->shape.num_ranks, st->rank_devices, config,
                                       st->layout.num_bytes, kTarget, &e->buffer, &e->rank, &e->sym);
      !err.success()) {
    return err;
  }
  const CUdeviceptr base = e->buffer->ptr[e->rank];

  // Descriptors of the buffer's slices (fixed for the entry's lifetime).
  const layout::Sm90MegaLayout& l = st->layout;
  const int64_t H = c.hidden, I = c.intermediate, D = l.num_data_pool_tokens;
  const int64_t S = l.num_padded_sf_pool_tokens;
  const auto at = [&](uint64_t off) { return reinterpret_cast<const void*>(base + off); };
  ffi::Error err = Encode2D(d, x, &e->l1_acts, "l1_acts", CU_TENSOR_MAP_DATA_TYPE_UINT8, 1,
                            at(l.l1_acts), H, D, H, c.block_k, c.block_m, 128);
  if (err.success()) {
    err = Encode2D(d, x, &e->l1_acts_sf, "l1_acts_sf", CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4,
                   at(l.l1_acts_sf), S, H / 128, S, c.block_m, 1, 0);
  }
  if (err.success()) {
    err = Encode2D(d, x, &e->l1_output, "l1_output", CU_TENSOR_MAP_DATA_TYPE_UINT8, 1,
                   at(l.l2_acts), I, D, I, c.l1_output_box_n, c.l1_output_box_m,
                   static_cast<int>(c.l1_output_swizzle));
  }
  if (err.success()) {
    err = Encode2D(d, x, &e->l2_acts, "l2_acts", CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, at(l.l2_acts),
                   I, D, I, c.block_k, c.block_m, 128);
  }
  if (err.success()) {
    err = Encode2D(d, x, &e->l2_acts_sf, "l2_acts_sf", CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4,
                   at(l.l2_acts_sf), S, I / 128, S, c.block_m, 1, 0);
  }
  if (!err.success()) return err;
  *out = std::move(e);
  return ffi::Error::Success();
}

ffi::Error Initialize(CUstream stream, int32_t device, MegaMoeSm90State* st, ffi::AnyBuffer x,
                      ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights, ffi::AnyBuffer l1,
                      ffi::AnyBuffer l1_sf, ffi::AnyBuffer l2, ffi::AnyBuffer l2_sf,
                      ffi::Result<ffi::AnyBuffer> y) {
  int64_t T = 0;
  if (ffi::Error e = ValidateBuffers(st, x, topk_idx, topk_weights, l1, l1_sf, l2, l2_sf, *y, &T);
      !e.success()) {
    return e;
  }
  if (device < 0 || device >= MegaMoeSm90State::kMaxDevices) {
    return ffi::Error::InvalidArgument(cat(kTarget, ": device ordinal ", device, " out of range"));
  }
  if (MegaMoeSm90Device* e = st->devices[device].load(std::memory_order_acquire);
      e != nullptr && e->num_tokens == T) {
    return ffi::Error::Success();  // prepared by an earlier run
  }
  std::lock_guard<std::mutex> lock(st->mu);
  if (MegaMoeSm90Device* e = st->devices[device].load(std::memory_order_acquire);
      e != nullptr && e->num_tokens == T) {
    return ffi::Error::Success();
  }
  const cuda::Driver* d = nullptr;
  const DriverExt* dx = nullptr;
  host::ContextScope scope;
  CUcontext ctx = nullptr;
  if (ffi::Error e = host::Begin(stream, device, kTarget, &scope, &d, &dx, &ctx); !e.success()) {
    return e;
  }
  if (ffi::Error e = host::RefuseCapture(d, stream, kTarget); !e.success()) return e;
  std::unique_ptr<MegaMoeSm90Device> entry;
  if (ffi::Error e = Prepare(d, dx, st, ctx, device, T, &entry); !e.success()) return e;
  st->devices[device].store(entry.get(), std::memory_order_release);
  st->owned.push_back(std::move(entry));
  return ffi::Error::Success();
}

ffi::Error Execute(CUstream stream, int32_t device, MegaMoeSm90State* st, ffi::AnyBuffer x,
                   ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights, ffi::AnyBuffer l1,
                   ffi::AnyBuffer l1_sf, ffi::AnyBuffer l2, ffi::AnyBuffer l2_sf,
                   ffi::Result<ffi::AnyBuffer> y) {
  int64_t T = 0;
  if (ffi::Error e = ValidateBuffers(st, x, topk_idx, topk_weights, l1, l1_sf, l2, l2_sf, *y, &T);
      !e.success()) {
    return e;
  }
  if (T == 0) return ffi::Error::Success();
  MegaMoeSm90Device* e = (device >= 0 && device < MegaMoeSm90State::kMaxDevices)
                             ? st->devices[device].load(std::memory_order_acquire)
                             : nullptr;
  if (e == nullptr || e->num_tokens != T) {
    return ffi::Error::Internal(cat(kTarget, ": not initialized for device ", device, " and T=", T,
                                    " (XLA skipped the initialize stage); execute never compiles "
                                    "or allocates"));
  }
  const layout::Sm90MegaConfig& c = e->config;
  const layout::Sm90MegaLayout& l = st->layout;
  const cuda::Driver* d = nullptr;
  const DriverExt* dx = nullptr;
  host::ContextScope scope;
  CUcontext ctx = nullptr;
  if (ffi::Error err = host::Begin(stream, device, kTarget, &scope, &d, &dx, &ctx); !err.success()) {
    return err;
  }
  if (ctx != e->ctx) {
    return ffi::Error::Internal(cat(kTarget, ": the stream's CUDA context changed since initialize"));
  }
  for (const auto* p : {l1.untyped_data(), l2.untyped_data(), y->untyped_data()}) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
      return ffi::Error::InvalidArgument(cat(kTarget, ": operands l1, l2 and result y must be "
                                             "16-byte aligned (TMA)"));
    }
  }

  // 1. Pre-dispatch into the buffer's input slots (x, x_sf, topk_idx, topk_weights; P rows).
  const int64_t H = c.hidden, K = c.top_k, P = c.num_max_tokens_per_rank;
  const CUdeviceptr base = e->buffer->ptr[e->rank];
  {
    jit::Sm90PreDispatchArgs a{x.untyped_data(),
                               topk_idx.untyped_data(),
                               topk_weights.untyped_data(),
                               reinterpret_cast<void*>(base + l.x),
                               reinterpret_cast<void*>(base + l.x_sf),
                               reinterpret_cast<void*>(base + l.topk_idx),
                               reinterpret_cast<void*>(base + l.topk_weights),
                               static_cast<uint32_t>(T),
                               static_cast<uint32_t>(P),
                               static_cast<uint32_t>(H),
                               static_cast<uint32_t>(H / 128),
                               static_cast<uint32_t>(K),
                               st->routed_scaling_factor};
    void* params[] = {&a.x,          &a.topk_idx,   &a.topk_weights,     &a.buf_x,
                      &a.buf_x_sf,   &a.buf_topk_idx, &a.buf_topk_weights, &a.num_tokens,
                      &a.padded_max, &a.hidden,     &a.num_groups,       &a.top_k,
                      &a.routed_scaling_factor};
    const int64_t threads = H / 8;
    const int64_t blocks = T + ((P - T) * K + threads - 1) / threads;
    if (CUresult r = d->LaunchKernel(e->pre_fn, static_cast<unsigned>(blocks), 1, 1,
                                     static_cast<unsigned>(threads), 1, 1, 0, stream, params,
                                     nullptr);
        r != CUDA_SUCCESS) {
      return ffi::Error::Internal(cat(kTarget, ": launching the pre-dispatch kernel (grid ", blocks,
                                      ", block ", threads, ") failed: ", cuda::error_string(d, r)));
    }
  }

  // 2. The mega kernel.
  jit::Sm90MegaMoeArgs a;
  std::memset(&a, 0, sizeof(a));
  a.y = y->untyped_data();
  a.cumulative_local_expert_recv_stats = nullptr;
  a.num_tokens = static_cast<uint32_t>(T);
  a.sym_buffer = e->sym;
  a.l1_acts = e->l1_acts;
  a.l1_acts_sf = e->l1_acts_sf;
  a.l1_weights_sf = static_cast<const float*>(l1_sf.untyped_data());
  a.l1_output = e->l1_output;
  a.l2_acts = e->l2_acts;
  a.l2_acts_sf = e->l2_acts_sf;
  a.l2_weights_sf = static_cast<const float*>(l2_sf.untyped_data());
  a.trace = nullptr;
  {
    std::lock_guard<std::mutex> lock(e->mu);
    const int64_t I = c.intermediate, e_local = st->layout.num_experts_per_rank;
    if (e->l1w_ptr != l1.untyped_data()) {
      if (ffi::Error err = Encode2D(d, dx, &e->l1w, "l1_weights", CU_TENSOR_MAP_DATA_TYPE_UINT8, 1,
                                    l1.untyped_data(), H, e_local * 2 * I, H, c.block_k,
                                    c.weight_tma_block_n, 128);
          !err.success()) {
        e->l1w_ptr = nullptr;
        return err;
      }
      e->l1w_ptr = l1.untyped_data();
    }
    if (e->l2w_ptr != l2.untyped_data()) {
      if (ffi::Error err = Encode2D(d, dx, &e->l2w, "l2_weights", CU_TENSOR_MAP_DATA_TYPE_UINT8, 1,
                                    l2.untyped_data(), I, e_local * H, I, c.block_k,
                                    c.weight_tma_block_n, 128);
          !err.success()) {
        e->l2w_ptr = nullptr;
        return err;
      }
      e->l2w_ptr = l2.untyped_data();
    }
    a.l1_weights = e->l1w;
    a.l2_weights = e->l2w;
  }
  void* params[jit::kSm90MegaMoeNumParams] = {
      &a.y,        &a.cumulative_local_expert_recv_stats, &a.num_tokens, &a.sym_buffer,
      &a.l1_acts,  &a.l1_acts_sf, &a.l1_weights, &a.l1_weights_sf, &a.l1_output,
      &a.l2_acts,  &a.l2_acts_sf, &a.l2_weights, &a.l2_weights_sf, &a.trace};
  CUlaunchAttribute attr{};
  attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
  attr.value.clusterDim.x = static_cast<unsigned>(c.cluster_size);
  attr.value.clusterDim.y = 1;
  attr.value.clusterDim.z = 1;
  CUlaunchConfig lc{};
  lc.gridDimX = static_cast<unsigned>(c.num_sms);
  lc.gridDimY = lc.gridDimZ = 1;
  lc.blockDimX = static_cast<unsigned>(c.num_threads);
  lc.blockDimY = lc.blockDimZ = 1;
  lc.sharedMemBytes = static_cast<unsigned>(c.smem_size);
  lc.hStream = stream;
  lc.attrs = c.cluster_size > 1 ? &attr : nullptr;
  lc.numAttrs = c.cluster_size > 1 ? 1 : 0;
  if (CUresult r = dx->LaunchKernelEx(&lc, e->mega_fn, params, nullptr); r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(kTarget, ": cuLaunchKernelEx(", e->mega->symbol, ", grid ",
                                    c.num_sms, ", block ", c.num_threads, ", cluster ",
                                    c.cluster_size, ", smem ", c.smem_size,
                                    ") failed: ", cuda::error_string(d, r)));
  }
  host::CountExecute(d, stream);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// C API helpers (tests, tooling): no GPU needed.
// ---------------------------------------------------------------------------
layout::Sm90MegaShape ShapeOf(int64_t E, int64_t P, int64_t K, int64_t H, int64_t I, int64_t R) {
  layout::Sm90MegaShape s;
  s.num_ranks = R;
  s.num_experts = E;
  s.capacity = P;
  s.top_k = K;
  s.hidden = H;
  s.intermediate = I;
  return s;
}

bool ConfigOf(int64_t E, int64_t P, int64_t K, int64_t H, int64_t I, int64_t R, int64_t T,
              int64_t num_sms, float clamp, int fast_math, layout::Sm90MegaConfig* c) {
  const auto s = ShapeOf(E, P, K, H, I, R);
  std::string why;
  if (!layout::sm90_mega_shape_valid(s, &why)) {
    set_last_error(why);
    return false;
  }
  if (!layout::sm90_mega_config(s, layout::sm90_mega_layout(s), T, num_sms, clamp, fast_math != 0,
                                c, &why)) {
    set_last_error(why);
    return false;
  }
  return true;
}

}  // namespace
}  // namespace jmm

// ---------------------------------------------------------------------------
// Exported symbols (see ffi/exports.map; Python: jax_megamoe/_ffi.py, tests).
// ---------------------------------------------------------------------------

JMM_EXPORT XLA_FFI_TypeId* jmm_mega_moe_sm90_state_type_id() { return &jmm::MegaMoeSm90State::id; }
JMM_EXPORT const XLA_FFI_TypeInfo* jmm_mega_moe_sm90_state_type_info() {
  return &jmm::kMegaMoeSm90StateTypeInfo;
}

// Symmetric-buffer layout of (E, P, K, H, I) with R ranks (one rank's buffer). Writes min(n, 16) int64 values:
// [workspace_bytes, x, x_sf, topk_idx, topk_weights, l1_acts, l1_acts_sf, l1_topk_weights,
//  l2_acts, l2_acts_sf, combine, num_bytes, num_max_pool_tokens, num_data_pool_tokens,
//  num_padded_sf_pool_tokens, num_experts_per_rank]. Returns the count, or -1 (jmm_last_error).
JMM_EXPORT int jmm_sm90_mega_layout(int64_t E, int64_t P, int64_t K, int64_t H, int64_t I,
                                    int64_t R, int64_t* out, int n) {
  const auto s = jmm::ShapeOf(E, P, K, H, I, R);
  std::string why;
  if (!jmm::layout::sm90_mega_shape_valid(s, &why)) {
    jmm::set_last_error(why);
    return -1;
  }
  const auto l = jmm::layout::sm90_mega_layout(s);
  const int64_t v[16] = {static_cast<int64_t>(l.workspace_bytes), static_cast<int64_t>(l.x),
                         static_cast<int64_t>(l.x_sf), static_cast<int64_t>(l.topk_idx),
                         static_cast<int64_t>(l.topk_weights), static_cast<int64_t>(l.l1_acts),
                         static_cast<int64_t>(l.l1_acts_sf),
                         static_cast<int64_t>(l.l1_topk_weights), static_cast<int64_t>(l.l2_acts),
                         static_cast<int64_t>(l.l2_acts_sf), static_cast<int64_t>(l.combine),
                         static_cast<int64_t>(l.num_bytes), l.num_max_pool_tokens,
                         l.num_data_pool_tokens, l.num_padded_sf_pool_tokens,
                         l.num_experts_per_rank};
  int i = 0;
  for (; out != nullptr && i < n && i < 16; ++i) out[i] = v[i];
  return i;
}

// Kernel configuration for a call of T tokens on num_sms SMs. Writes min(n, 40) int64 values in
// the order of jax_megamoe's tests (tests/test_mega_layout_sm90.py, SM90_CONFIG_FIELDS).
JMM_EXPORT int jmm_sm90_mega_config(int64_t E, int64_t P, int64_t K, int64_t H, int64_t I,
                                    int64_t R, int64_t T, int64_t num_sms, float clamp, int fast_math,
                                    int64_t* out, int n) {
  jmm::layout::Sm90MegaConfig c;
  if (!jmm::ConfigOf(E, P, K, H, I, R, T, num_sms, clamp, fast_math, &c)) return -1;
  const int64_t v[] = {c.num_max_tokens_per_rank, c.hidden, c.intermediate, c.num_experts,
                       c.top_k, c.num_experts_per_wave, c.block_m, c.block_n, c.block_k,
                       c.num_max_pool_tokens, c.num_padded_sf_pool_tokens, c.num_ring_tokens,
                       c.num_stages, c.num_dispatch_threads, c.num_non_epilogue_threads,
                       c.num_epilogue_threads, c.num_sms, c.num_ranks,
                       c.epilogue_register_budget, c.reuse_accum_as_final, c.l2_arrival_counter,
                       c.l2_epilogue_requires_full_sync, c.half_l2_cd, c.cluster_size,
                       c.multicast_on_b, c.l2_lag_units, c.l2_cd_passes, c.l2_stage_mode, c.pdl,
                       c.early_combine, c.pull_publish_batch, c.pull_eager_publish,
                       c.num_threads, c.smem_size, c.host_smem_size, c.kernel_smem_bytes,
                       c.tile_table_entries, c.l1_output_box_n, c.l1_output_box_m,
                       c.l1_output_swizzle};
  return jmm::copy_out(v, out, n);
}

// kernel.cu of the mega kernel for that configuration. Returns the length (>= cap: truncated),
// or -1 (jmm_last_error).
JMM_EXPORT int jmm_sm90_mega_render(int64_t E, int64_t P, int64_t K, int64_t H, int64_t I,
                                    int64_t R, int64_t T, int64_t num_sms, float clamp, int fast_math,
                                    char* out, size_t cap) {
  jmm::layout::Sm90MegaConfig c;
  if (!jmm::ConfigOf(E, P, K, H, I, R, T, num_sms, clamp, fast_math, &c)) return -1;
  return static_cast<int>(jmm::copy_out(jmm::jit::mega_moe_sm90_source(c).source, out, cap));
}

// Compiles (or finds in the caches) that kernel; writes the cubin path. 0 on success.
JMM_EXPORT int jmm_sm90_mega_compile(int64_t E, int64_t P, int64_t K, int64_t H, int64_t I,
                                     int64_t R, int64_t T, int64_t num_sms, float clamp, int fast_math,
                                     char* cubin_path_out, size_t cap, char* err_out,
                                     size_t err_cap) {
  jmm::layout::Sm90MegaConfig c;
  if (!jmm::ConfigOf(E, P, K, H, I, R, T, num_sms, clamp, fast_math, &c)) {
    jmm::copy_out(jmm::last_error(), err_out, err_cap);
    return 1;
  }
  jmm::jit::CompiledKernel compiled;
  std::string why;
  if (!jmm::jit::jit_compile(jmm::jit::mega_moe_sm90_source(c), &compiled, &why)) {
    jmm::set_last_error(why);
    jmm::copy_out(why, err_out, err_cap);
    return 1;
  }
  jmm::copy_out(compiled.cubin_path, cubin_path_out, cap);
  jmm::copy_out("", err_out, err_cap);
  return 0;
}

#define JMM_MEGA_INSTANTIATE_BINDING              \
  ffi::Ffi::BindInstantiate()                     \
      .Attr<int64_t>("hidden")                    \
      .Attr<int64_t>("intermediate")              \
      .Attr<int64_t>("num_experts")               \
      .Attr<int64_t>("top_k")                     \
      .Attr<int64_t>("capacity")                  \
      .Attr<float>("activation_clamp")            \
      .Attr<bool>("fast_math")                    \
      .Attr<int64_t>("num_sms")                   \
      .Attr<int64_t>("reserved_sms")              \
      .Attr<float>("routed_scaling_factor")       \
      .Attr<int64_t>("num_ranks")                 \
      .Attr<ffi::Span<const int64_t>>("rank_devices")
#define JMM_MEGA_BUFFERS                          \
  .Arg<ffi::AnyBuffer>() /* x */                  \
      .Arg<ffi::AnyBuffer>() /* topk_idx */       \
      .Arg<ffi::AnyBuffer>() /* topk_weights */   \
      .Arg<ffi::AnyBuffer>() /* l1 */             \
      .Arg<ffi::AnyBuffer>() /* l1_sf */          \
      .Arg<ffi::AnyBuffer>() /* l2 */             \
      .Arg<ffi::AnyBuffer>() /* l2_sf */          \
      .Ret<ffi::AnyBuffer>() /* y */
#define JMM_MEGA_INITIALIZE_BINDING                          \
  ffi::Ffi::Bind<ffi::ExecutionStage::kInitialize>()         \
      .Ctx<ffi::PlatformStream<CUstream>>()                  \
      .Ctx<ffi::DeviceOrdinal>()                             \
      .Ctx<ffi::State<jmm::MegaMoeSm90State>>() JMM_MEGA_BUFFERS
#define JMM_MEGA_EXECUTE_BINDING                             \
  ffi::Ffi::Bind()                                           \
      .Ctx<ffi::PlatformStream<CUstream>>()                  \
      .Ctx<ffi::DeviceOrdinal>()                             \
      .Ctx<ffi::State<jmm::MegaMoeSm90State>>() JMM_MEGA_BUFFERS

JMM_EXPORT XLA_FFI_Error* jmm_mega_moe_sm90_instantiate(XLA_FFI_CallFrame*);
JMM_EXPORT XLA_FFI_Error* jmm_mega_moe_sm90_initialize(XLA_FFI_CallFrame*);
JMM_EXPORT XLA_FFI_Error* jmm_mega_moe_sm90_execute(XLA_FFI_CallFrame*);

// Plain target: XLA runs it outside CUDA graphs.
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmm_mega_moe_sm90_instantiate, jmm::Instantiate,
                              JMM_MEGA_INSTANTIATE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmm_mega_moe_sm90_initialize, jmm::Initialize,
                              JMM_MEGA_INITIALIZE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmm_mega_moe_sm90_execute, jmm::Execute, JMM_MEGA_EXECUTE_BINDING);

// `_graph` target: the same code, declared command-buffer compatible, so that XLA may trace the
// custom call into its CUDA graphs (jax_megamoe.ops uses it with JAX_MEGAMOE_GRAPH_TARGETS=1).
// Safe because initialize (allocation, zeroing, compilation, module loading, peer access) runs
// outside any capture and refuses to run inside one, and execute only launches: the two launches
// and their by-value arguments (buffer TMA descriptors, the pointer table, the weight descriptors
// encoded on the host from the operands' addresses at trace time) are what the graph records.
// The persistent kernel carries its barrier state in the symmetric buffer, which DeepGEMM builds
// for graph replay.
JMM_EXPORT XLA_FFI_Error* jmm_mega_moe_sm90_graph_instantiate(XLA_FFI_CallFrame*);
JMM_EXPORT XLA_FFI_Error* jmm_mega_moe_sm90_graph_initialize(XLA_FFI_CallFrame*);
JMM_EXPORT XLA_FFI_Error* jmm_mega_moe_sm90_graph_execute(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmm_mega_moe_sm90_graph_instantiate, jmm::Instantiate,
                              JMM_MEGA_INSTANTIATE_BINDING, {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmm_mega_moe_sm90_graph_initialize, jmm::Initialize,
                              JMM_MEGA_INITIALIZE_BINDING, {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmm_mega_moe_sm90_graph_execute, jmm::Execute,
                              JMM_MEGA_EXECUTE_BINDING, {ffi::Traits::kCmdBufferCompatible});
