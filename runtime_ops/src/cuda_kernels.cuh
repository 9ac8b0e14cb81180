// cuda_kernels.cuh -- the CUDA elementwise kernel, instantiated per storage
// type in cuda_f32.cu / cuda_f16.cu / cuda_bf16.cu (split so that a 2-core CI
// machine compiles them in parallel).
//
//  * 16-byte vector loads/stores (packs of 4 floats or 8 halves) for the body of
//    the tensor; a scalar head brings a misaligned pointer up to 16 bytes and a
//    scalar tail finishes it (cuda_launch.h: split_elements).  Only when x and y
//    sit at different offsets within 16 bytes does the whole tensor go scalar.
//    The math is the shared normact_math.h in float32.
//  * grid-stride loop over at most one full wave of resident blocks, from the
//    occupancy API and the SM count of the device that holds the tensor
//    (cached per device and kernel).
//  * the device is the one holding the input (cudaPointerGetAttributes), made
//    current for the launch if the calling thread had another; launched on the
//    stream ONNX Runtime hands us, never the default stream.
//  * x and y may alias (in-place): every element is read before it is written
//    by the same thread, so no __restrict__.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "cuda_device.h"
#include "cuda_launch.h"
#include "kernels.h"

namespace normact {
namespace cuda {

constexpr int kMaxDevices = 64;

template <class Act, class T, int V>
__global__ void __launch_bounds__(kThreads) norm_kernel(const T* x, T* y, size_t n, size_t head, size_t packs,
                                                        Params p) {
  struct alignas(sizeof(T) * V) Pack {
    T v[V];
  };
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const Pack* xp = reinterpret_cast<const Pack*>(x + head);
  Pack* yp = reinterpret_cast<Pack*>(y + head);
  for (size_t i = tid; i < packs; i += stride) {
    Pack a = xp[i];
    Pack b;
#pragma unroll
    for (int k = 0; k < V; ++k) b.v[k] = from_float<T>(norm_act<Act>(to_float(a.v[k]), p));
    yp[i] = b;
  }
  if (V > 1) {  // the head (< V elements before the first pack) and the tail (< V after the last)
    if (tid < head) y[tid] = from_float<T>(norm_act<Act>(to_float(x[tid]), p));
    const size_t t = head + packs * V + tid;
    if (t < n) y[t] = from_float<T>(norm_act<Act>(to_float(x[t]), p));
  }
}

// One full wave of this kernel on `dev` (SMs x resident blocks per SM), cached.
template <class Act, class T, int V>
int wave_blocks(int dev, int* sms, int* per_sm) {
  static std::atomic<int> cache_sms[kMaxDevices], cache_per_sm[kMaxDevices];
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && (*sms = cache_sms[dev].load(std::memory_order_relaxed)) > 0) {
    *per_sm = cache_per_sm[dev].load(std::memory_order_relaxed);
    return cudaSuccess;
  }
  int err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, norm_kernel<Act, T, V>, kThreads, 0);
  if (err != cudaSuccess) return err;
  if (cached) {
    cache_per_sm[dev].store(*per_sm, std::memory_order_relaxed);
    cache_sms[dev].store(*sms, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

template <class Act, class T, int V>
int launch_on(const T* x, T* y, size_t n, const Split& s, const Params& p, int dev, cudaStream_t stream) {
  int sms = 0, per_sm = 0;
  const int err = wave_blocks<Act, T, V>(dev, &sms, &per_sm);
  if (err != cudaSuccess) return err;
  norm_kernel<Act, T, V><<<grid_blocks(s.packs, sms, per_sm), kThreads, 0, stream>>>(x, y, n, s.head, s.packs, p);
  return cudaGetLastError();
}

template <class Act, class T>
int launch(const void* xv, void* yv, size_t n, const Params& p, void* stream) {
  if (n == 0) return cudaSuccess;
  (void)cudaGetLastError();  // a stale error of this runtime from an earlier call is not this launch's
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  cudaPointerAttributes where;
  int err = cudaPointerGetAttributes(&where, x);
  if (err != cudaSuccess) return err;
  if (where.type != cudaMemoryTypeDevice && where.type != cudaMemoryTypeManaged) return kNotDeviceMemory;
  int previous = where.device;
  if (cudaGetDevice(&previous) != cudaSuccess) previous = where.device;
  if (previous != where.device && (err = cudaSetDevice(where.device)) != cudaSuccess) return err;
  constexpr int V = static_cast<int>(kVectorBytes / sizeof(T));
  const Split s = split_elements(reinterpret_cast<uintptr_t>(x), reinterpret_cast<uintptr_t>(y), n, sizeof(T));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  err = s.lanes == V ? launch_on<Act, T, V>(x, y, n, s, p, where.device, st)
                     : launch_on<Act, T, 1>(x, y, n, s, p, where.device, st);
  if (previous != where.device) (void)cudaSetDevice(previous);
  return err;
}

// Whether the device has code for both of the op's kernels (vector and scalar).
template <class Act, class T>
int probe() {
  cudaFuncAttributes a;
  int err = cudaFuncGetAttributes(&a, norm_kernel<Act, T, static_cast<int>(kVectorBytes / sizeof(T))>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&a, norm_kernel<Act, T, 1>);
  return err;
}

}  // namespace cuda
}  // namespace normact

// Defines normact::cuda::kColumn_<suffix>[kNumOps] and kProbe_<suffix>[kNumOps]:
// one storage type's launchers and image probes.
#define NORMACT_CUDA_COLUMN(T, suffix)                                                  \
  namespace normact {                                                                   \
  namespace cuda {                                                                      \
  extern const CudaFn kColumn_##suffix[kNumOps];                                        \
  const CudaFn kColumn_##suffix[kNumOps] = {NORMACT_OP_TABLE(NORMACT_CUDA_CELL)};        \
  extern const CudaProbeFn kProbe_##suffix[kNumOps];                                    \
  const CudaProbeFn kProbe_##suffix[kNumOps] = {NORMACT_OP_TABLE(NORMACT_CUDA_PROBE)};  \
  }                                                                                     \
  }
#define NORMACT_CUDA_CELL(name, functor, kind, an, ad, bn, bd) launch<act::functor, NORMACT_CUDA_T>,
#define NORMACT_CUDA_PROBE(name, functor, kind, an, ad, bn, bd) probe<act::functor, NORMACT_CUDA_T>,
