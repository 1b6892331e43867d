#include "handlers/mega_moe_sm100.h"

// NOT RUN ON HARDWARE: no sm_100 GPU was available to this project. Every GPU stage below is
// written to the standard of handlers/mega_moe_sm90.cc (which has run on an H200) and compiles
// into the library, but has never executed. See the header for the contract.

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "common/export.h"
#include "common/status.h"
#include "cuda/driver.h"
#include "handlers/buffer_checks.h"
#include "handlers/host_glue.h"
#include "handlers/symmetric.h"
#include "layout/rank_table.h"
#include "jit/compiler.h"
#include "jit/kernels.h"
#include "jit/loader.h"
#include "jit/mega_kernels.h"

namespace ffi = xla::ffi;

namespace jmm {
namespace {

constexpr const char* kTarget = "jax_megamoe_mega_moe_sm100";

// CU_TENSOR_MAP_DATA_TYPE_16U4_ALIGN16B (CUDA 12.8+ headers): packed E2M1 in global memory, each
// 4-bit value in an 8-bit container in shared memory (DeepGEMM's "unpacked smem" FP4 weights of
// the fp8xfp4 kernel, which feeds kind::mxf8f6f4).
// sm100_tensor_map_plans writes the enum values as plain ints (0, 3, 14).
static_assert(CU_TENSOR_MAP_DATA_TYPE_UINT8 == 0 && CU_TENSOR_MAP_DATA_TYPE_INT32 == 3, "enum");
#if defined(CUDA_VERSION) && CUDA_VERSION >= 12080
static_assert(static_cast<int>(CU_TENSOR_MAP_DATA_TYPE_16U4_ALIGN16B) == 14, "enum value");
#endif

using host::driver_ext;
using host::DriverExt;

// ---------------------------------------------------------------------------
// Library-owned device memory: the symmetric buffer (per configuration) and the locality table
// (per context), both process-wide registries; the expert-scale array (per device entry).
// ---------------------------------------------------------------------------
struct DeviceMemory {
  CUcontext ctx = nullptr;
  CUdeviceptr ptr = 0;
  uint64_t bytes = 0;
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    const cuda::Driver* d = cuda::driver(nullptr);
    const DriverExt* x = driver_ext(nullptr);
    if (d == nullptr || x == nullptr || ptr == 0) return;
    // cuMemFree synchronises with the device work that may still use the memory.
    if (d->CtxPushCurrent(ctx) == CUDA_SUCCESS) {
      x->MemFree(ptr);
      CUcontext popped = nullptr;
      d->CtxPopCurrent(&popped);
    }
  }
};

// Allocates `bytes` in the current context `ctx` (called from initialize only).
ffi::Error Allocate(const cuda::Driver* d, const DriverExt* x, CUcontext ctx, uint64_t bytes,
                    const char* what, DeviceMemory* m) {
  m->ctx = ctx;
  m->bytes = bytes;
  if (CUresult r = x->MemAlloc(&m->ptr, static_cast<size_t>(bytes)); r != CUDA_SUCCESS) {
    m->ptr = 0;
    return ffi::Error::Internal(
        cat(kTarget, ": cuMemAlloc of the ", bytes, "-byte ", what, " failed: ",
            cuda::error_string(d, r),
            " (leave room next to XLA's pool: XLA_PYTHON_CLIENT_MEM_FRACTION or "
            "XLA_PYTHON_CLIENT_PREALLOCATE=false)"));
  }
  return ffi::Error::Success();
}

// Fills `m` with the 32-bit `pattern` synchronously on a private stream (never XLA's).
ffi::Error FillSync(const cuda::Driver* d, const DriverExt* x, const DeviceMemory& m,
                    uint32_t pattern, const char* what) {
  CUstream s = nullptr;
  CUresult r = x->StreamCreate(&s, CU_STREAM_NON_BLOCKING);
  if (r == CUDA_SUCCESS) r = x->MemsetD32Async(m.ptr, pattern, static_cast<size_t>(m.bytes / 4), s);
  if (r == CUDA_SUCCESS) r = x->StreamSynchronize(s);
  if (s != nullptr) x->StreamDestroy(s);
  if (r != CUDA_SUCCESS) {
    return ffi::Error::Internal(
        cat(kTarget, ": initialising the ", what, " failed: ", cuda::error_string(d, r)));
  }
  return ffi::Error::Success();
}

std::mutex g_registry_mu;
std::map<CUcontext, std::weak_ptr<DeviceMemory>> g_locality_tables;

// The context's sm_locality_domains table (u8, one balanced entry per physical SM), built once.
ffi::ErrorOr<std::shared_ptr<DeviceMemory>> AcquireLocalityTable(const cuda::Driver* d,
                                                                 const DriverExt* x,
                                                                 CUcontext ctx, int sm_count) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  if (auto it = g_locality_tables.find(ctx); it != g_locality_tables.end()) {
    if (auto alive = it->second.lock()) return alive;
  }
  const int64_t n = sm100_locality_table_entries(sm_count);
  std::vector<uint8_t> host(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) host[static_cast<size_t>(i)] = sm100_balanced_locality_domain(i);
  auto table = std::make_shared<DeviceMemory>();
  if (ffi::Error e = Allocate(d, x, ctx, static_cast<uint64_t>(n), "sm_locality_domains table",
                              table.get());
      !e.success()) {
    return ffi::Unexpected<ffi::Error>(e);
  }
  // Copy on a private non-blocking stream and wait (initialize stage, outside any capture; never
  // the legacy default stream, which would serialise with XLA's streams).
  CUstream s = nullptr;
  CUresult r = x->StreamCreate(&s, CU_STREAM_NON_BLOCKING);
  if (r == CUDA_SUCCESS) r = x->MemcpyHtoDAsync(table->ptr, host.data(), host.size(), s);
  if (r == CUDA_SUCCESS) r = x->StreamSynchronize(s);
  if (s != nullptr) x->StreamDestroy(s);
  if (r != CUDA_SUCCESS) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::Internal(
        cat(kTarget, ": uploading the sm_locality_domains table failed: ",
            cuda::error_string(d, r))));
  }
  g_locality_tables[ctx] = table;
  return table;
}

