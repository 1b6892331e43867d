// Integer helpers of the host-side layout / heuristics ports (the kernels' math::align and
// math::ceil_div on non-negative int64).
#pragma once

#include <cstdint>

namespace jmm {

inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace jmm
