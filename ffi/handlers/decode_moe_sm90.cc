// XLA FFI handlers for the low-latency decode kernels (ffi/jit/decode_kernels.h): two custom
// calls per MoE layer, chosen by jax_megamoe.ops for small T*K on sm_90.
//
//   jax_megamoe_decode_l1_sm90  x bf16[T,H], topk_idx s32[T,K], topk_weights f32[T,K],
//                               l1 f8e4m3fn[E,2I,H], l1_sf f32[E,2I/128,H/128]  ->  act f32[T*K,I]
//   jax_megamoe_decode_l2_sm90  act f32[T*K,I], topk_idx s32[T,K], l2 f8e4m3fn[E,H,I],
//                               l2_sf f32[E,H/128,I/128]                         ->  y bf16[T,H]
//   ..._graph                   the same, declaring kCmdBufferCompatible
// Attributes: hidden, intermediate, num_experts, top_k (i64); l1 also activation_clamp and
// routed_scaling_factor (f32). Ids outside [0, E) route nowhere (their act rows are left unwritten
// and never read). Neither call keeps device state: no buffer to zero, no side effect.
//
// Stages: instantiate validates the attributes, JIT-compiles (disk cache) and loads the cubin;
// initialize makes the CUfunction for the stream's context and sets its dynamic shared memory;
// execute validates the buffers and launches one grid on XLA's stream.
#include <cuda.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "common/c_api.h"
#include "common/export.h"
#include "common/status.h"
#include "cuda/driver.h"
#include "handlers/buffer_checks.h"
#include "handlers/host_glue.h"
#include "handlers/stages.h"
#include "jit/compiler.h"
#include "jit/decode_kernels.h"
#include "jit/loader.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jmm {

struct DecodeMoeState {
  static ffi::TypeId id;
  jit::DecodePass pass = jit::DecodePass::kL1;
  int64_t hidden = 0, intermediate = 0, num_experts = 0, top_k = 0;
  float activation_clamp = INFINITY;
  float routed_scaling_factor = 1.0f;
  int64_t smem_bytes = 0;
  std::shared_ptr<const jit::LoadedKernel> kernel;
  host::FunctionCache functions;  // the kernel's CUfunction per context
};

ffi::TypeId DecodeMoeState::id = XLA_FFI_UNKNOWN_TYPE_ID;

namespace {

constexpr XLA_FFI_TypeInfo kDecodeStateTypeInfo = ffi::MakeTypeInfo<DecodeMoeState>();

const char* TargetName(jit::DecodePass p) {
  return p == jit::DecodePass::kL1 ? "jax_megamoe_decode_l1_sm90" : "jax_megamoe_decode_l2_sm90";
}

ffi::Error ValidateShape(const char* t, int64_t h, int64_t i, int64_t e, int64_t k) {
  if (h <= 0 || h % 128 != 0) {
    return ffi::Error::InvalidArgument(
        cat(t, ": attribute hidden=", h, " must be a positive multiple of 128"));
  }
  if (i <= 0 || i % 128 != 0) {
    return ffi::Error::InvalidArgument(
        cat(t, ": attribute intermediate=", i, " must be a positive multiple of 128"));
  }
  if (e <= 0 || e > std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument(
        cat(t, ": attribute num_experts=", e, " must be in [1, 2^31)"));
  }
  if (k < 1 || k > 64) {
    return ffi::Error::InvalidArgument(cat(t, ": attribute top_k=", k, " must be in [1, 64]"));
  }
  return ffi::Error::Success();
}

ffi::ErrorOr<std::unique_ptr<DecodeMoeState>> Build(jit::DecodePass pass, int64_t h, int64_t i,
                                                    int64_t e, int64_t k, float clamp, float rsf) {
  const char* t = TargetName(pass);
  if (ffi::Error err = ValidateShape(t, h, i, e, k); !err.success()) {
    return ffi::Unexpected<ffi::Error>(std::move(err));
  }
  if (!std::isfinite(rsf)) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        cat(t, ": attribute routed_scaling_factor=", rsf, " must be finite")));
  }
  if (std::isnan(clamp) || clamp <= 0.f) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        cat(t, ": attribute activation_clamp=", clamp, " must be > 0 (+inf: no clamp)")));
  }
  const int64_t smem = jit::decode_smem_bytes(pass, h, i, k);
  if (smem > 227 * 1024) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(
        cat(t, ": ", smem, " B of shared memory needed (hidden=", h, ", intermediate=", i,
            ", top_k=", k, "), more than an sm_90 block has (227 KiB)")));
  }
  auto st = std::make_unique<DecodeMoeState>();
  st->pass = pass;
  st->hidden = h, st->intermediate = i, st->num_experts = e, st->top_k = k;  // the shape
  st->activation_clamp = clamp;
  st->routed_scaling_factor = rsf;
  st->smem_bytes = smem;
  return host::WithKernel(std::move(st), jit::decode_source(pass), t);
}

