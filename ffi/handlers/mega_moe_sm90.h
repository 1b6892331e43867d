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
// Attributes: mega::MegaMoeAttrs (handlers/mega_moe.h) plus sm90_wide_tile (bool: let the
//   kernel take DeepGEMM's 128-row tile from 64 expected tokens per expert on, see
//   layout::sm90_mega_config; jax_megamoe passes its policy's sm90_wide_tile); capacity a multiple
//   of 128; routed_scaling_factor is multiplied into the weights by the pre-dispatch kernel;
//   num_ranks 1..32 (kNumRanks).
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
// Stages: handlers/mega_moe.h (shared with sm_100). What is sm_90's own (Sm90Mega below):
//   weights l1/l2 f8e4m3fn with f32 128x128 scales (pointers, not TMA), the full-pool layout
//   (layout/sm90_mega_moe.h), cluster 1 or 2, block 384; initialize encodes the five buffer-slice
//   descriptors, execute the two weight descriptors (cached by pointer).
//   (The instantiate stage gets no device ordinal from XLA, so the device-dependent work cannot
//   happen there.)
//
// Symmetric buffer registry (handlers/symmetric.h, shared with the sm_100 handler): one group of
// buffers per (contexts of the ranks, E, P, K, H, I, num_sms, num_ranks), shared by every call
// site and executable that uses the same configuration
// (shared_ptr; freed with cuMemFree when the last state using it dies). Calls sharing a buffer
// must not run concurrently (they are ordered on one XLA stream in practice). Single rank: a
// group of one, kNumRanks = 1, pointer table [own ptr].
#pragma once

#include <array>
#include <string>

#include "handlers/mega_moe.h"
#include "layout/sm90_mega_moe.h"

namespace jmm {

// The sm_90 attributes: the shared ones plus the wide-tile switch (struct decoding by name).
struct Sm90MegaMoeAttrs {
  mega::MegaMoeAttrs common;
  bool sm90_wide_tile;
};

// What the sm_90 target adds to handlers/mega_moe.h.
struct Sm90Mega {
  static constexpr const char* kTarget = "jax_megamoe_mega_moe_sm90";
  static constexpr int kArch = 90;
  static constexpr int kComputeMajor = 9;
  static constexpr const char* kGpuName = "an sm_90 GPU (H100/H200)";
  static constexpr int kTmaAlignment = 16;  // l1, l2, y (the scales are plain pointers)
  static constexpr bool kTmaScales = false;
  static constexpr int kNumParams = jit::kSm90MegaMoeNumParams;
  static constexpr size_t kNumTensorMaps =
      7;  // l1_acts l1_acts_sf l1_weights l1_output l2_acts l2_acts_sf l2_weights

  using Attrs = Sm90MegaMoeAttrs;
  struct Options {
    bool sm90_wide_tile = false;  // layout::sm90_mega_config
  };
  using Shape = layout::Sm90MegaShape;
  using Layout = layout::Sm90MegaLayout;
  using Config = layout::Sm90MegaConfig;
  using Args = jit::Sm90MegaMoeArgs;
  struct DeviceExtra {
    mega::TensorMaps<kNumTensorMaps> maps;
  };
  using Device = mega::Device<Sm90Mega>;
  using State = mega::State<Sm90Mega>;

  static const mega::MegaMoeAttrs& Common(const Attrs& a) { return a.common; }
  static bool AttrsValid(const Attrs&, std::string*) { return true; }
  static Options OptionsOf(const Attrs& a) { return Options{a.sm90_wide_tile}; }
  static Shape ShapeOf(const Attrs& a);
  static bool ShapeValid(const Shape& s, std::string* why);
  static MmaKind MmaKindOf(const Shape&) { return MmaKind::kNone; }
  static bool SetMmaKind(MmaKind k, Shape*, std::string* why) { return mma_kind_valid(90, k, why); }
  static std::array<mega::WeightSpec, 4> Weights(const Shape& s);
  static bool Plan(const Shape& s, const Options& o, int64_t num_sms, int64_t num_tokens,
                   float clamp, bool fast_math, Layout* l, Config* c, std::string* why);
  static jit::KernelSource Source(const Config& c);
  static std::array<TensorMapPlan, kNumTensorMaps> Plans(const Config& c, const Layout& l);
  static void ExtendGroupKey(const Shape&, std::vector<int64_t>*) {}
  static xla::ffi::Error PrepareExtra(const cuda::Driver* d, const host::DriverExt* x,
                                      const State& st, CUcontext ctx, int sm_count, Device* e);
  static const void* ExpertScales(const Device&) { return nullptr; }
  static xla::ffi::Error KernelArgs(const cuda::Driver* d, const host::DriverExt* x,
                                    const State& st, int64_t T, const mega::ExecuteOperands& ops,
                                    Device* e, Args* a, void** params);
};

using MegaMoeSm90State = Sm90Mega::State;

}  // namespace jmm
