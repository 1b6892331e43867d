// The XLA FFI handler of DeepGEMM's fused Mega MoE, written once for both architectures:
// jax_megamoe_mega_moe_sm90 (handlers/mega_moe_sm90.cc) and jax_megamoe_mega_moe_sm100
// (handlers/mega_moe_sm100.cc) instantiate these templates with an `Arch` class holding only what
// differs: the layout and heuristics (layout/sm90_mega_moe.h, sm100_mega_moe.h), the weight
// operands' dtypes and shapes, the device resources beyond the symmetric buffer, the TMA
// descriptors and the kernel arguments. Everything else is here: attribute checks, the buffer
// checks, the per-device state lookup, instantiate / initialize / execute, the residency check,
// the two launches. (The C test API over these templates is common/c_api_testing.cc.)
//
// Operands: x bf16[T,H], topk_idx s32[T,K] (global expert ids, -1 = skip), topk_weights f32[T,K],
//           then this rank's E_l = E / num_ranks experts: l1, l1_sf, l2, l2_sf (Arch::Weights).
// Result:   y bf16[T,H] (rows whose top-k slots are all -1 are exactly 0).
// Attributes (MegaMoeAttrs, decoded by XLA into the struct by name; a missing, extra or
//   mistyped attribute is XLA's "Wrong number of attributes" / "Wrong attribute type" error):
//   hidden, intermediate, num_experts, top_k i64; capacity i64 (token cap P, T <= P, a multiple
//   of the arch's token alignment); activation_clamp f32 (+inf = no clamp, else >= 0);
//   fast_math bool; reserved_sms i64 (>= 0: the kernel runs on the device's SM count minus
//   reserved_sms, rounded down to even); routed_scaling_factor f32 (finite); num_ranks i64 and
//   rank_devices i64[] (the rank table of layout/rank_table.h; may be empty for one rank);
//   sm_90 also sm90_wide_tile bool, sm_100 also mma_kind (jmm::MmaKind). The arch's own
//   kernel choices that are not part of the shape (sm_90's sm90_wide_tile) are its Options, taken
//   from the attributes (Arch::OptionsOf) or from the C test API's jmm_mega_call
//   (common/c_api_testing.cc), and passed to Arch::Plan.
//
// Stages:
//   instantiate  validate the attributes; JIT-compile and load the arch's pre-dispatch kernel
//                (nvcc + disk cache; no GPU needed) -> State<Arch>
//   initialize   once per (state, device, T), outside any CUDA-graph capture (XLA runs it before
//                execute): the device gives the SM count and the architecture; Arch::Plan picks
//                the layout and the kernel configuration; JIT-compile and load the mega kernel,
//                set its dynamic shared memory, check that all num_sms CTAs (in clusters) can be
//                co-resident, join the symmetric buffer group (handlers/symmetric.h), then
//                Arch::PrepareExtra (buffer-slice TMA descriptors, sm_100's locality table and
//                expert scales). Later calls find the prepared entry and return at once.
//   execute      validate buffers; on XLA's stream launch pre-dispatch (x -> the buffer's input
//                slots) and the mega kernel (cuLaunchKernelEx: grid num_sms, cluster, dynamic
//                smem); weight descriptors are encoded on the host, cached by operand pointer.
//                No allocation, synchronisation, compilation or module loading. T == 0 is a
//                no-op. If initialize did not run for this device and T, execute fails.
#pragma once

#include <cuda.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/mma_kind.h"
#include "common/status.h"
#include "cuda/driver.h"
#include "handlers/buffer_checks.h"
#include "handlers/host_glue.h"
#include "handlers/pre_dispatch.h"
#include "handlers/stages.h"
#include "handlers/symmetric.h"
#include "jit/compiler.h"
#include "jit/kernels.h"
#include "jit/loader.h"
#include "jit/mega_kernels.h"
#include "layout/mega_moe.h"
#include "layout/rank_table.h"
#include "xla/ffi/api/ffi.h"

