#include "jit/cubin.h"

#include <elf.h>

#include <cstring>
#include <fstream>
#include <iterator>

#include "common/status.h"

namespace jmm::jit {
namespace {
constexpr unsigned char kStoCudaEntry = 0x10;
}

bool cubin_entry_symbols(const std::string& path, std::vector<std::string>* names,
                         std::string* error) {
  names->clear();
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    *error = cat("cannot open cubin ", path);
    return false;
  }
  const std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto bad = [&](const char* why) {
    *error = cat("cubin ", path, " is not a valid ELF64 file (", why, ")");
    return false;
  };
  if (data.size() < sizeof(Elf64_Ehdr)) return bad("too short");
  Elf64_Ehdr eh;
  std::memcpy(&eh, data.data(), sizeof(eh));
  if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0) return bad("bad magic");
  if (eh.e_ident[EI_CLASS] != ELFCLASS64) return bad("not ELFCLASS64");
  if (eh.e_shentsize != sizeof(Elf64_Shdr)) return bad("unexpected section header size");
  const uint64_t sh_end = eh.e_shoff + uint64_t(eh.e_shnum) * sizeof(Elf64_Shdr);
  if (eh.e_shoff == 0 || sh_end > data.size()) return bad("section headers out of range");
  std::vector<Elf64_Shdr> sh(eh.e_shnum);
  std::memcpy(sh.data(), data.data() + eh.e_shoff, eh.e_shnum * sizeof(Elf64_Shdr));
  bool found_symtab = false;
  for (const auto& s : sh) {
    if (s.sh_type != SHT_SYMTAB) continue;
    found_symtab = true;
    if (s.sh_link >= sh.size()) return bad("symtab link out of range");
    const Elf64_Shdr& strtab = sh[s.sh_link];
    if (s.sh_offset + s.sh_size > data.size() || strtab.sh_offset + strtab.sh_size > data.size()) {
      return bad("symtab out of range");
    }
    if (s.sh_entsize != sizeof(Elf64_Sym)) return bad("unexpected symbol size");
    const size_t count = s.sh_size / sizeof(Elf64_Sym);
    for (size_t i = 0; i < count; ++i) {
      Elf64_Sym sym;
      std::memcpy(&sym, data.data() + s.sh_offset + i * sizeof(Elf64_Sym), sizeof(sym));
      if (ELF64_ST_TYPE(sym.st_info) != STT_FUNC || ELF64_ST_BIND(sym.st_info) != STB_GLOBAL ||
          (sym.st_other & kStoCudaEntry) == 0 || sym.st_name >= strtab.sh_size) {
        continue;
      }
      const char* name = data.data() + strtab.sh_offset + sym.st_name;
      names->emplace_back(name, strnlen(name, strtab.sh_size - sym.st_name));
    }
  }
  if (!found_symtab) return bad("no symbol table");
  return true;
}

}  // namespace jmm::jit
