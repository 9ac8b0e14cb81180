"""Gaussian moments of an activation (docs/math.md §1.6), by closed form or piecewise quadrature.

For ``x ~ N(0, q)``: ``m1 = E f``, ``m2 = E f²``, ``v = m2 − m1²``, ``b = E f'``,
``d2 = E f'²``. Gauss–Hermite is exact for smooth f but only ~1e-3 for kinked f,
so integrals are Gauss–Legendre on pieces split at the entry's kinks, over ±12√q
(the Gaussian tail beyond is below 1e-32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .catalogue import CATALOGUE, Activation

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(48)
_SPAN = 12.0


@dataclass(frozen=True)
class Moments:
    """Gaussian moments of f at design variance q."""

    m1: float
    m2: float
    b: float
    d2: float
    q: float

    @property
    def v(self) -> float:
        return self.m2 - self.m1 * self.m1

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "v": self.v}


def _breakpoints(kinks: tuple[float, ...], q: float) -> np.ndarray:
    """Interval ends: ±12√q, the kinks inside, and a grid of width ≤ √q/2 so every piece is smooth and short."""
    s = math.sqrt(q)
    grid = np.linspace(-_SPAN * s, _SPAN * s, int(4 * _SPAN) + 1)
    inside = [k for k in kinks if -_SPAN * s < k < _SPAN * s]
    return np.unique(np.concatenate([grid, np.asarray(inside, dtype=np.float64)]))


def gaussian_expectations(funcs: list[Any], q: float, kinks: tuple[float, ...] = ()) -> list[float]:
    """E g(x) for each g in ``funcs`` with x ~ N(0, q), by piecewise Gauss–Legendre."""
    ends = _breakpoints(kinks, q)
    a, b = ends[:-1, None], ends[1:, None]
    x = (0.5 * (b - a) * _NODES + 0.5 * (b + a)).ravel()
    w = (0.5 * (b - a) * _WEIGHTS).ravel() * np.exp(-0.5 * x * x / q) / math.sqrt(2.0 * math.pi * q)
    return [float(np.dot(w, g(x))) for g in funcs]


def _scalar_params(params: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, float(v)) for k, v in params.items()))


@lru_cache(maxsize=4096)
def _moments_cached(kind: str, q: float, params: tuple[tuple[str, float], ...]) -> Moments:
    act = CATALOGUE[kind]
    p = dict(params)
    if act.closed_moments is not None:
        closed = act.closed_moments(q, p)
        if closed is not None:
            return Moments(*closed, q=q)
    if act.homogeneous and q != 1.0:  # m1 ∝ √q, m2 ∝ q, b and d2 fixed
        base = _moments_cached(kind, 1.0, params)
        return Moments(base.m1 * math.sqrt(q), base.m2 * q, base.b, base.d2, q)
    f = lambda x: act.forward(x, **p)  # noqa: E731
    df = lambda x: act.derivative(x, **p)  # noqa: E731
    m1, m2, b, d2 = gaussian_expectations([f, lambda x: f(x) ** 2, df, lambda x: df(x) ** 2], q, tuple(act.kinks(p)))
    return Moments(m1, m2, b, d2, q)


def gaussian_moments(act: Activation, q: float = 1.0, params: dict[str, Any] | None = None) -> Moments:
    """Moments of ``act`` (with ``params``) for x ~ N(0, q); cached per (kind, q, params)."""
    if not q > 0 or not math.isfinite(q):
        raise ValueError(f"design variance q must be positive and finite, got {q}")
    return _moments_cached(act.kind, float(q), _scalar_params(act.with_defaults(params)))
