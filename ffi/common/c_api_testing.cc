// The typed C test API (common/c_api_testing.h): every export that only tests/ffi_testing.py and
// tools/ call, over the same host-side code the handlers run (layouts, configurations, TMA
// descriptor plans, launch geometry). No GPU needed.
#include "common/c_api_testing.h"

#include <cstddef>
#include <cstring>
#include <string>

#include "common/export.h"
#include "common/mma_kind.h"
#include "common/status.h"
#include "handlers/mega_moe_sm100.h"
#include "handlers/mega_moe_sm90.h"
#include "handlers/pre_dispatch.h"
#include "jit/compiler.h"
#include "layout/rank_table.h"

namespace jmm::c_api {
namespace {

// One field of a C struct from the C++ member of the same name (a compile error when it goes).
template <typename D, typename S>
void copy_field(D* d, const S& s) {
  *d = static_cast<D>(s);
}
template <typename D, size_t N, typename S, size_t M>
void copy_field(D (*d)[N], const S (&s)[M]) {
  static_assert(N == M, "C and C++ arrays differ in length");
  for (size_t i = 0; i < N; ++i) (*d)[i] = static_cast<D>(s[i]);
}

// false (and jmm_last_error) unless the caller's struct is ours: a non-null pointer of our size.
bool size_ok(const void* p, size_t got, size_t want, const char* what) {
  if (p == nullptr || got != want) {
    set_last_error(cat(what, ": the caller's struct is ", p == nullptr ? 0 : got, " bytes, the ",
                       "library's is ", want,
                       " (rebuild the library, or use tests/ffi_testing.py)"));
    return false;
  }
  return true;
}

// Inside a function with `out` (the C struct pointer) and `src` (the C++ struct) in scope.
#define JMM_C_COPY_FIELD(kind, name, count) ::jmm::c_api::copy_field(&out->name, src.name);

void describe(std::string* s, const char* kind, const char* name, int count) {
  *s += kind;
  if (count > 1) *s += cat("[", count, "]");
  *s += cat(" ", name, ";");
}

// The arch's kernel options from the call (the attributes' counterpart, Arch::OptionsOf).
bool OptionsFromC(const jmm_mega_call_t& call, Sm90Mega::Options* o, std::string*) {
  o->sm90_wide_tile = call.sm90_wide_tile != 0;
  return true;
}
bool OptionsFromC(const jmm_mega_call_t& call, Sm100Mega::Options*, std::string* why) {
  if (call.sm90_wide_tile != 0) {
    *why = cat("jmm_mega_call.sm90_wide_tile=", call.sm90_wide_tile,
               " must be 0 on sm_100 (the wide-tile switch is the sm_90 kernel's)");
    return false;
  }
  return true;
}

void ToC(const layout::Sm90MegaConfig& src, jmm_sm90_mega_config_t* out) {
  JMM_SM90_MEGA_CONFIG_FIELDS(JMM_C_COPY_FIELD)
}
void ToC(const layout::Sm100MegaConfig& src, jmm_sm100_mega_config_t* out) {
  JMM_SM100_MEGA_CONFIG_FIELDS(JMM_C_COPY_FIELD)
}

// The arch's shape from the C struct; false + jmm_last_error when the struct is missing or the
// shape invalid.
template <class Arch>
bool ShapeFromC(const jmm_mega_shape_t* in, typename Arch::Shape* s) {
  if (in == nullptr) {
    set_last_error("jmm_mega_shape_t* is null");
    return false;
  }
  *s = mega::CommonShape<typename Arch::Shape>(in->num_ranks, in->num_experts, in->capacity,
                                               in->top_k, in->hidden, in->intermediate);
  std::string why;
  if (!Arch::SetMmaKind(static_cast<MmaKind>(in->mma_kind), s, &why) ||
      !Arch::ShapeValid(*s, &why)) {
    set_last_error(why);
    return false;
  }
  return true;
}

// Layout and configuration of one call, as initialize would pick them on num_sms SMs.
template <class Arch>
bool PlanFromC(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call, typename Arch::Layout* l,
               typename Arch::Config* c) {
  typename Arch::Shape s;
  if (!ShapeFromC<Arch>(shape, &s)) return false;
  if (call == nullptr) {
    set_last_error("jmm_mega_call_t* is null");
    return false;
  }
  std::string why;
  typename Arch::Options options;
  if (!OptionsFromC(*call, &options, &why) ||
      !Arch::Plan(s, options, call->num_sms, call->num_tokens,
                  static_cast<float>(call->activation_clamp), call->fast_math != 0, l, c, &why)) {
    set_last_error(why);
    return false;
  }
  return true;
}

// The arch's descriptor plans (TensorMapPlan order = kernel parameter order); returns the count.
template <class Arch>
int TensorMapsToC(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call, jmm_tensor_map_t* out,
                  int n, size_t elem_size) {
  if (!size_ok(out, elem_size, sizeof(jmm_tensor_map_t), Arch::kTarget)) return -1;
  typename Arch::Layout l;
  typename Arch::Config c;
  if (!PlanFromC<Arch>(shape, call, &l, &c)) return -1;
  const auto plans = Arch::Plans(c, l);
  jmm_tensor_map_t* const first = out;
  int i = 0;
  for (; i < n && i < static_cast<int>(plans.size()); ++i) {
    const TensorMapPlan& src = plans[static_cast<size_t>(i)];
    out = first + i;
    JMM_TENSOR_MAP_FIELDS(JMM_C_COPY_FIELD)
  }
  return i;
}

template <class Arch, class CConfig>
int ConfigToC(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call, CConfig* out,
              size_t out_size) {
  if (!size_ok(out, out_size, sizeof(CConfig), Arch::kTarget)) return -1;
  typename Arch::Layout l;
  typename Arch::Config c;
  if (!PlanFromC<Arch>(shape, call, &l, &c)) return -1;
  ToC(c, out);
  return 0;
}

// kernel.cu of the mega kernel (snprintf convention), or -1 (jmm_last_error).
template <class Arch>
int Render(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call, char* out, size_t cap) {
  typename Arch::Layout l;
  typename Arch::Config c;
  if (!PlanFromC<Arch>(shape, call, &l, &c)) return -1;
  return static_cast<int>(copy_out(Arch::Source(c).source, out, cap));
}

// Compiles (or finds in the caches) the mega kernel; writes the cubin path. 0 on success.
template <class Arch>
int Compile(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call, char* cubin_path_out,
            size_t cap, char* err_out, size_t err_cap) {
  typename Arch::Layout l;
  typename Arch::Config c;
  if (!PlanFromC<Arch>(shape, call, &l, &c)) {
    copy_out(last_error(), err_out, err_cap);
    return 1;
  }
  jit::CompiledKernel compiled;
  std::string why;
  if (!jit::jit_compile(Arch::Source(c), &compiled, &why)) {
    set_last_error(why);
    copy_out(why, err_out, err_cap);
    return 1;
  }
  copy_out(compiled.cubin_path, cubin_path_out, cap);
  copy_out("", err_out, err_cap);
  return 0;
}

}  // namespace
}  // namespace jmm::c_api