namespace jmm {

// One TMA descriptor, as the handlers encode it with cuTensorMapEncodeTiled (DeepGEMM 0.2.5's
// make_tma_*_desc conventions: inner dim first, strides in bytes, element strides 1, L2
// promotion 256B, no OOB fill, no interleave). A pure function of the configuration where the
// arch computes it ahead (sm100_tensor_map_plans), so that tests check it without a GPU.
// Where a descriptor's global address comes from: the symmetric buffer (+ TensorMapPlan::offset),
// or one of the four weight operands (the C API's `source`: these values).
enum class MapSource : int { kBuffer = 0, kL1 = 1, kL1Sf = 2, kL2 = 3, kL2Sf = 4 };
constexpr int kNumMapSources = 5;

// The element types the descriptors use, with CUtensorMapDataType's values (the C API's `dtype`).
// Our own enum because CU_TENSOR_MAP_DATA_TYPE_16U4_ALIGN16B exists only in CUDA >= 12.8 headers.
enum class MapDtype : int { kUint8 = 0, kInt32 = 3, kFloat32 = 7, kU4Align16B = 14 };
static_assert(static_cast<int>(MapDtype::kUint8) == CU_TENSOR_MAP_DATA_TYPE_UINT8 &&
                  static_cast<int>(MapDtype::kInt32) == CU_TENSOR_MAP_DATA_TYPE_INT32 &&
                  static_cast<int>(MapDtype::kFloat32) == CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
              "MapDtype follows CUtensorMapDataType");
#if defined(CUDA_VERSION) && CUDA_VERSION >= 12080
static_assert(static_cast<int>(MapDtype::kU4Align16B) ==
                  static_cast<int>(CU_TENSOR_MAP_DATA_TYPE_16U4_ALIGN16B),
              "MapDtype follows CUtensorMapDataType");
#endif

// The swizzle of a descriptor's shared-memory box, in bytes (the C API's `swizzle`).
enum class Swizzle : int { kNone = 0, k32B = 32, k64B = 64, k128B = 128 };

struct TensorMapPlan {
  const char* name = "";
  MapSource source = MapSource::kBuffer;
  uint64_t offset = 0;  // byte offset in the symmetric buffer (MapSource::kBuffer)
  MapDtype dtype = MapDtype::kUint8;
  int rank = 0;
  int64_t dims[5] = {};
  int64_t strides[4] = {};  // bytes, dims 1..rank-1
  int64_t box[5] = {};
  Swizzle swizzle = Swizzle::kNone;
};

namespace mega {

namespace ffi = xla::ffi;
using host::DriverExt;

// The attributes both targets take, in the order of JMM_MEGA_MOE_ATTR_MEMBERS.
struct MegaMoeAttrs {
  int64_t hidden;
  int64_t intermediate;
  int64_t num_experts;
  int64_t top_k;
  int64_t capacity;
  float activation_clamp;
  bool fast_math;
  int64_t reserved_sms;
  float routed_scaling_factor;
  int64_t num_ranks;
  ffi::Span<const int64_t> rank_devices;
};

// The StructMember list of MegaMoeAttrs (XLA_FFI_REGISTER_STRUCT_ATTR_DECODING, in the arch files).
#define JMM_MEGA_MOE_ATTR_MEMBERS                                                                 \
  ::xla::ffi::StructMember<int64_t>("hidden"), ::xla::ffi::StructMember<int64_t>("intermediate"), \
      ::xla::ffi::StructMember<int64_t>("num_experts"),                                           \
      ::xla::ffi::StructMember<int64_t>("top_k"), ::xla::ffi::StructMember<int64_t>("capacity"),  \
      ::xla::ffi::StructMember<float>("activation_clamp"),                                        \
      ::xla::ffi::StructMember<bool>("fast_math"),                                                \
      ::xla::ffi::StructMember<int64_t>("reserved_sms"),                                          \
      ::xla::ffi::StructMember<float>("routed_scaling_factor"),                                   \
      ::xla::ffi::StructMember<int64_t>("num_ranks"),                                             \
      ::xla::ffi::StructMember<::xla::ffi::Span<const int64_t>>("rank_devices")

// dtype and trailing dims of one weight operand (the leading dim is the rank's expert count).
struct WeightSpec {
  const char* name;
  ffi::DataType dtype;
  int64_t rows, cols;
};

// Per-device prepared launch: what both archs keep, plus Arch::DeviceExtra.
template <class Arch>
struct Device : Arch::DeviceExtra {
  int32_t device = -1;
  CUcontext ctx = nullptr;
  int64_t num_tokens = 0;
  typename Arch::Layout layout;
  typename Arch::Config config;
  std::shared_ptr<const jit::LoadedKernel> mega;
  CUfunction mega_fn = nullptr;
  CUfunction pre_fn = nullptr;
  int64_t rank = 0;                              // this device's rank in its group
  std::shared_ptr<host::SymmetricGroup> buffer;  // the group's buffers; this rank's is ptr[rank]
  jit::Sm90SymBuffer sym{};                      // SymBuffer<N> (the same on both archs)
  std::string cubin_path;
  std::mutex mu;  // guards the operand-keyed descriptor caches of the extra
};

// The FFI state of one call site (instantiate's result).
template <class Arch>
struct State {
  static ffi::TypeId id;  // assigned by XLA when the type is registered

