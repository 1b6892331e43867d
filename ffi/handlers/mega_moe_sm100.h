// XLA FFI handler for DeepGEMM's sm_100 (B200) fused Mega MoE: pre-dispatch into the
// library-owned symmetric buffer, then the persistent sm100_fp8_fp4_mega_moe_impl kernel.
//
// *** NOT RUN ON HARDWARE. *** This project has no sm_100 GPU. The handler is written to the
// same standard as the sm_90 one (handlers/mega_moe_sm90.h, which has run on an H200), its
// kernel instantiations are compile-checked for sm_100f, and its arithmetic (buffer layout,
// heuristics, launch geometry) is unit-tested on the CPU; its GPU stages have never executed.
// Treat the first B200 run as a bring-up (compute-sanitizer, a small shape, the reference).
//
// Target (registered for platform "CUDA" by jax_megamoe/_ffi.py with the stage dict
// {"instantiate", "initialize", "execute"}; state type "jax_megamoe.MegaMoeSm100State"):
//
//   jax_megamoe_mega_moe_sm100
//
// Operands: x bf16[T,H], topk_idx s32[T,K] (global expert ids), topk_weights f32[T,K], and
//           this rank's E_l = E / num_ranks experts (E below means E_l):
//           l1 u8[E,2I,H/2] (packed E2M1; gate/up rows interleaved for the mode: gran-16
//           packed for mxf4xmxf4, gran-8 for fp8xfp4), l1_sf s32[E,H/128,2I] (UE8M0 x4,
//           MN-major, UTCCP-transposed rows), l2 u8[E,H,I/2], l2_sf s32[E,I/128,H]
//           (jax_megamoe/layout.py MoEWeights, modes "mxf4xmxf4" / "fp8xfp4").
// Result:   y bf16[T,H] (rows whose top-k slots are all -1 are exactly 0).
// Attributes: hidden i64, intermediate i64, num_experts i64, top_k i64, capacity i64 (token cap
//   P, a multiple of 1920, T <= P), activation_clamp f32 (+inf = no clamp, else >= 0),
//   fast_math bool, num_sms i64 (0: device SM count minus reserved_sms, rounded down to even),
//   reserved_sms i64 (>= 0), routed_scaling_factor f32 (finite; the sm_100 pre-dispatch kernel
//   has no scaling factor: it is applied through the kernel's per-expert scale array, i.e.
//   topk_weights * rsf in f32, the same product as on sm_90), mma_kind i64 (1 = MXFP8FP4 =
//   fp8xfp4, 2 = MXFP4 = mxf4xmxf4), num_ranks i64 (1..32) and rank_devices i64 array (the
//   rank table of layout/rank_table.h), as for jax_megamoe_mega_moe_sm90: expert parallelism
//   over the GPUs of one process (jax_megamoe.parallel.ep_moe, dispatch "fused"), with the
//   shared symmetric-group code of handlers/symmetric.h. Never run with more than one rank either.
//
// Stages:
//   instantiate  validate the attributes; JIT-compile and load the sm_100 pre-dispatch kernel
//                (nvcc + disk cache; no GPU needed) -> MegaMoeSm100State
//   initialize   once per (state, device), outside any CUDA-graph capture (XLA runs it before
//                execute): the operand shapes give T; the device gives the SM count (compute
//                capability 10.x required); size the buffer for that SM count
//                (layout/sm100_mega_moe.h: the ring depends on it), choose the kernel
//                configuration, JIT-compile and load the mega kernel, set its dynamic shared
//                memory, check that num_sms CTAs in 2-CTA clusters can be co-resident, take the
//                symmetric buffer from the process registry (cuMemAlloc + synchronous zeroing on
//                a private stream the first time), take the device's sm_locality_domains table
//                from its registry (built once per device: balanced (sm / 2) % 2, one entry per
//                physical SM, padded), upload the per-expert scale array when
//                routed_scaling_factor != 1, encode the TMA descriptors of the buffer slices.
//   execute      validate buffers; on XLA's stream launch pre-dispatch (x -> buffer input slots,
//                P rows) and the mega kernel (cuLaunchKernelEx: grid num_sms, block 512,
//                cluster (2,1,1), dynamic smem); the weight TMA descriptors (4-D weights, 2-D
//                scale factors) are encoded on the host and cached by operand pointer. No
//                allocation, synchronisation, compilation or module loading. T == 0 is a no-op.
//                If initialize did not run for this device and T, execute fails.
//
// Symmetric buffers: handlers/symmetric.h, one group per (contexts of the ranks, E, P, K, H, I,
// num_sms, ranks, mma_kind), shared by every call site and executable with that configuration.
// Calls sharing a buffer must not run concurrently (they are ordered on one XLA stream in
// practice). Single rank: kNumRanks = 1, pointer table [own ptr].
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "jit/loader.h"
#include "layout/sm100_mega_moe.h"
#include "xla/ffi/api/ffi.h"

