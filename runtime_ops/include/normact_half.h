// normact_half.h -- the 16-bit storage types (fp16, bf16) and their float32
// conversions.  Everything is computed in float32; fp16/bf16 are storage
// types only.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "normact_bits.h"

namespace normact {

// ------------------------------------------------------------ storage types
// fp16 / bf16 are handled as raw 16-bit patterns so the same code compiles as
// plain C++.  Host conversions are branch-free (selects) so loops vectorize;
// the device uses the hardware conversion instructions.
struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

NA_HD float to_float(float x) { return x; }
NA_HD float to_float(f16 h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  // F. Giesen, "half_to_float_fast": shift exponent/mantissa into place, fix
  // the exponent bias, then patch up Inf/NaN and zero/subnormal inputs.
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t)(h.bits & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  const uint32_t inf_nan = o + ((128u - 16u) << 23);
  const float sub = as_float(o + (1u << 23)) - as_float(113u << 23);  // renormalize
  o = exp == shifted_exp ? inf_nan : (exp == 0 ? as_uint(sub) : o);
  return as_float(o | ((uint32_t)(h.bits & 0x8000u) << 16));
#endif
}
NA_HD float to_float(bf16 h) { return as_float((uint32_t)h.bits << 16); }

template <typename T>
NA_HD T from_float(float x);

template <>
NA_HD float from_float<float>(float x) {
  return x;
}

template <>
NA_HD f16 from_float<f16>(float x) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(x))};
#else
  // F. Giesen, "float_to_half_fast3_rtne": round-to-nearest-even, overflow to
  // Inf, NaN stays a (quiet) NaN, subnormals via a magic-number addition.
  uint32_t u = as_uint(x);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  const uint32_t f32infty = 255u << 23, f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t big = u > f32infty ? 0x7e00u : 0x7c00u;
  const uint32_t sub = as_uint(as_float(u) + as_float(denorm_magic)) - denorm_magic;
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t norm = (u + ((uint32_t)(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  const uint32_t o = u >= f16max ? big : (u < (113u << 23) ? sub : norm);
  return f16{(uint16_t)(o | (sign >> 16))};
#endif
}

template <>
NA_HD bf16 from_float<bf16>(float x) {
  // Round to nearest even; NaN stays NaN (force a quiet-NaN mantissa bit).
  const uint32_t u = as_uint(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return bf16{(uint16_t)(is_nan(x) ? nan : rounded)};
}

}  // namespace normact
