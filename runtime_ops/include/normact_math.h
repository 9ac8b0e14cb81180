// normact_math.h -- the activation math of every Norm<Act> kernel, in one place.
//
// Every function here is `__host__ __device__` when compiled by nvcc and plain
// inline C++ otherwise, so the CPU kernels (and therefore the CPU tests) run
// exactly the arithmetic the CUDA kernels run.
//
// Design choices, and why:
//  * Transcendentals (exp, expm1, log, tanh, the normal CDF) are implemented
//    here with range reduction + polynomial / rational approximations instead
//    of calling libm.  The code is straight-line arithmetic plus selects, so
//    GCC/Clang auto-vectorize the CPU loops (libm calls would block
//    vectorization without -ffast-math, and -ffast-math would break NaN/Inf
//    semantics), and the GPU gets the same results as the CPU.  exp, log, tanh
//    and Phi use our own minimax fits (runtime_ops/tools/fit_approx.py), sized for
//    a max relative error of a few 1e-7 -- measured over every float of the
//    range by runtime_ops/tools/measure_error.cc, and quoted at each function.
//    The tests check the kernels against numpy in float64.
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
// The polynomial and rational coefficients below are our own minimax fits,
// reproducible with runtime_ops/tools/fit_approx.py; the float32 errors quoted
// are measured by runtime_ops/tools/measure_error.cc against long double libm
// over every float of the stated range ("rel" = |got/want - 1| where want is a
// normal float; results below FLT_MIN may be flushed to zero).

// The rounding error of the product p = a*b (p + err == a*b exactly, barring
// over/underflow): one FMA where the target has one, else Dekker's exact
// product with Veltkamp splitting (|a|, |b| < 2^100).
NA_HD float prod_err(float a, float b, float p) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, -p);
#elif defined(__FMA__) || defined(__aarch64__)
  return __builtin_fmaf(a, b, -p);
#else
  const float ca = 4097.0f * a, cb = 4097.0f * b;
  const float ah = ca - (ca - a), al = a - ah;
  const float bh = cb - (cb - b), bl = b - bh;
  return ((ah * bh - p) + ah * bl + al * bh) + al * bl;
#endif
}

// 2e^r for |r| <= 0.35 as 2 + r*u(r); u = 2 + r*(c2 + c3 r + c4 r^2 + c5 r^3).
// Max relative error 1.4e-7 (fit), five FMAs.  *u_out = u, so that
// e^r - 1 = r*u/2 keeps relative accuracy for tiny r (expm1).
NA_HD float exp2r(float r, float* u_out) {
  float u = 0.016630819f;
  u = u * r + 0.0837836f;
  u = u * r + 0.33334213f;
  u = u * r + 0.99998504f;
  u = u * r + 2.0f;
  *u_out = u;
  return u * r + 2.0f;
}
NA_HD float exp2r(float r) {
  float u;
  return exp2r(r, &u);
}

// Cody-Waite split of ln 2: kLn2Hi has 9 significant bits, so n*kLn2Hi is exact
// for |n| < 2^15 and x - n*kLn2Hi is exact near n*ln2 even without an FMA.
#define NA_LOG2E 1.44269504088896341f
#define NA_LN2_HI 0.693359375f
#define NA_LN2_LO -2.12194440e-4f
// Adding 1.5*2^23 rounds to an integer; +126 puts n + 126 in the low mantissa
// bits, so (bits << 23) is the float 2^(n-1) (normal for -125 <= n <= 128).
#define NA_EXP_MAGIC 12583038.0f

// e^x for x in [-86.6, 88.7228394] -- the caller clamps (NaN passes through).
// One scale multiply: 2e^r * 2^(n-1); overflows to +inf exactly where e^x
// exceeds FLT_MAX.  Max rel error 2.1e-7 (measured; na_exp the same,
// na_expm1 7.3e-7 on [-20, 20]).
NA_HD float exp_clamped(float x) {
  const float t = x * NA_LOG2E + NA_EXP_MAGIC;
  const float fn = t - NA_EXP_MAGIC;
  float r = x - fn * NA_LN2_HI;
  r = r - fn * NA_LN2_LO;
  return exp2r(r) * as_float(as_uint(t) << 23);
}

