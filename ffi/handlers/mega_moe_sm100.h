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
// Attributes: mega::MegaMoeAttrs (handlers/mega_moe.h) plus mma_kind (jmm::MmaKind:
//   1 = MXFP8FP4 = fp8xfp4, 2 = MXFP4 = mxf4xmxf4); capacity a multiple of 1920; num_ranks
//   1..32. routed_scaling_factor: the sm_100 pre-dispatch kernel has no scaling factor, it is
//   applied through the kernel's per-expert scale array, i.e. topk_weights * rsf in f32, the same
//   product as on sm_90. Expert parallelism as for jax_megamoe_mega_moe_sm90 (never run with
//   more than one rank either).
//
// Stages: handlers/mega_moe.h (shared with sm_90). What is sm_100's own (Sm100Mega below):
//   packed-E2M1 weights with UE8M0 scales (all four TMA operands, 32-byte aligned), a layout
//   sized for the device's SM count (layout/sm100_mega_moe.h: the ring depends on it), 2-CTA
//   clusters, block 512; initialize also takes the device's sm_locality_domains table from its
//   registry (built once per device: balanced (sm / 2) % 2, one entry per physical SM, padded)
//   and uploads the per-expert scale array when routed_scaling_factor != 1; execute encodes the
//   weight descriptors (4-D weights, 2-D scale factors), cached by operand pointer, and passes
//   copies of the routed descriptors in the shared-expert slots.
//
// Symmetric buffers: handlers/symmetric.h, one group per (contexts of the ranks, E, P, K, H, I,
// num_sms, ranks, mma_kind), shared by every call site and executable with that configuration.
// Calls sharing a buffer must not run concurrently (they are ordered on one XLA stream in
// practice). Single rank: kNumRanks = 1, pointer table [own ptr].
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "handlers/mega_moe.h"
#include "layout/sm100_mega_moe.h"

namespace jmm {

struct DeviceMemory;  // library-owned device memory (handlers/mega_moe_sm100.cc)

// The sm_100 attributes: the shared ones plus the MMA kind (struct decoding by name).
struct Sm100MegaMoeAttrs {
  mega::MegaMoeAttrs common;
  MmaKind mma_kind;
};

using Sm100TensorMapPlan = TensorMapPlan;
constexpr int kSm100NumRoutedTensorMaps =
    9;  // l1_acts .. l2_weights_sf; the shared slots copy them

// What the sm_100 target adds to handlers/mega_moe.h.
struct Sm100Mega {
  static constexpr const char* kTarget = "jax_megamoe_mega_moe_sm100";
  static constexpr int kArch = 100;
  static constexpr int kComputeMajor = 10;
  static constexpr const char* kGpuName =
      "an sm_100-family GPU (B200/B300, compute capability 10.x; the kernel is built for sm_100f)";
  static constexpr int kTmaAlignment = 32;  // the 16U4_ALIGN16B weight views need 32 bytes
  static constexpr bool kTmaScales = true;
  static constexpr int kNumParams = jit::kSm100MegaMoeNumParams;
  static constexpr size_t kNumTensorMaps = kSm100NumRoutedTensorMaps;

  using Attrs = Sm100MegaMoeAttrs;
  struct Options {};  // no kernel choice beyond the shape and the call
  using Shape = layout::Sm100MegaShape;
  using Layout = layout::Sm100MegaLayout;
  using Config = layout::Sm100MegaConfig;
  using Args = jit::Sm100MegaMoeArgs;
  struct DeviceExtra {
    DeviceExtra();
    ~DeviceExtra();
    mega::TensorMaps<kNumTensorMaps> maps;
    std::shared_ptr<DeviceMemory> locality;       // the context's sm_locality_domains table
    std::unique_ptr<DeviceMemory> expert_scales;  // f32 [E] = routed_scaling_factor, or null
  };
  using Device = mega::Device<Sm100Mega>;
  using State = mega::State<Sm100Mega>;

  static const mega::MegaMoeAttrs& Common(const Attrs& a) { return a.common; }
  static bool AttrsValid(const Attrs& a, std::string* why);
  static Options OptionsOf(const Attrs&) { return Options{}; }
  static Shape ShapeOf(const Attrs& a);
  static bool ShapeValid(const Shape& s, std::string* why);
  static MmaKind MmaKindOf(const Shape& s) { return s.mma_kind; }
  static bool SetMmaKind(MmaKind k, Shape* s, std::string* why);
  static std::array<mega::WeightSpec, 4> Weights(const Shape& s);
  static bool Plan(const Shape& s, const Options& o, int64_t num_sms, int64_t num_tokens,
                   float clamp, bool fast_math, Layout* l, Config* c, std::string* why);
  static jit::KernelSource Source(const Config& c);
  static std::array<TensorMapPlan, kNumTensorMaps> Plans(const Config& c, const Layout& l);
  static void ExtendGroupKey(const Shape& s, std::vector<int64_t>* key);
  static xla::ffi::Error PrepareExtra(const cuda::Driver* d, const host::DriverExt* x,
                                      const State& st, CUcontext ctx, int sm_count, Device* e);
  static const void* ExpertScales(const Device& e);
  static xla::ffi::Error KernelArgs(const cuda::Driver* d, const host::DriverExt* x,
                                    const State& st, int64_t T, const mega::ExecuteOperands& ops,
                                    Device* e, Args* a, void** params);
};

using MegaMoeSm100State = Sm100Mega::State;

// The nine routed descriptors in kernel parameter order (a pure function of the configuration).
inline std::array<Sm100TensorMapPlan, kSm100NumRoutedTensorMaps> sm100_tensor_map_plans(
    const layout::Sm100MegaConfig& c, const layout::Sm100MegaLayout& l) {
  return Sm100Mega::Plans(c, l);
}

// Balanced stand-in for DeepGEMM's probed locality table: domain(sm) = (sm / 2) % 2, so the two
// CTAs of a cluster (a TPC pair) share a domain and both domains get half of the SMs.
inline uint8_t sm100_balanced_locality_domain(int64_t sm) {
  return static_cast<uint8_t>((sm / 2) % 2);
}
// Entries of the device table: one per physical SM, at least 1024 (a guard: %smid is below the
// SM count on current parts, but PTX does not promise a contiguous numbering).
inline int64_t sm100_locality_table_entries(int64_t sm_count) {
  return sm_count > 1024 ? sm_count : 1024;
}

}  // namespace jmm
