"""Derive the polynomial / rational coefficients of runtime_ops/include/normact_approx.h.

    /work/venv/bin/python runtime_ops/tools/fit_approx.py          # prints the C constants

Every fit is a discrete minimax (Chebyshev) fit on a dense grid, solved as a
linear program (scipy's HiGHS); rational fits use Loeb's iteration (the
denominator of the previous iterate linearizes the relative error).  The error
printed here is that of the float64 evaluation of the float32-rounded
coefficients; the error of the float32 code is measured by measure_error.cc.

Fits:

* exp:  2·e^r ≈ 2 + 2r + r²·(c2 + c3 r + c4 r² + c5 r³) on |r| ≤ 0.35 (covers the
  Cody–Waite reduced argument |r| ≤ ln2/2 with room for the split argument of
  Gelu), minimizing the relative error.  The factor 2 lets the caller scale by
  2^(n-1), whose exponent field is normal for n ∈ [-125, 128].
* tanh: tanh(x) ≈ x·P(x²)/Q(x²), P(0) = Q(0) = 1, on 0 ≤ x ≤ TANH_CLAMP (beyond
  it the code returns ±R(TANH_CLAMP), within 2·e^(-2·clamp) of ±1), relative error.
* erfc: ½·erfc(z) ≈ t·exp(E(t) − z²), t = 1/(1 + k·z), on 0 ≤ z ≤ 9.6 (erfc(9.6)
  is far below FLT_MIN), minimizing the absolute error of E, i.e. the relative
  error of erfc.  Gelu uses it as Φ(−|x|) with z = |x|/√2, evaluating E at
  t' = 2⁻⁸·t (so the coefficients are printed scaled by 2^(8j), exactly: the
  float evaluation rounds identically) -- the 2⁻⁸ carried by t' lets exp's
  2^(n-1+8) scale stay a normal float down to Φ(−13.4) ≈ 3e-41.
* log:  log(1+x) ≈ x − x²/2 + x³·P(x) on √½ − 1 ≤ x ≤ √2 − 1 (the mantissa
  m = 1 + x after moving it into [√½, √2)), relative error.  The target
  (log(1+x) − x + x²/2)/x³ is computed in mpmath: in float64 it would cancel
  near x = 0.  The relative-error weights are scaled by LOG_WEIGHT_SCALE so the
  bound the LP minimizes is O(1e-2), far above HiGHS' feasibility tolerance
  (1e-7, absolute), which would otherwise swamp an error of a few 1e-8.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
from scipy.optimize import linprog

mpmath.mp.dps = 40

TANH_CLAMP = 7.90
TANH_DEGREES = (4, 3)  # (deg P, deg Q) in x²
EXP_DEGREE = 5
ERFC_K = 0.5
ERFC_DEGREE = 8
ERFC_ZMAX = 9.6
LOG_DEGREE = 6  # deg P; 5 gives 2.6e-7 before any float32 rounding
LOG_WEIGHT_SCALE = 1e6


def minimax_linear(basis: np.ndarray, target: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, float]:
    """min_c max_i weight_i·|target_i − Σ_j c_j basis_ij|  (LP in c and the bound e)."""
    n, m = basis.shape
    wb = basis * weight[:, None]
    wt = target * weight
    # variables [c_0..c_{m-1}, e]; minimize e;  ±(wt − wb·c) ≤ e
    a_ub = np.block([[-wb, -np.ones((n, 1))], [wb, -np.ones((n, 1))]])
    b_ub = np.concatenate([-wt, wt])
    cost = np.zeros(m + 1)
    cost[-1] = 1.0
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * (m + 1), method="highs")
    if not res.success:
        raise RuntimeError(res.message)
    return res.x[:m], res.x[-1]


def f32(c: np.ndarray) -> np.ndarray:
    return np.asarray(c, dtype=np.float32).astype(np.float64)


def fmt(c: float) -> str:
    return f"{np.float32(c)!r}".replace("np.float32(", "").rstrip(")") + "f"


def fit_exp() -> tuple[np.ndarray, float]:
    r = np.cos(np.linspace(0, np.pi, 4001)) * 0.35  # Chebyshev-spaced nodes
    r = r[np.abs(r) > 1e-9]
    # 2e^r − 2 − 2r = r²·Q(r):  relative error |r²(Q_true − Q)| / (2e^r)
    em = np.array([float(2 * (mpmath.exp(v) - 1 - v)) for v in r])
    basis = np.stack([r ** (2 + j) for j in range(EXP_DEGREE - 1)], axis=1)
    c, _ = minimax_linear(basis, em, 1.0 / (2 * np.exp(r)))
    c = f32(c)
    dense = np.linspace(-0.35, 0.35, 200001)
    approx = 2 + 2 * dense + sum(c[j] * dense ** (2 + j) for j in range(len(c)))
    true = np.array([float(2 * mpmath.exp(v)) for v in dense[::50]])
    err = np.max(np.abs(approx[::50] / true - 1))
    return c, err


def fit_tanh() -> tuple[np.ndarray, np.ndarray, float]:
    dp, dq = TANH_DEGREES
    x = np.cos(np.linspace(0, np.pi / 2, 6001)) * TANH_CLAMP
    x = x[x > 1e-6]
    s = x * x
    t = np.array([float(mpmath.tanh(v)) for v in x])
    g = t / x  # tanh(x)/x ≈ P(s)/Q(s)
    q_prev = np.ones_like(s)
    for _ in range(30):
        # (P − g·Q)/(g·Q_prev) with P = 1 + Σ p_j s^j, Q = 1 + Σ q_j s^j:
        # target g − 1, basis [s^j (P part), −g·s^j (Q part)]
        basis = np.concatenate(
            [np.stack([s**j for j in range(1, dp + 1)], 1), np.stack([-g * s**j for j in range(1, dq + 1)], 1)], 1
        )
        c, _ = minimax_linear(basis, g - 1.0, 1.0 / (g * q_prev))
        p = np.concatenate([[1.0], c[:dp]])
        q = np.concatenate([[1.0], c[dp:]])
        q_new = np.polyval(q[::-1], s)
        if np.max(np.abs(q_new / q_prev - 1)) < 1e-12:
            break
        q_prev = q_new
    p, q = f32(p), f32(q)
    xd = np.linspace(1e-6, TANH_CLAMP, 200001)
    rd = xd * np.polyval(p[::-1], xd * xd) / np.polyval(q[::-1], xd * xd)
    err = max(np.max(np.abs(rd / np.tanh(xd) - 1)), 2 * math.exp(-2 * TANH_CLAMP))
    return p, q, err


def fit_erfc() -> tuple[np.ndarray, float]:
    z = (1 - np.cos(np.linspace(0, np.pi, 8001))) / 2 * ERFC_ZMAX
    t = 1.0 / (1.0 + ERFC_K * z)
    e = np.array([float(mpmath.log(mpmath.erfc(zz) / 2 / tt) + mpmath.mpf(zz) ** 2) for zz, tt in zip(z, t)])
    basis = np.stack([t**j for j in range(ERFC_DEGREE + 1)], 1)
    c, _ = minimax_linear(basis, e, np.ones_like(z))
    c = f32(c)
    zd = np.linspace(0, ERFC_ZMAX, 20001)
    td = 1.0 / (1.0 + ERFC_K * zd)
    ed = np.array([float(mpmath.log(mpmath.erfc(zz) / 2 / tt) + mpmath.mpf(zz) ** 2) for zz, tt in zip(zd, td)])
    err = np.max(np.abs(np.expm1(np.polyval(c[::-1], td) - ed)))
    return c, err


def fit_log() -> tuple[np.ndarray, float]:
    lo, hi = math.sqrt(0.5) - 1, math.sqrt(2) - 1
    x = (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.linspace(0, np.pi, 4001))  # Chebyshev nodes
    x = x[np.abs(x) > 1e-9]
    mx = [mpmath.mpf(v) for v in x]
    lg = np.array([float(mpmath.log1p(v)) for v in mx])
    g = np.array([float((mpmath.log1p(v) - v + v**2 / 2) / v**3) for v in mx])
    basis = np.stack([x**j for j in range(LOG_DEGREE + 1)], axis=1)
    # relative error |x³(g − P)| / |log(1+x)|
    c, _ = minimax_linear(basis, g, LOG_WEIGHT_SCALE * np.abs(x**3 / lg))
    c = f32(c)
    xd = np.linspace(lo, hi, 100001)
    xd = xd[np.abs(xd) > 1e-9]
    ld = np.array([float(mpmath.log1p(v)) for v in xd])
    err = np.max(np.abs((xd - xd * xd / 2 + xd**3 * np.polyval(c[::-1], xd)) / ld - 1))
    return c, err


def main() -> None:
    c, err = fit_exp()
    print(f"// exp: 2e^r ≈ 2 + 2r + r²(c2 + c3 r + ...), |r| ≤ 0.35, max rel err {err:.2e} (float64 eval)")
    for j, v in enumerate(c):
        print(f"  c{j + 2} = {fmt(v)}")
    p, q, err = fit_tanh()
    print(f"// tanh: x·P(x²)/Q(x²) on [0, {TANH_CLAMP}], degrees {TANH_DEGREES}, max rel err {err:.2e}")
    print("  P:", ", ".join(fmt(v) for v in p))
    print("  Q:", ", ".join(fmt(v) for v in q))
    c, err = fit_erfc()
    print(
        f"// ½erfc: t·exp(E(t) − z²), t = 1/(1 + {ERFC_K} z), z ≤ {ERFC_ZMAX}, "
        f"degree {ERFC_DEGREE}, max rel err {err:.2e}"
    )
    print("  E:", ", ".join(fmt(v) for v in c))
    print("  E(2^8 t') coefficients c_j·2^(8j):", ", ".join(fmt(v * 2.0 ** (8 * j)) for j, v in enumerate(c)))
    c, err = fit_log()
    print(f"// log: log(1+x) ≈ x − x²/2 + x³·P(x), √½−1 ≤ x ≤ √2−1, degree {LOG_DEGREE}, max rel err {err:.2e}")
    print("  P:", ", ".join(fmt(v) for v in c))


if __name__ == "__main__":
    main()
