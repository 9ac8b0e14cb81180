// normact_activations.h -- the activation functors (f and its derivative df) and
// the normalized activation norm_act that every Norm<Act> kernel computes.
//
//  * NaN must propagate: never use fmaxf/fminf for ReLU-like kinks
//    (fmaxf(NaN, 0) == 0).  Comparisons are written so that a NaN input falls
//    through to a branch that carries it (`x < 0 ? 0 : x`).
//  * +-Inf follow the limits of the math (silu(-inf) = 0, softsign(inf) = 1,
//    gelu(-inf) = 0, ...), not the NaN that a naive `inf * 0` would produce.
//  * Everything is computed in float32 (normact_approx.h).
#pragma once

#include "normact_approx.h"
#include "normact_op_table.h"

namespace normact {

// ------------------------------------------------------------- activations
// Each functor: f(x, a, b) with the activation's own attributes a, b: the
// catalogue entry's params in order (normact_op_table.h, generated from it), and its derivative
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
struct LeakyRelu {
  static NA_HD float f(float x, float alpha, float) { return x < 0.0f ? alpha * x : x; }
  static NA_HD float df(float x, float alpha, float) { return x > 0.0f ? 1.0f : alpha; }
};
using PRelu = LeakyRelu;  // PRelu with a scalar slope: the same math
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
    return cdf + xc * (NORMACT_INV_SQRT_2PI * na_exp(-0.5f * xc * xc));
  }
};
struct GeluTanh {
  // 0.5 x (1 + tanh(u)) == x * sigmoid(2u): no cancellation for x << 0.
  static NA_HD float f(float x, float, float) {
    const float u = NORMACT_SQRT_2_OVER_PI * (x + NORMACT_GELU_CUBIC * x * x * x);
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
    const float u = NORMACT_SQRT_2_OVER_PI * (xc + NORMACT_GELU_CUBIC * x2 * xc);
    const float du = NORMACT_SQRT_2_OVER_PI * (1.0f + 3.0f * NORMACT_GELU_CUBIC * x2);
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
