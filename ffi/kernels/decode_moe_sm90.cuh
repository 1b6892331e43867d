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

// Activations in shared memory are chunk-interleaved: chunk c (16 consecutive values) keeps its
// i-th float4 at x4[i * stride + c]. A warp's lanes read consecutive chunks, so each float4 read and
// each write of quantize_per128 is one conflict-free wavefront (the plain layout, 64 bytes per lane,
// was a 4-way conflict on every read and 16-way on every write: ncu's top stall at T=1).
// 16 e4m3 weights (one 16-byte load) . the 16 f32 activations of chunk c.
__device__ __forceinline__ float dot16(const uint4 w, const float4* __restrict__ x4, uint32_t c,
                                       uint32_t stride) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float a0 = 0.f, a1 = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 xv = x4[i * stride + c];
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

// One warp's partial dot products of two weight rows (`wa`, `wb`: n e4m3 bytes each) with the same
// activation codes (chunks c0 + off / 16 of stride `stride`, see dot16); `scales(blk)` gives the
// two rows' f32 scales of 128-column block blk. Per-lane sums: the caller reduces the warp.
template <class Scales>
__device__ __forceinline__ float2 row_pair_dot(const uint8_t* wa, const uint8_t* wb,
                                               const float4* __restrict__ x4, uint32_t c0,
                                               uint32_t stride, uint32_t n, uint32_t lane,
                                               Scales scales) {
  float oa = 0.f, ob = 0.f;
#pragma unroll 4
  for (uint32_t off = lane * 16; off < n; off += 512) {
    const uint4 a = load_weights(wa + off);
    const uint4 b = load_weights(wb + off);
    const float2 sc = scales(off / 128);
    oa = fmaf(dot16(a, x4, c0 + off / 16, stride), sc.x, oa);
    ob = fmaf(dot16(b, x4, c0 + off / 16, stride), sc.y, ob);
  }
  return make_float2(oa, ob);
}

// Quantises `n` f32 values (n % 128 == 0) per 128 columns into e4m3 codes (kept as f32, exact;
// chunk-interleaved, stride n / 16, see dot16) and one f32 scale per group, with the rule of
// `requant` (true: the mega kernels' L1 epilogue, sf = max(amax, 1e-10) * (1/448), inv = 1/sf) or
// of the sm_90 pre-dispatch (false: amax = max(amax, 1e-10), sf = amax / 448, inv = 1/sf).
// load16(c, v) fills v with the 16 values of chunk c. Every thread of the block calls it.
template <bool kRequant, typename Load16>
__device__ __forceinline__ void quantize_per128(Load16 load16, uint32_t n, float4* __restrict__ codes,
                                                float* __restrict__ scales) {
  const uint32_t chunks = n / 16;
  const uint32_t rounds = (chunks + kThreads - 1) / kThreads;
  for (uint32_t r = 0; r < rounds; ++r) {
    const uint32_t c = r * kThreads + threadIdx.x;  // 8 consecutive chunks = one group
    const bool live = c < chunks;
    float v[16];
    if (live) {
      load16(c, v);
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = 0.f;
    }
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
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
      for (int i = 0; i < 4; ++i) {
        codes[i * chunks + c] = make_float4(e4m3_round(__fmul_rn(v[4 * i], inv)), e4m3_round(__fmul_rn(v[4 * i + 1], inv)),
                                            e4m3_round(__fmul_rn(v[4 * i + 2], inv)), e4m3_round(__fmul_rn(v[4 * i + 3], inv)));
      }
      if ((c & 7u) == 0) scales[c / 8] = sf;
    }
  }
}

}  // namespace jmm_decode