  typename Arch::Shape shape;
  typename Arch::Options options;
  float activation_clamp = 0.0f;
  bool fast_math = true;
  int64_t reserved_sms = 0;
  float routed_scaling_factor = 1.0f;
  std::vector<int64_t> rank_devices;  // layout/rank_table.h; empty: one rank, the calling device
  std::shared_ptr<const jit::LoadedKernel> pre_dispatch;

  static constexpr int kMaxDevices = 64;
  std::mutex mu;                                                  // serialises initialize
  std::array<std::atomic<Device<Arch>*>, kMaxDevices> devices{};  // published entries
  std::vector<std::unique_ptr<Device<Arch>>> owned;               // guarded by mu
};

template <class Arch>
ffi::TypeId State<Arch>::id = XLA_FFI_UNKNOWN_TYPE_ID;

// The MegaShape part of an arch's shape, from the attributes or the C API.
template <class Shape>
Shape CommonShape(int64_t ranks, int64_t E, int64_t P, int64_t K, int64_t H, int64_t I) {
  Shape s;
  static_cast<layout::MegaShape&>(s) = layout::MegaShape{ranks, E, P, K, H, I};
  return s;
}

// cuTensorMapEncodeTiled of a plan at `base` (host only).
inline ffi::Error EncodeTiled(const cuda::Driver* d, const DriverExt* x, const char* target,
                              CUtensorMap* out, const TensorMapPlan& p, const void* base) {
  cuuint64_t dims[5] = {}, strides[4] = {};
  cuuint32_t box[5] = {}, estrides[5] = {1, 1, 1, 1, 1};
  for (int k = 0; k < p.rank; ++k) {
    dims[k] = static_cast<cuuint64_t>(p.dims[k]);
    box[k] = static_cast<cuuint32_t>(p.box[k]);
    if (k + 1 < p.rank) strides[k] = static_cast<cuuint64_t>(p.strides[k]);
  }
  CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_NONE;
  if (p.swizzle == Swizzle::k32B) swizzle = CU_TENSOR_MAP_SWIZZLE_32B;
  if (p.swizzle == Swizzle::k64B) swizzle = CU_TENSOR_MAP_SWIZZLE_64B;
  if (p.swizzle == Swizzle::k128B) swizzle = CU_TENSOR_MAP_SWIZZLE_128B;
  std::memset(out, 0, sizeof(*out));
  CUresult r = x->TensorMapEncodeTiled(
      out, static_cast<CUtensorMapDataType>(static_cast<int>(p.dtype)),
      static_cast<cuuint32_t>(p.rank), const_cast<void*>(base), dims, strides, box, estrides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::string shape, boxs;
    for (int k = 0; k < p.rank; ++k) {
      shape += cat(k ? "x" : "", dims[k]);
      boxs += cat(k ? "x" : "", box[k]);
    }
    return ffi::Error::Internal(cat(target, ": cuTensorMapEncodeTiled(", p.name, ": dtype ",
                                    static_cast<int>(p.dtype), ", dims ", shape, ", box ", boxs,
                                    ", swizzle ", static_cast<int>(p.swizzle), ", base ", base,
                                    ") failed: ", cuda::error_string(d, r)));
  }
  return ffi::Error::Success();
}

// The operands the arch's kernel arguments are built from.
struct ExecuteOperands {
  void* y;
  const void* l1;
  const void* l1_sf;
  const void* l2;
  const void* l2_sf;
};

// A 2-D plan (inner dim first; stride of the outer dim in bytes).
inline TensorMapPlan Plan2D(const char* name, MapSource source, uint64_t offset, MapDtype dtype,
                            int64_t inner, int64_t outer, int64_t stride_bytes, int64_t box_inner,
                            int64_t box_outer, Swizzle swizzle) {
  return TensorMapPlan{name,       source,         offset,         dtype,
                       /*rank=*/2, {inner, outer}, {stride_bytes}, {box_inner, box_outer},
                       swizzle};
}

// The descriptors of a kernel's launch, in kernel parameter order: the buffer slices' (kBuffer)
// are encoded once at initialize, the operands' in execute (host only, cached by operand
// pointer, guarded by Device::mu).
template <size_t N>
struct TensorMaps {
  std::array<TensorMapPlan, N> plans;
  std::array<CUtensorMap, N> maps{};
  std::array<const void*, N> encoded_for{};
};

template <size_t N>
ffi::Error EncodeBufferMaps(const cuda::Driver* d, const DriverExt* x, const char* target,
                            CUdeviceptr base, TensorMaps<N>* m) {
  for (size_t i = 0; i < N; ++i) {
    const TensorMapPlan& p = m->plans[i];
    if (p.source != MapSource::kBuffer) continue;
    const void* at = reinterpret_cast<const void*>(base + p.offset);
    if (ffi::Error err = EncodeTiled(d, x, target, &m->maps[i], p, at); !err.success()) return err;
    m->encoded_for[i] = at;
  }
  return ffi::Error::Success();
}

// Checks every operand against the state; returns T in *t_out.
template <class Arch>
ffi::Error ValidateBuffers(const State<Arch>* st, const ffi::AnyBuffer& x,
                           const ffi::AnyBuffer& topk_idx, const ffi::AnyBuffer& topk_weights,
                           const ffi::AnyBuffer& l1, const ffi::AnyBuffer& l1_sf,
                           const ffi::AnyBuffer& l2, const ffi::AnyBuffer& l2_sf,
                           const ffi::AnyBuffer& y, int64_t* t_out) {
  const char* t = Arch::kTarget;
  const int64_t H = st->shape.hidden;
  const int64_t E = st->shape.num_experts / st->shape.num_ranks;  // the weights hold this rank's
  const int64_t K = st->shape.top_k, P = st->shape.capacity;
  int64_t T = 0;
  if (ffi::Error e = ExpectTokens(t, x, H, P, &T); !e.success()) return e;
  ffi::Error e = ExpectBuffer(t, "operand", "topk_idx", topk_idx, ffi::DataType::S32, {T, K});
  if (e.success()) {
    e = ExpectBuffer(t, "operand", "topk_weights", topk_weights, ffi::DataType::F32, {T, K});
  }
  const ffi::AnyBuffer* weights[4] = {&l1, &l1_sf, &l2, &l2_sf};
  const std::array<WeightSpec, 4> specs = Arch::Weights(st->shape);
  for (size_t i = 0; i < 4 && e.success(); ++i) {
    const WeightSpec& w = specs[i];
    e = ExpectBuffer(t, "operand", w.name, *weights[i], w.dtype, {E, w.rows, w.cols});
  }
  if (e.success()) e = ExpectBuffer(t, "result", "y", y, ffi::DataType::BF16, {T, H});
  if (!e.success()) return e;
  *t_out = T;
  return ffi::Error::Success();
}

template <class Arch>
ffi::ErrorOr<std::unique_ptr<State<Arch>>> Instantiate(typename Arch::Attrs attrs) {
  const auto invalid = [](std::string m) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(cat(Arch::kTarget, ": ", m)));
  };
  const MegaMoeAttrs& a = Arch::Common(attrs);
  std::string why;
  if (!Arch::AttrsValid(attrs, &why)) return invalid(why);
  if (!layout::rank_table_valid(a.rank_devices.begin(), static_cast<int64_t>(a.rank_devices.size()),
                                a.num_ranks, &why)) {
    return invalid(why);
  }
  const typename Arch::Shape shape = Arch::ShapeOf(attrs);
  if (!Arch::ShapeValid(shape, &why)) return invalid(why);
  if (std::isnan(a.activation_clamp) || a.activation_clamp < 0.0f) {
    return invalid(
        cat("attribute activation_clamp=", a.activation_clamp, " must be >= 0 (+inf: no clamp)"));
  }
  if (a.reserved_sms < 0) {
    return invalid(cat("attribute reserved_sms=", a.reserved_sms, " must be >= 0"));
  }
  if (!std::isfinite(a.routed_scaling_factor)) {
    return invalid(
        cat("attribute routed_scaling_factor=", a.routed_scaling_factor, " must be finite"));
  }
  std::shared_ptr<const jit::LoadedKernel> pre;
  if (ffi::Error e = host::CompileAndLoad(
          jit::pre_dispatch_source(Arch::kArch, Arch::MmaKindOf(shape)), Arch::kTarget, &pre);
      !e.success()) {
    return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  auto st = std::make_unique<State<Arch>>();
  st->shape = shape;
  st->options = Arch::OptionsOf(attrs);
  st->activation_clamp = a.activation_clamp;
  st->fast_math = a.fast_math;
  st->reserved_sms = a.reserved_sms;
  st->routed_scaling_factor = a.routed_scaling_factor;
  st->rank_devices.assign(a.rank_devices.begin(), a.rank_devices.end());
  st->pre_dispatch = std::move(pre);
  return st;
}

// The mega kernel's launch: grid num_sms, block num_threads, the dynamic shared memory, and the
// cluster dimension when the configuration pairs CTAs (`attr` must outlive `lc`).
template <class Config>
void FillLaunch(const Config& c, CUstream stream, CUlaunchAttribute* attr, CUlaunchConfig* lc) {
  attr->id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
  attr->value.clusterDim.x = static_cast<unsigned>(c.cluster_size);
  attr->value.clusterDim.y = 1;
  attr->value.clusterDim.z = 1;
  lc->gridDimX = static_cast<unsigned>(c.num_sms);
  lc->gridDimY = lc->gridDimZ = 1;
  lc->blockDimX = static_cast<unsigned>(c.num_threads);
  lc->blockDimY = lc->blockDimZ = 1;
  lc->sharedMemBytes = static_cast<unsigned>(c.smem_size);
  lc->hStream = stream;
  lc->attrs = c.cluster_size > 1 ? attr : nullptr;
  lc->numAttrs = c.cluster_size > 1 ? 1 : 0;
}

// The persistent kernel's grid barriers spin: all num_sms CTAs (in clusters) must be resident.
template <class Config>
ffi::Error CheckResidency(const cuda::Driver* d, const DriverExt* x, const char* target,
                          CUfunction fn, const Config& c) {
  if (c.cluster_size > 1) {
    CUlaunchAttribute attr{};
    CUlaunchConfig lc{};
    FillLaunch(c, /*stream=*/nullptr, &attr, &lc);
    int clusters = 0;
    if (CUresult r = x->OccupancyMaxActiveClusters(&clusters, fn, &lc); r != CUDA_SUCCESS) {
      return ffi::Error::Internal(
          cat(target, ": cuOccupancyMaxActiveClusters failed: ", cuda::error_string(d, r)));
    }
    if (static_cast<int64_t>(clusters) * c.cluster_size < c.num_sms) {
      return ffi::Error::InvalidArgument(cat(target, ": only ", clusters, " clusters of ",
                                             c.cluster_size,
                                             " CTAs can be resident, the persistent kernel needs ",
                                             c.num_sms, " CTAs at once; raise reserved_sms"));
    }
    return ffi::Error::Success();
  }
  int blocks = 0;
  if (CUresult r = x->OccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, fn, static_cast<int>(c.num_threads), static_cast<size_t>(c.smem_size));
      r != CUDA_SUCCESS || blocks < 1) {
    return ffi::Error::InvalidArgument(
        cat(target, ": the kernel (", c.num_threads, " threads, ", c.smem_size,
            " B shared memory) cannot be resident: ",
            r != CUDA_SUCCESS ? cuda::error_string(d, r) : std::string("0 blocks per SM")));
  }
  return ffi::Error::Success();
}

