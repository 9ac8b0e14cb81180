"""Statistics kept batch by batch: exact mergeable moments, and ANAct's gated running rule (docs/math.md §2.4, §4).

:class:`Moments` holds the count, mean and centred sum of squares (M2) of a quantity, per channel, and
combines two parts with Chan, Golub & LeVeque's pairwise update

    n = na + nb,  δ = mb − ma,  mean = ma + δ·nb/n,  M2 = M2a + M2b + δ²·na·nb/n

which is exact in real arithmetic and stable in floating point (no E[x²] − E[x]² cancellation). Calibration,
``compare --sites`` and the Ray runs all accumulate with it.

The gated running rule (:func:`gated`): a new value enters a running one only within ``GATE`` times it, blended
with ``MOMENTUM``; calibration's EMA and the fine-tuning loop's running statistics both apply it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MOMENTUM = 0.9
GATE = (0.8, 1.2)


@dataclass
class Moments:
    """Count, mean and centred sum of squares of one quantity (arrays: one entry per channel)."""

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> Moments:
        z = np.zeros(channels)
        return cls(z.copy(), z.copy(), z.copy())

    @classmethod
    def of(cls, values: Any) -> Moments:
        """One channel: the moments of every finite element of ``values`` (NaN and Inf left out)."""
        x = np.asarray(values, dtype=np.float64)
        x = x[np.isfinite(x)]
        if not x.size:
            return cls.empty(1)
        mean = float(x.mean())
        return cls(np.array([float(x.size)]), np.array([mean]), np.array([float(np.square(x - mean).sum())]))

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s pairwise combination; empty sides (n = 0) drop out exactly."""
        n = self.n + other.n
        safe = np.where(n > 0, n, 1.0)
        delta = other.mean - self.mean
        mean = np.where(n > 0, self.mean + delta * (other.n / safe), 0.0)
        m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / safe)
        return Moments(n, mean, np.where(n > 0, m2, 0.0))

    @property
    def var(self) -> np.ndarray:
        """Population variance M2/n (what ANAct's var(X) and the design variance q mean)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.m2 / np.where(self.n > 0, self.n, 1.0), np.nan)

    @property
    def mean_square(self) -> np.ndarray:
        return self.var + self.mean * self.mean

    def pooled(self) -> Moments:
        """All channels as one population (a scalar q for static normalization from per-channel stats)."""
        out = Moments.empty(1)
        for c in range(self.n.size):
            out = out.merge(Moments(self.n[c : c + 1], self.mean[c : c + 1], self.m2[c : c + 1]))
        return out

    def as_dict(self) -> dict[str, list[float]]:
        return {"n": self.n.tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Moments:
        return cls(*(np.asarray(d[k], dtype=np.float64) for k in ("n", "mean", "m2")))


def merge_cross(xa: Moments, fa: Moments, ca: np.ndarray, xb: Moments, fb: Moments, cb: np.ndarray) -> np.ndarray:
    """Chan's update for the co-moment C = Σ (x − mean x)(f − mean f) of two parts: C_a + C_b + δx·δf·n_a·n_b/n."""
    n = xa.n + xb.n
    safe = np.where(n > 0, n, 1.0)
    return ca + cb + (xb.mean - xa.mean) * (fb.mean - fa.mean) * (xa.n * xb.n / safe)


def mean_merge(n_a: np.ndarray, a: np.ndarray, n_b: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Count-weighted mean of two means (E f'² needs no centring: it is a mean of squares)."""
    n = n_a + n_b
    return np.where(n > 0, a + (b - a) * (n_b / np.where(n > 0, n, 1.0)), 0.0)


# ---- the gated running rule --------------------------------------------------------------------------------------


def accepted(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Where a batch's value may enter the running one: finite and within ``GATE`` times it."""
    lo, hi = GATE
    return np.isfinite(new) & (new >= lo * old) & (new <= hi * old)


def blend(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The momentum update, without the gate (what μ = E f gets)."""
    return MOMENTUM * old + (1 - MOMENTUM) * new


def gated(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The running value after one batch: blended where the new value is accepted, else unchanged."""
    return np.where(accepted(old, new), blend(old, new), old)
