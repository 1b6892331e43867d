// Process-wide JIT configuration, set from Python through jmm_configure(). The library reads no
// environment variable: every knob (paths, cache roots, nvcc switches) arrives here, resolved by
// the Python policy (jax_megamoe/_src/numerics/policy.py).
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
  std::string cache_dirs;                   // roots (colon-separated); empty: the fallback below
  std::string header_version;               // e.g. "sgl-deep-gemm 0.2.5", part of the cache key
  bool with_lineinfo = false;               // nvcc -lineinfo (DeepGEMM's DG_JIT_WITH_LINEINFO)
  bool print_commands = false;              // print each nvcc command line to stderr
  uint64_t generation = 0;                  // bumped by every jmm_configure()
};

JitConfig jit_config();
void set_jit_config(JitConfig config);

std::vector<std::string> split_paths(const std::string& colon_separated);

// Cache roots, in lookup order; the first one is the only one written.
// Source: the configured cache_dirs (Python passes the policy's jit_cache_dirs: DG_JIT_CACHE_DIR,
// else ~/.cache/jax_megamoe/jit), else /tmp/jax_megamoe-jit-<uid>.
std::vector<std::string> cache_roots(const JitConfig& config);

}  // namespace jmm::jit
