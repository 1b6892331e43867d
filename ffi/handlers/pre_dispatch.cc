#include "handlers/pre_dispatch.h"

#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>

#include "common/c_api.h"
#include "common/export.h"
#include "common/status.h"
#include "cuda/driver.h"
#include "handlers/attrs.h"
#include "handlers/buffer_checks.h"
#include "handlers/host_glue.h"
#include "handlers/stages.h"
#include "jit/compiler.h"
#include "jit/kernels.h"
#include "jit/loader.h"

namespace ffi = xla::ffi;

namespace jmm {

ffi::TypeId PreDispatchState::id = XLA_FFI_UNKNOWN_TYPE_ID;

PreDispatchState::~PreDispatchState() = default;

namespace {

constexpr XLA_FFI_TypeInfo kPreDispatchStateTypeInfo = ffi::MakeTypeInfo<PreDispatchState>();

const char* TargetName(int arch) {
  return arch == 90 ? "jax_megamoe_pre_dispatch_sm90" : "jax_megamoe_pre_dispatch_sm100";
}

// Checks one buffer; on mismatch returns InvalidArgument naming it.
ffi::Error Expect(int arch, const char* role, const char* name, const ffi::AnyBuffer& b,
                  ffi::DataType t, std::initializer_list<int64_t> dims) {
  return ExpectBuffer(TargetName(arch), role, name, b, t, dims);
}

// Attribute checks shared by instantiate (and mirrored in Python's ops.py).
ffi::Error ValidateAttrs(int arch, int64_t hidden, int64_t top_k, int64_t capacity, int64_t group,
                         MmaKind mma_kind, float rsf) {
  const char* t = TargetName(arch);
  const int64_t want_group = arch == 90 ? 128 : 32;
  if (group != want_group) {
    return ffi::Error::InvalidArgument(
        cat(t, ": attribute group=", group, " must be ", want_group));
  }
  std::string why;
  if (!mma_kind_valid(arch, mma_kind, &why)) {
    return ffi::Error::InvalidArgument(cat(t, ": ", why));
  }
  if (hidden <= 0 || hidden % 128 != 0 || hidden / 8 > 1024) {
    return ffi::Error::InvalidArgument(
        cat(t, ": attribute hidden=", hidden,
            " must be a positive multiple of 128 and at most 8192 (one thread per 8 columns, "
            "at most 1024 threads)"));
  }
  if (top_k < 1 || top_k > hidden / 8) {
    return ffi::Error::InvalidArgument(
        cat(t, ": attribute top_k=", top_k, " must be in [1, hidden/8 = ", hidden / 8, "]"));
  }
  // The kernel indexes slots and scale bytes with 32-bit arithmetic.
  if (capacity < 0 || capacity * top_k > std::numeric_limits<int32_t>::max() ||
      capacity * (hidden / group) > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument(cat(t, ": attribute capacity=", capacity,
                                           " must be >= 0 with capacity*top_k and ",
                                           "capacity*hidden/group below 2^31"));
  }
  if (arch == 90 && !std::isfinite(rsf)) {
    return ffi::Error::InvalidArgument(
        cat(t, ": attribute routed_scaling_factor=", rsf, " must be finite"));
  }
  if (arch == 100 && rsf != 1.0f) {
    return ffi::Error::InvalidArgument(
        cat(t, ": attribute routed_scaling_factor=", rsf,
            " must be 1.0 (the sm_100 kernel has no routed scaling; fold it into the weights)"));
  }
  return ffi::Error::Success();
}

template <int kArch>
ffi::ErrorOr<std::unique_ptr<PreDispatchState>> Instantiate(int64_t hidden, int64_t top_k,
                                                            int64_t capacity, int64_t group,
                                                            MmaKind mma_kind, float rsf) {
  if (ffi::Error e = ValidateAttrs(kArch, hidden, top_k, capacity, group, mma_kind, rsf);
      !e.success()) {
    return ffi::Unexpected<ffi::Error>(std::move(e));
  }
  auto state = std::make_unique<PreDispatchState>();
  state->arch = kArch;
  state->mma_kind = mma_kind;
  state->hidden = hidden, state->top_k = top_k, state->capacity = capacity;  // the shape
  state->group = group;
  state->routed_scaling_factor = rsf;
  return host::WithKernel(std::move(state), jit::pre_dispatch_source(kArch, mma_kind),
                          TargetName(kArch));
}

// The kernel's CUfunction in the current context `ctx` (host::FunctionCache: cached per context).
ffi::Error FunctionFor(const cuda::Driver* d, PreDispatchState* st, CUcontext ctx, CUfunction* fn) {
  return st->functions.Get(d, *st->kernel, ctx, TargetName(st->arch), fn);
}

const cuda::Driver* DriverOr(std::string* why) { return cuda::driver(why); }

ffi::Error Initialize(CUstream stream, int32_t device, PreDispatchState* st) {
  std::string why;
  const cuda::Driver* d = DriverOr(&why);
  if (d == nullptr) return ffi::Error::Internal(cat(TargetName(st->arch), ": ", why));
  host::ContextScope scope;
  CUcontext ctx = nullptr;
  if (ffi::Error e = scope.Enter(d, stream, device, &ctx, TargetName(st->arch)); !e.success())
    return e;
  CUfunction fn = nullptr;
  return FunctionFor(d, st, ctx, &fn);
}

template <int kArch>
ffi::Error Execute(CUstream stream, int32_t device, PreDispatchState* st, ffi::AnyBuffer x,
                   ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights,
                   ffi::Result<ffi::AnyBuffer> x_q, ffi::Result<ffi::AnyBuffer> x_sf,
                   ffi::Result<ffi::AnyBuffer> topk_idx_out,
                   ffi::Result<ffi::AnyBuffer> topk_weights_out) {
  const char* t = TargetName(kArch);
  if (st->arch != kArch) {
    return ffi::Error::Internal(cat(t, ": state was instantiated for sm_", st->arch));
  }
  const int64_t H = st->hidden, K = st->top_k, P = st->capacity;
  int64_t T = 0;
  if (ffi::Error e = ExpectTokens(t, x, H, P, &T); !e.success()) return e;
  const bool fp4 = kArch == 100 && st->mma_kind == MmaKind::kMXFP4;
  const ffi::DataType q_type = fp4 ? ffi::DataType::U8 : ffi::DataType::F8E4M3FN;
  const int64_t q_cols = fp4 ? H / 2 : H;
  const ffi::DataType sf_type = kArch == 90 ? ffi::DataType::F32 : ffi::DataType::S32;
  const int64_t sf_cols = H / 128;  // sm90: one f32 per 128; sm100: 4 UE8M0 bytes per int32
  ffi::Error e = Expect(kArch, "operand", "topk_idx", topk_idx, ffi::DataType::S32, {T, K});
  if (e.success()) {
    e = Expect(kArch, "operand", "topk_weights", topk_weights, ffi::DataType::F32, {T, K});
  }
  if (e.success()) e = Expect(kArch, "result", "x_q", *x_q, q_type, {P, q_cols});
  if (e.success()) e = Expect(kArch, "result", "x_sf", *x_sf, sf_type, {P, sf_cols});
  if (e.success() && !Matches(*topk_idx_out, ffi::DataType::S64, {P, K})) {
    e = Expect(kArch, "result", "topk_idx_out", *topk_idx_out, ffi::DataType::S32, {P, K, 2});
  }
  if (e.success()) {
    e = Expect(kArch, "result", "topk_weights_out", *topk_weights_out, ffi::DataType::F32, {P, K});
  }
  if (!e.success()) return e;

  const PreDispatchLaunch plan = plan_pre_dispatch(kArch, st->mma_kind, T, P, H, K);
  const int64_t threads = plan.block;
  const int64_t blocks = plan.grid;
  if (blocks == 0) return ffi::Error::Success();  // P == 0: nothing to write

  std::string why;
  const cuda::Driver* d = DriverOr(&why);
  if (d == nullptr) return ffi::Error::Internal(cat(t, ": ", why));
  host::ContextScope scope;
  CUcontext ctx = nullptr;
  if (e = scope.Enter(d, stream, device, &ctx, TargetName(st->arch)); !e.success()) return e;
  CUfunction fn = nullptr;
  if (e = FunctionFor(d, st, ctx, &fn); !e.success()) return e;

  // The kernel never writes x/x_sf rows [T, P); define them as zero.
  if (P > T) {
    const struct {
      const char* name;
      void* base;
      int64_t row_bytes;
    } pads[2] = {{"x_q", x_q->untyped_data(), plan.x_row_bytes},
                 {"x_sf", x_sf->untyped_data(), plan.sf_row_bytes}};
    for (const auto& p : pads) {
      const CUdeviceptr dst =
          reinterpret_cast<CUdeviceptr>(p.base) + static_cast<CUdeviceptr>(T * p.row_bytes);
      if (CUresult r = d->MemsetD8Async(dst, 0, static_cast<size_t>((P - T) * p.row_bytes), stream);
          r != CUDA_SUCCESS) {
        return ffi::Error::Internal(cat(t, ": cuMemsetD8Async of the pad rows of ", p.name,
                                        " failed: ", cuda::error_string(d, r)));
      }
    }
  }

  PreDispatchOperands o;
  o.x = x.untyped_data();
  o.topk_idx = topk_idx.untyped_data();
  o.topk_weights = topk_weights.untyped_data();
  o.buf_x = x_q->untyped_data();
  o.buf_x_sf = x_sf->untyped_data();
  o.buf_topk_idx = topk_idx_out->untyped_data();
  o.buf_topk_weights = topk_weights_out->untyped_data();
  PreDispatchLaunch launched;
  const CUresult r = launch_pre_dispatch(d, fn, stream, kArch, st->mma_kind, o, T, P, H, K,
                                         st->routed_scaling_factor, &launched);
  if (r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(t, ": cuLaunchKernel(", st->kernel->symbol, ", grid=", blocks,
                                    ", block=", threads, ") failed: ", cuda::error_string(d, r)));
  }
  return ffi::Error::Success();
}

}  // namespace
PreDispatchLaunch plan_pre_dispatch(int arch, MmaKind mma_kind, int64_t T, int64_t P, int64_t H,
                                    int64_t K) {
  PreDispatchLaunch p;
  p.block = H / 8;
  const int64_t pad_slots = (P - T) * K;
  p.grid = T + (p.block > 0 ? (pad_slots + p.block - 1) / p.block : 0);
  const int64_t group = arch == 90 ? 128 : 32;
  p.num_groups = H / group;
  p.x_row_bytes = (arch != 90 && mma_kind == MmaKind::kMXFP4) ? H / 2 : H;
  p.sf_row_bytes = 4 * (H / 128);
  return p;
}

