#include "jit/compiler.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "common/status.h"
#include "jit/config.h"
#include "jit/cubin.h"
#include "jit/process.h"
#include "jit/sha256.h"

namespace fs = std::filesystem;

namespace jmm::jit {
namespace {

constexpr const char* kFormatTag = "jax_megamoe-jit-cache-v1";
constexpr size_t kMaxHeaders = 20000;
constexpr size_t kMaxLogTail = 12000;

std::mutex g_compile_mu;  // serialises compiles and guards the maps below
std::map<std::string, CompiledKernel> g_memory;
std::map<std::string, NvccVersion> g_nvcc_versions;
JitStats g_stats;

bool read_file(const fs::path& p, std::string* out) {
  std::ifstream f(p, std::ios::binary);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return true;
}

bool write_file(const fs::path& p, const std::string& data, std::string* error) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  if (!f || !(f << data) || !(f.flush())) {
    *error = cat("cannot write ", p.string(), ": ", std::strerror(errno));
    return false;
  }
  return true;
}

bool is_file_nonempty(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec) && fs::file_size(p, ec) > 0 && !ec;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out;
}

std::string tail(const std::string& s, size_t n) {
  return s.size() <= n ? s : "...\n" + s.substr(s.size() - n);
}

// Parses `#include <x>` / `#include "x"` directives of a source text.
std::vector<std::pair<char, std::string>> includes_of(const std::string& text) {
  std::vector<std::pair<char, std::string>> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    size_t i = line.find_first_not_of(" \t");
    if (i == std::string::npos || line[i] != '#') continue;
    i = line.find_first_not_of(" \t", i + 1);
    if (i == std::string::npos || line.compare(i, 7, "include") != 0) continue;
    i = line.find_first_not_of(" \t", i + 7);
    if (i == std::string::npos || (line[i] != '<' && line[i] != '"')) continue;
    const char close = line[i] == '<' ? '>' : '"';
    const size_t j = line.find(close, i + 1);
    if (j == std::string::npos) continue;
    out.emplace_back(line[i], line.substr(i + 1, j - i - 1));
  }
  return out;
}

// Adds every header under `root` reachable from `source` to the hash, in a
// deterministic order (sorted by path relative to root).
bool hash_header_closure(const fs::path& root, const std::string& source, Sha256* h, size_t* count,
                         std::string* error) {
  std::map<std::string, std::string> files;            // relative path -> contents
  std::vector<std::pair<fs::path, std::string>> work;  // (dir of includer, include text)
  for (const auto& inc : includes_of(source)) work.emplace_back(fs::path(), inc.second);
  while (!work.empty()) {
    auto [dir, name] = work.back();
    work.pop_back();
    std::error_code ec;
    fs::path found;
    if (!dir.empty() && fs::is_regular_file(dir / name, ec)) {
      found = dir / name;
    } else if (fs::is_regular_file(root / name, ec)) {
      found = root / name;
    } else {
      continue;  // a CUDA / system header: covered by the nvcc version
    }
    found = found.lexically_normal();
    std::string rel = found.lexically_relative(root).generic_string();
    if (rel.empty() || rel.rfind("..", 0) == 0) continue;  // outside the DeepGEMM folder
    if (files.count(rel)) continue;
    std::string text;
    if (!read_file(found, &text)) {
      *error = cat("cannot read DeepGEMM header ", found.string());
      return false;
    }
    for (const auto& inc : includes_of(text)) work.emplace_back(found.parent_path(), inc.second);
    files.emplace(std::move(rel), std::move(text));
    if (files.size() > kMaxHeaders) {
      *error = cat("more than ", kMaxHeaders, " headers reachable under ", root.string());
      return false;
    }
  }
  for (const auto& [rel, text] : files) {
    h->field(rel);
    h->field(text);
  }
  *count = files.size();
  return true;
}

bool entry_valid(const fs::path& entry) {
  return is_file_nonempty(entry / "kernel.cubin") && fs::exists(entry / "meta.json");
}

