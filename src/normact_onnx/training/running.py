"""ANAct's running statistics and the gated update rule (docs/math.md §2.4), in numpy, for the host loop.

Per site the training graph returns ``[mean f, mean f², mean f'², mean x, var x]``
for the batch. From those:

    ρ  = mean f² / var x      (``centered``: (mean f² − (mean f)²) / var x)
    ρ' = mean f'²
    μ  = mean f

The first observed batch sets ρ, ρ', μ (unless the site started primed from an
earlier normalization's constants, see :meth:`RunningStats.start`). After that a batch's ρ (and, separately,
its ρ') is accepted only within [0.8, 1.2]× the running value, then blended with
momentum 0.9; μ is blended with momentum 0.9 without the gate. A batch whose
statistics are not finite, or whose pre-activation has no variance, is ignored.

Timing (the one thing the ONNX Runtime form fixes): λ and μ are *inputs* of a
step, so step t uses the running values after steps 0…t−1; before the first
batch they are the Gaussian values at q = 1. :mod:`.reference` follows the same
timing, which is what makes the two comparable step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..methods.anact import lambda_of
from ..streaming import accepted, blend, gated
from .graph import STATS_FIELDS

VAR_EPS = 1e-12


def lambda_from(rho: np.ndarray, rho_d: np.ndarray, rule: str = "anact") -> np.ndarray:
    """λ from the forward and backward gains: anact √((ρ+ρ')/(2ρρ')), xavier √(2/(ρ+ρ'))."""
    return lambda_of(np.asarray(rho, np.float64), np.asarray(rho_d, np.float64), rule)


def batch_values(stats: np.ndarray, centered: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ρ, ρ', μ and a validity mask per site from the graph's flat statistics output."""
    s = np.asarray(stats, dtype=np.float64).reshape(-1, len(STATS_FIELDS))
    mean_f, mean_f2, mean_d2, _, var_x = s.T
    num = mean_f2 - mean_f * mean_f if centered else mean_f2
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = num / var_x
    ok = np.isfinite(s).all(axis=1) & (var_x > VAR_EPS) & (rho > 0) & (mean_d2 > 0)
    return rho, mean_d2, mean_f, ok


@dataclass
class RunningStats:
    """The running ρ, ρ', μ of every ANAct site, and how many batches updated them."""

    rho: np.ndarray
    rho_d: np.ndarray
    mu: np.ndarray
    batches: int = 0
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per site: batches whose ρ was accepted

    @classmethod
    def start(cls, gaussian: list[tuple[float, float, float]], primed: list[bool] | None = None) -> RunningStats:
        """Running values before any batch. ``primed`` sites (started from an earlier normalization's
        constants) count that start as one accepted observation, so their first batch is gated and
        blended like any later one instead of replacing the pretrained map at once."""
        g = np.asarray(gaussian, dtype=np.float64).reshape(-1, 3)
        accepted = np.asarray(primed if primed is not None else [False] * len(g), dtype=np.float64)
        return cls(g[:, 0].copy(), g[:, 1].copy(), g[:, 2].copy(), 0, accepted)

    def lam(self, rule: str = "anact") -> np.ndarray:
        return lambda_from(self.rho, self.rho_d, rule)

    def feeds(self, rule: str = "anact") -> tuple[np.ndarray, np.ndarray]:
        """The float32 λ and μ vectors a step is fed."""
        return self.lam(rule).astype(np.float32), self.mu.astype(np.float32)

    def update(self, stats: np.ndarray, centered: bool = False) -> None:
        """Apply one batch's statistics by the gated running rule (:mod:`..streaming`)."""
        rho, rho_d, mu, ok = batch_values(stats, centered)
        first = ok & (self.batches == 0) & (self.accepted == 0)  # first batch of a site without a primed start
        later = ok & ~first
        took = later & accepted(self.rho, rho)
        with np.errstate(invalid="ignore", over="ignore"):  # sites left alone may hold NaN or Inf this batch
            self.rho[:] = np.where(first, rho, np.where(took, blend(self.rho, rho), self.rho))
            self.rho_d[:] = np.where(first, rho_d, np.where(later, gated(self.rho_d, rho_d), self.rho_d))
            self.mu[:] = np.where(first, mu, np.where(later, blend(self.mu, mu), self.mu))
        self.accepted[:] = self.accepted + (first | took)
        self.batches += 1

    # checkpoints keep these as flat float properties (the ORT checkpoint stores scalars)
    def to_properties(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"normact.batches": int(self.batches), "normact.sites": len(self.rho)}
        for i in range(len(self.rho)):
            out[f"normact.rho.{i}"] = float(self.rho[i])
            out[f"normact.rho_d.{i}"] = float(self.rho_d[i])
            out[f"normact.mu.{i}"] = float(self.mu[i])
            out[f"normact.accepted.{i}"] = float(self.accepted[i])
        return out

    @classmethod
    def from_properties(cls, props: dict[str, float | int]) -> RunningStats:
        n = int(props["normact.sites"])
        get = lambda key: np.array([float(props[f"normact.{key}.{i}"]) for i in range(n)])  # noqa: E731
        return cls(get("rho"), get("rho_d"), get("mu"), int(props["normact.batches"]), get("accepted"))
