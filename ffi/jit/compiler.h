// nvcc driver with a disk + memory cubin cache.
//
// Disk layout (compatible in spirit with DeepGEMM's deep_jit cache):
//   <root>/cache/<name>.<digest32>/{kernel.cu, kernel.cubin, meta.json}
//   <root>/tmp/<name>.<digest32>.XXXXXX/   build directory, renamed into cache/ when complete
// Roots come from jit::cache_roots(): the first is written, the others are
// read-only lookups. Publication is an atomic rename(2) of a complete
// directory, so concurrent processes never see a partial entry; a process that
// loses the race discards its own build and uses the winner's.
// digest = SHA-256 over: a format tag, the rendered source, the nvcc flags
// (include dirs other than DeepGEMM's), the full `nvcc --version` text, the
// DeepGEMM header version string, and the path + contents of every header
// under the DeepGEMM include folder reachable from the source's includes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "jit/kernels.h"

namespace jmm::jit {

struct CompiledKernel {
  std::string cubin_path;  // <entry>/kernel.cubin
  std::string symbol;      // mangled entry symbol, for cuLibraryGetKernel
  std::string digest;      // full SHA-256 hex
  std::string entry_dir;
  bool from_memory = false;
  bool from_disk = false;
};

struct JitStats {
  uint64_t memory_hits = 0;
  uint64_t disk_hits = 0;
  uint64_t compiles = 0;  // nvcc runs that produced a cubin
  uint64_t failures = 0;
};

// Compiles (or finds in a cache) `k`. Never throws; false + *error on failure.
// Thread-safe (compiles are serialised within the process).
bool jit_compile(const KernelSource& k, CompiledKernel* out, std::string* error);

JitStats jit_stats();
void jit_clear_memory_cache();

struct NvccVersion {
  std::string text;  // full `nvcc --version` output
  int major = 0;
  int minor = 0;
};
// Runs `nvcc --version` (cached per path) and parses "release X.Y".
bool nvcc_version(const std::string& nvcc, NvccVersion* out, std::string* error);
constexpr int kMinNvccMajor = 12;
constexpr int kMinNvccMinor = 9;

}  // namespace jmm::jit