using jmm::c_api::size_ok;

JMM_EXPORT int jmm_c_struct_fields(const char* name, char* out, size_t cap) {
  const std::string n = name != nullptr ? name : "";
#define JMM_C_DESCRIBE_FIELD(kind, fname, count) jmm::c_api::describe(&s, #kind, #fname, count);
#define JMM_C_DESCRIBE(sname, FIELDS)                    \
  if (n == #sname) {                                     \
    std::string s = jmm::cat(sizeof(sname##_t), ";");    \
    FIELDS(JMM_C_DESCRIBE_FIELD)                         \
    return static_cast<int>(jmm::copy_out(s, out, cap)); \
  }
  JMM_C_STRUCTS(JMM_C_DESCRIBE)
#undef JMM_C_DESCRIBE
#undef JMM_C_DESCRIBE_FIELD
  jmm::set_last_error(jmm::cat("jmm_c_struct_fields: unknown struct '", n, "'"));
  return -1;
}

JMM_EXPORT int jmm_pre_dispatch_launch_plan(int arch, int mma_kind, int64_t T, int64_t P, int64_t H,
                                            int64_t K, jmm_pre_dispatch_launch_t* out,
                                            size_t out_size) {
  if (!size_ok(out, out_size, sizeof(*out), "jmm_pre_dispatch_launch_plan")) return -1;
  const auto kind = static_cast<jmm::MmaKind>(mma_kind);
  std::string why;
  if (!jmm::mma_kind_valid(arch, kind, &why)) {
    jmm::set_last_error(why);
    return -1;
  }
  if (T < 0 || P < T || H <= 0 || H % 128 != 0 || K <= 0) {
    jmm::set_last_error(jmm::cat("jmm_pre_dispatch_launch_plan: T=", T, ", P=", P, ", H=", H,
                                 ", K=", K,
                                 " (want 0 <= T <= P, H a positive multiple of 128, "
                                 "K >= 1)"));
    return -1;
  }
  const jmm::PreDispatchLaunch src = jmm::plan_pre_dispatch(arch, kind, T, P, H, K);
  JMM_PRE_DISPATCH_LAUNCH_FIELDS(JMM_C_COPY_FIELD)
  return 0;
}

// Symmetric-buffer layout of a shape (mma_kind 0). 0, or -1 (jmm_last_error).
JMM_EXPORT int jmm_sm90_mega_layout(const jmm_mega_shape_t* shape, jmm_sm90_mega_layout_t* out,
                                    size_t out_size) {
  if (!size_ok(out, out_size, sizeof(*out), "jmm_sm90_mega_layout")) return -1;
  jmm::Sm90Mega::Shape s;
  if (!jmm::c_api::ShapeFromC<jmm::Sm90Mega>(shape, &s)) return -1;
  const jmm::layout::Sm90MegaLayout src = jmm::layout::sm90_mega_layout(s);
  JMM_SM90_MEGA_LAYOUT_FIELDS(JMM_C_COPY_FIELD)
  return 0;
}

// Symmetric-buffer layout of a shape sized for num_sms SMs. 0, or -1 (jmm_last_error).
JMM_EXPORT int jmm_sm100_mega_layout(const jmm_mega_shape_t* shape, int64_t num_sms,
                                     jmm_sm100_mega_layout_t* out, size_t out_size) {
  if (!size_ok(out, out_size, sizeof(*out), "jmm_sm100_mega_layout")) return -1;
  jmm::Sm100Mega::Shape s;
  if (!jmm::c_api::ShapeFromC<jmm::Sm100Mega>(shape, &s)) return -1;
  jmm::layout::Sm100MegaLayout src;
  std::string why;
  if (!jmm::layout::sm100_mega_layout(s, num_sms, &src, &why)) {
    jmm::set_last_error(why);
    return -1;
  }
  JMM_SM100_MEGA_LAYOUT_FIELDS(JMM_C_COPY_FIELD)
  return 0;
}

// The per-arch exports (declared by JMM_MEGA_C_API_DECLS).
#define JMM_DEFINE_MEGA_C_API(PREFIX, ARCH, CONFIG_T)                                             \
  JMM_EXPORT int PREFIX##_config(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call,      \
                                 CONFIG_T* out, size_t out_size) {                                \
    return ::jmm::c_api::ConfigToC<ARCH>(shape, call, out, out_size);                             \
  }                                                                                               \
  JMM_EXPORT int PREFIX##_tensor_maps(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call, \
                                      jmm_tensor_map_t* out, int n, size_t elem_size) {           \
    return ::jmm::c_api::TensorMapsToC<ARCH>(shape, call, out, n, elem_size);                     \
  }                                                                                               \
  JMM_EXPORT int PREFIX##_render(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call,      \
                                 char* out, size_t cap) {                                         \
    return ::jmm::c_api::Render<ARCH>(shape, call, out, cap);                                     \
  }                                                                                               \
  JMM_EXPORT int PREFIX##_compile(const jmm_mega_shape_t* shape, const jmm_mega_call_t* call,     \
                                  char* cubin_path_out, size_t cap, char* err_out,                \
                                  size_t err_cap) {                                               \
    return ::jmm::c_api::Compile<ARCH>(shape, call, cubin_path_out, cap, err_out, err_cap);       \
  }

