// Process-wide JIT configuration, set from Python through jmm_configure().
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace jmm::jit {

struct JitConfig {
  bool configured = false;
  std::string deepgemm_include;             // folder holding deep_gemm/, cute/, cutlass/
  std::string nvcc;                         // absolute path of nvcc
  std::vector<std::string> extra_includes;  // CUDA headers when nvcc comes from pip wheels
  std::string cache_dirs;                   // explicit roots (colon-separated); empty: env/default
  std::string header_version;               // e.g. "sgl-deep-gemm 0.2.5", part of the cache key
  uint64_t generation = 0;                  // bumped by every jmm_configure()
};

JitConfig jit_config();
void set_jit_config(JitConfig config);

std::vector<std::string> split_paths(const std::string& colon_separated);

// Cache roots, in lookup order; the first one is the only one written.
// Source: the configured cache_dirs, else $DG_JIT_CACHE_DIR (then $DJ_JIT_CACHE_DIR),
// else $XDG_CACHE_HOME/jax_megamoe/jit, else ~/.cache/jax_megamoe/jit.
std::vector<std::string> cache_roots(const JitConfig& config);

}  // namespace jmm::jit
