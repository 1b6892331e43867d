// The one way a target's stage handlers are defined: NAME_instantiate / NAME_initialize /
// NAME_execute (exported, C linkage; what jax_megamoe/_src/kernels/_ffi.py registers as the
// stage dict), and the CUDA-graph twin NAME_graph of a target.
#pragma once

#include <utility>

#include "common/export.h"
#include "xla/ffi/api/ffi.h"

// The three stage symbols of target NAME, each from its implementation and binding, in stage
// order: (INSTANTIATE, its binding, INITIALIZE, its binding, EXECUTE, its binding); an optional
// eighth argument is the handler traits, e.g. {::xla::ffi::Traits::kCmdBufferCompatible}. The
// arguments may come from a macro that expands to several of them (JMM_MEGA_MOE_STAGES).
#define JMM_DEFINE_STAGES(NAME, ...) JMM_DEFINE_STAGES_(NAME, __VA_ARGS__)

// Target NAME (plain: XLA runs it outside CUDA graphs) and NAME_graph: the same code, declared
// command-buffer compatible, so that XLA may trace the custom call into its CUDA graphs. Only for
// handlers whose execute stage just enqueues work on XLA's stream (no allocation, synchronisation,
// compilation or module loading: those run in instantiate / initialize, outside any capture).
#define JMM_DEFINE_STAGES_AND_GRAPH_TWIN(NAME, ...) \
  JMM_DEFINE_STAGES_(NAME, __VA_ARGS__);            \
  JMM_DEFINE_STAGES_(NAME##_graph, __VA_ARGS__, {::xla::ffi::Traits::kCmdBufferCompatible})

// The contexts every target's initialize and execute stages bind first, on BIND (e.g.
// ::xla::ffi::Ffi::Bind()): XLA's stream, the device ordinal and the target's state type.
#define JMM_STAGE_CONTEXTS(BIND, STATE)            \
  BIND.Ctx<::xla::ffi::PlatformStream<CUstream>>() \
      .Ctx<::xla::ffi::DeviceOrdinal>()            \
      .Ctx<::xla::ffi::State<STATE>>()
#define JMM_INITIALIZE_CONTEXTS(STATE) \
  JMM_STAGE_CONTEXTS(::xla::ffi::Ffi::Bind<::xla::ffi::ExecutionStage::kInitialize>(), STATE)
#define JMM_EXECUTE_CONTEXTS(STATE) JMM_STAGE_CONTEXTS(::xla::ffi::Ffi::Bind(), STATE)

#define JMM_DEFINE_STAGES_(NAME, INSTANTIATE, INSTANTIATE_BINDING, INITIALIZE, INITIALIZE_BINDING, \
                           EXECUTE, EXECUTE_BINDING, ...)                                          \
  JMM_EXPORT XLA_FFI_Error* NAME##_instantiate(XLA_FFI_CallFrame*);                                \
  JMM_EXPORT XLA_FFI_Error* NAME##_initialize(XLA_FFI_CallFrame*);                                 \
  JMM_EXPORT XLA_FFI_Error* NAME##_execute(XLA_FFI_CallFrame*);                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME##_instantiate, INSTANTIATE, INSTANTIATE_BINDING,              \
                                ##__VA_ARGS__);                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME##_initialize, INITIALIZE, INITIALIZE_BINDING, ##__VA_ARGS__); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME##_execute, EXECUTE, EXECUTE_BINDING, ##__VA_ARGS__)

namespace jmm {

enum class BufferRole { kArg, kRet };

// BINDING followed by one AnyBuffer argument (kArg) or result (kRet).
template <BufferRole kRole, typename Binding>
auto WithOneBuffer(Binding&& binding) {
  if constexpr (kRole == BufferRole::kArg) {
    return std::move(binding).template Arg<::xla::ffi::AnyBuffer>();
  } else {
    return std::move(binding).template Ret<::xla::ffi::AnyBuffer>();
  }
}

// BINDING followed by N (>= 1) of them: the buffers of a stage, whose names are the handler's
// parameter names. (XLA's Binding cannot be moved, only extended, hence the recursion that
// returns each extension directly.)
template <BufferRole kRole, int N, typename Binding>
auto WithBuffers(Binding&& binding) {
  static_assert(N >= 1, "WithBuffers: N must be >= 1");
  if constexpr (N == 1) {
    return WithOneBuffer<kRole>(std::move(binding));
  } else {
    return WithBuffers<kRole, N - 1>(WithOneBuffer<kRole>(std::move(binding)));
  }
}

// The two of them with one template argument each, so that they can stand in a macro argument.
template <int N, typename Binding>
auto WithBufferArgs(Binding&& binding) {
  return WithBuffers<BufferRole::kArg, N>(std::move(binding));
}
template <int N, typename Binding>
auto WithBufferRets(Binding&& binding) {
  return WithBuffers<BufferRole::kRet, N>(std::move(binding));
}

}  // namespace jmm

// BINDING followed by NUM_ARGS AnyBuffer arguments, then NUM_RETS AnyBuffer results.
#define JMM_WITH_BUFFERS(BINDING, NUM_ARGS, NUM_RETS) \
  ::jmm::WithBufferRets<NUM_RETS>(::jmm::WithBufferArgs<NUM_ARGS>(BINDING))
// The execute binding of a target with state STATE and only AnyBuffer arguments and results.
#define JMM_EXECUTE_BUFFERS(STATE, NUM_ARGS, NUM_RETS) \
  JMM_WITH_BUFFERS(JMM_EXECUTE_CONTEXTS(STATE), NUM_ARGS, NUM_RETS)