ffi::ErrorOr<std::unique_ptr<DecodeMoeState>> InstantiateL1(int64_t h, int64_t i, int64_t e,
                                                            int64_t k, float clamp, float rsf) {
  return Build(jit::DecodePass::kL1, h, i, e, k, clamp, rsf);
}

ffi::ErrorOr<std::unique_ptr<DecodeMoeState>> InstantiateL2(int64_t h, int64_t i, int64_t e,
                                                            int64_t k) {
  return Build(jit::DecodePass::kL2, h, i, e, k, INFINITY, 1.0f);
}

// The CUfunction for `ctx` with its shared-memory limit raised (once per context).
ffi::Error FunctionFor(const cuda::Driver* d, const host::DriverExt* x, DecodeMoeState* st,
                       CUcontext ctx, CUfunction* fn) {
  const char* t = TargetName(st->pass);
  const int64_t smem = st->smem_bytes;
  return st->functions.Get(d, *st->kernel, ctx, t, fn, [&](CUfunction f) {
    if (smem <= 48 * 1024) return ffi::Error::Success();
    if (CUresult r = x->FuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                         static_cast<int>(smem));
        r != CUDA_SUCCESS) {
      return ffi::Error::Internal(cat(t, ": cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, ",
                                      smem, ") failed: ", cuda::error_string(d, r)));
    }
    return ffi::Error::Success();
  });
}

ffi::Error Enter(CUstream stream, int32_t device, DecodeMoeState* st, host::ContextScope* scope,
                 const cuda::Driver** d, CUfunction* fn) {
  const host::DriverExt* x = nullptr;
  CUcontext ctx = nullptr;
  if (ffi::Error e = host::Begin(stream, device, TargetName(st->pass), scope, d, &x, &ctx);
      !e.success()) {
    return e;
  }
  return FunctionFor(*d, x, st, ctx, fn);
}

ffi::Error Initialize(CUstream stream, int32_t device, DecodeMoeState* st) {
  host::ContextScope scope;
  const cuda::Driver* d = nullptr;
  CUfunction fn = nullptr;
  return Enter(stream, device, st, &scope, &d, &fn);
}

ffi::Error Launch(CUstream stream, int32_t device, DecodeMoeState* st, int64_t blocks,
                  void** params) {
  if (blocks == 0) return ffi::Error::Success();
  host::ContextScope scope;
  const cuda::Driver* d = nullptr;
  CUfunction fn = nullptr;
  if (ffi::Error e = Enter(stream, device, st, &scope, &d, &fn); !e.success()) return e;
  if (CUresult r =
          d->LaunchKernel(fn, static_cast<unsigned>(blocks), 1, 1, jit::kDecodeThreads, 1, 1,
                          static_cast<unsigned>(st->smem_bytes), stream, params, nullptr);
      r != CUDA_SUCCESS) {
    return ffi::Error::Internal(cat(TargetName(st->pass), ": cuLaunchKernel(grid=", blocks,
                                    ") failed: ", cuda::error_string(d, r)));
  }
  return ffi::Error::Success();
}

ffi::Error Check(const DecodeMoeState* st, const char* role, const char* name,
                 const ffi::AnyBuffer& b, ffi::DataType type, std::initializer_list<int64_t> dims) {
  return ExpectBuffer(TargetName(st->pass), role, name, b, type, dims);
}