CUresult launch_pre_dispatch(const cuda::Driver* d, CUfunction fn, CUstream stream, int arch,
                             MmaKind mma_kind, const PreDispatchOperands& o, int64_t T, int64_t P,
                             int64_t H, int64_t K, float routed_scaling_factor,
                             PreDispatchLaunch* plan) {
  *plan = plan_pre_dispatch(arch, mma_kind, T, P, H, K);
  const auto u32 = [](int64_t v) { return static_cast<uint32_t>(v); };
  const auto launch = [&](void** params) {
    return d->LaunchKernel(fn, static_cast<unsigned>(plan->grid), 1, 1,
                           static_cast<unsigned>(plan->block), 1, 1, /*sharedMemBytes=*/0, stream,
                           params, nullptr);
  };
  // The argument blocks and their addresses, in kernel parameter order (tables, laid out by hand).
  // clang-format off
  if (arch == 90) {
    jit::Sm90PreDispatchArgs a{o.x, o.topk_idx, o.topk_weights, o.buf_x, o.buf_x_sf,
                               o.buf_topk_idx, o.buf_topk_weights, u32(T), u32(P), u32(H),
                               u32(plan->num_groups), u32(K), routed_scaling_factor};
    void* params[] = {&a.x, &a.topk_idx, &a.topk_weights, &a.buf_x, &a.buf_x_sf, &a.buf_topk_idx,
                      &a.buf_topk_weights, &a.num_tokens, &a.padded_max, &a.hidden, &a.num_groups,
                      &a.top_k, &a.routed_scaling_factor};
    return launch(params);
  }
  jit::Sm100PreDispatchArgs a{o.x, o.topk_idx, o.topk_weights, o.expert_scales, o.buf_x, o.buf_x_sf,
                              /*buf_x_scales=*/nullptr, o.buf_topk_idx, o.buf_topk_weights,
                              u32(T), u32(P), u32(H), u32(plan->num_groups), u32(K)};
  void* params[] = {&a.x, &a.topk_idx, &a.topk_weights, &a.expert_scales, &a.buf_x, &a.buf_x_sf,
                    &a.buf_x_scales, &a.buf_topk_idx, &a.buf_topk_weights, &a.num_tokens,
                    &a.padded_max, &a.hidden, &a.num_groups, &a.top_k};
  // clang-format on
  return launch(params);
}

}  // namespace jmm

