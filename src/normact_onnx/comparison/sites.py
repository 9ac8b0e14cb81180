"""Each normalized site's property, measured in the model as written (``compare --sites``, ``measure_sites``).

A site's pre-activation and normalized output are fetched as extra outputs; their moments (per channel when the
site's constants are) give the property its method promises (policy.GAIN_RANGE) and whether it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.feeding import LoadedModel
from ..passes.fold import normalized_sites
from ..policy import GAIN_RANGE
from ..provenance import read_records
from ..streaming import Moments


def summary(m: Moments) -> tuple[int, float, float]:
    """Count, mean and variance of an accumulator (NaN for no elements).

    With several channels (a per-channel site's pre-activation) the variance is the one *within*
    channels, Σ M2 / Σ n: what per-channel constants normalize. The spread of the channel means is
    no part of it (pooled, it made per-channel sites look 20× off their target).
    """
    n = float(m.n.sum())
    if not n:
        return (0, float("nan"), float("nan"))
    return (int(n), float((m.n * m.mean).sum() / n), float(m.m2.sum() / n))


def per_channel_moments(values: Any, channels: tuple[int, ...]) -> Moments:
    """Moments per channel of ``values``, whose channel axis is where ``channels`` (constants broadcast against
    it, e.g. (C, 1, 1) for NCHW) puts it; pooled when the shapes do not line up or values are not finite."""
    x = np.asarray(values, dtype=np.float64)
    axis = x.ndim - len(channels)
    if axis < 0 or x.shape[axis] != channels[0] or not np.isfinite(x).all():
        return Moments.of(x)
    rows = np.moveaxis(x, axis, -1).reshape(-1, channels[0])
    mean = rows.mean(axis=0)
    return Moments(np.full(channels[0], float(rows.shape[0])), mean, np.square(rows - mean).sum(axis=0))


# What each method promises at a normalized site (policy.GAIN_RANGE), measured in the model as written.
MEAN_LIMIT = 0.25


def site_property(method: str | None, pre_moments: Moments, post_moments: Moments) -> dict[str, Any]:
    """The site's measured property next to its target, and whether it holds."""
    (pre_n, _, pre_var), (post_n, post_mean, post_var) = summary(pre_moments), summary(post_moments)
    second = post_var + post_mean**2 if post_n else float("nan")
    lo, hi = GAIN_RANGE
    if method == "anact":
        gain = second / pre_var if pre_n and pre_var > 0 else float("nan")
        return {"property": "E y²/Var x", "value": gain, "target": f"[{lo:g}, {hi:g}]", "holds": bool(lo <= gain <= hi)}
    holds = bool(lo <= second <= hi and abs(post_mean) <= MEAN_LIMIT)
    return {
        "property": "E y² (|E y|)",
        "value": second,
        "target": f"[{lo:g}, {hi:g}] (≤ {MEAN_LIMIT:g})",
        "holds": holds,
    }


@dataclass
class SiteProbe:
    """One normalized site to measure: its pre-activation and its normalized output."""

    info: dict[str, Any]
    pre: str
    post: str
    pre_stats: Moments = field(default_factory=lambda: Moments.empty(1))
    post_stats: Moments = field(default_factory=lambda: Moments.empty(1))
    channels: tuple[int, ...] | None = None  # the constants' shape when they are per channel (e.g. (C, 1, 1))

    def pre_moments(self, x: np.ndarray) -> Moments:
        """The pre-activation's moments: per channel when the site's constants are (see :func:`summary`)."""
        return per_channel_moments(x, self.channels) if self.channels else Moments.of(x)

    def result(self) -> dict[str, Any]:
        return {
            **self.info,
            "pre_mean": summary(self.pre_stats)[1],
            "pre_var": summary(self.pre_stats)[2],
            "mean": summary(self.post_stats)[1],
            "var": summary(self.post_stats)[2],
            **site_property(self.info.get("method"), self.pre_stats, self.post_stats),
        }


def site_probes(model: LoadedModel) -> tuple[list[SiteProbe], list[dict[str, Any]]]:
    """Normalized sites of the main graph (measurable as extra outputs), and the ones that are not."""
    probes, unreachable = [], []
    records = {(r.get("graph"), r.get("output")): r for r in read_records(model.proto)}
    for s in normalized_sites(model.proto, model.base_dir):
        post = (s.normalized or {}).get("output", s.output) if s.root.domain != "ai.normact" else s.output
        rec = records.get((s.path, post), {})
        info = {
            "model": model.label,
            "site": s.name,
            "kind": s.kind,
            "graph": s.path,
            "method": rec.get("method"),
            "design_q": rec.get("q"),
        }
        scale = np.asarray(rec.get("scale", 0.0), dtype=np.float64)
        if rec.get("per_channel") and scale.ndim:
            info["property_of"] = "within channels"
        if s.container.parent is not None or s.container.function is not None:
            unreachable.append({**info, "note": "inside a subgraph or function: not measurable as a graph output"})
        else:
            probes.append(SiteProbe(info, s.input, post, channels=scale.shape if scale.ndim else None))
    return probes, unreachable