// Builds the device entry: layout + config, compile + load, smem attribute, residency check,
// the symmetric buffer group, then the arch's extras.
template <class Arch>
ffi::Error Prepare(const cuda::Driver* d, const DriverExt* x, State<Arch>* st, CUcontext ctx,
                   int32_t device, int64_t T, std::unique_ptr<Device<Arch>>* out) {
  const char* t = Arch::kTarget;
  auto e = std::make_unique<Device<Arch>>();
  e->device = device;
  e->ctx = ctx;
  e->num_tokens = T;
  CUdevice dev = 0;
  if (CUresult r = x->CtxGetDevice(&dev); r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(t, ": cuCtxGetDevice failed: ", cuda::error_string(d, r)));
  }
  int sm_count = 0, major = 0;
  x->DeviceGetAttribute(&sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
  x->DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  if (major != Arch::kComputeMajor) {
    return ffi::Error::InvalidArgument(cat(t, ": needs ", Arch::kGpuName, ", device ", device,
                                           " has compute capability ", major, ".x"));
  }
  int64_t num_sms = sm_count - st->reserved_sms;
  num_sms -= num_sms % 2;
  if (num_sms < 2) {
    return ffi::Error::InvalidArgument(cat(t, ": num_sms=", num_sms, " (the device's ", sm_count,
                                           " SMs minus reserved_sms=", st->reserved_sms,
                                           ", rounded down to even) must be at least 2"));
  }
  std::string why;
  if (!Arch::Plan(st->shape, st->options, num_sms, std::max<int64_t>(T, 1), st->activation_clamp,
                  st->fast_math, &e->layout, &e->config, &why)) {
    return ffi::Error::InvalidArgument(cat(t, ": ", why));
  }
  const typename Arch::Config& c = e->config;

  // Compile (disk/memory cache; nvcc runs as a subprocess, nothing is enqueued) and load.
  if (ffi::Error err = host::CompileAndLoad(Arch::Source(c), t, &e->mega); !err.success()) {
    return err;
  }
  e->cubin_path = e->mega->cubin_path;
  if (ffi::Error err = host::FunctionOf(d, *e->mega, &e->mega_fn, t); !err.success()) return err;
  if (ffi::Error err = host::FunctionOf(d, *st->pre_dispatch, &e->pre_fn, t); !err.success()) {
    return err;
  }
  if (CUresult r = x->FuncSetAttribute(e->mega_fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       static_cast<int>(c.smem_size));
      r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(t, ": cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, ",
                                    c.smem_size, ") failed: ", cuda::error_string(d, r)));
  }
  if (ffi::Error err = CheckResidency(d, x, t, e->mega_fn, c); !err.success()) return err;

  // This device's rank and its group's buffers (allocated for the whole group at once, see
  // handlers/symmetric.h). The key tells the configurations sharing a buffer apart.
  const layout::MegaShape& s = st->shape;
  std::vector<int64_t> key{Arch::kArch, s.num_experts,  s.capacity, s.top_k,
                           s.hidden,    s.intermediate, c.num_sms,  s.num_ranks};
  Arch::ExtendGroupKey(st->shape, &key);
  if (ffi::Error err = host::JoinGroup(d, x, ctx, dev, s.num_ranks, st->rank_devices, key,
                                       e->layout.num_bytes, t, &e->buffer, &e->rank, &e->sym);
      !err.success()) {
    return err;
  }
  if (ffi::Error err = Arch::PrepareExtra(d, x, *st, ctx, sm_count, e.get()); !err.success()) {
    return err;
  }
  *out = std::move(e);
  return ffi::Error::Success();
}