// ---------------------------------------------------------------------------
// TMA descriptors: host-only cuTensorMapEncodeTiled of a plan (see sm100_tensor_map_plans).
// ---------------------------------------------------------------------------
ffi::Error EncodeTiled(const cuda::Driver* d, const DriverExt* x, CUtensorMap* out,
                       const Sm100TensorMapPlan& p, const void* base) {
  cuuint64_t dims[5] = {}, strides[4] = {};
  cuuint32_t box[5] = {}, estrides[5] = {1, 1, 1, 1, 1};
  for (int k = 0; k < p.rank; ++k) {
    dims[k] = static_cast<cuuint64_t>(p.dims[k]);
    box[k] = static_cast<cuuint32_t>(p.box[k]);
    if (k + 1 < p.rank) strides[k] = static_cast<cuuint64_t>(p.strides[k]);
  }
  CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_NONE;
  if (p.swizzle == 32) swizzle = CU_TENSOR_MAP_SWIZZLE_32B;
  if (p.swizzle == 64) swizzle = CU_TENSOR_MAP_SWIZZLE_64B;
  if (p.swizzle == 128) swizzle = CU_TENSOR_MAP_SWIZZLE_128B;
  std::memset(out, 0, sizeof(*out));
  CUresult r = x->TensorMapEncodeTiled(
      out, static_cast<CUtensorMapDataType>(p.dtype), static_cast<cuuint32_t>(p.rank),
      const_cast<void*>(base), dims, strides, box, estrides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::string shape, boxs;
    for (int k = 0; k < p.rank; ++k) {
      shape += cat(k ? "x" : "", dims[k]);
      boxs += cat(k ? "x" : "", box[k]);
    }
    return ffi::Error::Internal(cat(kTarget, ": cuTensorMapEncodeTiled(", p.name, ": dtype ",
                                    p.dtype, ", dims ", shape, ", box ", boxs, ", swizzle ",
                                    p.swizzle, ", base ", base, ") failed: ",
                                    cuda::error_string(d, r)));
  }
  return ffi::Error::Success();
}

}  // namespace

static_assert(kSm100NumRoutedTensorMaps == jit::kSm100SharedL1Acts,
              "the routed descriptors precede the shared-expert ones");

