// XLA FFI handler for DeepGEMM's sm_90 (H100/H200) fused Mega MoE: pre-dispatch into the
// library-owned symmetric buffer, then the persistent sm90_fp8_mega_moe_impl kernel.
//
// Target (registered for platform "CUDA" by jax_megamoe/_ffi.py with the stage dict
// {"instantiate", "initialize", "execute"}; state type "jax_megamoe.MegaMoeSm90State"):
//
//   jax_megamoe_mega_moe_sm90
//
// Operands: x bf16[T,H], topk_idx s32[T,K], topk_weights f32[T,K],
//           l1 f8e4m3fn[E,2I,H] (gate/up gran-8 interleaved rows), l1_sf f32[E,2I/128,H/128]
//           (canonical [gate | up] rows), l2 f8e4m3fn[E,H,I], l2_sf f32[E,H/128,I/128].
// Result:   y bf16[T,H] (rows whose top-k slots are all -1 are exactly 0).
// Attributes: hidden i64, intermediate i64, num_experts i64, top_k i64, capacity i64 (token cap
//   P, a multiple of 128, T <= P), activation_clamp f32 (+inf = no clamp, else >= 0),
//   fast_math bool, num_sms i64 (0: device SM count minus reserved_sms, rounded down to even),
//   reserved_sms i64 (>= 0), routed_scaling_factor f32 (finite; multiplied into the weights by
//   the pre-dispatch kernel).
//
// Stages:
//   instantiate  validate the attributes; JIT-compile and load the sm90 pre-dispatch kernel
//                (nvcc + disk cache; no GPU needed) -> MegaMoeSm90State
//   initialize   once per (state, device), outside any CUDA-graph capture (XLA runs it before
//                execute): the operand shapes give T; the device gives the SM count; choose the
//                kernel configuration (layout/sm90_mega_moe.h), JIT-compile and load the mega
//                kernel, set its dynamic shared memory (cuFuncSetAttribute), check that
//                num_sms CTAs (clusters) can be co-resident, take the symmetric buffer from the
//                process registry (allocated with cuMemAlloc and zeroed synchronously on a
//                private stream the first time), encode the TMA descriptors of the buffer's
//                slices. Later calls find the prepared entry and return at once.
//                (The instantiate stage gets no device ordinal from XLA, so the device-dependent
//                work cannot happen there.)
//   execute      validate buffers; on XLA's stream launch pre-dispatch (x -> buffer input
//                slots, capacity P rows, routed scaling factor) and the mega kernel
//                (cuLaunchKernelEx: grid num_sms, block 384, cluster 1 or 2, dynamic smem);
//                the two weight TMA descriptors are encoded on the host (cached by pointer).
//                No allocation, synchronisation, compilation or module loading. T == 0 is a
//                no-op. If initialize did not run for this device, execute fails (it never
//                compiles or allocates itself).
//
// Symmetric buffer registry: one buffer per (CUDA device, E, P, K, H, I, num_sms), shared by every
// call site and executable that uses the same configuration (shared_ptr; freed with cuMemFree when
// the last state using it dies). Calls sharing a buffer must not run concurrently (they are
// ordered on one XLA stream in practice). Single rank: kNumRanks = 1, pointer table [own ptr].
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "jit/loader.h"
#include "layout/sm90_mega_moe.h"
#include "xla/ffi/api/ffi.h"

namespace jmm {

struct MegaMoeSm90Device;  // per-device prepared launch (handlers/mega_moe_sm90.cc)

struct MegaMoeSm90State {
  static xla::ffi::TypeId id;  // assigned by XLA when the type is registered

  layout::Sm90MegaShape shape;
  layout::Sm90MegaLayout layout;
  float activation_clamp = 0.0f;
  bool fast_math = true;
  int64_t num_sms_attr = 0;
  int64_t reserved_sms = 0;
  float routed_scaling_factor = 1.0f;
  std::shared_ptr<const jit::LoadedKernel> pre_dispatch;

  static constexpr int kMaxDevices = 64;
  std::mutex mu;  // serialises initialize
  std::array<std::atomic<MegaMoeSm90Device*>, kMaxDevices> devices{};  // published entries
  std::vector<std::unique_ptr<MegaMoeSm90Device>> owned;              // guarded by mu

  ~MegaMoeSm90State();
};

}  // namespace jmm
