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

/* The field lists are tables, laid out by hand (clang-format reflows them differently on each
 * run). */
/* clang-format off */
/* Static problem of one symmetric buffer (input). mma_kind: 0 on sm_90; 1 (MXFP8FP4, fp8xfp4)
 * or 2 (MXFP4, mxf4xmxf4) on sm_100. */
#define JMM_MEGA_SHAPE_FIELDS(X)                                                   \
  X(i64, num_ranks, 1) X(i64, num_experts, 1) X(i64, capacity, 1) X(i64, top_k, 1) \
  X(i64, hidden, 1) X(i64, intermediate, 1) X(i64, mma_kind, 1)

/* One call (input): T tokens per rank on num_sms SMs (even, >= 2). activation_clamp: +inf = no
 * clamp. fast_math: 0 or 1. sm90_wide_tile: 0 or 1, the sm_90 target's attribute of that name
 * (1 lets the kernel take DeepGEMM's 128-row tile); must be 0 on sm_100. */
#define JMM_MEGA_CALL_FIELDS(X)                                                             \
  X(i64, num_tokens, 1) X(i64, num_sms, 1) X(f64, activation_clamp, 1) X(i64, fast_math, 1) \
  X(i64, sm90_wide_tile, 1)

/* The fields both archs' configurations have (prefix of theirs): template constants the two
 * kernels share and the launch geometry. */
#define JMM_MEGA_CONFIG_COMMON_FIELDS(X)                                                 \
  X(i64, num_max_tokens_per_rank, 1) X(i64, hidden, 1) X(i64, intermediate, 1)           \
  X(i64, num_experts, 1) X(i64, top_k, 1) X(i64, block_m, 1) X(i64, block_n, 1)          \
  X(i64, block_k, 1) X(i64, num_stages, 1) X(i64, num_dispatch_threads, 1)               \
  X(i64, num_non_epilogue_threads, 1) X(i64, num_epilogue_threads, 1) X(i64, num_sms, 1) \
  X(i64, num_ranks, 1) X(f64, activation_clamp, 1) X(i64, fast_math, 1)                  \
  X(i64, cluster_size, 1) X(i64, num_threads, 1) X(i64, smem_size, 1)                    \
  X(i64, host_smem_size, 1) X(i64, kernel_smem_bytes, 1)

/* The fields both archs' layouts have: the input slots, the combine region, the totals. */
#define JMM_MEGA_LAYOUT_COMMON_FIELDS(X)                                                    \
  X(i64, num_experts_per_rank, 1) X(i64, num_max_pool_tokens, 1) X(i64, workspace_bytes, 1) \
  X(i64, x, 1) X(i64, x_sf, 1) X(i64, topk_idx, 1) X(i64, topk_weights, 1)                  \
  X(i64, l1_topk_weights, 1) X(i64, combine, 1) X(i64, num_bytes, 1)

/* layout::Sm90MegaLayout (byte offsets from the buffer base, sizes). */
#define JMM_SM90_MEGA_LAYOUT_FIELDS(X)                                                    \
  JMM_MEGA_LAYOUT_COMMON_FIELDS(X)                                                        \
  X(i64, num_data_pool_tokens, 1) X(i64, num_padded_sf_pool_tokens, 1) X(i64, l1_acts, 1) \
  X(i64, l1_acts_sf, 1) X(i64, l2_acts, 1) X(i64, l2_acts_sf, 1)

/* layout::Sm90MegaConfig: the template constants of sm90_fp8_mega_moe_impl and the launch. */
#define JMM_SM90_MEGA_CONFIG_FIELDS(X)                                                      \
  JMM_MEGA_CONFIG_COMMON_FIELDS(X)                                                          \
  X(i64, num_experts_per_wave, 1) X(i64, num_max_pool_tokens, 1)                            \
  X(i64, num_padded_sf_pool_tokens, 1) X(i64, epilogue_register_budget, 1)                  \
  X(i64, reuse_accum_as_final, 1) X(i64, l2_arrival_counter, 1)                             \
  X(i64, l2_epilogue_requires_full_sync, 1) X(i64, half_l2_cd, 1) X(i64, multicast_on_b, 1) \
  X(i64, l2_cd_passes, 1) X(i64, l2_stage_mode, 1) X(i64, pdl, 1) X(i64, early_combine, 1)  \
  X(i64, pull_publish_batch, 1) X(i64, pull_eager_publish, 1) X(i64, tile_table_entries, 1) \
  X(i64, l1_output_box_n, 1) X(i64, l1_output_box_m, 1) X(i64, l1_output_swizzle, 1)        \
  X(i64, weight_tma_block_n, 1)

