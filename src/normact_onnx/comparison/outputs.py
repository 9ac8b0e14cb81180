"""Each output of model B against the reference A: running error statistics that merge exactly across batches.

Counts, sums and maxima add; the p99 comes from a bounded uniform sample (re-drawn, weighted, when two partial
results merge), so memory does not grow with the number of batches and Ray workers' tallies add up to the
single-process result. Pass/fail is numpy ``allclose`` with A as the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import NormactError

P99_SAMPLE = 1 << 20  # error values kept per output for the percentile


UNCOMPARED = ("max_abs", "max_ref", "mean_abs", "max_rel", "mean_rel", "p99_abs", "cosine")


@dataclass
class ErrorStats:
    """Running error statistics of one output (B against the reference A)."""

    atol: float
    rtol: float
    count: int = 0
    max_abs: float = 0.0
    max_ref: float = 0.0  # largest |A|: the output's scale, for errors relative to it
    sum_abs: float = 0.0
    max_rel: float = 0.0
    sum_rel: float = 0.0
    dot: float = 0.0
    norm_a: float = 0.0
    norm_b: float = 0.0
    violations: int = 0
    nan_mismatch: int = 0
    shape_mismatch: str = ""
    sample: list[np.ndarray] = field(default_factory=list)
    sampled: int = 0
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            self.shape_mismatch = self.shape_mismatch or f"shapes differ: {a.shape} vs {b.shape}"
            return
        a64, b64 = _as_float(a), _as_float(b)
        nan_a, nan_b = np.isnan(a64), np.isnan(b64)
        self.nan_mismatch += int(np.count_nonzero(nan_a != nan_b))
        both = nan_a & nan_b
        err = np.where(both, 0.0, np.abs(a64 - b64))
        err = np.where(np.isnan(err), np.inf, err)  # NaN on one side only
        err = np.where(np.isinf(a64) & np.isinf(b64) & (a64 == b64), 0.0, err)
        rel = err / np.maximum(np.abs(np.nan_to_num(a64)), max(self.atol, 1e-30))
        self.count += err.size
        if err.size:
            self.max_abs = max(self.max_abs, float(err.max()))
            self.max_rel = max(self.max_rel, float(rel.max()))
            self.max_ref = max(self.max_ref, float(np.max(np.abs(np.nan_to_num(a64, posinf=0.0, neginf=0.0)))))
        self.sum_abs += float(err.sum())
        self.sum_rel += float(rel.sum())
        self.violations += int(np.count_nonzero(err > self.atol + self.rtol * np.abs(np.nan_to_num(a64))))
        fa, fb = np.nan_to_num(a64, posinf=0.0, neginf=0.0), np.nan_to_num(b64, posinf=0.0, neginf=0.0)
        self.dot += float(np.vdot(fa, fb))
        self.norm_a += float(np.vdot(fa, fa))
        self.norm_b += float(np.vdot(fb, fb))
        self._keep(err.ravel())

    def merge(self, other: ErrorStats) -> ErrorStats:
        """Two partial results: counts, sums and maxima exactly; the p99 sample re-drawn from both, weighted."""
        out = ErrorStats(self.atol, self.rtol)
        for k in ("count", "sum_abs", "sum_rel", "dot", "norm_a", "norm_b", "violations", "nan_mismatch", "sampled"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        for k in ("max_abs", "max_ref", "max_rel"):
            setattr(out, k, max(getattr(self, k), getattr(other, k)))
        out.shape_mismatch = self.shape_mismatch or other.shape_mismatch
        parts = [(e.sampled, np.concatenate(e.sample)) for e in (self, other) if e.sample]
        kept = sum(v.size for _, v in parts)
        if kept <= P99_SAMPLE:
            out.sample = [v for _, v in parts]
        else:  # each kept value stands for sampled/kept errors of its side: draw in proportion
            allv = np.concatenate([v for _, v in parts])
            w = np.concatenate([np.full(v.size, n / v.size) for n, v in parts])
            out.sample = [out.rng.choice(allv, P99_SAMPLE, replace=False, p=w / w.sum())]
        return out

    def _keep(self, err: np.ndarray) -> None:
        """A bounded uniform sample of the errors, for the percentile."""
        self.sampled += err.size
        self.sample.append(err.astype(np.float32))
        kept = sum(s.size for s in self.sample)
        if kept > P99_SAMPLE:
            allv = np.concatenate(self.sample)
            self.sample = [self.rng.choice(allv, P99_SAMPLE, replace=False)]

    def result(self, name: str, shape: tuple[int, ...]) -> dict[str, Any]:
        n = max(self.count, 1)
        errs = np.concatenate(self.sample) if self.sample else np.zeros(1, np.float32)
        if self.norm_a == 0 and self.norm_b == 0:
            cosine = 1.0
        elif self.norm_a == 0 or self.norm_b == 0:
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.norm_a * self.norm_b)
        passed = not self.shape_mismatch and self.violations == 0 and self.nan_mismatch == 0
        return {
            "output": name,
            "shape": list(shape),
            "max_abs": self.max_abs,
            "max_ref": self.max_ref,
            "mean_abs": self.sum_abs / n,
            "max_rel": self.max_rel,
            "mean_rel": self.sum_rel / n,
            "p99_abs": float(np.percentile(errs, 99)),
            "cosine": cosine,
            "violations": self.violations,
            "elements": self.count,
            "passed": passed,
            **({"error": self.shape_mismatch} if self.shape_mismatch else {}),
            **({"nan_mismatch": self.nan_mismatch} if self.nan_mismatch else {}),
            # outputs of different shapes were never compared: no numbers rather than a perfect-looking 0 and 1.0
            **(dict.fromkeys(UNCOMPARED, None) if self.shape_mismatch else {}),
        }


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.number):
        return x.astype(np.float64)
    raise NormactError(f"cannot compare outputs of type {x.dtype}")