// ---------------------------------------------------------------------------
// Exported symbols (see ffi/exports.map; Python: jax_megamoe/_ffi.py).
// ---------------------------------------------------------------------------

JMM_EXPORT XLA_FFI_TypeId* jmm_pre_dispatch_state_type_id() { return &jmm::PreDispatchState::id; }
JMM_EXPORT const XLA_FFI_TypeInfo* jmm_pre_dispatch_state_type_info() {
  return &jmm::kPreDispatchStateTypeInfo;
}

#define JMM_INSTANTIATE_BINDING(ARCH) \
  ffi::Ffi::BindInstantiate()         \
      .Attr<int64_t>("hidden")        \
      .Attr<int64_t>("top_k")         \
      .Attr<int64_t>("capacity")      \
      .Attr<int64_t>("group")         \
      .Attr<jmm::MmaKind>("mma_kind") \
      .Attr<float>("routed_scaling_factor")
#define JMM_INITIALIZE_BINDING JMM_INITIALIZE_CONTEXTS(jmm::PreDispatchState)
// x, topk_idx, topk_weights -> x_q, x_sf, topk_idx_out, topk_weights_out.
#define JMM_EXECUTE_BINDING JMM_EXECUTE_BUFFERS(jmm::PreDispatchState, 3, 4)

// Each arch's plain target and its `_graph` twin (handlers/stages.h). Execute only enqueues two
// memsets and one kernel on the given stream; the CUfunction is made in initialize, which XLA
// runs outside capture.
JMM_DEFINE_STAGES_AND_GRAPH_TWIN(jmm_pre_dispatch_sm90, jmm::Instantiate<90>,
                                 JMM_INSTANTIATE_BINDING(90), jmm::Initialize,
                                 JMM_INITIALIZE_BINDING, jmm::Execute<90>, JMM_EXECUTE_BINDING);
JMM_DEFINE_STAGES_AND_GRAPH_TWIN(jmm_pre_dispatch_sm100, jmm::Instantiate<100>,
                                 JMM_INSTANTIATE_BINDING(100), jmm::Initialize,
                                 JMM_INITIALIZE_BINDING, jmm::Execute<100>, JMM_EXECUTE_BINDING);
