// normact_bits.h -- float32 bit-level helpers and the host/device qualifier that
// every header of the activation math uses.
//
// NA_HD makes a function `__host__ __device__` under nvcc and plain inline C++
// otherwise, so the CPU kernels (and therefore the CPU tests) run exactly the
// arithmetic the CUDA kernels run.  The helpers work on the bit pattern
// (abs, copysign, NaN, Inf) so they are branch-free selects the CPU loops can
// vectorize, and never call libm.
#pragma once

#include <stdint.h>
#if !defined(__CUDACC__)
#include <string.h>
#endif

#if defined(__CUDACC__)
#define NA_HD __host__ __device__ __forceinline__
#else
#define NA_HD inline __attribute__((always_inline))
#endif

namespace normact {

// ---------------------------------------------------------------- bit casts
NA_HD float as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

NA_HD uint32_t as_uint(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

NA_HD float na_abs(float x) { return as_float(as_uint(x) & 0x7fffffffu); }
NA_HD float copy_sign(float mag, float sgn) {
  return as_float((as_uint(mag) & 0x7fffffffu) | (as_uint(sgn) & 0x80000000u));
}
NA_HD bool is_nan(float x) { return x != x; }
NA_HD float na_inf() { return as_float(0x7f800000u); }

}  // namespace normact
