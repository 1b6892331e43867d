// Error plumbing: errors are strings, never aborts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>

namespace jmm {

// Per-thread last error, returned by jmm_last_error().
void set_last_error(std::string message);
const std::string& last_error();

// Concatenates anything streamable into a string.
template <typename... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

// Copies `s` into a caller buffer of `cap` bytes (NUL-terminated, truncated if
// needed). Returns the full length of `s`.
size_t copy_out(const std::string& s, char* out, size_t cap);

// Copies the first min(n, N) values into `out` (may be null); returns how many were written.
// The convention of the jmm_*_layout / jmm_*_config exports.
template <size_t N>
int copy_out(const int64_t (&values)[N], int64_t* out, int n) {
  int i = 0;
  for (; out != nullptr && i < n && i < static_cast<int>(N); ++i) out[i] = values[i];
  return i;
}

}  // namespace jmm
