/* The typed C test API of libjax_megamoe_ffi.so (no GPU needed): plain C structs with named
 * fields for the host-side arithmetic of the Mega-MoE handlers (buffer layouts, kernel
 * configurations, TMA descriptor plans, pre-dispatch launch geometry), and the exports that fill
 * them (defined in common/c_api_testing.cc). Only tests/ffi_testing.py and tools/ use it; the
 * production C API (what jax_megamoe/_src/kernels/_ffi.py calls) is common/c_api.h.
 *
 * Each struct is declared once, here, as an X-macro list of its fields. The same list
 *   - defines the C struct (JMM_C_STRUCT below),
 *   - fills it from the C++ struct of the same field names (handlers/, a compile error when a
 *     name goes away),
 *   - and describes it at run time: jmm_c_struct_fields("<struct name>") returns
 *     "<sizeof>;<type> <name>;..." with type i64, f64 or i64[N]. The Python side
 *     (tests/ffi_testing.py) builds its ctypes.Structure from that description, so the field
 *     order lives in this file only.
 * Every export that fills a struct takes the caller's sizeof as well and fails (-1,
 * jmm_last_error) when it differs.
 */
#ifndef JMM_COMMON_C_API_TESTING_H_
#define JMM_COMMON_C_API_TESTING_H_

#include <stddef.h>
#include <stdint.h>

/* Field kinds of the X-macro lists: X(kind, name, count); count > 1 only for i64 arrays. */
#define JMM_C_TYPE_i64 int64_t
#define JMM_C_TYPE_f64 double
#define JMM_C_FIELD_DECL(kind, name, count) JMM_C_TYPE_##kind name[count];
#define JMM_C_FIELD_DECL1(kind, name, count) JMM_C_TYPE_##kind name;

/* The field lists: one table per struct, and JMM_C_STRUCTS naming them all. */
#include "common/c_api_fields.def"

/* typedef struct jmm_<name>_t { ... } jmm_<name>_t; (arrays of one are declared as scalars) */
#define JMM_C_FIELD(kind, name, count) JMM_C_FIELD_##count(kind, name, count)
#define JMM_C_FIELD_1(kind, name, count) JMM_C_FIELD_DECL1(kind, name, count)
#define JMM_C_FIELD_4(kind, name, count) JMM_C_FIELD_DECL(kind, name, count)
#define JMM_C_FIELD_5(kind, name, count) JMM_C_FIELD_DECL(kind, name, count)
#define JMM_C_STRUCT(sname, FIELDS) \
  typedef struct sname##_t {        \
    FIELDS(JMM_C_FIELD)             \
  } sname##_t;
JMM_C_STRUCTS(JMM_C_STRUCT)
#undef JMM_C_STRUCT

#ifdef __cplusplus
extern "C" {
#endif
#define JMM_TESTING_API __attribute__((visibility("default")))

/* "<sizeof>;<kind> <name>;..." of struct `name` (e.g. "jmm_sm90_mega_config"), snprintf
 * convention (returns the full length); -1 for an unknown name. */
JMM_TESTING_API int jmm_c_struct_fields(const char* name, char* out, size_t cap);

/* Every export below that fills a struct takes the caller's sizeof of it (out_size, elem_size)
 * and returns -1 (jmm_last_error) when it differs from the library's. */

/* Pre-dispatch launch geometry (handlers/pre_dispatch.h plan_pre_dispatch). 0, or -1 for
 * arguments no handler would accept. */
JMM_TESTING_API int jmm_pre_dispatch_launch_plan(int arch, int mma_kind, int64_t T, int64_t P,
                                                 int64_t H, int64_t K,
                                                 jmm_pre_dispatch_launch_t* out, size_t out_size);

/* Symmetric-buffer layout of a shape: sm_90 (mma_kind 0), sm_100 sized for num_sms SMs. */
JMM_TESTING_API int jmm_sm90_mega_layout(const jmm_mega_shape_t* shape, jmm_sm90_mega_layout_t* out,
                                         size_t out_size);
JMM_TESTING_API int jmm_sm100_mega_layout(const jmm_mega_shape_t* shape, int64_t num_sms,
                                          jmm_sm100_mega_layout_t* out, size_t out_size);

/* Per arch (sm90, sm100): the kernel configuration of one call (0 or -1); its TMA descriptor
 * plans in kernel parameter order (the count, or -1); the kernel.cu of its mega kernel (the
 * length, >= cap: truncated; or -1); compile it (or find it in the caches) and write the cubin
 * path (0 on success, else 1 and the reason in err_out). */
#define JMM_MEGA_C_API_DECLS(PREFIX, CONFIG_T)                                                     \
  JMM_TESTING_API int PREFIX##_config(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call,  \
                                      CONFIG_T* out, size_t out_size);                             \
  JMM_TESTING_API int PREFIX##_tensor_maps(const jmm_mega_shape_t* shape,                          \
                                           const jmm_mega_call_t* call, jmm_tensor_map_t* out,     \
                                           int n, size_t elem_size);                               \
  JMM_TESTING_API int PREFIX##_render(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call,  \
                                      char* out, size_t cap);                                      \
  JMM_TESTING_API int PREFIX##_compile(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call, \
                                       char* cubin_path_out, size_t cap, char* err_out,            \
                                       size_t err_cap);
JMM_MEGA_C_API_DECLS(jmm_sm90_mega, jmm_sm90_mega_config_t)
JMM_MEGA_C_API_DECLS(jmm_sm100_mega, jmm_sm100_mega_config_t)

/* The sm_locality_domains table the sm_100 handler uploads for a device with sm_count SMs:
 * writes min(n, entries) bytes, returns the entry count (-1 for sm_count < 1). */
JMM_TESTING_API int jmm_sm100_locality_table(int64_t sm_count, uint8_t* out, int n);

/* [group, rank] of `device` in a rank table (layout/rank_table.h) into out[0..1]; 0 found,
 * 1 absent, -1 invalid table. */
JMM_TESTING_API int jmm_rank_table_lookup(const int64_t* table, int64_t size, int64_t num_ranks,
                                          int64_t device, int64_t* out);

#ifdef __cplusplus
}
#endif

#endif /* JMM_COMMON_C_API_TESTING_H_ */
