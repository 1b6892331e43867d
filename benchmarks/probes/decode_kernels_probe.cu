// Standalone timing probe of the decode kernels (ffi/jit/decode_kernels.cc) without JAX: the same
// CUDA source (extracted by run_decode_probe.sh into decode_src.cuh), launched the way the model
// runs them: L layers per step on one stream, each layer l1 -> l2 -> a residual add, every layer with
// its own routing, weight sets cycled. Reports per-layer time against the weight-read floor at the
// bandwidth a plain streaming-read kernel reaches on the same card, with and without programmatic
// dependent launch (PDL) of l2 and with the step as a CUDA graph. For kernel work and ncu; the
// numbers users see come from benchmarks/decode_step.py.
//
//   probe [--model flash|pro] [--tokens 1,2,4] [--layers 43] [--sets 8] [--reps 20] [--json F]
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "decode_src.cuh"

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

namespace {

__global__ void fill_bytes(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed ^ uint32_t(i >> 32) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = uint8_t(h) & 0xB7;  // e4m3 with exponent <= 6 and no NaN code
  }
}

__global__ void fill_float(float* p, size_t n, float v) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) p[i] = v;
}

__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 2246822519u;
    p[i] = __float2bfloat16(float(h & 0xffff) / 32768.0f - 1.0f);
  }
}

// x = bf16(x + y): the residual add between layers (XLA's fusion in decode_step).
__global__ void residual(__nv_bfloat16* x, const __nv_bfloat16* y, uint32_t n) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = __float2bfloat16(__bfloat162float(x[i]) + 0.01f * __bfloat162float(y[i]));
}

// Streaming read of n bytes (uint4 loads, 8 in flight per thread): the bandwidth the floor uses.
__global__ void read_bw(const uint4* p, size_t n16, uint32_t* sink) {
  uint32_t acc = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  for (; i + 7 * stride < n16; i += 8 * stride) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldg(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) acc ^= __ldg(p + i).x;
  if (acc == 0x12345678u) *sink = acc;
}

struct Model {
  const char* name;
  uint32_t H, I, E, K;
};

