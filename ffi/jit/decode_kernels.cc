#include "jit/decode_kernels.h"

#include "common/status.h"

namespace jmm::jit {
namespace {

// Both passes live in one source; JMM_DECODE_PASS selects the one entry function of a cubin.
constexpr const char* kDecodeSource = R"CUDA(
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace jmm_decode {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// max over the 8 lanes that share one 128-column group (8 lanes x 16 columns).
__device__ __forceinline__ float group8_max(float v) {
#pragma unroll
  for (int o = 4; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t two_bytes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes), __NV_E4M3);
  return __half22float2(__half2(h));
}

__device__ __forceinline__ float e4m3_round(float v) {
  const __nv_fp8_storage_t q = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(q, __NV_E4M3)));
}

// 16 e4m3 weights (one 16-byte load) . 16 f32 activations in shared memory.
__device__ __forceinline__ float dot16(const uint4 w, const float* __restrict__ x) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float a0 = 0.f, a1 = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 xv = *reinterpret_cast<const float4*>(x + 4 * i);
    const float2 lo = e4m3x2_to_float2(words[i] & 0xffffu);
    const float2 hi = e4m3x2_to_float2(words[i] >> 16);
    a0 = fmaf(lo.x, xv.x, a0);
    a1 = fmaf(lo.y, xv.y, a1);
    a0 = fmaf(hi.x, xv.z, a0);
    a1 = fmaf(hi.y, xv.w, a1);
  }
  return a0 + a1;
}

__device__ __forceinline__ uint4 load_weights(const uint8_t* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// Quantises `n` f32 values (n % 128 == 0) per 128 columns into e4m3 codes (kept as `Code`: f32 or
// bf16, both exact for e4m3) and one f32 scale per group, with the rule of `requant` (true: the
// mega kernels' L1 epilogue, sf = max(amax, 1e-10) * (1/448), inv = 1/sf) or of the sm_90
// pre-dispatch (false: amax = max(amax, 1e-10), sf = amax / 448, inv = 1/sf). Every thread of the
// block calls it.
template <bool kRequant, typename Code, typename Load>
__device__ __forceinline__ void quantize_per128(Load load, uint32_t n, Code* __restrict__ codes,
                                                float* __restrict__ scales) {
  const uint32_t chunks = n / 16;
  const uint32_t rounds = (chunks + kThreads - 1) / kThreads;
  for (uint32_t r = 0; r < rounds; ++r) {
    const uint32_t c = r * kThreads + threadIdx.x;  // 8 consecutive chunks = one group
    const bool live = c < chunks;
    float v[16];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      v[i] = live ? load(c * 16 + i) : 0.f;
      amax = fmaxf(amax, fabsf(v[i]));
    }
    amax = group8_max(amax);
    float sf, inv;
    if (kRequant) {
      sf = fmaxf(amax, 1e-10f) * (1.0f / 448.0f);
      inv = __fdiv_rn(1.0f, sf);
    } else {
      sf = __fdiv_rn(fmaxf(amax, 1e-10f), 448.0f);
      inv = __fdiv_rn(1.0f, sf);
    }
    if (live) {
#pragma unroll
      for (int i = 0; i < 16; ++i) codes[c * 16 + i] = Code(e4m3_round(__fmul_rn(v[i], inv)));
      if ((c & 7u) == 0) scales[c / 8] = sf;
    }
  }
}

// 16 e4m3 weights . 16 bf16 codes in shared memory (two 16-byte loads); the same products and
// additions, in the same order, as dot16.
__device__ __forceinline__ float dot16_bf16(const uint4 w, const __nv_bfloat16* __restrict__ x) {
  const uint4 x0 = *reinterpret_cast<const uint4*>(x), x1 = *reinterpret_cast<const uint4*>(x + 8);
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  const uint32_t xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
  float a0 = 0.f, a1 = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 lo = e4m3x2_to_float2(words[i] & 0xffffu);
    const float2 hi = e4m3x2_to_float2(words[i] >> 16);
    a0 = fmaf(lo.x, __uint_as_float(xs[2 * i] << 16), a0);
    a1 = fmaf(lo.y, __uint_as_float(xs[2 * i] & 0xffff0000u), a1);
    a0 = fmaf(hi.x, __uint_as_float(xs[2 * i + 1] << 16), a0);
    a1 = fmaf(hi.y, __uint_as_float(xs[2 * i + 1] & 0xffff0000u), a1);
  }
  return a0 + a1;
}

