// The MMA kind of a Mega-MoE kernel: the FFI attribute `mma_kind` (i64), decoded by XLA straight
// into this enum (XLA_FFI_REGISTER_ENUM_ATTR_DECODING in the handlers), and deep_gemm::MmaKind's
// values. XLA does not range-check an enum attribute: every decoder calls mma_kind_valid().
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace jmm {

enum class MmaKind : int64_t {
  kNone = 0,      // sm_90: FP8 e4m3 x e4m3 with f32 per-128 scales (no deep_gemm::MmaKind)
  kMXFP8FP4 = 1,  // sm_100 "fp8xfp4": e4m3 activations x E2M1 weights
  kMXFP4 = 2,     // sm_100 "mxf4xmxf4": E2M1 activations x E2M1 weights
};

inline int64_t mma_kind_value(MmaKind k) { return static_cast<int64_t>(k); }

// The jax_megamoe mode name of a kind ("fp8xfp4", "mxf4xmxf4"; "fp8" for kNone).
inline const char* mma_kind_mode(MmaKind k) {
  switch (k) {
    case MmaKind::kNone: return "fp8";
    case MmaKind::kMXFP8FP4: return "fp8xfp4";
    case MmaKind::kMXFP4: return "mxf4xmxf4";
  }
  return "unknown";
}

// Whether `k` is a kind the `arch` (90 or 100) kernels take; false + *error naming the attribute
// `mma_kind`, its value and the accepted ones.
inline bool mma_kind_valid(int arch, MmaKind k, std::string* error) {
  const int64_t v = mma_kind_value(k);
  if (arch == 90) {
    if (k == MmaKind::kNone) return true;
    if (error) *error = cat("attribute mma_kind=", v, " must be 0 on sm_90 (FP8 per-128 scales)");
    return false;
  }
  if (arch == 100) {
    if (k == MmaKind::kMXFP8FP4 || k == MmaKind::kMXFP4) return true;
    if (error) {
      *error = cat("attribute mma_kind=", v,
                   " must be 1 (MXFP8FP4, fp8xfp4) or 2 (MXFP4, mxf4xmxf4) on sm_100");
    }
    return false;
  }
  if (error) *error = cat("arch must be 90 (sm_90a) or 100 (sm_100f), got ", arch);
  return false;
}

}  // namespace jmm
