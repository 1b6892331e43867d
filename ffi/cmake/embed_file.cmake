# Embeds a file's bytes into a C++ header, exactly (no byte added, dropped or changed):
#   cmake -DIN=<file> -DOUT=<header> -DNAME=<C++ name> -P embed_file.cmake
# The header defines, in namespace jmm::kernels, `NAME` (a std::string_view of the bytes) over
# `NAME##Data` (the bytes, NUL-terminated). Used for our CUDA kernels (ffi/kernels/*.cuh), which
# the JIT renders into kernel.cu: the rendered text, hence the cubin cache key, is the file's.
# The top-level BUILD does the same with od + sed (a genrule); keep the two formats alike.
foreach(_v IN ITEMS IN OUT NAME)
  if(NOT DEFINED ${_v})
    message(FATAL_ERROR "embed_file.cmake: -D${_v}=... is required")
  endif()
endforeach()
file(READ "${IN}" _hex HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," _bytes "${_hex}")
# 16 bytes a line (CMake's regular expressions have no {n}).
set(_line "")
foreach(_i RANGE 15)
  string(APPEND _line "0x[0-9a-f][0-9a-f],")
endforeach()
string(REGEX REPLACE "(${_line})" "\\1\n" _bytes "${_bytes}")
get_filename_component(_in_name "${IN}" NAME)
set(_text "// Generated from ${_in_name} by ffi/cmake/embed_file.cmake; do not edit.
#pragma once

#include <string_view>

namespace jmm::kernels {

inline constexpr char ${NAME}Data[] = {
${_bytes}0x00};
inline constexpr std::string_view ${NAME}(${NAME}Data, sizeof(${NAME}Data) - 1);

}  // namespace jmm::kernels
")
# Rewrite only on a change, so that an unchanged kernel rebuilds nothing.
if(EXISTS "${OUT}")
  file(READ "${OUT}" _old)
  if(_old STREQUAL _text)
    return()
  endif()
endif()
file(WRITE "${OUT}" "${_text}")
