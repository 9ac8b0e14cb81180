// normact_math.h -- the activation math of every Norm<Act> kernel, in one place.
//
// Every function here is `__host__ __device__` when compiled by nvcc and plain
// inline C++ otherwise, so the CPU kernels (and therefore the CPU tests) run
// exactly the arithmetic the CUDA kernels run.
//
// Design choices, and why:
//  * Transcendentals (exp, expm1, log, tanh, erfc) are implemented here with
//    Cephes-style range reduction + polynomials instead of calling libm.  The
//    code is straight-line arithmetic plus selects, so GCC/Clang auto-vectorize
//    the CPU loops (libm calls would block vectorization without -ffast-math,
//    and -ffast-math would break NaN/Inf semantics), and the GPU gets the same
//    results as the CPU.  Accuracy: a few float32 ulp (checked by the tests
//    against numpy in float64).
//  * NaN must propagate: never use fmaxf/fminf for ReLU-like kinks
//    (fmaxf(NaN, 0) == 0).  Comparisons are written so that a NaN input falls
//    through to a branch that carries it (`x < 0 ? 0 : x`).
//  * +-Inf follow the limits of the math (silu(-inf) = 0, softsign(inf) = 1,
//    gelu(-inf) = 0, ...), not the NaN that a naive `inf * 0` would produce.
//  * Everything is computed in float32; fp16/bf16 are storage types only.
#pragma once

#include <stdint.h>
#if !defined(__CUDACC__)
#include <string.h>
#endif

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
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

// ------------------------------------------------------------- elementary
// exp(x) = 2^n * e^r, |r| <= ln2/2 (Cody-Waite), e^r by the Cephes expf
// polynomial.  Returns e^r - 1 in *em1 (accurate for small r: used by expm1).
NA_HD float exp_core(float x, float* em1) {
  // Clamp so that n stays within [-151, 129]; the result still over/underflows
  // correctly (exp(89) = inf in float, exp(-104) = 0).  NaN passes the clamps.
  float xc = x > 89.0f ? 89.0f : x;
  xc = xc < -104.0f ? -104.0f : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + magic;
  const int32_t n = (int32_t)(as_uint(t) - as_uint(magic));
  const float fn = t - magic;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float q = p * (r * r) + r;  // e^r - 1
  *em1 = q;
  // 2^n as two normal factors so subnormal results and n = 128 work.
  const int32_t n1 = n >> 1, n2 = n - n1;
  const float s1 = as_float((uint32_t)(n1 + 127) << 23);
  const float s2 = as_float((uint32_t)(n2 + 127) << 23);
  return ((q + 1.0f) * s1) * s2;
}

NA_HD float na_exp(float x) {
  float em1;
  const float e = exp_core(x, &em1);
  return is_nan(x) ? x : e;
}

// expm1 without cancellation near 0: when n == 0 the polynomial already is e^r - 1.
NA_HD float na_expm1(float x) {
  float em1;
  const float e = exp_core(x, &em1);
  const float r = na_abs(x) < 0.34657359f ? em1 : e - 1.0f;
  return is_nan(x) ? x : r;
}

// Natural log for finite w > 0 (Cephes logf).  Callers guarantee the domain.
NA_HD float na_log(float w) {
  const uint32_t u = as_uint(w);
  int32_t e = (int32_t)(u >> 23) - 126;                  // w = m * 2^e, m in [0.5, 1)
  float m = as_float((u & 0x007fffffu) | 0x3f000000u);
  const bool small = m < 0.70710678f;                    // move m to [sqrt(.5), sqrt(2))
  e = small ? e - 1 : e;
  const float x = (small ? m + m : m) - 1.0f;
  const float fe = (float)e;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (x + y) + fe * 0.693359375f;
}

// log(1 + u) for u >= 0 (Goldberg's trick keeps relative accuracy for tiny u).
NA_HD float na_log1p_pos(float u) {
  const float w = 1.0f + u;
  const float d = w - 1.0f;
  return d == 0.0f ? u : na_log(w) * (u / d);
}

NA_HD float na_sigmoid(float x) { return 1.0f / (1.0f + na_exp(-x)); }

// tanh as one rational function (odd degree-13 / even degree-6 minimax fit, as
// in Eigen's float tanh), clamped where tanh rounds to 1: no exp, no branch;
// max relative error 4e-7 (measured against double tanh).  Tiny |x|: tanh = x.
NA_HD float na_tanh(float x0) {
  const float c = 7.90531110763549805f;
  float x = x0 > c ? c : x0;  // NaN passes both clamps
  x = x < -c ? -c : x;
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const float r = p / q;
  return na_abs(x0) < 0.0004f ? x0 : r;
}

// erfc(z) for z >= 0 with relative error < 1.2e-7 everywhere (Numerical
// Recipes `erfcc`, Chebyshev fit).  Relative accuracy in the tail is what makes
// Gelu accurate for negative x, where 1 + erf(x) would cancel.
NA_HD float na_erfc_pos(float z) {
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  return t * na_exp(p - z * z);
}

