"""Static activation normalization (Richemond & Guo, arXiv 1905.01369; docs/math.md §1).

A fixed transform computed once from Gaussian integrals at the design variance q:
no data needed. Every variant is ``y = scale·(f(x) − shift − slope·x)``.

``center-scale`` and ``zeta-zero`` follow the paper; ``zeta-zero-unscaled`` is the
ζ = 0 form without the variance rescale (for ReLU |x| − √(2q/π), the form the
paper's public code uses); ``ratio`` is this project's own interpolation between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from ..catalogue import Activation
from ..errors import NormactError
from ..moments import Moments, gaussian_moments
from ..outcome import Refusal

Variant = Literal["center-scale", "zeta-zero", "zeta-zero-unscaled", "ratio"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
# From measured statistics (calibrate, in situ): the unscaled form needs E f'², which the statistics do not hold.
MEASURED_VARIANTS: tuple[Variant, ...] = ("center-scale", "zeta-zero", "ratio")


@dataclass(frozen=True)
class Affine:
    """The three numbers (or per-channel arrays) that normalize one site."""

    scale: Any
    shift: Any
    slope: Any = 0.0

    @property
    def is_scalar(self) -> bool:
        return all(np.ndim(v) == 0 for v in (self.scale, self.shift, self.slope))

    def as_dict(self) -> dict[str, Any]:
        conv = lambda v: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()  # noqa: E731
        return {"scale": conv(self.scale), "shift": conv(self.shift), "slope": conv(self.slope)}


def affine_from_moments(m: Moments, variant: str = "center-scale", ratio: float | None = None) -> Affine:
    """The normalizing affine of a variant, given the Gaussian moments at q = ``m.q``."""
    q, b, v = m.q, m.b, m.v
    if variant == "center-scale":
        if not v > 0:
            raise NormactError("activation has zero variance at this q; center-scale is undefined")
        return Affine(1.0 / math.sqrt(v), m.m1, 0.0)
    residual = v - q * b * b  # variance left after removing the linear part (Poincaré: ≥ 0)
    if variant == "zeta-zero-unscaled":
        return _unit_gain_zeta_zero(m)
    if variant == "zeta-zero":
        ratio = 0.0
    elif variant != "ratio":
        raise NormactError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if ratio is None:
        raise NormactError("variant 'ratio' needs --ratio r")
    r_max = q * b * b / v if v > 0 else 0.0
    if not 0.0 <= ratio <= r_max + 1e-12:
        raise NormactError(f"ratio must lie in [0, {r_max:.6g}] (= q·b²/v) for this activation, got {ratio}")
    if not residual > 1e-12 * max(v, 1e-300):
        raise NormactError("activation is affine at this q (v = q·b²); zeta-zero/ratio variants are undefined")
    if ratio >= r_max:  # the top end of the range is center-scale exactly
        return Affine(1.0 / math.sqrt(v), m.m1, 0.0)
    scale = math.sqrt((1.0 - ratio) / residual)
    slope = b - math.copysign(math.sqrt(ratio * residual / ((1.0 - ratio) * q)), b) if ratio else b
    return Affine(scale, m.m1, slope)


def _unit_gain_zeta_zero(m: Moments) -> Affine:
    """ζ = 0 without the variance rescale (docs/math.md §1.3.1): s·(f − E f − b·x), s = 1/√(E f'² − b²).

    The only factor left makes the derivative's second moment one, E(s·(f' − b))² = 1, so
    the backward gain at σ_w² = 1 is exactly 1 at the design q; the forward variance
    s²·(v − q·b²) is then at most q (Gaussian Poincaré), and the variance map contracts.
    For ReLU s = 2: y = |x| − √(2q/π).
    """
    spread = m.d2 - m.b * m.b  # Var f'(x) under the Gaussian; zero only when f' is constant (f affine)
    if not spread > 1e-12 * max(m.d2, 1e-300):
        raise NormactError("activation is affine at this q (f' constant); zeta-zero-unscaled is undefined")
    return Affine(1.0 / math.sqrt(spread), m.m1, m.b)


def static_affine(
    act: Activation,
    params: dict[str, Any] | None = None,
    q: float = 1.0,
    variant: str = "center-scale",
    ratio: float | None = None,
) -> Affine:
    """Static normalization of ``act`` at design variance ``q``.

    Per-channel parameters (a PRelu slope tensor) give per-channel constants of the
    same shape, one Gaussian integral per distinct value.
    """
    params = act.with_defaults(params)
    tensors = {k: np.asarray(v) for k, v in params.items() if np.ndim(v) > 0}
    if not tensors:
        return affine_from_moments(gaussian_moments(act, q, params), variant, ratio)
    (name, values), *rest = tensors.items()
    if rest:
        raise NormactError(f"{act.kind}: more than one per-channel parameter is not supported")
    parts = [
        affine_from_moments(gaussian_moments(act, q, {**params, name: float(v)}), variant, ratio)
        for v in values.ravel()
    ]
    shape = values.shape
    stack = lambda attr: np.array([getattr(p, attr) for p in parts]).reshape(shape)  # noqa: E731
    return Affine(stack("scale"), stack("shift"), stack("slope"))


def measured_affine(
    f_mean: np.ndarray,
    f_var: np.ndarray,
    x_mean: np.ndarray,
    x_var: np.ndarray,
    cov: np.ndarray | None,
    variant: str = "center-scale",
    ratio: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | Refusal:
    """Static normalization from a site's *measured* moments (docs/math.md §4.3), per channel, or why not.

    Real pre-activations are neither centred nor Gaussian, so the constants come from
    the data itself: center-scale uses the measured mean and variance of f; the variants
    with a linear term use the regression slope Cov(x, f)/Var x (under a Gaussian this is
    E f′, by Stein's lemma), so that on the calibration data E f̃ = 0 and E f̃² = 1 hold
    exactly, and f̃ is uncorrelated with x for zeta-zero. A ratio above a channel's
    r_max = q·b²/v gives center-scale there (where the family ends).
    Returns (scale, shift, slope) arrays.
    """
    if variant not in MEASURED_VARIANTS:
        if variant in VARIANTS:
            return Refusal(
                f"variant {variant} needs E f'², which measured statistics do not hold: use the Gaussian constants"
            )
        raise NormactError(f"unknown variant {variant!r}; choose one of {', '.join(MEASURED_VARIANTS)}")
    m1, v, mx, q = (np.asarray(a, dtype=np.float64) for a in (f_mean, f_var, x_mean, x_var))
    if variant == "center-scale":
        if not np.all(v > 0):
            return Refusal("the activation's output is constant on the calibration data (Var f = 0)")
        return 1.0 / np.sqrt(v), m1, np.zeros_like(m1)
    if cov is None:
        return Refusal(f"these statistics hold no x·f co-moment: calibrate with --method static --variant {variant}")
    if not np.all(q > 0):
        return Refusal("the pre-activation is constant on the calibration data (var x = 0)")
    b = np.asarray(cov, dtype=np.float64) / q
    linear = b * b * q
    resid = v - linear
    if not np.all(resid > 1e-12 * np.maximum(v, 1e-300)):
        return Refusal("the activation is affine on the calibration data; zeta-zero/ratio variants are undefined")
    r = np.zeros_like(v) if variant == "zeta-zero" else np.minimum(float(ratio or 0.0), linear / v)
    keep = 1.0 - r
    slope = b - np.sign(b) * np.sqrt(r * resid / (keep * q))
    return np.sqrt(keep / resid), m1 - slope * mx, slope
