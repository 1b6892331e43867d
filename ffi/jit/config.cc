#include "jit/config.h"

#include <unistd.h>

#include <mutex>

namespace jmm::jit {
namespace {
std::mutex g_mu;
JitConfig g_config;
}  // namespace

JitConfig jit_config() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_config;
}

void set_jit_config(JitConfig config) {
  std::lock_guard<std::mutex> lock(g_mu);
  config.generation = g_config.generation + 1;
  config.configured = true;
  g_config = std::move(config);
}

std::vector<std::string> split_paths(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(':', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

std::vector<std::string> cache_roots(const JitConfig& config) {
  std::vector<std::string> roots = split_paths(config.cache_dirs);
  if (roots.empty()) roots.push_back("/tmp/jax_megamoe-jit-" + std::to_string(getuid()));
  return roots;
}

}  // namespace jmm::jit
