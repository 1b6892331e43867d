// Typed FFI attributes shared by the handlers: the i64 attribute `mma_kind` decodes straight into
// jmm::MmaKind (XLA checks the attribute's type, not the value: the handlers call
// mma_kind_valid(), whose message names the attribute).
#pragma once

#include "common/mma_kind.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_REGISTER_ENUM_ATTR_DECODING(::jmm::MmaKind);