JMM_DEFINE_MEGA_C_API(jmm_sm90_mega, ::jmm::Sm90Mega, jmm_sm90_mega_config_t)
JMM_DEFINE_MEGA_C_API(jmm_sm100_mega, ::jmm::Sm100Mega, jmm_sm100_mega_config_t)

JMM_EXPORT int jmm_sm100_locality_table(int64_t sm_count, uint8_t* out, int n) {
  if (sm_count < 1) {
    jmm::set_last_error(jmm::cat("sm_count=", sm_count, " must be >= 1"));
    return -1;
  }
  const int64_t entries = jmm::sm100_locality_table_entries(sm_count);
  for (int64_t i = 0; out != nullptr && i < n && i < entries; ++i) {
    out[i] = jmm::sm100_balanced_locality_domain(i);
  }
  return static_cast<int>(entries);
}

JMM_EXPORT int jmm_rank_table_lookup(const int64_t* table, int64_t size, int64_t num_ranks,
                                     int64_t device, int64_t* out) {
  std::string why;
  if (!jmm::layout::rank_table_valid(table, size, num_ranks, &why)) {
    jmm::set_last_error(why);
    return -1;
  }
  return jmm::layout::rank_table_find(table, size, num_ranks, device, &out[0], &out[1]) ? 0 : 1;
}