// The initialize stage after the buffer checks: prepares the (device, T) entry once.
template <class Arch>
ffi::Error InitializeChecked(CUstream stream, int32_t device, State<Arch>* st, int64_t T) {
  const char* t = Arch::kTarget;
  if (device < 0 || device >= State<Arch>::kMaxDevices) {
    return ffi::Error::InvalidArgument(cat(t, ": device ordinal ", device, " out of range"));
  }
  if (Device<Arch>* e = st->devices[device].load(std::memory_order_acquire);
      e != nullptr && e->num_tokens == T) {
    return ffi::Error::Success();  // prepared by an earlier run
  }
  std::lock_guard<std::mutex> lock(st->mu);
  if (Device<Arch>* e = st->devices[device].load(std::memory_order_acquire);
      e != nullptr && e->num_tokens == T) {
    return ffi::Error::Success();
  }
  const cuda::Driver* d = nullptr;
  const DriverExt* dx = nullptr;
  host::ContextScope scope;
  CUcontext ctx = nullptr;
  if (ffi::Error e = host::Begin(stream, device, t, &scope, &d, &dx, &ctx); !e.success()) return e;
  if (ffi::Error e = host::RefuseCapture(d, stream, t); !e.success()) return e;
  std::unique_ptr<Device<Arch>> entry;
  if (ffi::Error e = Prepare(d, dx, st, ctx, device, T, &entry); !e.success()) return e;
  st->devices[device].store(entry.get(), std::memory_order_release);
  st->owned.push_back(std::move(entry));
  return ffi::Error::Success();
}

