// Symbol export for libjax_megamoe_ffi.so.
//
// The library is built with -fvisibility=hidden and a linker version script
// (ffi/exports.map) that keeps only `jmm_*` symbols global. Everything that
// Python (ctypes) or XLA looks up must be declared with JMM_EXPORT.
#pragma once

#define JMM_EXPORT extern "C" __attribute__((visibility("default")))
