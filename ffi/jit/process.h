// Runs a program (nvcc) and captures its combined stdout/stderr.
#pragma once

#include <string>
#include <vector>

namespace jmm::jit {

// argv[0] must be an absolute path (no PATH search). Returns false with a
// reason in *error when the program could not be started or was killed by a
// signal; otherwise true with the exit status in *exit_code.
bool run_process(const std::vector<std::string>& argv, std::string* output, int* exit_code,
                 std::string* error);

// "a b 'c d'": a shell-quoted rendering of argv, for logs and meta.json.
std::string shell_join(const std::vector<std::string>& argv);

}  // namespace jmm::jit
