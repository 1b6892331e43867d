// C entry points of the JIT, for Python (ctypes) and tooling (declared in common/c_api.h). No GPU
// needed.
//
// Conventions: functions returning int give 0 on success and non-zero on
// failure, with the reason in jmm_last_error() (per thread). Output strings
// are written NUL-terminated into caller buffers and truncated to fit.
#include <cuda.h>

#include <string>

#include "common/c_api.h"
#include "common/export.h"
#include "common/status.h"
#include "cuda/driver.h"
#include "jit/compiler.h"
#include "jit/config.h"
#include "jit/cubin.h"
#include "jit/kernels.h"
#include "jit/sha256.h"
#include "xla/ffi/api/c_api.h"

#ifndef JMM_VERSION
#define JMM_VERSION unknown
#endif

namespace {

std::string str(const char* s) { return s ? std::string(s) : std::string(); }

int fail(std::string msg, char* err_out = nullptr, size_t err_cap = 0) {
  jmm::copy_out(msg, err_out, err_cap);
  jmm::set_last_error(std::move(msg));
  return 1;
}

}  // namespace

// Everything the JIT needs, from Python (jax_megamoe/_src/kernels/_ffi.py configure_jit: the
// paths _toolchain.py found, the cache roots and nvcc switches of the process policy); the
// library reads no environment variable. extra_include_dirs and cache_dirs are colon-separated;
// cache_dirs empty: /tmp/jax_megamoe-jit-<uid>. with_lineinfo: nvcc -lineinfo (part of the cache
// key); print_commands: print every nvcc command line to stderr.
JMM_EXPORT int jmm_configure(const char* deepgemm_include, const char* nvcc_path,
                             const char* extra_include_dirs, const char* cache_dirs,
                             const char* header_version, int with_lineinfo, int print_commands) {
  jmm::jit::JitConfig c;
  c.deepgemm_include = str(deepgemm_include);
  c.nvcc = str(nvcc_path);
  c.extra_includes = jmm::jit::split_paths(str(extra_include_dirs));
  c.cache_dirs = str(cache_dirs);
  c.header_version = str(header_version);
  c.with_lineinfo = with_lineinfo != 0;
  c.print_commands = print_commands != 0;
  if (c.deepgemm_include.empty() || c.nvcc.empty()) {
    return fail("jmm_configure: deepgemm_include and nvcc_path must be non-empty");
  }
  jmm::jit::set_jit_config(std::move(c));
  return 0;
}

JMM_EXPORT const char* jmm_last_error() { return jmm::last_error().c_str(); }

// Writes the kernel.cu source for (arch, mma_kind) into out. Returns the
// source length (like snprintf: a return >= cap means it was truncated), or
// -1 for invalid arguments.
JMM_EXPORT int jmm_render_pre_dispatch(int arch, int mma_kind, char* out, size_t cap) {
  std::string why;
  const auto kind = static_cast<jmm::MmaKind>(mma_kind);
  if (!jmm::mma_kind_valid(arch, kind, &why)) {
    jmm::set_last_error(why);
    return -1;
  }
  const auto k = jmm::jit::pre_dispatch_source(arch, kind);
  return static_cast<int>(jmm::copy_out(k.source, out, cap));
}

// Compiles (or finds in the disk / memory cache) the pre-dispatch kernel and
// writes the cubin path. No GPU or driver needed.
JMM_EXPORT int jmm_compile_pre_dispatch(int arch, int mma_kind, char* cubin_path_out, size_t cap,
                                        char* err_out, size_t err_cap) {
  std::string why;
  const auto kind = static_cast<jmm::MmaKind>(mma_kind);
  if (!jmm::mma_kind_valid(arch, kind, &why)) return fail(why, err_out, err_cap);
  jmm::jit::CompiledKernel c;
  if (!jmm::jit::jit_compile(jmm::jit::pre_dispatch_source(arch, kind), &c, &why)) {
    return fail(why, err_out, err_cap);
  }
  if (c.cubin_path.size() + 1 > cap) {
    return fail("jmm_compile_pre_dispatch: cubin path buffer too small", err_out, err_cap);
  }
  jmm::copy_out(c.cubin_path, cubin_path_out, cap);
  jmm::copy_out("", err_out, err_cap);
  return 0;
}

// Counters since process start: [memory_hits, disk_hits, compiles, failures].
// Writes min(n, 4) values and returns how many were written.
JMM_EXPORT int jmm_jit_stats(uint64_t* out, int n) {
  const auto s = jmm::jit::jit_stats();
  const uint64_t v[4] = {s.memory_hits, s.disk_hits, s.compiles, s.failures};
  int i = 0;
  for (; out != nullptr && i < n && i < 4; ++i) out[i] = v[i];
  return i;
}

// Forgets the in-memory cubin and nvcc-version caches (tests, tooling).
JMM_EXPORT void jmm_jit_clear_memory_cache() { jmm::jit::jit_clear_memory_cache(); }

// The cache roots a compile would use now, colon-separated (first is written).
JMM_EXPORT int jmm_jit_cache_roots(char* out, size_t cap) {
  std::string joined;
  for (const auto& r : jmm::jit::cache_roots(jmm::jit::jit_config())) {
    joined += joined.empty() ? r : ":" + r;
  }
  return static_cast<int>(jmm::copy_out(joined, out, cap));
}

// Newline-separated CUDA entry symbols of a cubin (what the loader looks up).
// Returns the text length, or -1 on error.
JMM_EXPORT int jmm_cubin_kernel_symbols(const char* path, char* out, size_t cap) {
  std::vector<std::string> names;
  std::string why;
  if (!jmm::jit::cubin_entry_symbols(str(path), &names, &why)) {
    jmm::set_last_error(why);
    return -1;
  }
  std::string joined;
  for (const auto& n : names) joined += n + "\n";
  return static_cast<int>(jmm::copy_out(joined, out, cap));
}

// SHA-256 hex of a byte string (the JIT cache's hash; exported for tests).
JMM_EXPORT int jmm_sha256_hex(const char* data, size_t size, char* out, size_t cap) {
  return static_cast<int>(jmm::copy_out(
      jmm::jit::sha256_hex(std::string_view(data ? data : "", data ? size : 0)), out, cap));
}

// 0 when the CUDA driver loads and initialises; otherwise 1 and the reason.
JMM_EXPORT int jmm_driver_status(char* out, size_t cap) {
  std::string why;
  const auto* d = jmm::cuda::driver(&why);
  if (d == nullptr) {
    jmm::copy_out(why, out, cap);
    return 1;
  }
  jmm::copy_out(
      jmm::cat("CUDA driver ", d->driver_version / 1000, ".", (d->driver_version % 1000) / 10), out,
      cap);
  return 0;
}

#define JMM_STR2(x) #x
#define JMM_STR(x) JMM_STR2(x)
// Static build facts: library version, XLA FFI API version of the headers,
// CUDA header version.
JMM_EXPORT const char* jmm_build_info() {
  return "jax_megamoe_ffi " JMM_STR(JMM_VERSION) "; XLA FFI API " JMM_STR(
      XLA_FFI_API_MAJOR) "." JMM_STR(XLA_FFI_API_MINOR) "; cuda.h " JMM_STR(CUDA_VERSION);
}
