#include "handlers/mega_moe_sm90.h"

#include <string>
#include <vector>

#include "common/c_api.h"
#include "common/export.h"
#include "common/status.h"
#include "jit/mega_kernels.h"

namespace ffi = xla::ffi;

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jmm::Sm90MegaMoeAttrs, JMM_MEGA_MOE_ATTR_MEMBERS,
                                      ::xla::ffi::StructMember<bool>("sm90_wide_tile"));

namespace jmm {

Sm90Mega::Shape Sm90Mega::ShapeOf(const Attrs& attrs) {
  const mega::MegaMoeAttrs& a = attrs.common;
  return mega::CommonShape<Shape>(a.num_ranks, a.num_experts, a.capacity, a.top_k, a.hidden,
                                  a.intermediate);
}

bool Sm90Mega::ShapeValid(const Shape& s, std::string* why) {
  return layout::sm90_mega_shape_valid(s, why);
}

std::array<mega::WeightSpec, 4> Sm90Mega::Weights(const Shape& s) {
  const int64_t H = s.hidden, I = s.intermediate;
  return {{{"l1", ffi::DataType::F8E4M3FN, 2 * I, H},
           {"l1_sf", ffi::DataType::F32, 2 * I / 128, H / 128},
           {"l2", ffi::DataType::F8E4M3FN, H, I},
           {"l2_sf", ffi::DataType::F32, H / 128, I / 128}}};
}

bool Sm90Mega::Plan(const Shape& s, const Options& o, int64_t num_sms, int64_t num_tokens,
                    float clamp, bool fast_math, Layout* l, Config* c, std::string* why) {
  *l = layout::sm90_mega_layout(s);
  return layout::sm90_mega_config(s, *l, num_tokens, num_sms, clamp, fast_math, o.sm90_wide_tile, c,
                                  why);
}

jit::KernelSource Sm90Mega::Source(const Config& c) { return jit::mega_moe_sm90_source(c); }

// DeepGEMM's make_tma_2d_desc conventions: 2-D, inner dim first, 128B swizzle -> inner box =
// 128 bytes. Buffer slices and the two weight operands (l1, l2).
std::array<TensorMapPlan, Sm90Mega::kNumTensorMaps> Sm90Mega::Plans(const Config& c,
                                                                    const Layout& l) {
  const int64_t H = c.hidden, I = c.intermediate, D = l.num_data_pool_tokens;
  const int64_t S = l.num_padded_sf_pool_tokens, e_local = l.num_experts_per_rank;
  using Src = MapSource;
  // e4m3 [outer, inner] rows of `inner` bytes; a swizzled box is one swizzle atom wide.
  const auto fp8 = [](const char* name, MapSource source, uint64_t offset, int64_t inner,
                      int64_t outer, int64_t box_inner, int64_t box_outer, Swizzle swizzle) {
    const int64_t atom = static_cast<int64_t>(swizzle);
    return mega::Plan2D(name, source, offset, MapDtype::kUint8, inner, outer, inner,
                        swizzle != Swizzle::kNone ? atom : box_inner, box_outer, swizzle);
  };
  // f32 [K/128][S] MN-major scale factors, one column of block_m rows per box.
  const auto sf = [&](const char* name, uint64_t offset, int64_t groups) {
    return mega::Plan2D(name, Src::kBuffer, offset, MapDtype::kFloat32, S, groups, S * 4, c.block_m,
                        1, Swizzle::kNone);
  };
  const auto out_swizzle = static_cast<Swizzle>(c.l1_output_swizzle);
  constexpr Swizzle k128B = Swizzle::k128B;
  return {
      fp8("l1_acts", Src::kBuffer, l.l1_acts, H, D, c.block_k, c.block_m, k128B),
      sf("l1_acts_sf", l.l1_acts_sf, H / 128),
      fp8("l1_weights", Src::kL1, 0, H, e_local * 2 * I, c.block_k, c.weight_tma_block_n, k128B),
      fp8("l1_output", Src::kBuffer, l.l2_acts, I, D, c.l1_output_box_n, c.l1_output_box_m,
          out_swizzle),
      fp8("l2_acts", Src::kBuffer, l.l2_acts, I, D, c.block_k, c.block_m, k128B),
      sf("l2_acts_sf", l.l2_acts_sf, I / 128),
      fp8("l2_weights", Src::kL2, 0, I, e_local * H, c.block_k, c.weight_tma_block_n, k128B),
  };
}

ffi::Error Sm90Mega::PrepareExtra(const cuda::Driver* d, const host::DriverExt* x, const State&,
                                  CUcontext, int, Device* e) {
  e->maps.plans = Plans(e->config, e->layout);
  return mega::EncodeBufferMaps(d, x, kTarget, e->buffer->ptr[e->rank], &e->maps);
}

ffi::Error Sm90Mega::KernelArgs(const cuda::Driver* d, const host::DriverExt* x, const State&,
                                int64_t T, const mega::ExecuteOperands& ops, Device* e, Args* a,
                                void** params) {
  {
    std::lock_guard<std::mutex> lock(e->mu);
    if (ffi::Error err = mega::EncodeOperandMaps(d, x, kTarget, ops, &e->maps); !err.success()) {
      return err;
    }
  }
  const auto& m = e->maps.maps;
  a->y = ops.y;
  a->cumulative_local_expert_recv_stats = nullptr;
  a->num_tokens = static_cast<uint32_t>(T);
  a->sym_buffer = e->sym;
  a->l1_acts = m[0];
  a->l1_acts_sf = m[1];
  a->l1_weights = m[2];
  a->l1_weights_sf = static_cast<const float*>(ops.l1_sf);
  a->l1_output = m[3];
  a->l2_acts = m[4];
  a->l2_acts_sf = m[5];
  a->l2_weights = m[6];
  a->l2_weights_sf = static_cast<const float*>(ops.l2_sf);
  a->trace = nullptr;
  void* p[kNumParams] = {&a->y,
                         &a->cumulative_local_expert_recv_stats,
                         &a->num_tokens,
                         &a->sym_buffer,
                         &a->l1_acts,
                         &a->l1_acts_sf,
                         &a->l1_weights,
                         &a->l1_weights_sf,
                         &a->l1_output,
                         &a->l2_acts,
                         &a->l2_acts_sf,
                         &a->l2_weights,
                         &a->l2_weights_sf,
                         &a->trace};
  for (int i = 0; i < kNumParams; ++i) params[i] = p[i];
  return ffi::Error::Success();
}

}  // namespace jmm

// ---------------------------------------------------------------------------
// Exported symbols (see ffi/exports.map; Python: jax_megamoe/_src/kernels/_ffi.py).
// ---------------------------------------------------------------------------

JMM_DEFINE_MEGA_MOE_STATE(jmm_mega_moe_sm90, ::jmm::Sm90Mega)

// The plain target and its `_graph` twin (handlers/stages.h; jax_megamoe.ops uses the twin with
// JAX_MEGAMOE_GRAPH_TARGETS=1). The twin is safe because initialize (allocation, zeroing,
// compilation, module loading, peer access) runs outside any capture and refuses to run inside
// one, and execute only launches: the two launches and their by-value arguments (buffer TMA
// descriptors, the pointer table, the weight descriptors encoded on the host from the operands'
// addresses at trace time) are what the graph records. The persistent kernel carries its barrier
// state in the symmetric buffer, which DeepGEMM builds for graph replay.
JMM_DEFINE_STAGES_AND_GRAPH_TWIN(jmm_mega_moe_sm90, JMM_MEGA_MOE_STAGES(::jmm::Sm90Mega));