std::array<Sm100TensorMapPlan, kSm100NumRoutedTensorMaps> sm100_tensor_map_plans(
    const layout::Sm100MegaConfig& c, const layout::Sm100MegaLayout& l) {
  const int64_t H = c.hidden, I = c.intermediate, e_local = l.num_experts_per_rank;
  const int64_t R = l.num_ring_tokens, Rsf = l.num_sf_ring_tokens;
  const int64_t hb = H * c.elem_bits / 8, ib = I * c.elem_bits / 8;  // activation row bytes
  const int64_t sf_rows = c.block_k / (c.gran_k * 4);                // SF words per K block
  constexpr int kUint8 = 0, kInt32 = 3, kU4Align16B = 14;
  const auto plan2 = [](const char* name, int source, uint64_t offset, int dtype, int64_t inner,
                        int64_t outer, int64_t stride, int64_t box_inner, int64_t box_outer,
                        int swizzle) {
    Sm100TensorMapPlan p;
    p.name = name;
    p.source = source;
    p.offset = offset;
    p.dtype = dtype;
    p.rank = 2;
    p.dims[0] = inner;
    p.dims[1] = outer;
    p.strides[0] = stride;
    p.box[0] = box_inner;
    p.box[1] = box_outer;
    p.swizzle = swizzle;
    return p;
  };
  // Routed weights [E][N][K/2] packed E2M1, viewed 4-D as [E][2 halves][N/2][K] (the kernel loads
  // (k, n within the half, half, expert)); K in bytes (mxf4xmxf4: UINT8) or in 4-bit elements
  // (fp8xfp4: 16U4_ALIGN16B, each value unpacked to an 8-bit shared-memory container).
  const auto weights = [&](const char* name, int source, int64_t n, int64_t k) {
    const bool unpacked = c.mma_kind == layout::kSm100MmaMXFP8FP4;
    const int64_t row = k / 2;
    Sm100TensorMapPlan p;
    p.name = name;
    p.source = source;
    p.dtype = unpacked ? kU4Align16B : kUint8;
    p.rank = 4;
    const int64_t dims[4] = {unpacked ? k : row, n / 2, 2, e_local};
    const int64_t strides[3] = {row, (n / 2) * row, n * row};
    const int64_t box[4] = {c.block_k_bytes, c.load_block_n, 1, 1};
    for (int i = 0; i < 4; ++i) p.dims[i] = dims[i], p.box[i] = box[i];
    for (int i = 0; i < 3; ++i) p.strides[i] = strides[i];
    p.swizzle = static_cast<int>(c.swizzle_weights_mode);
    return p;
  };
  const int sw_acts = static_cast<int>(c.swizzle_acts_mode);
  const int sw_out = static_cast<int>(c.l1_out_block_n_bytes);  // 64B (FP8) / 32B (FP4) swizzle
  return {
      // A operand of L1: [R, H*b/8] bytes, (BLOCK_M/2 rows x 128 B) per CTA, 128B swizzle
      plan2("l1_acts", 0, l.l1, kUint8, hb, R, hb, c.block_k_bytes, c.load_block_m, sw_acts),
      // SFA of L1: int32 [H/128][Rsf] (MN-major), (SF_BLOCK_M x BLOCK_K/128) words
      plan2("l1_acts_sf", 0, l.l1_sf, kInt32, Rsf, H / 128, Rsf * 4, c.sf_block_m, sf_rows, 0),
      weights("l1_weights", 1, 2 * I, H),
      // SFB of L1: int32 [E][H/128][2I] (MN-major), (128 x BLOCK_K/128) words
      plan2("l1_weights_sf", 2, 0, kInt32, 2 * I, e_local * (H / 128), 2 * I * 4, c.block_n,
            sf_rows, 0),
      // L1 output (post-SwiGLU, requantised) stores into l2: (STORE_BLOCK_M_L1 x BLOCK_N/2 values)
      plan2("l1_output", 0, l.l2, kUint8, ib, R, ib, c.l1_out_block_n_bytes, c.store_block_m_l1,
            sw_out),
      plan2("l2_acts", 0, l.l2, kUint8, ib, R, ib, c.block_k_bytes, c.load_block_m, sw_acts),
      plan2("l2_acts_sf", 0, l.l2_sf, kInt32, Rsf, I / 128, Rsf * 4, c.sf_block_m, sf_rows, 0),
      weights("l2_weights", 3, H, I),
      plan2("l2_weights_sf", 4, 0, kInt32, H, e_local * (I / 128), H * 4, c.block_n, sf_rows, 0),
  };
}

// Per-device prepared launch.
struct MegaMoeSm100Device {
  int32_t device = -1;
  CUcontext ctx = nullptr;
  int64_t num_tokens = 0;
  layout::Sm100MegaLayout layout;
  layout::Sm100MegaConfig config;
  std::shared_ptr<const jit::LoadedKernel> mega;
  CUfunction mega_fn = nullptr;
  CUfunction pre_fn = nullptr;
  int64_t rank = 0;                             // this device's rank in its group
  std::shared_ptr<host::SymmetricGroup> buffer;  // the group's buffers; this rank's is ptr[rank]
  std::shared_ptr<DeviceMemory> locality;
  std::unique_ptr<DeviceMemory> expert_scales;  // f32 [E] = routed_scaling_factor, or null
  jit::Sm100SymBuffer sym{};
  std::array<Sm100TensorMapPlan, kSm100NumRoutedTensorMaps> plans;
  std::string cubin_path;
  // The routed descriptors: the buffer's slices are encoded at initialize; the weights' (sources
  // 1-4) in execute, host-only, cached by operand pointer (guarded by mu).
  std::mutex mu;
  std::array<CUtensorMap, kSm100NumRoutedTensorMaps> maps{};
  std::array<const void*, kSm100NumRoutedTensorMaps> encoded_for{};
};

ffi::TypeId MegaMoeSm100State::id = XLA_FFI_UNKNOWN_TYPE_ID;

MegaMoeSm100State::~MegaMoeSm100State() = default;