// exp over the whole float range (Elu, Softplus, Mish, ...): the same
// reduction, 2^n applied as two normal factors so that subnormal results and
// n = 128 work.  Returns e^x - 1 in *em1, accurate for |x| < ln2/2 (n == 0).
NA_HD float exp_core(float x, float* em1) {
  // Clamp so that n stays within [-151, 129]; the result still over/underflows
  // correctly (exp(89) = inf in float, exp(-104) = 0).  NaN passes the clamps.
  float xc = x > 89.0f ? 89.0f : x;
  xc = xc < -104.0f ? -104.0f : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float t = xc * NA_LOG2E + magic;
  const int32_t n = (int32_t)(as_uint(t) - as_uint(magic));
  const float fn = t - magic;
  float r = xc - fn * NA_LN2_HI;
  r = r - fn * NA_LN2_LO;
  float u;
  const float p = exp2r(r, &u);  // 2e^r
  *em1 = 0.5f * (u * r);
  // 2^(n-1) as two normal factors.
  const int32_t n1 = n >> 1, n2 = n - 1 - n1;
  const float s1 = as_float((uint32_t)(n1 + 127) << 23);
  const float s2 = as_float((uint32_t)(n2 + 127) << 23);
  return (p * s1) * s2;
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

// Natural log for normal finite w > 0 (callers guarantee the domain; the only
// one, na_log1p_pos, passes w in [1, 2]).  w = m * 2^e with m in [sqrt(.5),
// sqrt(2)), x = m - 1 exact (Sterbenz), then
//   log(1 + x) = x - x^2/2 + x^3 P(x),   P of degree 6 (fit, 3.5e-8),
// plus e*ln2 in the Cody-Waite split (e*NA_LN2_HI exact).  Keeping x and
// -x^2/2 outside P keeps relative accuracy for w near 1.  Max rel error
// 1.02e-7 (measured over every float in [FLT_MIN, FLT_MAX], with and without
// FMA).  Not handled (outside the domain): subnormals, 0, negatives, Inf, NaN.
NA_HD float na_log(float w) {
  const uint32_t u = as_uint(w);
  int32_t e = (int32_t)(u >> 23) - 126;  // w = m * 2^e, m in [0.5, 1)
  const float m = as_float((u & 0x007fffffu) | 0x3f000000u);
  const bool small = m < 0.70710678f;    // move m to [sqrt(.5), sqrt(2))
  e = small ? e - 1 : e;
  const float x = (small ? m + m : m) - 1.0f;
  const float fe = (float)e;
  const float z = x * x;
  float p = 0.08700438f;
  p = p * x - 0.14267486f;
  p = p * x + 0.14914767f;
  p = p * x - 0.16577585f;
  p = p * x + 0.19963063f;
  p = p * x - 0.25001338f;
  p = p * x + 0.3333391f;
  float y = (p * x) * z + fe * NA_LN2_LO;
  y = y - 0.5f * z;
  return (x + y) + fe * NA_LN2_HI;
}

// log(1 + u) for u >= 0 (Goldberg's trick keeps relative accuracy for tiny u).
NA_HD float na_log1p_pos(float u) {
  const float w = 1.0f + u;
  const float d = w - 1.0f;
  return d == 0.0f ? u : na_log(w) * (u / d);
}

// 1/(1 + e^-x).  The clamp keeps -x in exp_clamped's range: for x > 86.6 the
// result is 1 anyway (1 - sigmoid < 2^-124), for x < -88.72 e^-x overflows to
// inf and the result is +0 (the true value is below 2^-128, subnormal).
// Max rel error 2.8e-7 where the result is normal (measured; SiLU the same).
NA_HD float na_sigmoid(float x) {
  float xc = x < -88.7228394f ? -88.7228394f : x;  // NaN passes both clamps
  xc = xc > 86.6f ? 86.6f : xc;
  return 1.0f / (1.0f + exp_clamped(-xc));
}

// tanh(x) = x P(x^2) / Q(x^2), P(0) = Q(0) = 1 (so tiny x gives exactly x),
// degree 4 / 3 in x^2: nine FMAs and one division, no exp, no branch.  Clamped
// at 7.9, where tanh(7.9) = 1 - 2.7e-7.  Max rel error 5.1e-7 (measured).
NA_HD float na_tanh(float x0) {
  const float c = 7.9f;
  float x = x0 > c ? c : x0;  // NaN passes both clamps
  x = x < -c ? -c : x;
  const float s = x * x;
  float p = -6.294245e-09f;
  p = p * s + 7.249626e-06f;
  p = p * s + 0.002708391f;
  p = p * s + 0.12724327f;
  p = p * s + 1.0f;
  float q = 0.00019826042f;
  q = q * s + 0.022901952f;
  q = q * s + 0.46057552f;
  q = q * s + 1.0f;
  return (x * p) / q;
}

// Phi(-|x|) = erfc(|x|/sqrt2)/2, the standard normal lower tail, for |x| <= 13.4,
// with relative accuracy all the way down (what makes Gelu accurate for x << 0,
// where 1 + erf(x) would cancel):
//   erfc(z)/2 = t exp(E(t) - z^2),  t = 1/(1 + z/2),  E of degree 8 (fit).
// E is evaluated at t' = t/256 with its coefficients scaled by 256^j (exact, so
// the same rounding); the 1/256 carried by t' lets the exponential's scale be
// 2^(n+7), a normal float down to Phi(-13.4) = 3e-41.  z^2 = x^2/2 enters as the
// error-free sum a + b (FMA), so the large exponent adds no rounding error.
// Max rel error 6.8e-7 (measured); Gelu 9.8e-7, reached near x = -13.14 where
// Phi itself is subnormal (elsewhere <= 7e-7).
NA_HD float na_phi_lower(float x) {
  const float ax = na_abs(x);
  const float tp = 0.00390625f / (1.0f + 0.35355339059327373f * ax);  // t/256, z = ax/sqrt2
  float e = 1.432439e+18f;
  e = e * tp - 3.9778913e+16f;
  e = e * tp + 4.1434247e+14f;
  e = e * tp - 1.9596821e+12f;
  e = e * tp + 3.673731e+09f;
  e = e * tp - 4.0000775e+06f;
  e = e * tp + 28841.498f;
  e = e * tp + 254.16524f;
  e = e * tp - 1.9583297f;
  const float hx = 0.5f * ax;
  const float a = ax * hx;              // x^2/2 rounded
  const float b = prod_err(ax, hx, a);  // ... and its rounding error
  // exp(e - a - b): n from the rounded sum, r = (-a - n ln2) + (e - b).
  const float t = (e - a) * NA_LOG2E + (NA_EXP_MAGIC + 8.0f);
  const float fn = t - (NA_EXP_MAGIC + 8.0f);
  float r = -a - fn * NA_LN2_HI;
  r = r - fn * NA_LN2_LO;
  r = r + (e - b);
  return tp * (exp2r(r) * as_float(as_uint(t) << 23));
}

// ------------------------------------------------------------- activations
// Each functor: f(x, a, b) with the activation's own attributes a, b (see the
// op table in normact_ops.h for which attribute is which), and its derivative
// df(x, a, b) as the catalogue's `derivative`/`derivative_body` define it
// (docs/math.md §2.1's f'): at a kink the one-sided value the ONNX body gives (strict
// comparisons, e.g. relu'(0) = 0), and the limits at +-inf rather than NaN.
// df feeds the calibration statistics op (sum of f'(x)^2), not the Norm kernels.
namespace act {

// sigma'(x) = e/(1 + e)^2 with e = exp(-|x|): no 1 - sigma cancellation for x >> 0.
NA_HD float sigmoid_slope(float x) {
  const float e = na_exp(-na_abs(x));
  const float d = 1.0f + e;
  return e / (d * d);
}

struct Relu {
  static NA_HD float f(float x, float, float) { return x < 0.0f ? 0.0f : x; }
  static NA_HD float df(float x, float, float) { return x > 0.0f ? 1.0f : 0.0f; }
};
struct LeakyRelu {  // also PRelu with a scalar slope
  static NA_HD float f(float x, float alpha, float) { return x < 0.0f ? alpha * x : x; }
  static NA_HD float df(float x, float alpha, float) { return x > 0.0f ? 1.0f : alpha; }
};
struct Elu {
  static NA_HD float f(float x, float alpha, float) {
    return x > 0.0f ? x : alpha * na_expm1(x);
  }
  static NA_HD float df(float x, float alpha, float) { return x > 0.0f ? 1.0f : alpha * na_exp(x); }
};
struct Selu {
  static NA_HD float f(float x, float alpha, float gamma) {
    return gamma * (x > 0.0f ? x : alpha * na_expm1(x));
  }
  static NA_HD float df(float x, float alpha, float gamma) {
    return gamma * (x > 0.0f ? 1.0f : alpha * na_exp(x));
  }
};
struct Celu {
  // max(0,x) + min(0, alpha*(exp(x/alpha)-1)): the two terms never both
  // contribute, so one select suffices (and NaN falls into the second).
  static NA_HD float f(float x, float alpha, float) {
    return x > 0.0f ? x : alpha * na_expm1(x / alpha);
  }
  static NA_HD float df(float x, float alpha, float) { return x > 0.0f ? 1.0f : na_exp(x / alpha); }
};
struct Sigmoid {
  static NA_HD float f(float x, float, float) { return na_sigmoid(x); }
  static NA_HD float df(float x, float, float) { return sigmoid_slope(x); }
};
struct HardSigmoid {
  static NA_HD float f(float x, float alpha, float beta) {
    const float v = alpha * x + beta;
    return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
  }
  static NA_HD float df(float x, float alpha, float beta) {
    const float v = alpha * x + beta;
    return (v > 0.0f && v < 1.0f) ? alpha : 0.0f;
  }
};
struct Tanh {
  static NA_HD float f(float x, float, float) { return na_tanh(x); }
  // 1 - tanh^2 = 4 sigma'(2x): relative accuracy in the tails.
  static NA_HD float df(float x, float, float) { return 4.0f * sigmoid_slope(2.0f * x); }
};
struct Softplus {
  // max(x, 0) + log1p(exp(-|x|)): never overflows, exact tail for x << 0.
  // Max rel error 3.6e-7 on [-87.3, 40] (measured).
  static NA_HD float f(float x, float, float) {
    const float r = (x < 0.0f ? 0.0f : x) + na_log1p_pos(na_exp(-na_abs(x)));
    return is_nan(x) ? x : r;
  }
  static NA_HD float df(float x, float, float) { return na_sigmoid(x); }
};
struct Softsign {
  static NA_HD float f(float x, float, float) {
    const float a = na_abs(x);
    const float r = x / (1.0f + a);
    return a == na_inf() ? copy_sign(1.0f, x) : r;
  }
  static NA_HD float df(float x, float, float) {
    const float d = 1.0f + na_abs(x);
    return 1.0f / (d * d);
  }
};
struct Silu {
  // x / (1 + e^-x) with na_sigmoid's clamp.  The numerator is x clamped below
  // too: for x < -88.72, e^-x = inf and the result is -0 (true value < 3e-37),
  // also at x = -inf, whose limit is 0 (-inf/inf would be NaN).
  static NA_HD float f(float x, float, float) {
    const float xl = x < -88.7228394f ? -88.7228394f : x;  // NaN passes both clamps
    const float xc = xl > 86.6f ? 86.6f : xl;
    return xl / (1.0f + exp_clamped(-xc));
  }
  // sigma(x) (1 + x (1 - sigma(x))) with 1 - sigma = e sigma, e = exp(-x); x
  // clamped as in f (the limits 0 at -inf and 1 at +inf instead of inf * 0).
  static NA_HD float df(float x, float, float) {
    float xc = x < -88.0f ? -88.0f : x;  // NaN passes both clamps
    xc = xc > 86.6f ? 86.6f : xc;
    const float e = exp_clamped(-xc);
    const float s = 1.0f / (1.0f + e);
    return s * (1.0f + xc * (e * s));
  }
};
struct HardSwish {
  static NA_HD float f(float x, float, float) {
    return x <= -3.0f ? 0.0f : (x >= 3.0f ? x : x * (x * (1.0f / 6.0f) + 0.5f));
  }
  // 0 | x/3 + 1/2 | 1 on x <= -3 | (-3, 3] | x > 3 (the ONNX body's one-sided values).
  static NA_HD float df(float x, float, float) {
    return x > 3.0f ? 1.0f : (x <= -3.0f ? 0.0f : x * (1.0f / 3.0f) + 0.5f);
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
  // t + x sigma(x) (1 - t^2), t = tanh(softplus(x)) = q/(q + 2), q = n(n + 2), n = e^x:
  // 1 - t^2 = 4(q + 1)/(q + 2)^2 and sigma = n/(1 + n), without cancellation.
  // Beyond x = 20 the derivative is 1 in float; below -88 it is ~0 (x e^x).
  static NA_HD float df(float x, float, float) {
    float xc = x > 20.0f ? 20.0f : x;  // NaN passes both clamps
    xc = xc < -88.0f ? -88.0f : xc;
    const float n = na_exp(xc);
    const float q = n * (n + 2.0f);
    const float d = q + 2.0f;
    const float r = q / d + xc * (n / (1.0f + n)) * (4.0f * (q + 1.0f) / (d * d));
    return x > 20.0f ? 1.0f : r;
  }
};
struct Gelu {
  // x Phi(x): x Phi(-|x|) for x < 0 (relative accuracy in the tail), x (1 - Phi(-|x|))
  // for x >= 0.  Phi is evaluated at |x| clamped to 13.4; below -13.4 the true
  // result is under 5e-40 in magnitude and is returned as -0 (also at -inf).
  static NA_HD float f(float x, float, float) {
    const float ax = na_abs(x);
    const float h = na_phi_lower(ax > 13.4f ? 13.4f : ax);  // NaN passes the clamp
    const float r = x * (x < 0.0f ? h : 1.0f - h);
    return x < -13.4f ? -0.0f : r;
  }
  // Phi(x) + x phi(x), x clamped to +-13.4 (beyond it the result is 0 or 1 in float).
  static NA_HD float df(float x, float, float) {
    float xc = x > 13.4f ? 13.4f : x;  // NaN passes both clamps
    xc = xc < -13.4f ? -13.4f : xc;
    const float h = na_phi_lower(na_abs(xc));
    const float cdf = xc < 0.0f ? h : 1.0f - h;
    return cdf + xc * (0.3989422804014327f * na_exp(-0.5f * xc * xc));
  }
};
struct GeluTanh {
  // 0.5 x (1 + tanh(u)) == x * sigmoid(2u): no cancellation for x << 0.
  static NA_HD float f(float x, float, float) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    const float r = x / (1.0f + na_exp(-2.0f * u));
    return x == -na_inf() ? 0.0f : r;
  }
  // 0.5(1 + t) + 0.5 x (1 - t^2) u', t = tanh(u), written with s = sigma(2u):
  // 0.5(1 + t) = s, 1 - t^2 = 4 s (1 - s), 1 - s = e s with e = exp(-2u).  x is
  // clamped to +-10, where the derivative is 1 or 0 in float.
  static NA_HD float df(float x, float, float) {
    float xc = x > 10.0f ? 10.0f : x;  // NaN passes both clamps
    xc = xc < -10.0f ? -10.0f : xc;
    const float x2 = xc * xc;
    const float u = 0.7978845608028654f * (xc + 0.044715f * x2 * xc);
    const float du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x2);
    const float e = na_exp(-2.0f * u);
    const float s = 1.0f / (1.0f + e);
    return s + 2.0f * xc * (s * (e * s)) * du;
  }
};
struct Clip {
  static NA_HD float f(float x, float lo, float hi) {
    return x < lo ? lo : (x > hi ? hi : x);
  }
  static NA_HD float df(float x, float lo, float hi) { return (x > lo && x < hi) ? 1.0f : 0.0f; }
};
struct Abs {
  static NA_HD float f(float x, float, float) { return na_abs(x); }
  // sign(x): 0 at 0 and NaN for NaN, as ONNX's Sign.
  static NA_HD float df(float x, float, float) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x * 0.0f); }
};

}  // namespace act

// The attributes of one node: y = scale * (f(x; a, b) - shift - slope * x).
struct Params {
  float scale, shift, slope, a, b;
};

// The normalized activation, with the affine constants folded:
//   y = scale*f + (-scale*shift) [+ (-scale*slope)*x]
// (one FMA; the products of attributes are loop-invariant).  The slope term is
// skipped when slope == 0 so that slope*x never turns an infinite x into NaN
// (0 * inf).  kSlope = 0 / 1 states that test at compile time (the CPU loops
// are instantiated for both); -1 tests p.slope per call.
template <class Act, int kSlope = -1>
NA_HD float norm_act(float x, const Params& p) {
  const float y = Act::f(x, p.a, p.b) * p.scale + (-p.scale * p.shift);
  const bool slope = kSlope < 0 ? p.slope != 0.0f : kSlope == 1;
  return slope ? (-p.scale * p.slope) * x + y : y;
}

}  // namespace normact