bool pick_symbol(const std::string& cubin, const std::string& hint, std::string* symbol,
                 std::string* error) {
  std::vector<std::string> names;
  if (!cubin_entry_symbols(cubin, &names, error)) return false;
  std::vector<std::string> matching;
  for (const auto& n : names) {
    if (n.find(hint) != std::string::npos) matching.push_back(n);
  }
  if (matching.size() != 1 || names.size() != 1) {
    std::string all;
    for (const auto& n : names) all += cat("\n  ", n);
    *error = cat("expected exactly one kernel entry containing '", hint, "' in ", cubin, ", found ",
                 names.size(), " entries:", all.empty() ? " (none)" : all);
    return false;
  }
  *symbol = matching[0];
  return true;
}

}  // namespace

bool nvcc_version(const std::string& nvcc, NvccVersion* out, std::string* error) {
  {
    std::lock_guard<std::mutex> lock(g_compile_mu);
    auto it = g_nvcc_versions.find(nvcc);
    if (it != g_nvcc_versions.end()) {
      *out = it->second;
      return true;
    }
  }
  std::string text, why;
  int code = 0;
  if (!run_process({nvcc, "--version"}, &text, &code, &why)) {
    *error = cat("cannot run '", nvcc, " --version': ", why);
    return false;
  }
  if (code != 0) {
    *error = cat("'", nvcc, " --version' exited with status ", code, ": ", tail(text, 2000));
    return false;
  }
  NvccVersion v;
  v.text = text;
  const size_t p = text.find("release ");
  if (p == std::string::npos ||
      std::sscanf(text.c_str() + p + 8, "%d.%d", &v.major, &v.minor) != 2) {
    *error =
        cat("cannot parse the CUDA release from '", nvcc, " --version' output: ", tail(text, 2000));
    return false;
  }
  std::lock_guard<std::mutex> lock(g_compile_mu);
  g_nvcc_versions[nvcc] = v;
  *out = v;
  return true;
}

