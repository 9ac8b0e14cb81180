"""ANAct: adaptive normalization from measured statistics (Yuan et al., arXiv 2208.13315; docs/math.md §2).

From a site's statistics:

    ρ  = E f(X)² / var X   (``centered``: Var f(X) / var X)     forward gain
    ρ' = E f'(X)²                                              backward gain
    μ  = E f(X)
    λ  = √((ρ + ρ') / (2ρρ'))       (rule "xavier": √(2 / (ρ + ρ')))

and the site becomes ``λ·(f(x) − μ)`` (the learnable α starts at 0, so 0.3·tanh α
adds nothing at calibration time). ``aggregate="mean"`` uses the exact moments
over all batches; ``"ema"`` the paper's gated running values (order-dependent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from ..errors import NormactError
from ..outcome import Refusal
from .static import Affine

LambdaRule = Literal["anact", "xavier"]
Aggregate = Literal["ema", "mean"]  # gated running values (the paper's) or exact moments over all batches
LAMBDA_RULES: tuple[LambdaRule, ...] = get_args(LambdaRule)
AGGREGATES: tuple[Aggregate, ...] = get_args(Aggregate)


@dataclass
class Factors:
    """ANAct's numbers for one site (arrays of one entry per channel, or of one entry)."""

    rho: np.ndarray
    drho: np.ndarray
    mu: np.ndarray
    lam: np.ndarray
    q: np.ndarray  # measured variance of the pre-activation
    var_f: np.ndarray  # Var f(X), for the gains after normalization

    @property
    def rho_after(self) -> np.ndarray:
        """Forward gain of λ·(f − μ) at the same inputs: λ²·Var f / var X."""
        return self.lam**2 * self.var_f / self.q

    @property
    def drho_after(self) -> np.ndarray:
        """Backward gain of λ·(f − μ): λ²·E f'²."""
        return self.lam**2 * self.drho

    def as_dict(self) -> dict[str, Any]:
        conv = lambda v: float(v[0]) if v.size == 1 else v.tolist()  # noqa: E731
        return {k: conv(getattr(self, k)) for k in ("rho", "drho", "mu", "lam", "q")}


def lambda_of(rho: np.ndarray, drho: np.ndarray, rule: str = "anact") -> np.ndarray:
    """λ from the two gains: the harmonic-style compromise of ANAct, or Xavier's 2/(fan-in + fan-out)."""
    check_lambda_rule(rule)
    with np.errstate(divide="ignore", invalid="ignore"):
        if rule == "anact":
            return np.sqrt((rho + drho) / (2.0 * rho * drho))
        return np.sqrt(2.0 / (rho + drho))


def check_lambda_rule(rule: str) -> None:
    """The one check of a λ rule's name (every door to the factors goes through it)."""
    if rule not in LAMBDA_RULES:
        raise NormactError(f"unknown --lambda-rule {rule!r}; choose one of {', '.join(LAMBDA_RULES)}")


def check_options(lambda_rule: str, aggregate: str) -> None:
    """ANAct's factor options: the λ rule, then the aggregate (an unknown one is refused here, so no caller
    needs a check of its own after this one)."""
    check_lambda_rule(lambda_rule)
    if aggregate not in AGGREGATES:
        raise NormactError(f"unknown --aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")


def site_factors(
    s: Any, lambda_rule: str = "anact", centered: bool = False, aggregate: str = "ema"
) -> Factors | Refusal:
    """ANAct's factors of one :class:`~normact_onnx.calibration.stats.SiteStats`, or why there are none."""
    check_options(lambda_rule, aggregate)
    if not np.all(s.x.n > 0):
        return Refusal("no data reached this site")
    q, var_f = s.x.var, s.f.var
    if aggregate == "ema" and s.ema is not None:
        rho = s.ema.rho_centered if centered else s.ema.rho
        drho, mu = s.ema.drho, s.ema.mu
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = (var_f if centered else s.f.mean_square) / q
        drho, mu = s.d2, s.f.mean
    lam = lambda_of(rho, drho, lambda_rule)
    bad = ~(np.isfinite(lam) & (lam > 0))
    if np.all(bad):
        if not np.any(q > 0):
            return Refusal("the pre-activation is constant on the calibration data (var x = 0)")
        if not np.any(drho > 0):
            return Refusal("the activation is flat on the calibration data (f'(x) = 0 everywhere: a dead unit)")
        return Refusal("the gains are not finite on the calibration data")
    if np.any(bad):  # dead channels keep their scale; the others are normalized
        lam = np.where(bad, 1.0, lam)
    return Factors(rho, drho, mu, lam, q, var_f)


def anact_affine(s: Any, factors: Factors) -> Affine:
    """The site's ``scale·(f − shift)`` constants, shaped to broadcast against the pre-activation."""
    if s.channel_axis is None:
        return Affine(float(factors.lam[0]), float(factors.mu[0]), 0.0)
    shape = [factors.lam.size if d == -1 else d for d in s.channel_shape]
    return Affine(factors.lam.reshape(shape), factors.mu.reshape(shape), 0.0)
