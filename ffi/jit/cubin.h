// Minimal ELF reader for cubins: lists CUDA entry functions (kernels).
#pragma once

#include <string>
#include <vector>

namespace jmm::jit {

// Reads the ELF64 symbol table of `path` and returns the names of the CUDA
// entry functions (STT_FUNC, STB_GLOBAL, st_other & STO_CUDA_ENTRY (0x10)).
bool cubin_entry_symbols(const std::string& path, std::vector<std::string>* names,
                         std::string* error);

}  // namespace jmm::jit