// The execute stage after the buffer checks: the two launches.
template <class Arch>
ffi::Error ExecuteChecked(CUstream stream, int32_t device, State<Arch>* st, int64_t T,
                          const ffi::AnyBuffer& x, const ffi::AnyBuffer& topk_idx,
                          const ffi::AnyBuffer& topk_weights, const ExecuteOperands& ops) {
  const char* t = Arch::kTarget;
  if (T == 0) return ffi::Error::Success();
  Device<Arch>* e = (device >= 0 && device < State<Arch>::kMaxDevices)
                        ? st->devices[device].load(std::memory_order_acquire)
                        : nullptr;
  if (e == nullptr || e->num_tokens != T) {
    return ffi::Error::Internal(cat(t, ": not initialized for device ", device, " and T=", T,
                                    " (XLA skipped the initialize stage); execute never compiles "
                                    "or allocates"));
  }
  const typename Arch::Config& c = e->config;
  const typename Arch::Layout& l = e->layout;
  const cuda::Driver* d = nullptr;
  const DriverExt* dx = nullptr;
  host::ContextScope scope;
  CUcontext ctx = nullptr;
  if (ffi::Error err = host::Begin(stream, device, t, &scope, &d, &dx, &ctx); !err.success()) {
    return err;
  }
  if (ctx != e->ctx) {
    return ffi::Error::Internal(cat(t, ": the stream's CUDA context changed since initialize"));
  }
  // TMA bases: the arch's alignment (the weight scales too where they are TMA operands).
  const void* aligned[5] = {ops.l1, ops.l2, ops.y, ops.l1_sf, ops.l2_sf};
  for (int i = 0; i < (Arch::kTmaScales ? 5 : 3); ++i) {
    if (reinterpret_cast<uintptr_t>(aligned[i]) % Arch::kTmaAlignment != 0) {
      return ffi::Error::InvalidArgument(
          cat(t, ": operands l1, l2", Arch::kTmaScales ? ", l1_sf, l2_sf" : "", " and result y ",
              "must be ", Arch::kTmaAlignment, "-byte aligned (TMA)"));
    }
  }

  // 1. Pre-dispatch into the buffer's input slots (x, x_sf, topk_idx, topk_weights; P rows).
  const int64_t H = c.hidden, K = c.top_k, P = c.num_max_tokens_per_rank;
  const CUdeviceptr base = e->buffer->ptr[e->rank];
  const auto at = [&](uint64_t off) { return reinterpret_cast<void*>(base + off); };
  PreDispatchOperands pre;
  pre.x = x.untyped_data();
  pre.topk_idx = topk_idx.untyped_data();
  pre.topk_weights = topk_weights.untyped_data();
  pre.expert_scales = Arch::ExpertScales(*e);
  pre.buf_x = at(l.x);
  pre.buf_x_sf = at(l.x_sf);
  pre.buf_topk_idx = at(l.topk_idx);
  pre.buf_topk_weights = at(l.topk_weights);
  PreDispatchLaunch plan;
  if (CUresult r =
          launch_pre_dispatch(d, e->pre_fn, stream, Arch::kArch, Arch::MmaKindOf(st->shape), pre, T,
                              P, H, K, st->routed_scaling_factor, &plan);
      r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(t, ": launching the pre-dispatch kernel (grid ", plan.grid,
                                    ", block ", plan.block,
                                    ") failed: ", cuda::error_string(d, r)));
  }

  // 2. The mega kernel: the arch's argument block, one cuLaunchKernelEx.
  typename Arch::Args args;
  std::memset(&args, 0, sizeof(args));
  void* params[Arch::kNumParams] = {};
  if (ffi::Error err = Arch::KernelArgs(d, dx, *st, T, ops, e, &args, params); !err.success()) {
    return err;
  }
  CUlaunchAttribute attr{};
  CUlaunchConfig lc{};
  FillLaunch(c, stream, &attr, &lc);
  if (CUresult r = dx->LaunchKernelEx(&lc, e->mega_fn, params, nullptr); r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(t, ": cuLaunchKernelEx(", e->mega->symbol, ", grid ", c.num_sms,
                                    ", block ", c.num_threads, ", cluster ", c.cluster_size,
                                    ", smem ", c.smem_size,
                                    ") failed: ", cuda::error_string(d, r)));
  }
  host::CountExecute(d, stream);
  return ffi::Error::Success();
}