namespace {

constexpr XLA_FFI_TypeInfo kMegaMoeSm100StateTypeInfo = ffi::MakeTypeInfo<MegaMoeSm100State>();

ffi::Error Expect(const char* role, const char* name, const ffi::AnyBuffer& b, ffi::DataType t,
                  std::initializer_list<int64_t> dims) {
  return ExpectBuffer(kTarget, role, name, b, t, dims);
}

// Checks every operand against the state; returns T in *t_out.
ffi::Error ValidateBuffers(const MegaMoeSm100State* st, const ffi::AnyBuffer& x,
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
  if (e.success()) e = Expect("operand", "l1", l1, ffi::DataType::U8, {E, 2 * I, H / 2});
  if (e.success()) e = Expect("operand", "l1_sf", l1_sf, ffi::DataType::S32, {E, H / 128, 2 * I});
  if (e.success()) e = Expect("operand", "l2", l2, ffi::DataType::U8, {E, H, I / 2});
  if (e.success()) e = Expect("operand", "l2_sf", l2_sf, ffi::DataType::S32, {E, I / 128, H});
  if (e.success()) e = Expect("result", "y", y, ffi::DataType::BF16, {T, H});
  if (!e.success()) return e;
  *t_out = T;
  return ffi::Error::Success();
}

ffi::ErrorOr<std::unique_ptr<MegaMoeSm100State>> Instantiate(
    int64_t hidden, int64_t intermediate, int64_t num_experts, int64_t top_k, int64_t capacity,
    float activation_clamp, bool fast_math, int64_t num_sms, int64_t reserved_sms, float rsf,
    int64_t mma_kind, int64_t num_ranks, ffi::Span<const int64_t> rank_devices) {
  const auto invalid = [](std::string m) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(cat(kTarget, ": ", m)));
  };
  std::string why;
  if (num_ranks > 32) {  // the sm_90 kernel's limit; the sm_100 one takes 72, the table code 32
    return invalid(cat("attribute num_ranks=", num_ranks, " must be in [1, 32]"));
  }
  if (!layout::rank_table_valid(rank_devices.begin(), static_cast<int64_t>(rank_devices.size()),
                                num_ranks, &why)) {
    return invalid(why);
  }
  if (mma_kind != layout::kSm100MmaMXFP8FP4 && mma_kind != layout::kSm100MmaMXFP4) {
    return invalid(cat("attribute mma_kind=", mma_kind,
                       " must be 1 (MXFP8FP4, fp8xfp4) or 2 (MXFP4, mxf4xmxf4)"));
  }
  layout::Sm100MegaShape shape;
  shape.num_ranks = num_ranks;
  shape.num_experts = num_experts;
  shape.capacity = capacity;
  shape.top_k = top_k;
  shape.hidden = hidden;
  shape.intermediate = intermediate;
  shape.mma_kind = mma_kind;
  if (!layout::sm100_mega_shape_valid(shape, &why)) return invalid(why);
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
  if (!jit::jit_compile(jit::pre_dispatch_source(100, static_cast<int>(mma_kind)), &compiled,
                        &why)) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::Internal(cat(kTarget, ": ", why)));
  }
  auto pre = jit::load_kernel(compiled.cubin_path, compiled.symbol, &why);
  if (!pre) return ffi::Unexpected<ffi::Error>(ffi::Error::Internal(cat(kTarget, ": ", why)));
  auto st = std::make_unique<MegaMoeSm100State>();
  st->shape = shape;
  st->rank_devices.assign(rank_devices.begin(), rank_devices.end());
  st->activation_clamp = activation_clamp;
  st->fast_math = fast_math;
  st->num_sms_attr = num_sms;
  st->reserved_sms = reserved_sms;
  st->routed_scaling_factor = rsf;
  st->pre_dispatch = std::move(pre);
  return st;
}