// Standard normal CDF Phi(x) = 0.5 * erfc(-x / sqrt 2).
NA_HD float na_phi(float x) {
  const float h = 0.5f * na_erfc_pos(na_abs(x) * 0.70710678118654752f);
  return x < 0.0f ? h : 1.0f - h;
}

// ------------------------------------------------------------- activations
// Each functor: f(x, a, b) with the activation's own attributes a, b (see the
// op table in normact_ops.h for which attribute is which).
namespace act {

struct Relu {
  static NA_HD float f(float x, float, float) { return x < 0.0f ? 0.0f : x; }
};
struct LeakyRelu {  // also PRelu with a scalar slope
  static NA_HD float f(float x, float alpha, float) { return x < 0.0f ? alpha * x : x; }
};
struct Elu {
  static NA_HD float f(float x, float alpha, float) {
    return x > 0.0f ? x : alpha * na_expm1(x);
  }
};
struct Selu {
  static NA_HD float f(float x, float alpha, float gamma) {
    return gamma * (x > 0.0f ? x : alpha * na_expm1(x));
  }
};
struct Celu {
  // max(0,x) + min(0, alpha*(exp(x/alpha)-1)): the two terms never both
  // contribute, so one select suffices (and NaN falls into the second).
  static NA_HD float f(float x, float alpha, float) {
    return x > 0.0f ? x : alpha * na_expm1(x / alpha);
  }
};
struct Sigmoid {
  static NA_HD float f(float x, float, float) { return na_sigmoid(x); }
};
struct HardSigmoid {
  static NA_HD float f(float x, float alpha, float beta) {
    const float v = alpha * x + beta;
    return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
  }
};
struct Tanh {
  static NA_HD float f(float x, float, float) { return na_tanh(x); }
};
struct Softplus {
  // max(x, 0) + log1p(exp(-|x|)): never overflows, exact tail for x << 0.
  static NA_HD float f(float x, float, float) {
    const float r = (x < 0.0f ? 0.0f : x) + na_log1p_pos(na_exp(-na_abs(x)));
    return is_nan(x) ? x : r;
  }
};
struct Softsign {
  static NA_HD float f(float x, float, float) {
    const float a = na_abs(x);
    const float r = x / (1.0f + a);
    return a == na_inf() ? copy_sign(1.0f, x) : r;
  }
};
struct Silu {
  // x / (1 + e^-x); at x = -inf that is -inf/inf, whose limit is 0.
  static NA_HD float f(float x, float, float) {
    const float r = x / (1.0f + na_exp(-x));
    return x == -na_inf() ? 0.0f : r;
  }
};
struct HardSwish {
  static NA_HD float f(float x, float, float) {
    return x <= -3.0f ? 0.0f : (x >= 3.0f ? x : x * (x * (1.0f / 6.0f) + 0.5f));
  }
};
struct Mish {
  // tanh(softplus(x)) = n(n+2) / (n(n+2) + 2) with n = e^x: one exp, no
  // cancellation for x << 0.  For x > 20, tanh(softplus(x)) == 1 in float.
  static NA_HD float f(float x, float, float) {
    const float n = na_exp(x > 20.0f ? 20.0f : x);
    const float q = n * (n + 2.0f);
    const float r = x * (q / (q + 2.0f));
    return x > 20.0f ? x : (x == -na_inf() ? 0.0f : r);
  }
};
struct Gelu {
  static NA_HD float f(float x, float, float) {
    const float r = x * na_phi(x);
    return x == -na_inf() ? 0.0f : r;
  }
};
struct GeluTanh {
  // 0.5 x (1 + tanh(u)) == x * sigmoid(2u): no cancellation for x << 0.
  static NA_HD float f(float x, float, float) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    const float r = x / (1.0f + na_exp(-2.0f * u));
    return x == -na_inf() ? 0.0f : r;
  }
};
struct Clip {
  static NA_HD float f(float x, float lo, float hi) {
    return x < lo ? lo : (x > hi ? hi : x);
  }
};
struct Abs {
  static NA_HD float f(float x, float, float) { return na_abs(x); }
};

}  // namespace act

// The attributes of one node: y = scale * (f(x; a, b) - shift - slope * x).
struct Params {
  float scale, shift, slope, a, b;
};

// The normalized activation.  The slope term is skipped when slope == 0 so
// that slope*x never turns an infinite x into NaN (0 * inf); the test is
// loop-invariant, so compilers unswitch it out of the loops.
template <class Act>
NA_HD float norm_act(float x, const Params& p) {
  float y = Act::f(x, p.a, p.b) - p.shift;
  if (p.slope != 0.0f) y -= p.slope * x;
  return p.scale * y;
}

}  // namespace normact
