// XLA FFI handler for DeepGEMM's sm_90 (H100/H200) fused Mega MoE: pre-dispatch into the
// library-owned symmetric buffer, then the persistent sm90_fp8_mega_moe_impl kernel.
//
// Target (registered for platform "CUDA" by jax_megamoe/_ffi.py with the stage dict
// {"instantiate", "initialize", "execute"}; state type "jax_megamoe.MegaMoeSm90State"):
//
//   jax_megamoe_mega_moe_sm90
//
// Operands: x bf16[T,H], topk_idx s32[T,K] (global expert ids, -1 = skip),
//           topk_weights f32[T,K], and this rank's E_l = E / num_ranks experts:
//           l1 f8e4m3fn[E_l,2I,H] (gate/up gran-8 interleaved rows), l1_sf f32[E_l,2I/128,H/128]
//           (canonical [gate | up] rows), l2 f8e4m3fn[E_l,H,I], l2_sf f32[E_l,H/128,I/128].
// Result:   y bf16[T,H] (rows whose top-k slots are all -1 are exactly 0).
// Attributes: hidden i64, intermediate i64, num_experts i64, top_k i64, capacity i64 (token cap
//   P, a multiple of 128, T <= P), activation_clamp f32 (+inf = no clamp, else >= 0),
//   fast_math bool, num_sms i64 (0: device SM count minus reserved_sms, rounded down to even),
//   reserved_sms i64 (>= 0), routed_scaling_factor f32 (finite; multiplied into the weights by
//   the pre-dispatch kernel), num_ranks i64 (1..32; kNumRanks), rank_devices i64 array (the rank
//   table of layout/rank_table.h: CUDA device ordinals, one row of num_ranks per expert-parallel
//   group; may be empty when num_ranks == 1).
//
// Expert parallelism (num_ranks > 1; jax_megamoe.parallel.ep_moe, dispatch "fused"): one process
// drives every GPU of the table and calls this target on each of them inside shard_map, with the
// same attributes and the same T. Each device finds its group row and rank from its own ordinal;
// the first rank of a group to initialize allocates and zeroes every rank's buffer (each in its
// device's primary context, where XLA runs) and enables peer access between all of them, before
// any rank can launch; every rank then passes the same pointer table (SymBuffer: base = own
// buffer, offsets = peer buffer - own buffer) with its own rank index. The kernel moves the
// (token, slot) pairs over NVLink, runs the rank's experts and writes each result into the source
// rank's combine slots: no NCCL, no XLA collective. Every rank launches on every step, also when
// none of its tokens is routed; a rank that does not launch leaves the others spinning until the
// kernel's 300 s timeout. Peers without peer access are refused with a clear error.
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
// Symmetric buffer registry (handlers/symmetric.h, shared with the sm_100 handler): one group of
// buffers per (contexts of the ranks, E, P, K, H, I, num_sms, num_ranks), shared by every call site and executable that uses the same configuration
// (shared_ptr; freed with cuMemFree when the last state using it dies). Calls sharing a buffer
// must not run concurrently (they are ordered on one XLA stream in practice). Single rank: a
// group of one, kNumRanks = 1, pointer table [own ptr].
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
  std::vector<int64_t> rank_devices;  // layout/rank_table.h; empty: one rank, the calling device
  std::shared_ptr<const jit::LoadedKernel> pre_dispatch;

  static constexpr int kMaxDevices = 64;
  std::mutex mu;  // serialises initialize
  std::array<std::atomic<MegaMoeSm90Device*>, kMaxDevices> devices{};  // published entries
  std::vector<std::unique_ptr<MegaMoeSm90Device>> owned;              // guarded by mu

  ~MegaMoeSm90State();
};

}  // namespace jmm
