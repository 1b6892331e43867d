/* The production C API of libjax_megamoe_ffi.so: what jax_megamoe/_src/kernels/_ffi.py declares
 * (its _C_API table, in this order) and calls, besides the XLA FFI stage symbols of the targets
 * (handlers/stages.h). The test-only exports are common/c_api_testing.h.
 *
 * Conventions: functions returning int give 0 on success and non-zero on failure, with the
 * reason in jmm_last_error() (per thread). Output strings are written NUL-terminated into caller
 * buffers and truncated to fit; the *_render / text exports return the full length (snprintf
 * convention) or -1. No GPU is needed by any of them except where a GPU is named.
 */
#ifndef JMM_COMMON_C_API_H_
#define JMM_COMMON_C_API_H_

#include <stddef.h>
#include <stdint.h>

#include "xla/ffi/api/c_api.h"

#ifdef __cplusplus
extern "C" {
#endif
#define JMM_API __attribute__((visibility("default")))

/* The JIT's whole configuration (jit/config.h; the library reads no environment variable):
 * DeepGEMM include folder, nvcc, extra include dirs and cache roots (colon-separated; the first
 * root is written; empty: /tmp/jax_megamoe-jit-<uid>), the header version (part of the cache
 * key), nvcc -lineinfo, and whether to print each nvcc command line to stderr. */
JMM_API int jmm_configure(const char* deepgemm_include, const char* nvcc_path,
                          const char* extra_include_dirs, const char* cache_dirs,
                          const char* header_version, int with_lineinfo, int print_commands);
JMM_API const char* jmm_last_error(void);

/* kernel.cu of the pre-dispatch kernel for (arch, mma_kind); compile it (or find it in the disk /
 * memory cache) and write the cubin path. */
JMM_API int jmm_render_pre_dispatch(int arch, int mma_kind, char* out, size_t cap);
JMM_API int jmm_compile_pre_dispatch(int arch, int mma_kind, char* cubin_path_out, size_t cap,
                                     char* err_out, size_t err_cap);

/* JIT counters since process start [memory_hits, disk_hits, compiles, failures] and execute
 * counters [eager, captured]: write min(n, count) values, return how many were written. */
JMM_API int jmm_jit_stats(uint64_t* out, int n);
JMM_API void jmm_jit_clear_memory_cache(void);
JMM_API int jmm_execute_stats(uint64_t* out, int n);
/* The cache roots a compile would use now, colon-separated (the first is written). */
JMM_API int jmm_jit_cache_roots(char* out, size_t cap);
/* Newline-separated CUDA entry symbols of a cubin; -1 on error. */
JMM_API int jmm_cubin_kernel_symbols(const char* path, char* out, size_t cap);
/* SHA-256 hex of a byte string (the JIT cache's hash). */
JMM_API int jmm_sha256_hex(const char* data, size_t size, char* out, size_t cap);
/* 0 when the CUDA driver loads and initialises (out: its version); otherwise 1 and the reason. */
JMM_API int jmm_driver_status(char* out, size_t cap);
/* Library version, XLA FFI API version of the headers, CUDA header version. */
JMM_API const char* jmm_build_info(void);

/* The FFI state types' ids and infos (jax.ffi.register_ffi_type). */
JMM_API XLA_FFI_TypeId* jmm_pre_dispatch_state_type_id(void);
JMM_API const XLA_FFI_TypeInfo* jmm_pre_dispatch_state_type_info(void);
JMM_API XLA_FFI_TypeId* jmm_mega_moe_sm90_state_type_id(void);
JMM_API const XLA_FFI_TypeInfo* jmm_mega_moe_sm90_state_type_info(void);
JMM_API XLA_FFI_TypeId* jmm_mega_moe_sm100_state_type_id(void);
JMM_API const XLA_FFI_TypeInfo* jmm_mega_moe_sm100_state_type_info(void);
JMM_API XLA_FFI_TypeId* jmm_decode_state_type_id(void);
JMM_API const XLA_FFI_TypeInfo* jmm_decode_state_type_info(void);

/* kernel.cu of decode pass 1 (L1) or 2 (L2); compile it and write the cubin path. */
JMM_API int jmm_decode_render(int pass, char* out, size_t cap);
JMM_API int jmm_decode_compile(int pass, char* cubin_out, size_t cap, char* err_out,
                               size_t err_cap);

#ifdef __cplusplus
}
#endif

#endif /* JMM_COMMON_C_API_H_ */
