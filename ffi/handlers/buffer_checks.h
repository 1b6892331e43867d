// Buffer checks shared by every FFI handler: one readable InvalidArgument message per mismatch,
// naming the target, the operand or result, the expected and the actual dtype/shape.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/status.h"
#include "xla/ffi/api/ffi.h"

namespace jmm {

inline std::string DTypeName(xla::ffi::DataType t) {
  using xla::ffi::DataType;
  switch (t) {
    case DataType::PRED: return "pred";
    case DataType::S8: return "s8";
    case DataType::S16: return "s16";
    case DataType::S32: return "s32";
    case DataType::S64: return "s64";
    case DataType::U8: return "u8";
    case DataType::U16: return "u16";
    case DataType::U32: return "u32";
    case DataType::U64: return "u64";
    case DataType::F16: return "f16";
    case DataType::F32: return "f32";
    case DataType::F64: return "f64";
    case DataType::BF16: return "bf16";
    case DataType::F8E5M2: return "f8e5m2";
    case DataType::F8E4M3: return "f8e4m3";
    case DataType::F8E4M3FN: return "f8e4m3fn";
    case DataType::F4E2M1FN: return "f4e2m1fn";
    case DataType::F8E8M0FNU: return "f8e8m0fnu";
    default: return cat("dtype#", static_cast<int>(t));
  }
}

template <typename Dims>
std::string ShapeString(xla::ffi::DataType t, const Dims& dims) {
  std::string s = DTypeName(t) + "[";
  size_t i = 0;
  for (int64_t d : dims) s += cat(i++ ? "," : "", d);
  return s + "]";
}

inline std::string Shape(xla::ffi::DataType t, xla::ffi::Span<const int64_t> dims) {
  return ShapeString(t, dims);
}

inline std::string Shape(xla::ffi::DataType t, std::initializer_list<int64_t> dims) {
  return ShapeString(t, dims);
}

inline bool Matches(const xla::ffi::AnyBuffer& b, xla::ffi::DataType t,
                    std::initializer_list<int64_t> dims) {
  if (b.element_type() != t) return false;
  const auto got = b.dimensions();
  if (got.size() != dims.size()) return false;
  size_t i = 0;
  for (int64_t d : dims) {
    if (got[i++] != d) return false;
  }
  return true;
}

// Success, or InvalidArgument: "<target>: <role> '<name>' must be <dtype[dims]>, got <...>".
inline xla::ffi::Error ExpectBuffer(const char* target, const char* role, const char* name,
                                    const xla::ffi::AnyBuffer& b, xla::ffi::DataType t,
                                    std::initializer_list<int64_t> dims) {
  if (Matches(b, t, dims)) return xla::ffi::Error::Success();
  return xla::ffi::Error::InvalidArgument(cat(target, ": ", role, " '", name, "' must be ",
                                              Shape(t, dims), ", got ",
                                              Shape(b.element_type(), b.dimensions())));
}

// Operand 'x' must be bf16[T, H] with T <= capacity; T in *t_out.
inline xla::ffi::Error ExpectTokens(const char* target, const xla::ffi::AnyBuffer& x, int64_t H,
                                    int64_t capacity, int64_t* t_out) {
  const auto xd = x.dimensions();
  if (x.element_type() != xla::ffi::DataType::BF16 || xd.size() != 2 || xd[1] != H) {
    return xla::ffi::Error::InvalidArgument(
        cat(target, ": operand 'x' must be bf16[T,", H, "], got ", Shape(x.element_type(), xd)));
  }
  if (xd[0] > capacity) {
    return xla::ffi::Error::InvalidArgument(
        cat(target, ": operand 'x' has T=", xd[0], " tokens, more than capacity=", capacity));
  }
  *t_out = xd[0];
  return xla::ffi::Error::Success();
}

}  // namespace jmm