#if JMM_DECODE_PASS == 1
// Grid: (I / 8) * T blocks, token fastest (blocks of one row group run together and share the
// expert's rows in L2 when tokens pick the same expert). Warp w: intermediate column
// j = 8 * group + w, i.e. W1 rows 16 * group + w (gate j) and 16 * group + 8 + w (up j).
extern "C" __global__ void __launch_bounds__(jmm_decode::kThreads)
jmm_decode_l1_sm90(const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ topk_idx,
                   const float* __restrict__ topk_weights, const uint8_t* __restrict__ l1,
                   const float* __restrict__ l1_sf, float* __restrict__ act, uint32_t num_tokens,
                   uint32_t hidden, uint32_t intermediate, uint32_t num_experts, uint32_t top_k,
                   float routed_scaling_factor, float activation_clamp) {
  using namespace jmm_decode;
  extern __shared__ __align__(16) float smem[];
  float4* xq = reinterpret_cast<float4*>(smem);  // [H] e4m3 codes as f32, chunk-interleaved
  float* xsf = smem + hidden;                    // [H / 128]
  const uint32_t t = blockIdx.x % num_tokens;
  const uint32_t group = blockIdx.x / num_tokens;
  const __nv_bfloat16* xt = x + static_cast<size_t>(t) * hidden;
  quantize_per128<false>(
      [&](uint32_t c, float* v) {  // two 16-byte loads: 16 bf16
        const uint4* p = reinterpret_cast<const uint4*>(xt + 16 * static_cast<size_t>(c));
        const uint4 q[2] = {p[0], p[1]};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t words[4] = {q[h].x, q[h].y, q[h].z, q[h].w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            v[8 * h + 2 * i] = __uint_as_float(words[i] << 16);
            v[8 * h + 2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
          }
        }
      },
      hidden, xq, xsf);
  __syncthreads();

  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t j = 8 * group + warp;
  const uint32_t two_i = 2 * intermediate;
  const uint32_t h_blocks = hidden / 128;
  const size_t row_gate = 16 * group + warp;
  for (uint32_t k = 0; k < top_k; ++k) {
    const int32_t e = topk_idx[t * top_k + k];
    if (e < 0 || static_cast<uint32_t>(e) >= num_experts) continue;  // routed nowhere
    const uint8_t* wg = l1 + (static_cast<size_t>(e) * two_i + row_gate) * hidden;
    const uint8_t* wu = wg + 8 * static_cast<size_t>(hidden);
    const float* sg = l1_sf + (static_cast<size_t>(e) * (two_i / 128) + j / 128) * h_blocks;
    const float* su = l1_sf + (static_cast<size_t>(e) * (two_i / 128) + (intermediate + j) / 128) * h_blocks;
    const float2 p = row_pair_dot(wg, wu, xq, 0, hidden / 16, hidden, lane, [&](uint32_t blk) {
      const float xs = xsf[blk];
      return make_float2(__ldg(sg + blk) * xs, __ldg(su + blk) * xs);
    });
    const float ag = warp_sum(p.x), au = warp_sum(p.y);
    if (lane == 0) {
      float g = ag, u = au;
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

#if JMM_DECODE_PASS == 2
// Grid: (H / 16) * T blocks, token fastest. Warp w: hidden rows 16 * group + w and
// 16 * group + 8 + w of W2; the combine over k happens in the warp (ascending k, f32 from 0).
extern "C" __global__ void __launch_bounds__(jmm_decode::kThreads)
jmm_decode_l2_sm90(const float* __restrict__ act, const int32_t* __restrict__ topk_idx,
                   const uint8_t* __restrict__ l2, const float* __restrict__ l2_sf,
                   __nv_bfloat16* __restrict__ y, uint32_t num_tokens, uint32_t hidden,
                   uint32_t intermediate, uint32_t num_experts, uint32_t top_k) {
  using namespace jmm_decode;
  extern __shared__ __align__(16) float smem[];
  float4* aq = reinterpret_cast<float4*>(smem);   // [K, I] e4m3 codes as f32, chunk-interleaved
  float* asf = smem + top_k * intermediate;       // [K, I / 128]
  const uint32_t t = blockIdx.x % num_tokens;
  const uint32_t group = blockIdx.x / num_tokens;
  const float* at = act + static_cast<size_t>(t) * top_k * intermediate;
  // Slots routed nowhere were never written by l1: read them as 0 (their codes are unused).
  const int32_t* idx_t = topk_idx + t * top_k;
  quantize_per128<true>(
      [&](uint32_t c, float* v) {  // a chunk never straddles two slots (I % 16 == 0)
        const int32_t e = idx_t[16 * c / intermediate];
        const bool routed = e >= 0 && static_cast<uint32_t>(e) < num_experts;
        const float4* p = reinterpret_cast<const float4*>(at + 16 * static_cast<size_t>(c));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float4 q = routed ? p[i] : make_float4(0.f, 0.f, 0.f, 0.f);
          v[4 * i] = q.x;
          v[4 * i + 1] = q.y;
          v[4 * i + 2] = q.z;
          v[4 * i + 3] = q.w;
        }
      },
      top_k * intermediate, aq, asf);
  __syncthreads();

  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t i_blocks = intermediate / 128;
  const size_t r0 = 16 * group + warp, r1 = r0 + 8;  // both in the same 128-row scale block
  float y0 = 0.f, y1 = 0.f;
  for (uint32_t k = 0; k < top_k; ++k) {
    const int32_t e = idx_t[k];
    if (e < 0 || static_cast<uint32_t>(e) >= num_experts) continue;
    const uint8_t* w0 = l2 + (static_cast<size_t>(e) * hidden + r0) * intermediate;
    const uint8_t* w1 = l2 + (static_cast<size_t>(e) * hidden + r1) * intermediate;
    const float* s = l2_sf + (static_cast<size_t>(e) * (hidden / 128) + r0 / 128) * i_blocks;
    const uint32_t ck = k * (intermediate / 16), stride = top_k * intermediate / 16;
    const float* sk = asf + k * i_blocks;
    const float2 p = row_pair_dot(w0, w1, aq, ck, stride, intermediate, lane, [&](uint32_t blk) {
      const float sc = __ldg(s + blk) * sk[blk];
      return make_float2(sc, sc);
    });
    const float o0 = warp_sum(p.x), o1 = warp_sum(p.y);
    y0 += __bfloat162float(__float2bfloat16_rn(o0));
    y1 += __bfloat162float(__float2bfloat16_rn(o1));
  }
  if (lane == 0) {
    y[static_cast<size_t>(t) * hidden + r0] = __float2bfloat16_rn(y0);
    y[static_cast<size_t>(t) * hidden + r1] = __float2bfloat16_rn(y1);
  }
}
#endif