// Both stage handlers (Stage<Arch, true>: initialize, <Arch, false>: execute): the same buffers,
// checked against the state the same way.
template <class Arch, bool kInitialize>
ffi::Error Stage(CUstream stream, int32_t device, State<Arch>* st, ffi::AnyBuffer x,
                 ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights, ffi::AnyBuffer l1,
                 ffi::AnyBuffer l1_sf, ffi::AnyBuffer l2, ffi::AnyBuffer l2_sf,
                 ffi::Result<ffi::AnyBuffer> y) {
  int64_t T = 0;
  if (ffi::Error e = ValidateBuffers(st, x, topk_idx, topk_weights, l1, l1_sf, l2, l2_sf, *y, &T);
      !e.success()) {
    return e;
  }
  if constexpr (kInitialize) {
    return InitializeChecked(stream, device, st, T);
  } else {
    const ExecuteOperands ops{y->untyped_data(), l1.untyped_data(), l1_sf.untyped_data(),
                              l2.untyped_data(), l2_sf.untyped_data()};
    return ExecuteChecked(stream, device, st, T, x, topk_idx, topk_weights, ops);
  }
}

// The operands' descriptors (sources 1-4: l1, l1_sf, l2, l2_sf), re-encoded when XLA hands over
// a different buffer. Call with the device entry's mu held.
template <size_t N>
ffi::Error EncodeOperandMaps(const cuda::Driver* d, const DriverExt* x, const char* target,
                             const ExecuteOperands& ops, TensorMaps<N>* m) {
  const void* operands[kNumMapSources] = {nullptr, ops.l1, ops.l1_sf, ops.l2, ops.l2_sf};
  for (size_t i = 0; i < N; ++i) {
    const TensorMapPlan& p = m->plans[i];
    if (p.source == MapSource::kBuffer) continue;
    const void* at = operands[static_cast<int>(p.source)];
    if (m->encoded_for[i] == at) continue;
    if (ffi::Error err = EncodeTiled(d, x, target, &m->maps[i], p, at); !err.success()) {
      m->encoded_for[i] = nullptr;
      return err;
    }
    m->encoded_for[i] = at;
  }
  return ffi::Error::Success();
}

}  // namespace mega
}  // namespace jmm