// Tokens of the call, from topk_idx (both passes take it).
ffi::Error Tokens(const DecodeMoeState* st, const ffi::AnyBuffer& topk_idx, int64_t* T) {
  const auto dims = topk_idx.dimensions();
  if (dims.size() != 2 || topk_idx.element_type() != ffi::DataType::S32 || dims[1] != st->top_k) {
    return ffi::Error::InvalidArgument(cat(TargetName(st->pass),
                                           ": operand 'topk_idx' must be s32[T,", st->top_k,
                                           "], got ", Shape(topk_idx.element_type(), dims)));
  }
  *T = dims[0];
  // Grid sizes and the kernels' 32-bit slot arithmetic.
  if (*T * st->top_k * std::max(st->intermediate, st->hidden) >
      std::numeric_limits<int32_t>::max()) {
    return ffi::Error::InvalidArgument(
        cat(TargetName(st->pass), ": T=", *T, " is too many tokens"));
  }
  return ffi::Error::Success();
}

ffi::Error ExecuteL1(CUstream stream, int32_t device, DecodeMoeState* st, ffi::AnyBuffer x,
                     ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights, ffi::AnyBuffer l1,
                     ffi::AnyBuffer l1_sf, ffi::Result<ffi::AnyBuffer> act) {
  const int64_t H = st->hidden, I = st->intermediate, E = st->num_experts, K = st->top_k;
  int64_t T = 0;
  ffi::Error e = Tokens(st, topk_idx, &T);
  if (e.success()) e = Check(st, "operand", "x", x, ffi::DataType::BF16, {T, H});
  if (e.success())
    e = Check(st, "operand", "topk_weights", topk_weights, ffi::DataType::F32, {T, K});
  if (e.success()) e = Check(st, "operand", "l1", l1, ffi::DataType::F8E4M3FN, {E, 2 * I, H});
  if (e.success())
    e = Check(st, "operand", "l1_sf", l1_sf, ffi::DataType::F32, {E, 2 * I / 128, H / 128});
  if (e.success()) e = Check(st, "result", "act", *act, ffi::DataType::F32, {T * K, I});
  if (!e.success()) return e;
  jit::DecodeL1Args a{
      x.untyped_data(),         topk_idx.untyped_data(),  topk_weights.untyped_data(),
      l1.untyped_data(),        l1_sf.untyped_data(),     act->untyped_data(),
      static_cast<uint32_t>(T), static_cast<uint32_t>(H), static_cast<uint32_t>(I),
      static_cast<uint32_t>(E), static_cast<uint32_t>(K), st->routed_scaling_factor,
      st->activation_clamp};
  // clang-format off
  void* params[] = {&a.x, &a.topk_idx, &a.topk_weights, &a.l1, &a.l1_sf, &a.act, &a.num_tokens,
                    &a.hidden, &a.intermediate, &a.num_experts, &a.top_k,
                    &a.routed_scaling_factor, &a.activation_clamp};
  // clang-format on
  return Launch(stream, device, st, T * (I / jit::kDecodeL1ColsPerBlock), params);
}

ffi::Error ExecuteL2(CUstream stream, int32_t device, DecodeMoeState* st, ffi::AnyBuffer act,
                     ffi::AnyBuffer topk_idx, ffi::AnyBuffer l2, ffi::AnyBuffer l2_sf,
                     ffi::Result<ffi::AnyBuffer> y) {
  const int64_t H = st->hidden, I = st->intermediate, E = st->num_experts, K = st->top_k;
  int64_t T = 0;
  ffi::Error e = Tokens(st, topk_idx, &T);
  if (e.success()) e = Check(st, "operand", "act", act, ffi::DataType::F32, {T * K, I});
  if (e.success()) e = Check(st, "operand", "l2", l2, ffi::DataType::F8E4M3FN, {E, H, I});
  if (e.success())
    e = Check(st, "operand", "l2_sf", l2_sf, ffi::DataType::F32, {E, H / 128, I / 128});
  if (e.success()) e = Check(st, "result", "y", *y, ffi::DataType::BF16, {T, H});
  if (!e.success()) return e;
  jit::DecodeL2Args a{act.untyped_data(),       topk_idx.untyped_data(),  l2.untyped_data(),
                      l2_sf.untyped_data(),     y->untyped_data(),        static_cast<uint32_t>(T),
                      static_cast<uint32_t>(H), static_cast<uint32_t>(I), static_cast<uint32_t>(E),
                      static_cast<uint32_t>(K)};
  void* params[] = {&a.act,        &a.topk_idx, &a.l2,           &a.l2_sf,       &a.y,
                    &a.num_tokens, &a.hidden,   &a.intermediate, &a.num_experts, &a.top_k};
  return Launch(stream, device, st, T * (H / jit::kDecodeL2RowsPerBlock), params);
}

}  // namespace
}  // namespace jmm