std::vector<int> int_list(const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    v.push_back(std::atoi(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  Model m{"flash", 4096, 2048, 256, 6};
  std::vector<int> tokens{1, 2, 4};
  int layers = 43, sets = 8, reps = 20;
  const char* json = nullptr;
  for (int a = 1; a + 1 < argc; a += 2) {
    if (!std::strcmp(argv[a], "--model") && !std::strcmp(argv[a + 1], "pro")) m = {"pro", 7168, 3072, 384, 6};
    else if (!std::strcmp(argv[a], "--tokens")) tokens = int_list(argv[a + 1]);
    else if (!std::strcmp(argv[a], "--layers")) layers = std::atoi(argv[a + 1]);
    else if (!std::strcmp(argv[a], "--sets")) sets = std::atoi(argv[a + 1]);
    else if (!std::strcmp(argv[a], "--reps")) reps = std::atoi(argv[a + 1]);
    else if (!std::strcmp(argv[a], "--json")) json = argv[a + 1];
  }
  const uint32_t H = m.H, I = m.I, E = m.E, K = m.K;
  const int T_max = *std::max_element(tokens.begin(), tokens.end());
  const size_t l1_bytes = size_t(E) * 2 * I * H, l2_bytes = size_t(E) * H * I;
  const size_t l1_sf_n = size_t(E) * (2 * I / 128) * (H / 128), l2_sf_n = size_t(E) * (H / 128) * (I / 128);
  size_t free_b = 0, total_b = 0;
  CK(cudaMemGetInfo(&free_b, &total_b));
  sets = int(std::min<size_t>(sets, (free_b - (size_t(4) << 30)) / (l1_bytes + l2_bytes)));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
#ifdef JMM_DECODE_DEPTH
  const int depth = JMM_DECODE_DEPTH;
#else
  const int depth = 0;
#endif
  std::printf("device %s, %d SMs; model %s H=%u I=%u E=%u K=%u; %d layers, %d weight sets, l2 ring depth %d\n",
              prop.name, prop.multiProcessorCount, m.name, H, I, E, K, layers, sets, depth);

  std::vector<uint8_t*> w1(sets), w2(sets);
  std::vector<float*> s1(sets), s2(sets);
  for (int s = 0; s < sets; ++s) {
    CK(cudaMalloc(&w1[s], l1_bytes));
    CK(cudaMalloc(&w2[s], l2_bytes));
    CK(cudaMalloc(&s1[s], l1_sf_n * 4));
    CK(cudaMalloc(&s2[s], l2_sf_n * 4));
    fill_bytes<<<1024, 256>>>(w1[s], l1_bytes, 17u * s + 1);
    fill_bytes<<<1024, 256>>>(w2[s], l2_bytes, 17u * s + 2);
    fill_float<<<256, 256>>>(s1[s], l1_sf_n, 1.0f / 4096);
    fill_float<<<256, 256>>>(s2[s], l2_sf_n, 1.0f / 4096);
  }
  __nv_bfloat16 *x, *y;
  float *act, *tw;
  int32_t* idx;
  CK(cudaMalloc(&x, size_t(T_max) * H * 2));
  CK(cudaMalloc(&y, size_t(T_max) * H * 2));
  CK(cudaMalloc(&act, size_t(T_max) * K * I * 4));
  CK(cudaMalloc(&idx, size_t(layers) * T_max * K * 4));
  CK(cudaMalloc(&tw, size_t(layers) * T_max * K * 4));
  uint32_t* sink;
  CK(cudaMalloc(&sink, 4));
  CK(cudaDeviceSynchronize());

  const size_t smem1 = 4 * (H + H / 128), smem2 = 4 * size_t(K) * (I + I / 128);
  CK(cudaFuncSetAttribute(jmm_decode_l1_sm90, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem1)));
  CK(cudaFuncSetAttribute(jmm_decode_l2_sm90, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem2)));
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  // Bandwidth of a streaming read over the weight sets (8 GiB, L2-cold).
  double bw = 0;
  {
    const size_t n = std::min<size_t>(l1_bytes, size_t(8) << 30) / 16;
    for (int r = 0; r < 3; ++r) {
      CK(cudaEventRecord(e0, st));
      read_bw<<<prop.multiProcessorCount * 8, 512, 0, st>>>(reinterpret_cast<const uint4*>(w1[r % sets]), n, sink);
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      bw = std::max(bw, n * 16.0 / (ms * 1e-3));
    }
  }
  std::printf("streaming read: %.3f TB/s\n", bw / 1e12);

  std::mt19937 rng(1234);
  std::string js = std::string("{\"device\": \"") + prop.name + "\", \"model\": \"" + m.name +
                   "\", \"depth\": " + std::to_string(depth) + ", \"read_tbps\": " +
                   std::to_string(bw / 1e12) + ", \"points\": [";
  bool first_pt = true;
  std::printf("%4s %8s %10s %10s %10s %10s %10s\n", "T", "floor_us", "stream", "stream_pdl", "graph", "graph_pdl",
              "empty");
  for (int T : tokens) {
    // Routing: K distinct experts per token per layer; the floor counts each touched expert once.
    std::vector<int32_t> h_idx(size_t(layers) * T * K);
    std::vector<float> h_w(h_idx.size(), 1.0f / K);
    double touched = 0;
    for (int l = 0; l < layers; ++l) {
      std::set<int> used;
      for (int t = 0; t < T; ++t) {
        std::set<int> mine;
        while (int(mine.size()) < int(K)) mine.insert(int(rng() % E));
        int k = 0;
        for (int e : mine) h_idx[(size_t(l) * T + t) * K + k++] = e, used.insert(e);
      }
      touched += used.size();
    }
    CK(cudaMemcpy(idx, h_idx.data(), h_idx.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(tw, h_w.data(), h_w.size() * 4, cudaMemcpyHostToDevice));
    fill_bf16<<<64, 256>>>(x, size_t(T) * H, 7);
    CK(cudaDeviceSynchronize());
    const double floor_us = touched / layers * (3.0 * I * H) / bw * 1e6;

    auto step = [&](bool pdl, bool moe) {
      for (int l = 0; l < layers; ++l) {
        const int s = l % sets;
        const int32_t* li = idx + size_t(l) * T * K;
        const float* lw = tw + size_t(l) * T * K;
        if (moe) {
          jmm_decode_l1_sm90<<<T * (I / 8), 256, smem1, st>>>(x, li, lw, w1[s], s1[s], act, T, H, I, E, K, 1.0f,
                                                               10.0f);
          cudaLaunchConfig_t c{};
          c.gridDim = dim3(T * (H / 16));
          c.blockDim = dim3(256);
          c.dynamicSmemBytes = smem2;
          c.stream = st;
          cudaLaunchAttribute at[1];
          at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
          at[0].val.programmaticStreamSerializationAllowed = 1;
          c.attrs = at;
          c.numAttrs = pdl ? 1 : 0;
          CK(cudaLaunchKernelEx(&c, jmm_decode_l2_sm90, (const float*)act, li, (const uint8_t*)w2[s],
                                (const float*)s2[s], y, uint32_t(T), H, I, E, K));
        }
        residual<<<(T * H + 255) / 256, 256, 0, st>>>(x, y, T * H);
      }
    };
    auto time_it = [&](bool pdl, bool moe, bool graph) {
      cudaGraphExec_t ge = nullptr;
      if (graph) {
        cudaGraph_t g;
        CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        step(pdl, moe);
        CK(cudaStreamEndCapture(st, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        CK(cudaGraphDestroy(g));
      }
      auto run = [&]() {
        if (graph) CK(cudaGraphLaunch(ge, st));
        else step(pdl, moe);
      };
      run();
      run();
      CK(cudaStreamSynchronize(st));
      std::vector<float> v;
      for (int r = 0; r < reps; ++r) {
        CK(cudaEventRecord(e0, st));
        run();
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        v.push_back(ms * 1e3f / layers);
      }
      if (ge) CK(cudaGraphExecDestroy(ge));
      std::sort(v.begin(), v.end());
      return double(v[v.size() / 2]);
    };
    const double a = time_it(false, true, false), b = time_it(true, true, false);
    const double c = time_it(false, true, true), d = time_it(true, true, true);
    const double z = time_it(false, false, true);
    std::printf("%4d %8.1f %10.1f %10.1f %10.1f %10.1f %10.1f\n", T, floor_us, a, b, c, d, z);
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "%s{\"T\": %d, \"floor_us\": %.2f, \"stream_us\": %.2f, \"stream_pdl_us\": %.2f, "
                  "\"graph_us\": %.2f, \"graph_pdl_us\": %.2f, \"empty_graph_us\": %.2f}",
                  first_pt ? "" : ", ", T, floor_us, a, b, c, d, z);
    js += buf;
    first_pt = false;
  }
  js += "]}\n";
  if (json) {
    FILE* f = std::fopen(json, "w");
    if (f) std::fputs(js.c_str(), f), std::fclose(f);
  }
  CK(cudaGetLastError());
  return 0;
}
