// C++ side of common/c_api.h: copies a C++ struct into its C mirror field by field (the X-macro
// field list names the C++ members too), and checks the caller's sizeof.
#pragma once

#include <cstddef>
#include <string>

#include "common/c_api.h"
#include "common/status.h"

namespace jmm::c_api {

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
inline bool size_ok(const void* p, size_t got, size_t want, const char* what) {
  if (p == nullptr || got != want) {
    set_last_error(cat(what, ": the caller's struct is ", p == nullptr ? 0 : got, " bytes, the ",
                       "library's is ", want, " (rebuild the library, or use tests/ffi_testing.py)"));
    return false;
  }
  return true;
}

}  // namespace jmm::c_api

// Inside a function with `out` (the C struct pointer) and `src` (the C++ struct) in scope.
#define JMM_C_COPY_FIELD(kind, name, count) ::jmm::c_api::copy_field(&out->name, src.name);
