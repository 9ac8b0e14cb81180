// normact_ort_f.h -- f(x) as ONNX Runtime's CPU kernels compute it, for the
// calibration statistics op when it is given x alone (its F input absent).
//
// Why: a custom op sees NCHW tensors while ORT runs convolutions in NCHWc, so
// reading the activation's output f costs ORT a full-tensor reorder per site.
// Computing f from x inside the statistics op avoids that, but the statistics
// must stay those of ORT's own f, bit for bit.  So OrtF<Act>::f repeats the
// arithmetic of ORT's kernel for that activation where it is known (kExact),
// and is the library's own f elsewhere (the Python side then keeps reading f).
//
// SiLU.  ORT's optimizer fuses x * Sigmoid(x) into com.microsoft.QuickGelu
// (alpha = 1): MLAS's logistic, then one float multiply by x.  On x86-64 with
// FMA3 the logistic is the rational function of Eigen's float logistic:
//   v = x clamped to [-18, 18]      (maxps/minps with the bound first: NaN passes)
//   p = v * P(v^2),  q = Q(v^2)     (Horner, one fused multiply-add per step)
//   s = p / q + 0.5, clamped to [0, 1]
// with P's and Q's float coefficients below.  Each Horner step must be a fused
// multiply-add (one rounding) and nothing else may be contracted, hence the
// explicit fmaf and this header's use only in files built with FMA (the
// generic build calls the exact library fmaf: slower, same bits).
// The result was compared with onnxruntime 1.32's QuickGelu on 8M random bit
// patterns, 8M evenly spaced values in [-25, 25] and every float with
// 16 <= |x| < 20 (where s rounds above 1 before the clamp): all equal.  The
// Python side checks it again against the installed ORT at instrumentation
// time (calibration/ort_f.py) and reads f when they differ.
//
// Sigmoid: the same logistic without the upper clamp (ORT's Sigmoid op returns
// 1.0000001 where QuickGelu returns 1).
//
// HardSigmoid, HardSwish: ORT rounds alpha * x and then adds beta (no fused
// multiply-add): max(0, min(1, alpha x + beta)) and x * max(0, min(1, x/6 + 1/2)).
// The product is formed as fmaf(alpha, x, +0), one rounding of alpha * x that
// the compiler's contraction (-ffp-contract=fast with FMA) cannot fuse into the
// following add (it is no multiply; + 0 cannot be dropped without
// -fno-signed-zeros): the same two roundings.  Compared with onnxruntime 1.32 on 5M
// values: equal.
//
// Relu, LeakyRelu: a compare and a select (and alpha * x in float), the same
// values as ORT's kernels (the sign of a zero may differ; the statistics,
// sums of values, cannot see it).
#pragma once

#include "normact_activations.h"

namespace normact {
namespace ortf {

template <class Act>
struct OrtF {
  static constexpr bool kExact = false;
  static inline float f(float x, float a, float b) { return Act::f(x, a, b); }
};

// MLAS's logistic (Eigen's rational approximation) with FMA3 Horner steps.
inline float mlas_logistic_unclamped(float x) {
  float v = -18.0f > x ? -18.0f : x;  // x86 max/min return the second operand on NaN
  v = 18.0f < v ? 18.0f : v;
  const float v2 = v * v;
  float p = __builtin_fmaf(v2, 4.37031012579801e-11f, 1.15627324459942e-07f);
  p = __builtin_fmaf(p, v2, 6.08574864600143e-05f);
  p = __builtin_fmaf(p, v2, 8.51377133304701e-03f);
  p = __builtin_fmaf(p, v2, 2.48287947061529e-01f);
  float q = __builtin_fmaf(v2, 6.10247389755681e-13f, 5.76102136993427e-09f);
  q = __builtin_fmaf(q, v2, 6.29106785017040e-06f);
  q = __builtin_fmaf(q, v2, 1.70198817374094e-03f);
  q = __builtin_fmaf(q, v2, 1.16817656904453e-01f);
  q = __builtin_fmaf(q, v2, 9.93151921023180e-01f);
  const float r = (v * p) / q + 0.5f;
  return 0.0f > r ? 0.0f : r;  // maxps(0, r): NaN passes
}

inline float mlas_logistic(float x) {
  const float r = mlas_logistic_unclamped(x);
  return 1.0f < r ? 1.0f : r;
}

// round(a * x) then + b, never fused (see above).
inline float mul_then_add(float a, float x, float b) { return __builtin_fmaf(a, x, 0.0f) + b; }

// v clamped to [0, 1], the upper bound first, NaN passing both (as ORT's).
inline float unit_clamp(float v) {
  const float hi = 1.0f < v ? 1.0f : v;
  return 0.0f > hi ? 0.0f : hi;
}

template <>
struct OrtF<act::Silu> {
  static constexpr bool kExact = true;
  static inline float f(float x, float, float) { return x * mlas_logistic(x); }
};

template <>
struct OrtF<act::Sigmoid> {
  static constexpr bool kExact = true;
  static inline float f(float x, float, float) { return mlas_logistic_unclamped(x); }
};

template <>
struct OrtF<act::HardSigmoid> {
  static constexpr bool kExact = true;
  static inline float f(float x, float alpha, float beta) { return unit_clamp(mul_then_add(alpha, x, beta)); }
};

template <>
struct OrtF<act::HardSwish> {
  static constexpr bool kExact = true;
  static inline float f(float x, float, float) { return x * unit_clamp(mul_then_add(1.0f / 6.0f, x, 0.5f)); }
};

template <>
struct OrtF<act::Relu> {
  static constexpr bool kExact = true;
  static inline float f(float x, float a, float b) { return act::Relu::f(x, a, b); }
};

template <>
struct OrtF<act::LeakyRelu> {
  static constexpr bool kExact = true;
  static inline float f(float x, float a, float b) { return act::LeakyRelu::f(x, a, b); }
};

}  // namespace ortf
}  // namespace normact