// Renders / compiles one pass's kernel (1 = l1, 2 = l2) without a GPU: for the CPU compile tests.
JMM_EXPORT int jmm_decode_render(int pass, char* out, size_t cap) {
  if (pass != 1 && pass != 2) {
    jmm::set_last_error(jmm::cat("jmm_decode_render: pass must be 1 or 2, got ", pass));
    return -1;
  }
  return static_cast<int>(jmm::copy_out(
      jmm::jit::decode_source(static_cast<jmm::jit::DecodePass>(pass)).source, out, cap));
}

JMM_EXPORT int jmm_decode_compile(int pass, char* cubin_out, size_t cap, char* err_out,
                                  size_t err_cap) {
  std::string why;
  if (pass != 1 && pass != 2) {
    why = jmm::cat("jmm_decode_compile: pass must be 1 or 2, got ", pass);
  } else {
    jmm::jit::CompiledKernel c;
    if (jmm::jit::jit_compile(jmm::jit::decode_source(static_cast<jmm::jit::DecodePass>(pass)), &c,
                              &why)) {
      if (c.cubin_path.size() + 1 <= cap) {
        jmm::copy_out(c.cubin_path, cubin_out, cap);
        jmm::copy_out("", err_out, err_cap);
        return 0;
      }
      why = "jmm_decode_compile: cubin path buffer too small";
    }
  }
  jmm::copy_out(why, err_out, err_cap);
  jmm::set_last_error(why);
  return 1;
}

JMM_EXPORT XLA_FFI_TypeId* jmm_decode_state_type_id() { return &jmm::DecodeMoeState::id; }
JMM_EXPORT const XLA_FFI_TypeInfo* jmm_decode_state_type_info() {
  return &jmm::kDecodeStateTypeInfo;
}

#define JMM_DECODE_INIT_BINDING JMM_INITIALIZE_CONTEXTS(jmm::DecodeMoeState)
#define JMM_DECODE_L2_INSTANTIATE    \
  ffi::Ffi::BindInstantiate()        \
      .Attr<int64_t>("hidden")       \
      .Attr<int64_t>("intermediate") \
      .Attr<int64_t>("num_experts")  \
      .Attr<int64_t>("top_k")
#define JMM_DECODE_L1_INSTANTIATE \
  JMM_DECODE_L2_INSTANTIATE.Attr<float>("activation_clamp").Attr<float>("routed_scaling_factor")
// L1: x, topk_idx, topk_weights, l1, l1_sf -> act; L2: act, topk_idx, l2, l2_sf -> y.
#define JMM_DECODE_L1_EXECUTE JMM_EXECUTE_BUFFERS(jmm::DecodeMoeState, 5, 1)
#define JMM_DECODE_L2_EXECUTE JMM_EXECUTE_BUFFERS(jmm::DecodeMoeState, 4, 1)

// Each pass's plain target and its `_graph` twin (handlers/stages.h).
JMM_DEFINE_STAGES_AND_GRAPH_TWIN(jmm_decode_l1_sm90, jmm::InstantiateL1, JMM_DECODE_L1_INSTANTIATE,
                                 jmm::Initialize, JMM_DECODE_INIT_BINDING, jmm::ExecuteL1,
                                 JMM_DECODE_L1_EXECUTE);
JMM_DEFINE_STAGES_AND_GRAPH_TWIN(jmm_decode_l2_sm90, jmm::InstantiateL2, JMM_DECODE_L2_INSTANTIATE,
                                 jmm::Initialize, JMM_DECODE_INIT_BINDING, jmm::ExecuteL2,
                                 JMM_DECODE_L2_EXECUTE);