namespace jmm {

struct MegaMoeSm100Device;  // per-device prepared launch (handlers/mega_moe_sm100.cc)

struct MegaMoeSm100State {
  static xla::ffi::TypeId id;  // assigned by XLA when the type is registered

  layout::Sm100MegaShape shape;  // the layout itself depends on the device's SM count
  float activation_clamp = 0.0f;
  bool fast_math = true;
  int64_t num_sms_attr = 0;
  int64_t reserved_sms = 0;
  float routed_scaling_factor = 1.0f;
  std::vector<int64_t> rank_devices;  // layout/rank_table.h; empty: one rank, the calling device
  std::shared_ptr<const jit::LoadedKernel> pre_dispatch;

  static constexpr int kMaxDevices = 64;
  std::mutex mu;  // serialises initialize
  std::array<std::atomic<MegaMoeSm100Device*>, kMaxDevices> devices{};  // published entries
  std::vector<std::unique_ptr<MegaMoeSm100Device>> owned;              // guarded by mu

  ~MegaMoeSm100State();
};

// One TMA descriptor of the kernel, as the handler encodes it with cuTensorMapEncodeTiled (DeepGEMM
// 0.2.5's make_tma_2d_desc / make_tma_sf_desc / make_tma_weights_3d_desc conventions: inner dim
// first, strides in bytes, element strides 1, L2 promotion 256B, no OOB fill, no interleave).
// A pure function of the configuration, so that tests check it without a GPU.
struct Sm100TensorMapPlan {
  const char* name = "";
  int source = 0;        // 0: symmetric buffer + offset; 1: operand l1; 2: l1_sf; 3: l2; 4: l2_sf
  uint64_t offset = 0;   // byte offset in the symmetric buffer (source 0)
  int dtype = 0;         // CUtensorMapDataType: 0 UINT8, 3 INT32, 14 16U4_ALIGN16B
  int rank = 0;
  int64_t dims[5] = {};
  int64_t strides[4] = {};  // bytes, dims 1..rank-1
  int64_t box[5] = {};
  int swizzle = 0;       // bytes: 0, 32, 64 or 128
};
constexpr int kSm100NumRoutedTensorMaps = 9;  // l1_acts .. l2_weights_sf; the shared slots copy them
// The nine routed descriptors in kernel parameter order.
std::array<Sm100TensorMapPlan, kSm100NumRoutedTensorMaps> sm100_tensor_map_plans(
    const layout::Sm100MegaConfig& c, const layout::Sm100MegaLayout& l);

// Balanced stand-in for DeepGEMM's probed locality table: domain(sm) = (sm / 2) % 2, so the two
// CTAs of a cluster (a TPC pair) share a domain and both domains get half of the SMs.
inline uint8_t sm100_balanced_locality_domain(int64_t sm) { return static_cast<uint8_t>((sm / 2) % 2); }
// Entries of the device table: one per physical SM, at least 1024 (a guard: %smid is below the
// SM count on current parts, but PTX does not promise a contiguous numbering).
inline int64_t sm100_locality_table_entries(int64_t sm_count) { return sm_count > 1024 ? sm_count : 1024; }

}  // namespace jmm
