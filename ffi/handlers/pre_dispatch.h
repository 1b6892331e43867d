// XLA FFI handlers for DeepGEMM's Mega-MoE pre-dispatch kernels.
//
// Targets (registered for platform "CUDA" by jax_megamoe/_ffi.py with the
// stage dict {"instantiate", "initialize", "execute"}):
//
//   jax_megamoe_pre_dispatch_sm90          sm90_mega_moe_pre_dispatch_kernel<128, false>
//   jax_megamoe_pre_dispatch_sm100         mega_moe_pre_dispatch_kernel<32, MXFP8FP4|MXFP4, false>
//   ..._graph                              the same, declaring kCmdBufferCompatible
//
// Operands: x bf16[T,H], topk_idx s32[T,K], topk_weights f32[T,K].
// Results:  sm90:  x_q f8e4m3fn[P,H], x_sf f32[P,H/128]
//           sm100: x_q u8[P,H/2] (mma_kind 2) | f8e4m3fn[P,H] (mma_kind 1), x_sf s32[P,H/128]
//           both:  topk_idx_out s32[P,K,2] (int64 slots as little-endian int32 pairs;
//                  s64[P,K] is accepted too), topk_weights_out f32[P,K].
// Attributes (all stages see them; instantiate decodes them, execute uses
// the state): hidden i64, top_k i64, capacity i64 (= P), group i64 (128 on
// sm90, 32 on sm100), mma_kind i64 decoded as jmm::MmaKind (0 on sm90; 1 or 2
// on sm100, common/mma_kind.h), routed_scaling_factor f32 (finite on sm90;
// exactly 1.0 on sm100).
//
// Stages:
//   instantiate  validate attributes, JIT-compile (nvcc, disk cache) and
//                cuLibraryLoadFromFile the cubin -> PreDispatchState
//   initialize   make the kernel's CUfunction for the stream's context
//                (outside any CUDA-graph capture)
//   execute      validate buffers, zero pad rows [T,P) of x_q and x_sf with
//                cuMemsetD8Async, launch grid = T + ceil((P-T)*K/(H/8)) blocks
//                of H/8 threads on XLA's stream. No allocation, no sync, no
//                compile. T may be 0 (then only padding runs); T <= P.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <memory>

#include "common/mma_kind.h"
#include "cuda/driver.h"
#include "handlers/host_glue.h"
#include "jit/loader.h"
#include "xla/ffi/api/ffi.h"

namespace jmm {

// Launch geometry of one pre-dispatch call: a pure function of the shapes, shared by the
// execute handler and the host-side tests (jmm_pre_dispatch_launch_plan).
struct PreDispatchLaunch {
  int64_t grid = 0;          // T quantise CTAs + ceil((P - T) * K / threads) pad CTAs
  int64_t block = 0;         // H / 8 threads: one 16-byte bf16 load each
  int64_t num_groups = 0;    // kernel argument: H / group (scale bytes per token)
  int64_t x_row_bytes = 0;   // bytes of one x_q row: H / 2 (packed FP4) or H (e4m3)
  int64_t sf_row_bytes = 0;  // bytes of one x_sf row: 4 * H / 128 (f32 or packed int32)
};
PreDispatchLaunch plan_pre_dispatch(int arch, MmaKind mma_kind, int64_t T, int64_t P, int64_t H,
                                    int64_t K);

// Where one pre-dispatch launch reads and writes (the pre-dispatch targets write XLA results; the
// mega targets their symmetric buffer's input slots).
struct PreDispatchOperands {
  const void* x = nullptr;              // bf16 [T, H]
  const void* topk_idx = nullptr;       // s32 [T, K]
  const void* topk_weights = nullptr;   // f32 [T, K]
  const void* expert_scales = nullptr;  // sm_100: f32 [E] multiplied into the weights, or null
  void* buf_x = nullptr;                // [P, x_row_bytes]
  void* buf_x_sf = nullptr;             // [P, sf_row_bytes]
  void* buf_topk_idx = nullptr;         // s64 [P, K]
  void* buf_topk_weights = nullptr;     // f32 [P, K]
};

// Launches the arch's pre-dispatch kernel `fn` on `stream` with the geometry of
// plan_pre_dispatch (written to *plan). `routed_scaling_factor` is a kernel argument on sm_90;
// the sm_100 kernel scales through expert_scales instead. Enqueues nothing else.
CUresult launch_pre_dispatch(const cuda::Driver* d, CUfunction fn, CUstream stream, int arch,
                             MmaKind mma_kind, const PreDispatchOperands& o, int64_t T, int64_t P,
                             int64_t H, int64_t K, float routed_scaling_factor,
                             PreDispatchLaunch* plan);

struct PreDispatchState {
  static xla::ffi::TypeId id;  // assigned by XLA when the type is registered

  int arch = 0;  // 90 or 100
  MmaKind mma_kind = MmaKind::kNone;
  int64_t hidden = 0;
  int64_t top_k = 0;
  int64_t capacity = 0;
  int64_t group = 0;
  float routed_scaling_factor = 1.0f;
  std::shared_ptr<const jit::LoadedKernel> kernel;

  host::FunctionCache functions;  // the kernel's CUfunction per context

  ~PreDispatchState();
};

}  // namespace jmm