// Programmatic dependent launch (PTX griddepcontrol; no-ops when the launch did not ask for it).
__device__ __forceinline__ void launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void wait_prerequisites() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

constexpr int kChunk = 512;  // columns of one warp step: 32 lanes x 16 bytes

}  // namespace jmm_decode

// The slots per token (the model's top_k) are a compile-time constant of the cubin: l1 keeps one
// weight register set per slot.
#ifndef JMM_DECODE_TOPK
#define JMM_DECODE_TOPK 6
#endif
// Depth of l2's per-lane ring of 16-byte weight loads.
#ifndef JMM_DECODE_DEPTH
#define JMM_DECODE_DEPTH 4
#endif

#if !defined(JMM_DECODE_PASS) || JMM_DECODE_PASS == 1
// Grid: (I / 8) * T blocks, token fastest (blocks of one row group run together and share the
// expert's rows in L2 when tokens pick the same expert). Warp w: intermediate column
// j = 8 * group + w, i.e. W1 rows 16 * group + w (gate j) and 16 * group + 8 + w (up j), of every
// valid slot. Chunk by chunk, a lane reads its 16 codes of x from shared memory once and uses them
// for the 2 x top_k rows; as soon as a slot's chunk is used, the same registers load the slot's
// next chunk, so about 2 x top_k loads per lane stay in flight. The first chunk is loaded before
// the quantisation of x. Per row, a lane still sums its chunks in ascending order.
extern "C" __global__ void __launch_bounds__(jmm_decode::kThreads, 2)
jmm_decode_l1_sm90(const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ topk_idx,
                   const float* __restrict__ topk_weights, const uint8_t* __restrict__ l1,
                   const float* __restrict__ l1_sf, float* __restrict__ act, uint32_t num_tokens,
                   uint32_t hidden, uint32_t intermediate, uint32_t num_experts, uint32_t top_k,
                   float routed_scaling_factor, float activation_clamp) {
  using namespace jmm_decode;
  constexpr int K = JMM_DECODE_TOPK;
  if (top_k != K) __trap();  // the handler renders the cubin for its top_k
  launch_dependents();  // l2 may start loading its weights; it waits for this grid before reading act
  extern __shared__ __align__(16) float smem[];
  float* xq = smem;            // [H] e4m3 codes as f32
  float* xsf = smem + hidden;  // [H / 128]
  const uint32_t t = blockIdx.x % num_tokens;
  const uint32_t group = blockIdx.x / num_tokens;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t j = 8 * group + warp;
  const uint32_t two_i = 2 * intermediate;
  const uint32_t h_blocks = hidden / 128;
  const size_t row_gate = 16 * group + warp;
  const int32_t* idx_t = topk_idx + t * top_k;
  const uint32_t chunks = (hidden + kChunk - 1) / kChunk;

  // Per slot: the expert's first W1 row of this warp and its scale row (32-bit indices; the byte
  // offset of a weight row is formed in 64 bits at each load). valid: bit k when slot k routes to
  // an expert of this rank (ids outside [0, E) route nowhere).
  uint32_t valid = 0, wrow[K], srow_g[K], srow_u[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int32_t e = idx_t[k];
    const bool ok = e >= 0 && static_cast<uint32_t>(e) < num_experts;
    const uint32_t ee = ok ? static_cast<uint32_t>(e) : 0u;
    valid |= static_cast<uint32_t>(ok) << k;
    wrow[k] = ee * two_i + static_cast<uint32_t>(row_gate);
    srow_g[k] = (ee * (two_i / 128) + j / 128) * h_blocks;
    srow_u[k] = (ee * (two_i / 128) + (intermediate + j) / 128) * h_blocks;
  }
  uint4 bg[K], bu[K];
  float sg[K], su[K];
  auto load = [&](int k, uint32_t c) {
    const uint32_t off = c * kChunk + lane * 16;
    if (((valid >> k) & 1u) && off < hidden) {
      const uint8_t* w = l1 + static_cast<size_t>(wrow[k]) * hidden + off;
      bg[k] = load_weights(w);
      bu[k] = load_weights(w + 8 * static_cast<size_t>(hidden));
      sg[k] = __ldg(l1_sf + srow_g[k] + off / 128);
      su[k] = __ldg(l1_sf + srow_u[k] + off / 128);
    }
  };
#pragma unroll
  for (int k = 0; k < K; ++k) load(k, 0);

  const __nv_bfloat16* xt = x + static_cast<size_t>(t) * hidden;
  quantize_per128<false>([&](uint32_t i) { return __bfloat162float(xt[i]); }, hidden, xq, xsf);
  __syncthreads();

  float ag[K], au[K];
#pragma unroll
  for (int k = 0; k < K; ++k) ag[k] = au[k] = 0.f;
  for (uint32_t c = 0; c < chunks; ++c) {
    const uint32_t off = c * kChunk + lane * 16;
    if (off < hidden) {
      const float xs = xsf[off / 128];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if ((valid >> k) & 1u) {
          ag[k] = fmaf(dot16(bg[k], xq + off), sg[k] * xs, ag[k]);
          au[k] = fmaf(dot16(bu[k], xq + off), su[k] * xs, au[k]);
          if (c + 1 < chunks) load(k, c + 1);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (!((valid >> k) & 1u)) continue;
    const float g0 = warp_sum(ag[k]), u0 = warp_sum(au[k]);
    if (lane == 0) {
      float g = g0, u = u0;
      if (activation_clamp < INFINITY) {  // sm_90 clamps the f32 accumulator
        g = fminf(g, activation_clamp);
        u = fminf(fmaxf(u, -activation_clamp), activation_clamp);
      }
      const float sig = __fdiv_rn(1.0f, 1.0f + expf(-g));
      const float w = topk_weights[t * top_k + k] * routed_scaling_factor;
      act[(static_cast<size_t>(t) * top_k + k) * intermediate + j] = ((g * sig) * u) * w;
    }
  }
}
#endif

#if !defined(JMM_DECODE_PASS) || JMM_DECODE_PASS == 2
// Grid: (H / 16) * T blocks, token fastest. Warp w: hidden rows 16 * group + w and
// 16 * group + 8 + w of W2; the combine over k happens in the warp (ascending k, f32 from 0).
// Weights stream through a per-lane ring of JMM_DECODE_DEPTH loads over the flattened
// (valid slot, chunk) steps, so loads stay in flight across slots. Launched as a programmatic
// dependent of l1 (which triggers at its start): before griddepcontrol.wait it reads only the
// routing (an operand of l1 too) and prefetches its first weights into L2, so the weight stream
// starts during l1's tail. The requantised act is kept as bf16 codes (exact), half the shared-memory traffic.
extern "C" __global__ void __launch_bounds__(jmm_decode::kThreads, 2)
jmm_decode_l2_sm90(const float* __restrict__ act, const int32_t* __restrict__ topk_idx,
                   const uint8_t* __restrict__ l2, const float* __restrict__ l2_sf,
                   __nv_bfloat16* __restrict__ y, uint32_t num_tokens, uint32_t hidden,
                   uint32_t intermediate, uint32_t num_experts, uint32_t top_k) {
  using namespace jmm_decode;
  constexpr int D = JMM_DECODE_DEPTH;
  extern __shared__ __align__(16) float smem[];
  __nv_bfloat16* aq = reinterpret_cast<__nv_bfloat16*>(smem);  // [K, I] e4m3 codes as bf16
  float* asf = smem + top_k * intermediate / 2;                  // [K, I / 128]
  const uint32_t t = blockIdx.x % num_tokens;
  const uint32_t group = blockIdx.x / num_tokens;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t i_blocks = intermediate / 128;
  const size_t r0 = 16 * group + warp;  // and r0 + 8: both in the same 128-row scale block
  const int32_t* idx_t = topk_idx + t * top_k;
  uint32_t valid = 0;
  for (uint32_t k = 0; k < top_k; ++k) {
    const int32_t e = idx_t[k];
    if (e >= 0 && static_cast<uint32_t>(e) < num_experts) valid |= 1u << k;  // else routed nowhere
  }
  const uint32_t chunks = (intermediate + kChunk - 1) / kChunk;
  const uint32_t steps = __popc(valid) * chunks;

  // Loader: slot lk, chunk lc.
  uint32_t lmask = valid, lk = valid ? __ffs(valid) - 1 : 0, lc = 0;
  const uint8_t* lw = nullptr;
  const float* ls = nullptr;
  auto load_slot = [&]() {
    const size_t e = static_cast<size_t>(idx_t[lk]);
    lw = l2 + (e * hidden + r0) * intermediate;
    ls = l2_sf + (e * (hidden / 128) + r0 / 128) * i_blocks;
  };
  if (valid) load_slot();
  uint4 b0[D], b1[D];
  float sv[D];
  auto load = [&](int d) {
    const uint32_t off = lc * kChunk + lane * 16;
    if (off < intermediate) {
      b0[d] = load_weights(lw + off);
      b1[d] = load_weights(lw + 8 * static_cast<size_t>(intermediate) + off);
      sv[d] = __ldg(ls + off / 128);
    }
    if (++lc == chunks) {
      lc = 0;
      lmask &= lmask - 1;
      if (lmask) {
        lk = __ffs(lmask) - 1;
        load_slot();
      }
    }
  };
  // Before the wait only L2 prefetches of the first D steps' weights (L2 is coherent, so this is
  // safe even if a kernel between l1 and this one wrote them); their loads follow the wait.
  {
    uint32_t pm = valid, pc = 0;
    for (int d = 0; d < D && pm; ++d) {
      const size_t e = static_cast<size_t>(idx_t[__ffs(pm) - 1]);
      const uint32_t off = pc * kChunk + lane * 16;
      if (off < intermediate) {
        const uint8_t* w = l2 + (e * hidden + r0) * intermediate + off;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(w));
        asm volatile("prefetch.global.L2 [%0];" ::"l"(w + 8 * static_cast<size_t>(intermediate)));
      }
      if (++pc == chunks) pc = 0, pm &= pm - 1;
    }
  }
  wait_prerequisites();  // the previous grid (l1) is complete and its act visible from here on
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (static_cast<uint32_t>(d) < steps) load(d);
  const float* at = act + static_cast<size_t>(t) * top_k * intermediate;
  // Slots routed nowhere were never written by l1: read them as 0 (their codes are unused).
  quantize_per128<true>([&](uint32_t i) { return ((valid >> (i / intermediate)) & 1u) ? at[i] : 0.f; },
                        top_k * intermediate, aq, asf);
  __syncthreads();

  // Consumer: slot ck, chunk cc.
  uint32_t cmask = valid, ck = valid ? __ffs(valid) - 1 : 0, cc = 0;
  float o0 = 0.f, o1 = 0.f, y0 = 0.f, y1 = 0.f;
  for (uint32_t base = 0; base < steps; base += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const uint32_t s = base + d;
      if (s < steps) {
        const uint32_t off = cc * kChunk + lane * 16;
        if (off < intermediate) {
          const __nv_bfloat16* ak = aq + ck * intermediate + off;
          const float sc = sv[d] * asf[ck * i_blocks + off / 128];
          o0 = fmaf(dot16_bf16(b0[d], ak), sc, o0);
          o1 = fmaf(dot16_bf16(b1[d], ak), sc, o1);
        }
        if (s + D < steps) load(d);
        if (++cc == chunks) {
          cc = 0;
          y0 += __bfloat162float(__float2bfloat16_rn(warp_sum(o0)));
          y1 += __bfloat162float(__float2bfloat16_rn(warp_sum(o1)));
          o0 = o1 = 0.f;
          cmask &= cmask - 1;
          ck = cmask ? __ffs(cmask) - 1 : 0;
        }
      }
    }
  }
  if (lane == 0) {
    y[static_cast<size_t>(t) * hidden + r0] = __float2bfloat16_rn(y0);
    y[static_cast<size_t>(t) * hidden + r0 + 8] = __float2bfloat16_rn(y1);
  }
}
#endif
)CUDA";

}  // namespace

KernelSource decode_source(DecodePass pass, int64_t top_k) {
  const bool l1 = pass == DecodePass::kL1;
  KernelSource k;
  k.name = l1 ? "sm90_decode_l1" : "sm90_decode_l2";
  k.gpu_arch = "sm_90a";
  k.impl_header = "";  // ours: no DeepGEMM header
  k.symbol_hint = l1 ? "jmm_decode_l1_sm90" : "jmm_decode_l2_sm90";
  k.source = cat("// Generated by jax_megamoe (ffi/jit/decode_kernels.cc); do not edit.\n",
                 "#define JMM_DECODE_PASS ", l1 ? 1 : 2, "\n#define JMM_DECODE_TOPK ", top_k,
                 "\n", kDecodeSource);
  return k;
}

int64_t decode_smem_bytes(DecodePass pass, int64_t hidden, int64_t intermediate, int64_t top_k) {
  if (pass == DecodePass::kL1) return 4 * (hidden + hidden / 128);
  return 2 * top_k * intermediate + 4 * top_k * (intermediate / 128);
}

}  // namespace jmm::jit