bool jit_compile(const KernelSource& k, CompiledKernel* out, std::string* error) {
  const JitConfig cfg = jit_config();
  const auto fail = [&](std::string msg) {
    std::lock_guard<std::mutex> lock(g_compile_mu);
    ++g_stats.failures;
    *error = cat("jax_megamoe JIT (", k.name, ", ", k.gpu_arch, "): ", msg);
    return false;
  };
  if (!cfg.configured) {
    return fail(
        "not configured: jax_megamoe.register() must run first (it calls jmm_configure with the "
        "nvcc and DeepGEMM header paths)");
  }
  std::error_code ec;
  const fs::path dg_root = fs::path(cfg.deepgemm_include).lexically_normal();
  // Our own kernels (impl_header empty) include no DeepGEMM header.
  if (cfg.deepgemm_include.empty() ||
      (!k.impl_header.empty() && !fs::is_regular_file(dg_root / k.impl_header, ec))) {
    return fail(cat("DeepGEMM header '", k.impl_header, "' not found under '", cfg.deepgemm_include,
                    "'; install the headers with `pip install sgl-deep-gemm==0.2.5` or point "
                    "JAX_MEGAMOE_DEEPGEMM_INCLUDE at the folder that contains deep_gemm/"));
  }
  if (cfg.nvcc.empty() || access(cfg.nvcc.c_str(), X_OK) != 0) {
    return fail(cat("nvcc '", cfg.nvcc,
                    "' is not an executable file; install the CUDA toolkit >= 12.9 or "
                    "`pip install 'jax_megamoe[cuda13]'`"));
  }
  const std::vector<std::string> roots = cache_roots(cfg);
  std::string memory_key = cat(k.name, '\n', k.gpu_arch, '\n', cfg.generation, '\n');
  for (const auto& r : roots) memory_key += r + ':';
  memory_key += '\n' + k.source;

  std::unique_lock<std::mutex> lock(g_compile_mu);
  const auto fail_locked = [&](std::string msg) {
    ++g_stats.failures;
    *error = cat("jax_megamoe JIT (", k.name, ", ", k.gpu_arch, "): ", msg);
    return false;
  };
  if (auto it = g_memory.find(memory_key); it != g_memory.end()) {
    if (is_file_nonempty(it->second.cubin_path)) {
      ++g_stats.memory_hits;
      *out = it->second;
      out->from_memory = true;
      out->from_disk = false;
      return true;
    }
    g_memory.erase(it);  // the file was removed behind our back
  }
  lock.unlock();  // nvcc_version() takes the lock itself
  NvccVersion ver;
  std::string why;
  const bool have_version = nvcc_version(cfg.nvcc, &ver, &why);
  lock.lock();
  if (!have_version) return fail_locked(why);
  if (ver.major < kMinNvccMajor || (ver.major == kMinNvccMajor && ver.minor < kMinNvccMinor)) {
    return fail_locked(cat("nvcc ", ver.major, ".", ver.minor, " at '", cfg.nvcc,
                           "' is too old: the DeepGEMM kernels need nvcc >= ", kMinNvccMajor, ".",
                           kMinNvccMinor, " (", k.gpu_arch,
                           "); install a newer CUDA toolkit or `pip install "
                           "'jax_megamoe[cuda13]'`"));
  }

  std::vector<std::string> flags = {
      "--cubin",
      "-O3",
      "--compiler-options=-O3",
      "-std=c++20",
      "--compiler-options=-fPIC",
      "--compiler-options=-fconcepts",
      "--expt-relaxed-constexpr",
      "--expt-extended-lambda",
      cat("--gpu-architecture=", k.gpu_arch),
  };
  if (cfg.with_lineinfo) flags.push_back("-lineinfo");
  std::vector<std::string> hashed_flags = flags;
  for (const auto& inc : cfg.extra_includes) {
    flags.push_back("-I" + inc);
    hashed_flags.push_back("-I" + inc);
  }
  flags.push_back("-I" + dg_root.string());  // contents hashed below, not the path

  Sha256 h;
  h.field(kFormatTag);
  h.field(k.name);
  h.field(k.source);
  for (const auto& f : hashed_flags) h.field(f);
  h.field(ver.text);
  h.field(cfg.header_version);
  size_t num_headers = 0;
  if (!hash_header_closure(dg_root, k.source, &h, &num_headers, &why)) return fail_locked(why);
  const std::string digest = h.hex();
  const std::string entry_name = cat(k.name, ".", digest.substr(0, 32));

  // Disk lookup: every root, in order.
  for (const auto& r : roots) {
    const fs::path entry = fs::path(r) / "cache" / entry_name;
    if (!entry_valid(entry)) continue;
    std::string symbol;
    if (!pick_symbol((entry / "kernel.cubin").string(), k.symbol_hint, &symbol, &why)) {
      continue;  // corrupt entry: ignore it (a fresh build replaces it in the first root)
    }
    CompiledKernel c{
        (entry / "kernel.cubin").string(), symbol, digest, entry.string(), false, true};
    ++g_stats.disk_hits;
    g_memory[memory_key] = c;
    *out = c;
    return true;
  }

  // Build in <root0>/tmp, publish by rename into <root0>/cache.
  const fs::path root0(roots.front());
  const fs::path cache_dir = root0 / "cache";
  const fs::path tmp_root = root0 / "tmp";
  fs::create_directories(cache_dir, ec);
  fs::create_directories(tmp_root, ec);
  if (!fs::is_directory(cache_dir) || !fs::is_directory(tmp_root)) {
    return fail_locked(cat("cannot create the JIT cache folders under '", root0.string(),
                           "' (set DG_JIT_CACHE_DIR to a writable folder)"));
  }
  std::string tmpl = (tmp_root / (entry_name + ".XXXXXX")).string();
  if (mkdtemp(tmpl.data()) == nullptr) {
    return fail_locked(cat("mkdtemp in '", tmp_root.string(), "' failed: ", std::strerror(errno)));
  }
  const fs::path tmp(tmpl);
  const auto discard = [&]() { fs::remove_all(tmp, ec); };
  const fs::path src = tmp / "kernel.cu";
  const fs::path cubin = tmp / "kernel.cubin";
  if (!write_file(src, k.source, &why)) {
    discard();
    return fail_locked(why);
  }
  std::vector<std::string> argv = {cfg.nvcc, src.string(), "-o", cubin.string()};
  argv.insert(argv.end(), flags.begin(), flags.end());
  const std::string command = shell_join(argv);
  if (cfg.print_commands) {
    std::fprintf(stderr, "[jax_megamoe JIT] %s\n", command.c_str());
  }
  std::string log;
  int code = 0;
  const auto t0 = std::chrono::steady_clock::now();
  if (!run_process(argv, &log, &code, &why)) {
    discard();
    return fail_locked(cat(why, "\ncommand: ", command));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (code != 0 || !is_file_nonempty(cubin)) {
    discard();
    return fail_locked(cat("nvcc failed with exit status ", code, "\ncommand: ", command,
                           "\n--- nvcc output ---\n", tail(log, kMaxLogTail)));
  }
  std::string symbol;
  if (!pick_symbol(cubin.string(), k.symbol_hint, &symbol, &why)) {
    discard();
    return fail_locked(why);
  }
  const std::string meta = cat(
      "{\n", "  \"format\": \"", kFormatTag, "\",\n", "  \"name\": \"", json_escape(k.name),
      "\",\n", "  \"digest\": \"", digest, "\",\n", "  \"gpu_arch\": \"", json_escape(k.gpu_arch),
      "\",\n", "  \"kernel_symbol\": \"", json_escape(symbol), "\",\n", "  \"impl_header\": \"",
      json_escape(k.impl_header), "\",\n", "  \"deepgemm_include\": \"",
      json_escape(dg_root.string()), "\",\n", "  \"deepgemm_headers_hashed\": ", num_headers, ",\n",
      "  \"header_version\": \"", json_escape(cfg.header_version), "\",\n", "  \"nvcc\": \"",
      json_escape(cfg.nvcc), "\",\n", "  \"nvcc_release\": \"", ver.major, ".", ver.minor, "\",\n",
      "  \"nvcc_version_text\": \"", json_escape(ver.text), "\",\n", "  \"command\": \"",
      json_escape(command), "\",\n", "  \"compile_seconds\": ", seconds, ",\n",
      "  \"created_unix\": ", static_cast<long long>(std::time(nullptr)), "\n", "}\n");
  if (!write_file(tmp / "meta.json", meta, &why)) {
    discard();
    return fail_locked(why);
  }
  if (!log.empty()) write_file(tmp / "nvcc.log", log, &why);  // warnings, for humans
  const fs::path entry = cache_dir / entry_name;
  if (std::rename(tmp.c_str(), entry.c_str()) != 0) {
    if (entry_valid(entry)) {
      // Another process published the same entry first: use theirs.
      discard();
      if (!pick_symbol((entry / "kernel.cubin").string(), k.symbol_hint, &symbol, &why)) {
        return fail_locked(why);
      }
    } else {
      // A broken leftover (e.g. a killed copy by hand): replace it.
      fs::remove_all(entry, ec);
      if (std::rename(tmp.c_str(), entry.c_str()) != 0) {
        const int err = errno;
        discard();
        return fail_locked(cat("cannot publish '", entry.string(), "': ", std::strerror(err)));
      }
    }
  }
  CompiledKernel c{(entry / "kernel.cubin").string(), symbol, digest, entry.string(), false, false};
  ++g_stats.compiles;
  g_memory[memory_key] = c;
  *out = c;
  return true;
}

JitStats jit_stats() {
  std::lock_guard<std::mutex> lock(g_compile_mu);
  return g_stats;
}

void jit_clear_memory_cache() {
  std::lock_guard<std::mutex> lock(g_compile_mu);
  g_memory.clear();
  g_nvcc_versions.clear();
}

}  // namespace jmm::jit
