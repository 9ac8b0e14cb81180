// kernels.h -- the interface between the ONNX Runtime ops (norm_op.cc,
// stats_op.cc) and the compute kernels (CPU: cpu_kernels.inc, CUDA: cuda_kernels.cuh).
//
// Kernels are plain function pointers in [op][dtype] tables generated from the
// op table, so registration never names an activation.
#pragma once

#include <stddef.h>

#include "normact_math.h"
#include "normact_ops.h"

namespace normact {

// y[i] = norm_act(x[i]) for i in [0, n); x and y may be the same buffer.
using CpuFn = void (*)(const void* x, void* y, size_t n, const Params& p);

// ---- statistics (the NormStats ops, calibration's per-site reductions)
// The tensor is viewed as [outer, channels, inner]; element i belongs to
// channel (i / inner) % channels (whole-tensor statistics: channels = 1).
struct StatsShape {
  size_t channels, inner;
};

// Count, mean and centred sum of squares of x and of f, and the sum of f'(x)^2,
// of one channel, in double; combined with Chan, Golub & LeVeque's update.
struct Moments6 {
  double n, mx, m2x, mf, m2f, d2;
};

// a becomes the moments of a's and b's elements together (Chan, Golub &
// LeVeque's pairwise update; the sums of f'^2 just add).  The one copy of the
// merge: the CPU loops fold blocks into channels with it, the statistics op
// folds the tasks' partial results.
inline void merge_moments(Moments6& a, const Moments6& b) {
  if (b.n == 0) return;
  const double total = a.n + b.n;
  const double w = b.n / total, dx = b.mx - a.mx, df = b.mf - a.mf;
  a.m2x += b.m2x + dx * dx * a.n * w;
  a.m2f += b.m2f + df * df * a.n * w;
  a.mx += dx * w;
  a.mf += df * w;
  a.d2 += b.d2;
  a.n = total;
}

// Adds elements [begin, end) of x (and of f, the activation's output, when f is
// not null; else f is computed from x) to acc[channels].  `scratch` holds
// kStatsScratch doubles.  When channels * inner <= kStatsRowMax and inner <
// kStatsShortInner (channel-last, or small feature maps), [begin, end) must be
// whole rows of channels * inner elements.
using CpuStatsFn = void (*)(const void* x, const void* f, size_t begin, size_t end, const StatsShape& s,
                            const Params& p, Moments6* acc, double* scratch);
constexpr size_t kStatsRowMax = 8192;
constexpr size_t kStatsShortInner = 64;
constexpr size_t kStatsScratch = 7 * kStatsRowMax;
inline bool stats_row_mode(const StatsShape& s) {
  return s.inner < kStatsShortInner && s.channels * s.inner <= kStatsRowMax;
}

// y[0, n) = ONNX Runtime's f(x) for float32 (normact_ort_f.h; the library's f where it has no ORT form).
using CpuOrtFFn = void (*)(const float* x, float* y, size_t n, const Params& p);

// The same loops compiled three times: for the baseline ISA (SSE2 on x86-64),
// AVX2+FMA+F16C and AVX-512; cpu_dispatch.cc picks one at kernel creation (see
// select_cpu_table).  On non-x86 builds all three are baseline code.
namespace cpu_generic {
extern const CpuFn kTable[kNumOps][kNumDTypes];
extern const CpuStatsFn kStatsTable[kNumOps][kNumDTypes];
extern const CpuOrtFFn kOrtFTable[kNumOps];
}
namespace cpu_avx2 {
extern const CpuFn kTable[kNumOps][kNumDTypes];
extern const CpuStatsFn kStatsTable[kNumOps][kNumDTypes];
extern const CpuOrtFFn kOrtFTable[kNumOps];
}
namespace cpu_avx512 {
extern const CpuFn kTable[kNumOps][kNumDTypes];
extern const CpuStatsFn kStatsTable[kNumOps][kNumDTypes];
extern const CpuOrtFFn kOrtFTable[kNumOps];
}

// Launches the kernel on `stream` (a cudaStream_t) on the device that holds x,
// and returns 0 or the error (a cudaError_t, or cuda::kNotDeviceMemory; the text
// comes from cuda::launch_error).  x and y are device pointers and may alias.
using CudaFn = int (*)(const void* x, void* y, size_t n, const Params& p, void* stream);
// cudaFuncGetAttributes of an op's kernels on the current device: 0, or why they cannot run there.
using CudaProbeFn = int (*)();

#if defined(NORMACT_WITH_CUDA)
namespace cuda {
// One column per storage type, each from its own translation unit.
extern const CudaFn kColumn_f32[kNumOps];
extern const CudaFn kColumn_f16[kNumOps];
extern const CudaFn kColumn_bf16[kNumOps];
extern const CudaProbeFn kProbe_f32[kNumOps];
extern const CudaProbeFn kProbe_f16[kNumOps];
extern const CudaProbeFn kProbe_bf16[kNumOps];
inline CudaFn kernel(int op, int dtype) {
  return dtype == kFloat32 ? kColumn_f32[op] : dtype == kFloat16 ? kColumn_f16[op] : kColumn_bf16[op];
}
inline CudaProbeFn probe(int op, int dtype) {
  return dtype == kFloat32 ? kProbe_f32[op] : dtype == kFloat16 ? kProbe_f16[op] : kProbe_bf16[op];
}
}  // namespace cuda
#endif

}  // namespace normact
