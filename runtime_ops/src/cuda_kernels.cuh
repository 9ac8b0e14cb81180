// cuda_kernels.cuh -- the CUDA elementwise kernel, instantiated per storage
// type in cuda_f32.cu / cuda_f16.cu / cuda_bf16.cu (split so that a 2-core CI
// machine compiles them in parallel).
//
//  * 16-byte vector loads/stores (float4-sized packs: 4 floats or 8 halves)
//    when both pointers are 16-byte aligned (ORT's allocations are), else a
//    scalar fallback; the math is the shared normact_math.h in float32.
//  * grid-stride loop over at most (SMs x 8) blocks of 256 threads: one full
//    wave on the device, sized from the device's SM count (cached per device).
//  * launched on the stream ONNX Runtime hands us, never the default stream.
//  * x and y may alias (in-place): every element is read before it is written
//    by the same thread, so no __restrict__.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "kernels.h"

namespace normact {
namespace cuda {

constexpr int kThreads = 256;

template <class Act, class T, int V>
__global__ void __launch_bounds__(kThreads) norm_kernel(const T* x, T* y, size_t n, Params p) {
  struct alignas(sizeof(T) * V) Pack {
    T v[V];
  };
  const size_t nvec = n / V;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const Pack* xp = reinterpret_cast<const Pack*>(x);
  Pack* yp = reinterpret_cast<Pack*>(y);
  for (size_t i = tid; i < nvec; i += stride) {
    Pack a = xp[i];
    Pack b;
#pragma unroll
    for (int k = 0; k < V; ++k) b.v[k] = from_float<T>(norm_act<Act>(to_float(a.v[k]), p));
    yp[i] = b;
  }
  // The n % V leftover elements (V == 1: none).
  const size_t rest = nvec * V + tid;
  if (V > 1 && rest < n) y[rest] = from_float<T>(norm_act<Act>(to_float(x[rest]), p));
}

// Number of SMs of the current device, queried once per device.
inline int sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 108;
  int c = cache[dev].load(std::memory_order_relaxed);
  if (c == 0) {
    if (cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || c <= 0) c = 108;
    cache[dev].store(c, std::memory_order_relaxed);
  }
  return c;
}

template <class Act, class T>
const char* launch(const void* xv, void* yv, size_t n, const Params& p, void* stream) {
  if (n == 0) return nullptr;
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  constexpr int V = 16 / sizeof(T);
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % 16) == 0;
  const size_t work = aligned ? (n + V - 1) / V : n;
  const size_t max_blocks = (size_t)sm_count() * (2048 / kThreads);
  size_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (aligned)
    norm_kernel<Act, T, V><<<(unsigned)blocks, kThreads, 0, s>>>(x, y, n, p);
  else
    norm_kernel<Act, T, 1><<<(unsigned)blocks, kThreads, 0, s>>>(x, y, n, p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace normact

// Defines normact::cuda::kColumn_<suffix>[kNumOps]: one storage type's launchers.
#define NORMACT_CUDA_COLUMN(T, suffix)                                           \
  namespace normact {                                                            \
  namespace cuda {                                                               \
  extern const CudaFn kColumn_##suffix[kNumOps];                                 \
  const CudaFn kColumn_##suffix[kNumOps] = {NORMACT_OP_TABLE(NORMACT_CUDA_CELL)}; \
  }                                                                              \
  }
#define NORMACT_CUDA_CELL(name, functor, kind, an, ad, bn, bd) launch<act::functor, NORMACT_CUDA_T>,