// Builds the device entry: layout + config, compile + load, smem attribute, residency check,
// buffer, locality table, expert scales, TMA descriptors of the buffer slices.
ffi::Error Prepare(const cuda::Driver* d, const DriverExt* x, MegaMoeSm100State* st,
                   CUcontext ctx, int32_t device, int64_t T,
                   std::unique_ptr<MegaMoeSm100Device>* out) {
  auto e = std::make_unique<MegaMoeSm100Device>();
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
  if (major != 10) {
    return ffi::Error::InvalidArgument(cat(kTarget, ": needs an sm_100-family GPU (B200/B300, "
                                           "compute capability 10.x; the kernel is built for "
                                           "sm_100f), device ", device, " has ", major, ".x"));
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
  if (!layout::sm100_mega_layout(st->shape, num_sms, &e->layout, &why) ||
      !layout::sm100_mega_config(st->shape, e->layout, std::max<int64_t>(T, 1),
                                 st->activation_clamp, st->fast_math, &e->config, &why)) {
    return ffi::Error::InvalidArgument(cat(kTarget, ": ", why));
  }
  const layout::Sm100MegaConfig& c = e->config;
  const layout::Sm100MegaLayout& l = e->layout;

  // Compile (disk/memory cache) and load the mega kernel (nvcc runs as a subprocess).
  jit::CompiledKernel compiled;
  if (!jit::jit_compile(jit::mega_moe_sm100_source(c), &compiled, &why)) {
    return ffi::Error::Internal(cat(kTarget, ": ", why));
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

  // The kernel's grid barriers spin: all num_sms CTAs (num_sms / 2 clusters) must be resident.
  {
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
  }

  // This device's rank and its group's symmetric buffers (allocated for the whole group at
  // once, see handlers/symmetric.h), then the locality table (per context).
  const std::vector<int64_t> config{100, st->shape.num_experts, st->shape.capacity, st->shape.top_k,
                                    st->shape.hidden, st->shape.intermediate, c.num_sms,
                                    st->shape.num_ranks, st->shape.mma_kind};
  if (ffi::Error err = host::JoinGroup(d, x, ctx, dev, st->shape.num_ranks, st->rank_devices, config,
                                       l.num_bytes, kTarget, &e->buffer, &e->rank, &e->sym);
      !err.success()) {
    return err;
  }
  auto table = AcquireLocalityTable(d, x, ctx, sm_count);
  if (table.has_error()) return table.error();
  e->locality = std::move(table.value());
  if (st->routed_scaling_factor != 1.0f) {
    // The pre-dispatch kernel multiplies topk_weights[t,k] by expert_scales[idx[t,k]] in f32.
    e->expert_scales = std::make_unique<DeviceMemory>();
    if (ffi::Error err = Allocate(d, x, ctx, static_cast<uint64_t>(st->shape.num_experts) * 4,
                                  "expert scale array", e->expert_scales.get());
        !err.success()) {
      return err;
    }
    uint32_t bits = 0;
    std::memcpy(&bits, &st->routed_scaling_factor, 4);
    if (ffi::Error err = FillSync(d, x, *e->expert_scales, bits, "expert scale array");
        !err.success()) {
      return err;
    }
  }
  const CUdeviceptr base = e->buffer->ptr[e->rank];

  // Descriptors of the buffer's slices (fixed for the entry's lifetime).
  e->plans = sm100_tensor_map_plans(c, l);
  for (int i = 0; i < kSm100NumRoutedTensorMaps; ++i) {
    const Sm100TensorMapPlan& p = e->plans[static_cast<size_t>(i)];
    if (p.source != 0) continue;
    const void* at = reinterpret_cast<const void*>(base + p.offset);
    if (ffi::Error err = EncodeTiled(d, x, &e->maps[static_cast<size_t>(i)], p, at);
        !err.success()) {
      return err;
    }
    e->encoded_for[static_cast<size_t>(i)] = at;
  }
  *out = std::move(e);
  return ffi::Error::Success();
}

ffi::Error Initialize(CUstream stream, int32_t device, MegaMoeSm100State* st, ffi::AnyBuffer x,
                      ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights, ffi::AnyBuffer l1,
                      ffi::AnyBuffer l1_sf, ffi::AnyBuffer l2, ffi::AnyBuffer l2_sf,
                      ffi::Result<ffi::AnyBuffer> y) {
  int64_t T = 0;
  if (ffi::Error e = ValidateBuffers(st, x, topk_idx, topk_weights, l1, l1_sf, l2, l2_sf, *y, &T);
      !e.success()) {
    return e;
  }
  if (device < 0 || device >= MegaMoeSm100State::kMaxDevices) {
    return ffi::Error::InvalidArgument(cat(kTarget, ": device ordinal ", device, " out of range"));
  }
  if (MegaMoeSm100Device* e = st->devices[device].load(std::memory_order_acquire);
      e != nullptr && e->num_tokens == T) {
    return ffi::Error::Success();  // prepared by an earlier run
  }
  std::lock_guard<std::mutex> lock(st->mu);
  if (MegaMoeSm100Device* e = st->devices[device].load(std::memory_order_acquire);
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
  std::unique_ptr<MegaMoeSm100Device> entry;
  if (ffi::Error e = Prepare(d, dx, st, ctx, device, T, &entry); !e.success()) return e;
  st->devices[device].store(entry.get(), std::memory_order_release);
  st->owned.push_back(std::move(entry));
  return ffi::Error::Success();
}

ffi::Error Execute(CUstream stream, int32_t device, MegaMoeSm100State* st, ffi::AnyBuffer x,
                   ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights, ffi::AnyBuffer l1,
                   ffi::AnyBuffer l1_sf, ffi::AnyBuffer l2, ffi::AnyBuffer l2_sf,
                   ffi::Result<ffi::AnyBuffer> y) {
  int64_t T = 0;
  if (ffi::Error e = ValidateBuffers(st, x, topk_idx, topk_weights, l1, l1_sf, l2, l2_sf, *y, &T);
      !e.success()) {
    return e;
  }
  if (T == 0) return ffi::Error::Success();
  MegaMoeSm100Device* e = (device >= 0 && device < MegaMoeSm100State::kMaxDevices)
                              ? st->devices[device].load(std::memory_order_acquire)
                              : nullptr;
  if (e == nullptr || e->num_tokens != T) {
    return ffi::Error::Internal(cat(kTarget, ": not initialized for device ", device, " and T=", T,
                                    " (XLA skipped the initialize stage); execute never compiles "
                                    "or allocates"));
  }
  const layout::Sm100MegaConfig& c = e->config;
  const layout::Sm100MegaLayout& l = e->layout;
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
  // TMA: 16-byte aligned bases; the 16U4_ALIGN16B weight views need 32 bytes.
  for (const auto* p : {l1.untyped_data(), l2.untyped_data(), l1_sf.untyped_data(),
                        l2_sf.untyped_data(), y->untyped_data()}) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
      return ffi::Error::InvalidArgument(cat(kTarget, ": operands l1, l1_sf, l2, l2_sf and result "
                                             "y must be 32-byte aligned (TMA)"));
    }
  }

  // 1. Pre-dispatch into the buffer's input slots (x, x_sf, topk_idx, topk_weights; P rows).
  const int64_t H = c.hidden, K = c.top_k, P = c.num_max_tokens_per_rank;
  const CUdeviceptr base = e->buffer->ptr[e->rank];
  {
    jit::Sm100PreDispatchArgs a{
        x.untyped_data(),
        topk_idx.untyped_data(),
        topk_weights.untyped_data(),
        e->expert_scales ? reinterpret_cast<const void*>(e->expert_scales->ptr) : nullptr,
        reinterpret_cast<void*>(base + l.x),
        reinterpret_cast<void*>(base + l.x_sf),
        /*buf_x_scales=*/nullptr,
        reinterpret_cast<void*>(base + l.topk_idx),
        reinterpret_cast<void*>(base + l.topk_weights),
        static_cast<uint32_t>(T),
        static_cast<uint32_t>(P),
        static_cast<uint32_t>(H),
        static_cast<uint32_t>(H / 32),
        static_cast<uint32_t>(K)};
    void* params[] = {&a.x,          &a.topk_idx,     &a.topk_weights,     &a.expert_scales,
                      &a.buf_x,      &a.buf_x_sf,     &a.buf_x_scales,     &a.buf_topk_idx,
                      &a.buf_topk_weights, &a.num_tokens, &a.padded_max,  &a.hidden,
                      &a.num_groups, &a.top_k};
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
  jit::Sm100MegaMoeArgs a;
  std::memset(&a, 0, sizeof(a));
  a.y = y->untyped_data();
  a.cumulative_local_expert_recv_stats = nullptr;
  a.l1_alphas = a.l2_alphas = a.l2_act_scales = a.post_expert_norm_weight = nullptr;
  a.num_tokens = static_cast<uint32_t>(T);
  a.sym_buffer = e->sym;
  a.sm_locality_domains = reinterpret_cast<const uint8_t*>(e->locality->ptr);
  {
    std::lock_guard<std::mutex> lock(e->mu);
    const void* operands[5] = {nullptr, l1.untyped_data(), l1_sf.untyped_data(), l2.untyped_data(),
                               l2_sf.untyped_data()};
    for (int i = 0; i < kSm100NumRoutedTensorMaps; ++i) {
      const Sm100TensorMapPlan& p = e->plans[static_cast<size_t>(i)];
      if (p.source != 0 && e->encoded_for[static_cast<size_t>(i)] != operands[p.source]) {
        if (ffi::Error err = EncodeTiled(d, dx, &e->maps[static_cast<size_t>(i)], p,
                                         operands[p.source]);
            !err.success()) {
          e->encoded_for[static_cast<size_t>(i)] = nullptr;
          return err;
        }
        e->encoded_for[static_cast<size_t>(i)] = operands[p.source];
      }
      a.maps[i] = e->maps[static_cast<size_t>(i)];
    }
  }
  // No shared experts: the shared slots get copies of the routed descriptors (as DeepGEMM 0.2.5
  // passes them); the kernel only prefetches them.
  for (int i = 0; i < jit::kSm100SharedL1Acts; ++i) a.maps[jit::kSm100SharedL1Acts + i] = a.maps[i];

  void* params[jit::kSm100MegaMoeNumParams];
  int n = 0;
  params[n++] = &a.y;
  params[n++] = &a.cumulative_local_expert_recv_stats;
  params[n++] = &a.l1_alphas;
  params[n++] = &a.l2_alphas;
  params[n++] = &a.l2_act_scales;
  params[n++] = &a.post_expert_norm_weight;
  params[n++] = &a.num_tokens;
  params[n++] = &a.sym_buffer;
  for (int i = 0; i < jit::kSm100NumTensorMaps; ++i) params[n++] = &a.maps[i];
  params[n++] = &a.sm_locality_domains;
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
  lc.attrs = &attr;
  lc.numAttrs = 1;
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
layout::Sm100MegaShape ShapeOf(int64_t ranks, int64_t E, int64_t P, int64_t K, int64_t H,
                               int64_t I, int64_t mma_kind) {
  layout::Sm100MegaShape s;
  s.num_ranks = ranks;
  s.num_experts = E;
  s.capacity = P;
  s.top_k = K;
  s.hidden = H;
  s.intermediate = I;
  s.mma_kind = mma_kind;
  return s;
}

bool LayoutOf(const layout::Sm100MegaShape& s, int64_t num_sms, layout::Sm100MegaLayout* l) {
  std::string why;
  if (!layout::sm100_mega_shape_valid(s, &why) || !layout::sm100_mega_layout(s, num_sms, l, &why)) {
    set_last_error(why);
    return false;
  }
  return true;
}

bool ConfigOf(int64_t ranks, int64_t E, int64_t P, int64_t K, int64_t H, int64_t I,
              int64_t mma_kind, int64_t T, int64_t num_sms, float clamp, int fast_math,
              layout::Sm100MegaConfig* c) {
  const auto s = ShapeOf(ranks, E, P, K, H, I, mma_kind);
  layout::Sm100MegaLayout l;
  if (!LayoutOf(s, num_sms, &l)) return false;
  std::string why;
  if (!layout::sm100_mega_config(s, l, T, clamp, fast_math != 0, c, &why)) {
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

JMM_EXPORT XLA_FFI_TypeId* jmm_mega_moe_sm100_state_type_id() { return &jmm::MegaMoeSm100State::id; }
JMM_EXPORT const XLA_FFI_TypeInfo* jmm_mega_moe_sm100_state_type_info() {
  return &jmm::kMegaMoeSm100StateTypeInfo;
}

// Symmetric-buffer layout of (ranks, E, P, K, H, I, mma_kind) sized for num_sms SMs. Writes
// min(n, 21) int64 values: [workspace_bytes, x, x_sf, topk_idx, topk_weights, l1, l1_sf,
// l1_topk_weights, l2, l2_sf, combine, input_x_scales, l1_x_scales, num_bytes,
// num_max_pool_tokens, num_ring_tokens, num_sf_ring_tokens, num_experts_per_rank, elem_bits,
// ring_is_full_pool, num_sms]. Returns the count, or -1 (jmm_last_error).
JMM_EXPORT int jmm_sm100_mega_layout(int64_t ranks, int64_t E, int64_t P, int64_t K, int64_t H,
                                     int64_t I, int64_t mma_kind, int64_t num_sms, int64_t* out,
                                     int n) {
  jmm::layout::Sm100MegaLayout l;
  if (!jmm::LayoutOf(jmm::ShapeOf(ranks, E, P, K, H, I, mma_kind), num_sms, &l)) return -1;
  const auto u = [](uint64_t v) { return static_cast<int64_t>(v); };
  const int64_t v[] = {u(l.workspace_bytes), u(l.x), u(l.x_sf), u(l.topk_idx),
                       u(l.topk_weights), u(l.l1), u(l.l1_sf), u(l.l1_topk_weights), u(l.l2),
                       u(l.l2_sf), u(l.combine), u(l.input_x_scales), u(l.l1_x_scales),
                       u(l.num_bytes), l.num_max_pool_tokens, l.num_ring_tokens,
                       l.num_sf_ring_tokens, l.num_experts_per_rank, l.elem_bits,
                       l.ring_is_full_pool ? 1 : 0, l.num_sms};
  return jmm::copy_out(v, out, n);
}

// Kernel configuration for a call of T tokens per rank. Writes min(n, 52) int64 values in the
// order of tests/test_mega_layout_sm100.py (SM100_CONFIG_FIELDS).
JMM_EXPORT int jmm_sm100_mega_config(int64_t ranks, int64_t E, int64_t P, int64_t K, int64_t H,
                                     int64_t I, int64_t mma_kind, int64_t T, int64_t num_sms,
                                     float clamp, int fast_math, int64_t* out, int n) {
  jmm::layout::Sm100MegaConfig c;
  if (!jmm::ConfigOf(ranks, E, P, K, H, I, mma_kind, T, num_sms, clamp, fast_math, &c)) return -1;
  const int64_t v[] = {
      c.num_max_tokens_per_rank, c.hidden, c.intermediate, c.num_experts, c.num_shared_experts,
      c.top_k, c.block_m, c.block_n, c.block_k, c.store_block_m_l1, c.store_block_m_l2,
      c.sf_block_m, c.sf_block_n, c.mma_kind, c.num_ring_tokens, c.num_sf_ring_tokens,
      c.num_stages, c.num_bytes_per_pull, c.num_dispatch_threads, c.num_non_epilogue_threads,
      c.num_epilogue_threads, c.num_sms, c.num_ranks, c.use_situ, c.fast_math, c.use_x_scales,
      c.with_l1_alphas, c.with_l2_alphas, c.with_l2_act_scales, c.use_fp8_combine,
      c.post_expert_norm, c.post_norm_weight_first, c.post_norm_has_weight,
      c.use_trtllm_weights, c.elem_bits, c.block_k_bytes, c.load_block_m, c.load_block_n,
      c.gran_k, c.swizzle_acts_mode, c.swizzle_weights_mode, c.l1_out_block_n_bytes,
      c.num_locality_domains, c.combine_chunks, c.num_tmem_cols, c.cluster_size, c.num_threads,
      c.smem_size, c.host_smem_size, c.kernel_smem_bytes, c.reusable_smem_bytes,
      static_cast<int64_t>(std::lround(static_cast<double>(c.expected_tokens_per_expert) * 1000.0))};
  return jmm::copy_out(v, out, n);
}

// kernel.cu of the mega kernel for that configuration. Returns the length (>= cap: truncated),
// or -1 (jmm_last_error).
JMM_EXPORT int jmm_sm100_mega_render(int64_t ranks, int64_t E, int64_t P, int64_t K, int64_t H,
                                     int64_t I, int64_t mma_kind, int64_t T, int64_t num_sms,
                                     float clamp, int fast_math, char* out, size_t cap) {
  jmm::layout::Sm100MegaConfig c;
  if (!jmm::ConfigOf(ranks, E, P, K, H, I, mma_kind, T, num_sms, clamp, fast_math, &c)) return -1;
  return static_cast<int>(jmm::copy_out(jmm::jit::mega_moe_sm100_source(c).source, out, cap));
}

// Compiles (or finds in the caches) that kernel for sm_100f; writes the cubin path. 0 on success.
JMM_EXPORT int jmm_sm100_mega_compile(int64_t ranks, int64_t E, int64_t P, int64_t K, int64_t H,
                                      int64_t I, int64_t mma_kind, int64_t T, int64_t num_sms,
                                      float clamp, int fast_math, char* cubin_path_out,
                                      size_t cap, char* err_out, size_t err_cap) {
  jmm::layout::Sm100MegaConfig c;
  if (!jmm::ConfigOf(ranks, E, P, K, H, I, mma_kind, T, num_sms, clamp, fast_math, &c)) {
    jmm::copy_out(jmm::last_error(), err_out, err_cap);
    return 1;
  }
  jmm::jit::CompiledKernel compiled;
  std::string why;
  if (!jmm::jit::jit_compile(jmm::jit::mega_moe_sm100_source(c), &compiled, &why)) {
    jmm::set_last_error(why);
    jmm::copy_out(why, err_out, err_cap);
    return 1;
  }
  jmm::copy_out(compiled.cubin_path, cubin_path_out, cap);
  jmm::copy_out("", err_out, err_cap);
  return 0;
}

// The nine routed TMA descriptor plans for that configuration (the shared-expert slots get copies).
// Per plan 20 int64 values: source, offset, dtype, rank, dims[5], strides[4], box[5], swizzle,
// index. Writes min(n, 9 * 20) values; returns the count, or -1 (jmm_last_error).
JMM_EXPORT int jmm_sm100_mega_tensor_maps(int64_t ranks, int64_t E, int64_t P, int64_t K, int64_t H,
                                          int64_t I, int64_t mma_kind, int64_t T, int64_t num_sms,
                                          int64_t* out, int n) {
  jmm::layout::Sm100MegaConfig c;
  if (!jmm::ConfigOf(ranks, E, P, K, H, I, mma_kind, T, num_sms, INFINITY, 1, &c)) return -1;
  jmm::layout::Sm100MegaLayout l;
  if (!jmm::LayoutOf(jmm::ShapeOf(ranks, E, P, K, H, I, mma_kind), num_sms, &l)) return -1;
  std::vector<int64_t> v;
  int index = 0;
  for (const auto& p : jmm::sm100_tensor_map_plans(c, l)) {
    v.push_back(p.source);
    v.push_back(static_cast<int64_t>(p.offset));
    v.push_back(p.dtype);
    v.push_back(p.rank);
    for (int64_t d : p.dims) v.push_back(d);
    for (int64_t s : p.strides) v.push_back(s);
    for (int64_t b : p.box) v.push_back(b);
    v.push_back(p.swizzle);
    v.push_back(index++);
  }
  int i = 0;
  for (; out != nullptr && i < n && i < static_cast<int>(v.size()); ++i) out[i] = v[static_cast<size_t>(i)];
  return i;
}

// Host-side view of the sm_locality_domains table the handler uploads for a device with
// sm_count SMs: writes min(n, entries) bytes, returns the entry count.
JMM_EXPORT int jmm_sm100_locality_table(int64_t sm_count, uint8_t* out, int n) {
  if (sm_count < 1) {
    jmm::set_last_error(jmm::cat("sm_count=", sm_count, " must be >= 1"));
    return -1;
  }
  const int64_t entries = jmm::sm100_locality_table_entries(sm_count);
  for (int64_t i = 0; out != nullptr && i < n && i < entries; ++i) {
    out[i] = jmm::sm100_balanced_locality_domain(i);
  }
  return static_cast<int>(entries);
}

#define JMM_MEGA100_INSTANTIATE_BINDING           \
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
      .Attr<int64_t>("mma_kind")                  \
      .Attr<int64_t>("num_ranks")                 \
      .Attr<ffi::Span<const int64_t>>("rank_devices")
#define JMM_MEGA100_BUFFERS                       \
  .Arg<ffi::AnyBuffer>() /* x */                  \
      .Arg<ffi::AnyBuffer>() /* topk_idx */       \
      .Arg<ffi::AnyBuffer>() /* topk_weights */   \
      .Arg<ffi::AnyBuffer>() /* l1 */             \
      .Arg<ffi::AnyBuffer>() /* l1_sf */          \
      .Arg<ffi::AnyBuffer>() /* l2 */             \
      .Arg<ffi::AnyBuffer>() /* l2_sf */          \
      .Ret<ffi::AnyBuffer>() /* y */
#define JMM_MEGA100_INITIALIZE_BINDING                       \
  ffi::Ffi::Bind<ffi::ExecutionStage::kInitialize>()         \
      .Ctx<ffi::PlatformStream<CUstream>>()                  \
      .Ctx<ffi::DeviceOrdinal>()                             \
      .Ctx<ffi::State<jmm::MegaMoeSm100State>>() JMM_MEGA100_BUFFERS
#define JMM_MEGA100_EXECUTE_BINDING                          \
  ffi::Ffi::Bind()                                           \
      .Ctx<ffi::PlatformStream<CUstream>>()                  \
      .Ctx<ffi::DeviceOrdinal>()                             \
      .Ctx<ffi::State<jmm::MegaMoeSm100State>>() JMM_MEGA100_BUFFERS

JMM_EXPORT XLA_FFI_Error* jmm_mega_moe_sm100_instantiate(XLA_FFI_CallFrame*);
JMM_EXPORT XLA_FFI_Error* jmm_mega_moe_sm100_initialize(XLA_FFI_CallFrame*);
JMM_EXPORT XLA_FFI_Error* jmm_mega_moe_sm100_execute(XLA_FFI_CallFrame*);

// Plain target: XLA runs it outside CUDA graphs.
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmm_mega_moe_sm100_instantiate, jmm::Instantiate,
                              JMM_MEGA100_INSTANTIATE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmm_mega_moe_sm100_initialize, jmm::Initialize,
                              JMM_MEGA100_INITIALIZE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jmm_mega_moe_sm100_execute, jmm::Execute,
                              JMM_MEGA100_EXECUTE_BINDING);
