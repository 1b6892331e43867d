#include "jit/mega_kernels.h"

#include <cmath>
#include <cstdio>

#include "common/status.h"

namespace jmm::jit {
namespace {

// The kernel's parameter list with top-level const dropped (what the function type holds) ...
std::string Sm90MegaMoeSignature(int64_t ranks) {
  return cat(
      "void*, int*, uint32_t, deep_gemm::layout::SymBuffer<", ranks,
      "u>, cute::TmaDescriptor, "
      "cute::TmaDescriptor, cute::TmaDescriptor, const float*, cute::TmaDescriptor, "
      "cute::TmaDescriptor, cute::TmaDescriptor, cute::TmaDescriptor, const float*, uint64_t*");
}
// ... and as the explicit instantiation must spell it (nvcc wants the __grid_constant__
// annotations of the declaration repeated).
std::string Sm90MegaMoeInstantiationParams(int64_t ranks) {
  return cat(
      "void*, int*, const uint32_t, const __grid_constant__ deep_gemm::layout::SymBuffer<", ranks,
      "u>, "
      "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
      "const __grid_constant__ cute::TmaDescriptor, const float*, "
      "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
      "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
      "const float*, uint64_t*");
}

// sm_100: the parameter list as the function type holds it ...
constexpr const char* kSm100TensorMaps18 =
    "cute::TmaDescriptor, cute::TmaDescriptor, cute::TmaDescriptor, cute::TmaDescriptor, "
    "cute::TmaDescriptor, cute::TmaDescriptor, cute::TmaDescriptor, cute::TmaDescriptor, "
    "cute::TmaDescriptor, cute::TmaDescriptor, cute::TmaDescriptor, cute::TmaDescriptor, "
    "cute::TmaDescriptor, cute::TmaDescriptor, cute::TmaDescriptor, cute::TmaDescriptor, "
    "cute::TmaDescriptor, cute::TmaDescriptor";
constexpr const char* kSm100GridConstantTensorMaps18 =
    "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
    "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
    "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
    "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
    "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
    "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
    "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
    "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor, "
    "const __grid_constant__ cute::TmaDescriptor, const __grid_constant__ cute::TmaDescriptor";

const char* b(bool v) { return v ? "true" : "false"; }

}  // namespace

std::string float_template_literal(float v) {
  if (std::isinf(v) && v > 0) return "cute::numeric_limits<float>::infinity()";
  if (std::isinf(v)) return "-cute::numeric_limits<float>::infinity()";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%af", static_cast<double>(v));  // exact hex float
  return buf;
}

std::string mega_moe_sm90_template_args(const layout::Sm90MegaConfig& c) {
  // Order of deep_gemm::sm90_fp8_mega_moe_impl's template parameters (0.2.5).
  return cat(c.num_max_tokens_per_rank, "u, ",                      // kNumMaxTokensPerRank
             c.hidden, "u, ", c.intermediate, "u, ",                // kHidden, kIntermediateHidden
             c.num_experts, "u, ", c.top_k, "u, ",                  // kNumExperts, kNumTopk
             c.num_experts_per_wave, "u, ",                         // kNumExpertsPerWave
             c.block_m, "u, ", c.block_n, "u, ", c.block_k, "u, ",  // BLOCK_M, BLOCK_N, BLOCK_K
             c.num_max_pool_tokens, "u, ",                          // kNumMaxPoolTokens
             c.num_padded_sf_pool_tokens, "u, ",                    // kNumPaddedSFPoolTokens
             c.num_max_pool_tokens, "u, ",                          // kNumRingTokens: the full pool
             c.num_stages, "u, ",                                   // kNumStages
             c.num_dispatch_threads, "u, ", c.num_non_epilogue_threads, "u, ",
             c.num_epilogue_threads, "u, ",                     // thread counts
             c.num_sms, "u, ", c.num_ranks, "u, ",              // kNumSMs, kNumRanks
             float_template_literal(c.activation_clamp), ", ",  // kActivationClamp
             b(c.fast_math), ", ",                              // kFastMath
             c.epilogue_register_budget, "u, ",                 // kEpilogueRegisterBudget
             b(c.reuse_accum_as_final), ", ",                   // kReuseAccumAsFinal
             b(c.l2_arrival_counter), ", ",                     // kL2ArrivalCounter
             b(c.l2_epilogue_requires_full_sync), ", ",         // kL2EpilogueRequiresFullSync
             b(c.half_l2_cd), ", ",                             // kHalfL2CD
             c.cluster_size, "u, ",                             // kClusterSize
             b(c.multicast_on_b), ", ",                         // kMulticastOnB
             "0u, ",                                            // kL2LagUnits: the wave schedule
             c.l2_cd_passes, "u, ",                             // kL2CDPasses
             b(c.trace), ", ", b(c.trace_epi), ", ",            // kTrace, kTraceEpi
             c.l2_stage_mode, "u, ",                            // kL2StageMode
             b(c.pdl), ", ",                                    // kPDL
             c.early_combine, "u, ",                            // kEarlyCombineMode
             c.pull_publish_batch, "u, ",                       // kPullPublishBatch
             b(c.pull_eager_publish));                          // kPullEagerPublish
}

namespace {

// The part of a rendered mega-kernel source both archs share: includes, the CUTLASS_GLOBAL
// override that gives the kernel a GLOBAL cubin symbol, and the static_assert pinning DeepGEMM's
// launch signature to the one the FFI handler marshals. Opens namespace jax_megamoe_jit.
std::string MegaSourcePrelude(const std::string& impl_header, const std::string& signature,
                              const std::string& fn, const char* kernel_name) {
  return cat(
      "#include <cstdint>\n", "#include <type_traits>\n",
      "// CUTLASS_GLOBAL is `__global__ static`: give the kernel external linkage so that its\n",
      "// entry symbol is GLOBAL in the cubin (found by name with cuLibraryGetKernel).\n",
      "#include <cutlass/detail/helper_macros.hpp>\n", "#undef CUTLASS_GLOBAL\n",
      "#define CUTLASS_GLOBAL __global__\n", "#include <", impl_header, ">\n", "\n",
      "namespace jax_megamoe_jit {\n", "using launch_signature_t = void (*)(", signature, ");\n",
      "static_assert(std::is_same_v<decltype(&", fn, "), launch_signature_t>,\n",
      "              \"DeepGEMM changed the signature of ", kernel_name,
      "; update "
      "ffi/jit/mega_kernels.{h,cc} and the FFI handler\");\n");
}

}  // namespace

KernelSource mega_moe_sm90_source(const layout::Sm90MegaConfig& c) {
  KernelSource k = kernel_named("sm90_mega_moe", "sm_90a", "deep_gemm/impls/sm90_fp8_mega_moe.cuh",
                                "sm90_fp8_mega_moe_impl");
  const std::string fn =
      cat("deep_gemm::sm90_fp8_mega_moe_impl<", mega_moe_sm90_template_args(c), ">");
  k.source = cat(
      "// Generated by jax_megamoe (ffi/jit/mega_kernels.cc); do not edit.\n", "// Kernel: ", fn,
      "\n",
      "// sm_90 fused Mega MoE: FP8 e4m3 x e4m3, 128x128 weight scales, per-128 act scales;\n",
      "// BLOCK_M=", c.block_m, " BLOCK_N=", c.block_n, " stages=", c.num_stages,
      " cluster=", c.cluster_size, " threads=", c.num_threads, " smem=", c.smem_size, "\n",
      MegaSourcePrelude(k.impl_header, Sm90MegaMoeSignature(c.num_ranks), fn,
                        "sm90_fp8_mega_moe_impl"),
      "static_assert(sizeof(deep_gemm::layout::SymBuffer<", c.num_ranks,
      "u>) == ", layout::kSm90SymBufferBytes, " and alignof(deep_gemm::layout::SymBuffer<",
      c.num_ranks, "u>) == 8,\n",
      "              \"SymBuffer layout changed; update jmm::jit::Sm90SymBuffer\");\n",
      "static_assert(sizeof(cute::TmaDescriptor) == 128, \"TmaDescriptor is a CUtensorMap\");\n",
      "}  // namespace jax_megamoe_jit\n", "\n",
      "// The one kernel of this cubin (an explicit instantiation).\n", "template __global__ void ",
      fn, "(", Sm90MegaMoeInstantiationParams(c.num_ranks), ");\n");
  return k;
}

std::string mega_moe_sm100_template_args(const layout::Sm100MegaConfig& c) {
  // Order of deep_gemm::sm100_fp8_fp4_mega_moe_impl's template parameters (0.2.5).
  const char* kind =
      c.mma_kind == MmaKind::kMXFP4 ? "deep_gemm::MmaKind::MXFP4" : "deep_gemm::MmaKind::MXFP8FP4";
  return cat(c.num_max_tokens_per_rank, "u, ",                   // kNumMaxTokensPerRank
             c.hidden, "u, ", c.intermediate, "u, ",             // kHidden, kIntermediateHidden
             c.num_experts, "u, ", c.num_shared_experts, "u, ",  // kNumExperts, kNumSharedExperts
             c.top_k, "u, ",                                     // kNumTopk
             c.block_m, "u, ", c.block_n, "u, ", c.block_k, "u, ",  // BLOCK_M, BLOCK_N, BLOCK_K
             c.store_block_m_l1, "u, ", c.store_block_m_l2, "u, ",  // STORE_BLOCK_M_L1/L2
             c.sf_block_m, "u, ", c.sf_block_n, "u, ",              // SF_BLOCK_M, SF_BLOCK_N
             kind, ", ",                                            // kMmaKind
             c.num_ring_tokens, "u, ", c.num_sf_ring_tokens,
             "u, ",                                             // kNumRingTokens, kNumSFRingTokens
             c.num_stages, "u, ", c.num_bytes_per_pull, "u, ",  // kNumStages, kNumBytesPerPull
             c.num_dispatch_threads, "u, ", c.num_non_epilogue_threads, "u, ",
             c.num_epilogue_threads, "u, ",                         // thread counts
             c.num_sms, "u, ", c.num_ranks, "u, ",                  // kNumSMs, kNumRanks
             float_template_literal(c.activation_clamp), ", ",      // kActivationClamp
             float_template_literal(c.swiglu_alpha), ", ",          // kSwiGLUAlpha
             b(c.use_situ), ", ", b(c.fast_math), ", ",             // kUseSitu, kFastMath
             b(c.use_x_scales), ", ",                               // kUseXScales
             b(c.with_l1_alphas), ", ", b(c.with_l2_alphas), ", ",  // kWithL1Alphas, kWithL2Alphas
             b(c.with_l2_act_scales), ", ",                         // kWithL2ActScales
             b(c.use_fp8_combine), ", ",                            // kUseFp8Combine
             "cutlass::detail::float_e2m1_unpacksmem_t, ",          // weight_dtype_t (FP4 weights)
             float_template_literal(c.situ_beta), ", ",             // kSituBeta
             float_template_literal(c.situ_linear_beta), ", ",      // kSituLinearBeta
             b(c.post_expert_norm), ", ",                           // kWithPostExpertNorm
             b(c.post_norm_weight_first), ", ",                     // kPostNormWeightFirst
             b(c.post_norm_has_weight), ", ",                       // kPostNormHasWeight
             float_template_literal(c.post_norm_eps), ", ",         // kPostNormEps
             b(c.use_trtllm_weights));                              // kUseTrtllmWeights
}

KernelSource mega_moe_sm100_source(const layout::Sm100MegaConfig& c) {
  KernelSource k =
      kernel_named("sm100_mega_moe", "sm_100f", "deep_gemm/impls/sm100_fp8_fp4_mega_moe.cuh",
                   "sm100_fp8_fp4_mega_moe_impl");
  const std::string fn =
      cat("deep_gemm::sm100_fp8_fp4_mega_moe_impl<", mega_moe_sm100_template_args(c), ">");
  const std::string signature =
      cat("void*, int*, const float*, const float*, const float*, const float*, uint32_t, "
          "deep_gemm::layout::SymBuffer<",
          c.num_ranks, "u>, ", kSm100TensorMaps18, ", const uint8_t*");
  const std::string instantiation_params =
      cat("void*, int*, const float* __restrict__, const float* __restrict__, "
          "const float* __restrict__, const float* __restrict__, const uint32_t, "
          "const __grid_constant__ deep_gemm::layout::SymBuffer<",
          c.num_ranks, "u>, ", kSm100GridConstantTensorMaps18, ", const uint8_t*");
  k.source = cat(
      "// Generated by jax_megamoe (ffi/jit/mega_kernels.cc); do not edit.\n", "// Kernel: ", fn,
      "\n", "// sm_100 fused Mega MoE (", mma_kind_mode(c.mma_kind),
      "): compile-checked only, never run on a B200 by jax_megamoe;\n", "// BLOCK_M=", c.block_m,
      " BLOCK_K=", c.block_k, " store=", c.store_block_m_l1, "/", c.store_block_m_l2,
      " ring=", c.num_ring_tokens, " stages=", c.num_stages, " cluster=", c.cluster_size,
      " threads=", c.num_threads, " smem=", c.smem_size, "\n",
      MegaSourcePrelude(k.impl_header, signature, fn, "sm100_fp8_fp4_mega_moe_impl"),
      "static_assert(sizeof(deep_gemm::layout::SymBuffer<", c.num_ranks,
      "u>) == ", layout::kSm100SymBufferBytes, " and alignof(deep_gemm::layout::SymBuffer<",
      c.num_ranks, "u>) == 8,\n",
      "              \"SymBuffer layout changed; update jmm::jit::Sm100SymBuffer\");\n",
      "static_assert(sizeof(cute::TmaDescriptor) == 128, \"TmaDescriptor is a CUtensorMap\");\n",
      "static_assert(sizeof(deep_gemm::layout::MegaMoESignals) == ", layout::kSm100MegaSignalsBytes,
      ",\n",
      "              \"MegaMoESignals changed; update ffi/layout/sm100_mega_moe.{h,cc}\");\n",
      "static_assert(deep_gemm::layout::kLCMCandidateBlockM == ", layout::kSm100TokenAlignment,
      ", \"token alignment changed\");\n", "}  // namespace jax_megamoe_jit\n", "\n",
      "// The one kernel of this cubin (an explicit instantiation).\n", "template __global__ void ",
      fn, "(", instantiation_params, ");\n");
  return k;
}

}  // namespace jmm::jit
