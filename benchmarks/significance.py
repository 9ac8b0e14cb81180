"""Significance of a difference between two training configurations run on the same seeds."""

from __future__ import annotations

import math

import numpy as np


def paired_test(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired comparison of b against a (same seeds): mean difference, 95% CI, paired t-test p, Cohen's d_z.

    Also Welch's t-test (ignoring the pairing), the more conservative reading when the seeds
    do not share anything that matters.
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = y - x
    n = d.size
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {
        "n": n,
        "mean_diff": mean,
        "ci95": [mean - half, mean + half],
        "p_paired": float(stats.ttest_rel(y, x).pvalue),
        "p_welch": float(stats.ttest_ind(y, x, equal_var=False).pvalue),
        "cohen_dz": mean / sd if sd > 0 else math.inf,
    }