// The buffers both targets' initialize and execute stages bind: x, topk_idx, topk_weights, l1,
// l1_sf, l2, l2_sf -> y.
#define JMM_MEGA_MOE_BUFFERS(BINDING) JMM_WITH_BUFFERS(BINDING, 7, 1)

// The stage implementations and bindings of `ARCH`'s target, as the arguments of
// JMM_DEFINE_STAGES / JMM_DEFINE_STAGES_AND_GRAPH_TWIN (handlers/stages.h).
#define JMM_MEGA_MOE_STAGES(ARCH)                                                            \
  (::jmm::mega::Instantiate<ARCH>), ::xla::ffi::Ffi::BindInstantiate().Attrs<ARCH::Attrs>(), \
      (::jmm::mega::Stage<ARCH, true>),                                                      \
      JMM_MEGA_MOE_BUFFERS(JMM_INITIALIZE_CONTEXTS(::jmm::mega::State<ARCH>)),               \
      (::jmm::mega::Stage<ARCH, false>),                                                     \
      JMM_MEGA_MOE_BUFFERS(JMM_EXECUTE_CONTEXTS(::jmm::mega::State<ARCH>))

// The state type's id / info exports of one arch.
#define JMM_DEFINE_MEGA_MOE_STATE(PREFIX, ARCH)                                                 \
  namespace {                                                                                   \
  constexpr XLA_FFI_TypeInfo PREFIX##_type_info =                                               \
      ::xla::ffi::MakeTypeInfo<::jmm::mega::State<ARCH>>();                                     \
  }                                                                                             \
  JMM_EXPORT XLA_FFI_TypeId* PREFIX##_state_type_id() { return &::jmm::mega::State<ARCH>::id; } \
  JMM_EXPORT const XLA_FFI_TypeInfo* PREFIX##_state_type_info() { return &PREFIX##_type_info; }