/* layout::Sm100MegaLayout (sized for num_sms SMs). */
#define JMM_SM100_MEGA_LAYOUT_FIELDS(X)                                                     \
  JMM_MEGA_LAYOUT_COMMON_FIELDS(X)                                                          \
  X(i64, num_sms, 1) X(i64, elem_bits, 1) X(i64, num_ring_tokens, 1)                        \
  X(i64, num_sf_ring_tokens, 1) X(i64, ring_is_full_pool, 1) X(i64, l1, 1) X(i64, l1_sf, 1) \
  X(i64, l2, 1) X(i64, l2_sf, 1) X(i64, input_x_scales, 1) X(i64, l1_x_scales, 1)

/* layout::Sm100MegaConfig: the template constants of sm100_fp8_fp4_mega_moe_impl, the derived
 * values and the launch. */
#define JMM_SM100_MEGA_CONFIG_FIELDS(X)                                                      \
  JMM_MEGA_CONFIG_COMMON_FIELDS(X)                                                           \
  X(i64, num_shared_experts, 1) X(i64, store_block_m_l1, 1) X(i64, store_block_m_l2, 1)      \
  X(i64, sf_block_m, 1) X(i64, sf_block_n, 1) X(i64, mma_kind, 1) X(i64, num_ring_tokens, 1) \
  X(i64, num_sf_ring_tokens, 1) X(i64, num_bytes_per_pull, 1) X(f64, swiglu_alpha, 1)        \
  X(i64, use_situ, 1) X(i64, use_x_scales, 1) X(i64, with_l1_alphas, 1)                      \
  X(i64, with_l2_alphas, 1) X(i64, with_l2_act_scales, 1) X(i64, use_fp8_combine, 1)         \
  X(f64, situ_beta, 1) X(f64, situ_linear_beta, 1) X(i64, post_expert_norm, 1)               \
  X(i64, post_norm_weight_first, 1) X(i64, post_norm_has_weight, 1) X(f64, post_norm_eps, 1) \
  X(i64, use_trtllm_weights, 1) X(f64, expected_tokens_per_expert, 1) X(i64, elem_bits, 1)   \
  X(i64, block_k_bytes, 1) X(i64, load_block_m, 1) X(i64, load_block_n, 1) X(i64, gran_k, 1) \
  X(i64, swizzle_acts_mode, 1) X(i64, swizzle_weights_mode, 1)                               \
  X(i64, l1_out_block_n_bytes, 1) X(i64, num_locality_domains, 1) X(i64, combine_chunks, 1)  \
  X(i64, num_tmem_cols, 1) X(i64, reusable_smem_bytes, 1)

/* One TMA descriptor plan of a mega handler (handlers/mega_moe.h TensorMapPlan), in kernel
 * parameter order; the enums' values: source (MapSource) 0 symmetric buffer + offset, 1 l1,
 * 2 l1_sf, 3 l2, 4 l2_sf; dtype (MapDtype = CUtensorMapDataType) 0 UINT8, 3 INT32, 7 FLOAT32,
 * 14 16U4_ALIGN16B; strides in bytes; swizzle (Swizzle) in bytes: 0, 32, 64, 128. */
#define JMM_TENSOR_MAP_FIELDS(X)                                                       \
  X(i64, source, 1) X(i64, offset, 1) X(i64, dtype, 1) X(i64, rank, 1) X(i64, dims, 5) \
  X(i64, strides, 4) X(i64, box, 5) X(i64, swizzle, 1)

/* handlers/pre_dispatch.h PreDispatchLaunch. */
#define JMM_PRE_DISPATCH_LAUNCH_FIELDS(X)                                       \
  X(i64, grid, 1) X(i64, block, 1) X(i64, num_groups, 1) X(i64, x_row_bytes, 1) \
  X(i64, sf_row_bytes, 1)

/* Every struct of the API: X(struct name, field list). */
#define JMM_C_STRUCTS(X)                                         \
  X(jmm_mega_shape, JMM_MEGA_SHAPE_FIELDS)                       \
  X(jmm_mega_call, JMM_MEGA_CALL_FIELDS)                         \
  X(jmm_sm90_mega_layout, JMM_SM90_MEGA_LAYOUT_FIELDS)           \
  X(jmm_sm90_mega_config, JMM_SM90_MEGA_CONFIG_FIELDS)           \
  X(jmm_sm100_mega_layout, JMM_SM100_MEGA_LAYOUT_FIELDS)         \
  X(jmm_sm100_mega_config, JMM_SM100_MEGA_CONFIG_FIELDS)         \
  X(jmm_tensor_map, JMM_TENSOR_MAP_FIELDS)                       \
  X(jmm_pre_dispatch_launch, JMM_PRE_DISPATCH_LAUNCH_FIELDS)

/* clang-format on */

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
