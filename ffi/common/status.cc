#include "common/status.h"

#include <cstring>

namespace jmm {

namespace {
thread_local std::string g_last_error;
}  // namespace

void set_last_error(std::string message) { g_last_error = std::move(message); }

const std::string& last_error() { return g_last_error; }

size_t copy_out(const std::string& s, char* out, size_t cap) {
  if (out != nullptr && cap > 0) {
    const size_t n = s.size() < cap - 1 ? s.size() : cap - 1;
    std::memcpy(out, s.data(), n);
    out[n] = '\0';
  }
  return s.size();
}

}  // namespace jmm
