#include "common/c_api.h"

#include <cstring>
#include <string>

#include "common/export.h"
#include "common/status.h"

namespace {

template <typename T>
void describe(std::string* s, const char* kind, const char* name, int count) {
  *s += kind;
  if (count > 1) *s += jmm::cat("[", count, "]");
  *s += jmm::cat(" ", name, ";");
}

}  // namespace

JMM_EXPORT int jmm_c_struct_fields(const char* name, char* out, size_t cap) {
  const std::string n = name != nullptr ? name : "";
#define JMM_C_DESCRIBE_FIELD(kind, fname, count) describe<void>(&s, #kind, #fname, count);
#define JMM_C_DESCRIBE(sname, FIELDS)                      \
  if (n == #sname) {                                       \
    std::string s = jmm::cat(sizeof(sname##_t), ";");      \
    FIELDS(JMM_C_DESCRIBE_FIELD)                           \
    return static_cast<int>(jmm::copy_out(s, out, cap));   \
  }
  JMM_C_STRUCTS(JMM_C_DESCRIBE)
#undef JMM_C_DESCRIBE
#undef JMM_C_DESCRIBE_FIELD
  jmm::set_last_error(jmm::cat("jmm_c_struct_fields: unknown struct '", n, "'"));
  return -1;
}
