// normact_approx.h -- the elementary functions the activations are built from:
// exp, expm1, log, log1p, sigmoid, tanh and the normal lower tail Phi(-|x|).
//
// Why our own approximations instead of libm: range reduction + polynomial /
// rational approximations are straight-line arithmetic plus selects, so
// GCC/Clang auto-vectorize the CPU loops (libm calls would block vectorization
// without -ffast-math, and -ffast-math would break NaN/Inf semantics), and the
// GPU gets the same results as the CPU.  exp, log, tanh and Phi use our own
// minimax fits (runtime_ops/tools/fit_approx.py), sized for a max relative
// error of a few 1e-7 -- measured over every float of the range by
// runtime_ops/tools/measure_error.cc, and quoted at each function.  The tests
// check the kernels against numpy in float64.
#pragma once

#include "normact_bits.h"

namespace normact {

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

}  // namespace normact
