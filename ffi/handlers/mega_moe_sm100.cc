#include "handlers/mega_moe_sm100.h"

// NOT RUN ON HARDWARE: no sm_100 GPU was available to this project. Every GPU stage below is
// written to the standard of handlers/mega_moe_sm90.cc (which has run on an H200) and compiles
// into the library, but has never executed. See the header for the contract.

#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "common/c_api.h"
#include "common/export.h"
#include "common/status.h"
#include "cuda/driver.h"
#include "handlers/attrs.h"
#include "handlers/host_glue.h"
#include "jit/mega_kernels.h"

namespace ffi = xla::ffi;

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jmm::Sm100MegaMoeAttrs, JMM_MEGA_MOE_ATTR_MEMBERS,
                                      ::xla::ffi::StructMember<::jmm::MmaKind>("mma_kind"));

namespace jmm {

// MapDtype::kU4Align16B (CU_TENSOR_MAP_DATA_TYPE_16U4_ALIGN16B, CUDA 12.8+ headers): packed E2M1
// in global memory, each 4-bit value in an 8-bit container in shared memory (DeepGEMM's "unpacked
// smem" FP4 weights of the fp8xfp4 kernel, which feeds kind::mxf8f6f4).
static_assert(kSm100NumRoutedTensorMaps == jit::kSm100SharedL1Acts,
              "the routed descriptors precede the shared-expert ones");

using host::driver_ext;
using host::DriverExt;
namespace {
constexpr const char* kTarget = Sm100Mega::kTarget;
}  // namespace

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

namespace {

// Allocates `bytes` in the current context `ctx` (called from initialize only).
ffi::Error Allocate(const cuda::Driver* d, const DriverExt* x, CUcontext ctx, uint64_t bytes,
                    const char* what, DeviceMemory* m) {
  m->ctx = ctx;
  m->bytes = bytes;
  if (CUresult r = x->MemAlloc(&m->ptr, static_cast<size_t>(bytes)); r != CUDA_SUCCESS) {
    m->ptr = 0;
    return ffi::Error::Internal(
        cat(kTarget, ": cuMemAlloc of the ", bytes, "-byte ", what,
            " failed: ", cuda::error_string(d, r),
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
                                                                 const DriverExt* x, CUcontext ctx,
                                                                 int sm_count) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  if (auto it = g_locality_tables.find(ctx); it != g_locality_tables.end()) {
    if (auto alive = it->second.lock()) return alive;
  }
  const int64_t n = sm100_locality_table_entries(sm_count);
  std::vector<uint8_t> host(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) host[static_cast<size_t>(i)] = sm100_balanced_locality_domain(i);
  auto table = std::make_shared<DeviceMemory>();
  if (ffi::Error e =
          Allocate(d, x, ctx, static_cast<uint64_t>(n), "sm_locality_domains table", table.get());
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
    return ffi::Unexpected<ffi::Error>(ffi::Error::Internal(cat(
        kTarget, ": uploading the sm_locality_domains table failed: ", cuda::error_string(d, r))));
  }
  g_locality_tables[ctx] = table;
  return table;
}

}  // namespace

std::array<TensorMapPlan, Sm100Mega::kNumTensorMaps> Sm100Mega::Plans(const Config& c,
                                                                      const Layout& l) {
  const int64_t H = c.hidden, I = c.intermediate, e_local = l.num_experts_per_rank;
  const int64_t R = l.num_ring_tokens, Rsf = l.num_sf_ring_tokens;
  const int64_t hb = H * c.elem_bits / 8, ib = I * c.elem_bits / 8;  // activation row bytes
  const int64_t sf_rows = c.block_k / (c.gran_k * 4);                // SF words per K block
  constexpr MapDtype kUint8 = MapDtype::kUint8, kInt32 = MapDtype::kInt32;
  using Src = MapSource;
  const auto plan2 = mega::Plan2D;
  // Routed weights [E][N][K/2] packed E2M1, viewed 4-D as [E][2 halves][N/2][K] (the kernel loads
  // (k, n within the half, half, expert)); K in bytes (mxf4xmxf4: UINT8) or in 4-bit elements
  // (fp8xfp4: 16U4_ALIGN16B, each value unpacked to an 8-bit shared-memory container).
  const auto weights = [&](const char* name, MapSource source, int64_t n, int64_t k) {
    const bool unpacked = c.mma_kind == MmaKind::kMXFP8FP4;
    const int64_t row = k / 2;
    TensorMapPlan p;
    p.name = name;
    p.source = source;
    p.dtype = unpacked ? MapDtype::kU4Align16B : kUint8;
    p.rank = 4;
    const int64_t dims[4] = {unpacked ? k : row, n / 2, 2, e_local};
    const int64_t strides[3] = {row, (n / 2) * row, n * row};
    const int64_t box[4] = {c.block_k_bytes, c.load_block_n, 1, 1};
    for (int i = 0; i < 4; ++i) p.dims[i] = dims[i], p.box[i] = box[i];
    for (int i = 0; i < 3; ++i) p.strides[i] = strides[i];
    p.swizzle = static_cast<Swizzle>(c.swizzle_weights_mode);
    return p;
  };
  const auto sw_acts = static_cast<Swizzle>(c.swizzle_acts_mode);
  const auto sw_out = static_cast<Swizzle>(c.l1_out_block_n_bytes);  // 64B (FP8) / 32B (FP4)
  constexpr Swizzle kNone = Swizzle::kNone;
  return {
      // A operand of L1: [R, H*b/8] bytes, (BLOCK_M/2 rows x 128 B) per CTA, 128B swizzle
      plan2("l1_acts", Src::kBuffer, l.l1, kUint8, hb, R, hb, c.block_k_bytes, c.load_block_m,
            sw_acts),
      // SFA of L1: int32 [H/128][Rsf] (MN-major), (SF_BLOCK_M x BLOCK_K/128) words
      plan2("l1_acts_sf", Src::kBuffer, l.l1_sf, kInt32, Rsf, H / 128, Rsf * 4, c.sf_block_m,
            sf_rows, kNone),
      weights("l1_weights", Src::kL1, 2 * I, H),
      // SFB of L1: int32 [E][H/128][2I] (MN-major), (128 x BLOCK_K/128) words
      plan2("l1_weights_sf", Src::kL1Sf, 0, kInt32, 2 * I, e_local * (H / 128), 2 * I * 4,
            c.block_n, sf_rows, kNone),
      // L1 output (post-SwiGLU, requantised) stores into l2: (STORE_BLOCK_M_L1 x BLOCK_N/2 values)
      plan2("l1_output", Src::kBuffer, l.l2, kUint8, ib, R, ib, c.l1_out_block_n_bytes,
            c.store_block_m_l1, sw_out),
      plan2("l2_acts", Src::kBuffer, l.l2, kUint8, ib, R, ib, c.block_k_bytes, c.load_block_m,
            sw_acts),
      plan2("l2_acts_sf", Src::kBuffer, l.l2_sf, kInt32, Rsf, I / 128, Rsf * 4, c.sf_block_m,
            sf_rows, kNone),
      weights("l2_weights", Src::kL2, H, I),
      plan2("l2_weights_sf", Src::kL2Sf, 0, kInt32, H, e_local * (I / 128), H * 4, c.block_n,
            sf_rows, kNone),
  };
}

Sm100Mega::DeviceExtra::DeviceExtra() = default;
Sm100Mega::DeviceExtra::~DeviceExtra() = default;

bool Sm100Mega::AttrsValid(const Attrs& a, std::string* why) {
  if (a.common.num_ranks >
      32) {  // the sm_90 kernel's limit; the sm_100 one takes 72, the table code 32
    *why = cat("attribute num_ranks=", a.common.num_ranks, " must be in [1, 32]");
    return false;
  }
  return mma_kind_valid(100, a.mma_kind, why);
}

Sm100Mega::Shape Sm100Mega::ShapeOf(const Attrs& a) {
  const mega::MegaMoeAttrs& m = a.common;
  Shape s = mega::CommonShape<Shape>(m.num_ranks, m.num_experts, m.capacity, m.top_k, m.hidden,
                                     m.intermediate);
  s.mma_kind = a.mma_kind;
  return s;
}

bool Sm100Mega::ShapeValid(const Shape& s, std::string* why) {
  return layout::sm100_mega_shape_valid(s, why);
}

bool Sm100Mega::SetMmaKind(MmaKind k, Shape* s, std::string* why) {
  s->mma_kind = k;
  return mma_kind_valid(100, k, why);
}

std::array<mega::WeightSpec, 4> Sm100Mega::Weights(const Shape& s) {
  const int64_t H = s.hidden, I = s.intermediate;
  return {{{"l1", ffi::DataType::U8, 2 * I, H / 2},
           {"l1_sf", ffi::DataType::S32, H / 128, 2 * I},
           {"l2", ffi::DataType::U8, H, I / 2},
           {"l2_sf", ffi::DataType::S32, I / 128, H}}};
}

bool Sm100Mega::Plan(const Shape& s, const Options&, int64_t num_sms, int64_t num_tokens,
                     float clamp, bool fast_math, Layout* l, Config* c, std::string* why) {
  return layout::sm100_mega_layout(s, num_sms, l, why) &&
         layout::sm100_mega_config(s, *l, num_tokens, clamp, fast_math, c, why);
}

jit::KernelSource Sm100Mega::Source(const Config& c) { return jit::mega_moe_sm100_source(c); }

void Sm100Mega::ExtendGroupKey(const Shape& s, std::vector<int64_t>* key) {
  key->push_back(mma_kind_value(s.mma_kind));
}

// The locality table (per context), the expert-scale array, the buffer slices' descriptors.
ffi::Error Sm100Mega::PrepareExtra(const cuda::Driver* d, const DriverExt* x, const State& st,
                                   CUcontext ctx, int sm_count, Device* e) {
  auto table = AcquireLocalityTable(d, x, ctx, sm_count);
  if (table.has_error()) return table.error();
  e->locality = std::move(table.value());
  if (st.routed_scaling_factor != 1.0f) {
    // The pre-dispatch kernel multiplies topk_weights[t,k] by expert_scales[idx[t,k]] in f32.
    e->expert_scales = std::make_unique<DeviceMemory>();
    if (ffi::Error err = Allocate(d, x, ctx, static_cast<uint64_t>(st.shape.num_experts) * 4,
                                  "expert scale array", e->expert_scales.get());
        !err.success()) {
      return err;
    }
    uint32_t bits = 0;
    std::memcpy(&bits, &st.routed_scaling_factor, 4);
    if (ffi::Error err = FillSync(d, x, *e->expert_scales, bits, "expert scale array");
        !err.success()) {
      return err;
    }
  }
  e->maps.plans = Plans(e->config, e->layout);
  return mega::EncodeBufferMaps(d, x, kTarget, e->buffer->ptr[e->rank], &e->maps);
}

const void* Sm100Mega::ExpertScales(const Device& e) {
  return e.expert_scales ? reinterpret_cast<const void*>(e.expert_scales->ptr) : nullptr;
}

ffi::Error Sm100Mega::KernelArgs(const cuda::Driver* d, const DriverExt* x, const State&, int64_t T,
                                 const mega::ExecuteOperands& ops, Device* e, Args* a,
                                 void** params) {
  a->y = ops.y;
  a->cumulative_local_expert_recv_stats = nullptr;
  a->l1_alphas = a->l2_alphas = a->l2_act_scales = a->post_expert_norm_weight = nullptr;
  a->num_tokens = static_cast<uint32_t>(T);
  a->sym_buffer = e->sym;
  a->sm_locality_domains = reinterpret_cast<const uint8_t*>(e->locality->ptr);
  {
    std::lock_guard<std::mutex> lock(e->mu);
    if (ffi::Error err = mega::EncodeOperandMaps(d, x, kTarget, ops, &e->maps); !err.success()) {
      return err;
    }
    for (int i = 0; i < kSm100NumRoutedTensorMaps; ++i)
      a->maps[i] = e->maps.maps[static_cast<size_t>(i)];
  }
  // No shared experts: the shared slots get copies of the routed descriptors (as DeepGEMM 0.2.5
  // passes them); the kernel only prefetches them.
  for (int i = 0; i < jit::kSm100SharedL1Acts; ++i)
    a->maps[jit::kSm100SharedL1Acts + i] = a->maps[i];
  int n = 0;
  params[n++] = &a->y;
  params[n++] = &a->cumulative_local_expert_recv_stats;
  params[n++] = &a->l1_alphas;
  params[n++] = &a->l2_alphas;
  params[n++] = &a->l2_act_scales;
  params[n++] = &a->post_expert_norm_weight;
  params[n++] = &a->num_tokens;
  params[n++] = &a->sym_buffer;
  for (int i = 0; i < jit::kSm100NumTensorMaps; ++i) params[n++] = &a->maps[i];
  params[n++] = &a->sm_locality_domains;
  return ffi::Error::Success();
}

}  // namespace jmm

// ---------------------------------------------------------------------------
// Exported symbols (see ffi/exports.map; Python: jax_megamoe/_src/kernels/_ffi.py).
// ---------------------------------------------------------------------------

JMM_DEFINE_MEGA_MOE_STATE(jmm_mega_moe_sm100, ::jmm::Sm100Mega)

// The plain target only (XLA runs it outside CUDA graphs; handlers/stages.h).
JMM_DEFINE_STAGES(jmm_mega_moe_sm100, JMM_MEGA_MOE_STAGES(::jmm::Sm100Mega));
