"""All sites' running statistics as flat arrays: one vectorized merge per batch instead of one per site.

Per batch, calibration folds six small records per site into that site's moments
(:meth:`.stats.SiteStats.add`). With dozens of sites the per-site Python (reading
each record, a Chan merge of tiny arrays, the gated EMA) costs as much as the
instrumented ONNX Runtime run on a small model. Here every main-graph site's
channels are laid end to end: the batch's outputs are concatenated once per
statistic and merged with the same elementwise formulas (:mod:`..streaming`) on
the concatenation, which gives each site exactly the numbers its own merge would.

Sites whose statistics come as several records per run (inside Loop/Scan bodies,
or If branches that may not run) keep the per-site path, as does any batch whose
shape differs from what the flat state holds (an empty tensor, a first batch):
the flat state is written back to the sites, the batch folded per site, and
gathered again. :meth:`FlatFolder.flush` writes the state back at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..streaming import Moments, blend, gated, mean_merge, merge_cross
from .instrument import CROSS, STAT_NAMES, Instrumented, Probe
from .stats import CalibrationStats, Ema

FoldOne = Callable[[CalibrationStats, Instrumented, list[Probe], dict[str, np.ndarray], str], None]

_STATE = ("xn", "xmean", "xm2", "fn", "fmean", "fm2", "d2", "xf", "rho", "rho_c", "drho", "mu")


class FlatFolder:
    """Folds batches into ``stats`` through one flat state for the main-graph sites (see the module doc)."""

    def __init__(self, stats: CalibrationStats, inst: Instrumented, fold_one: FoldOne) -> None:
        """``fold_one(stats, inst, probes, values, where)``: the per-site fold for the given probes."""
        self.stats, self.inst, self.fold_one = stats, inst, fold_one
        self.flat = [p for p in inst.probes if p.site.container.parent is None]
        self.rest = [p for p in inst.probes if p.site.container.parent is not None]
        self.names = {k: [p.outputs[k] for p in self.flat] for k in (*STAT_NAMES, CROSS) if self._has(k)}
        self.state: dict[str, np.ndarray] | None = None
        self.channels = np.zeros(0, dtype=np.int64)
        self.ema_batches = np.zeros(0, dtype=np.int64)

    def _has(self, stat: str) -> bool:
        return bool(self.flat) and all(stat in p.outputs for p in self.flat)

    def fold(self, values: dict[str, np.ndarray], where: str = "") -> None:
        """One batch's outputs into the statistics."""
        if self.rest:
            self.fold_one(self.stats, self.inst, self.rest, values, where)
        if not self.flat:
            return
        batch = self._gather_batch(values)
        if batch is None or self.state is None:
            self.flush()
            self.fold_one(self.stats, self.inst, self.flat, values, where)
            self._gather_state()
            return
        self._merge(batch)

    def _gather_batch(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """This batch as flat arrays, or None when it does not fit the flat path (not finite: the per-site path
        names the site)."""
        size = np.concatenate([np.asarray(values[k], dtype=np.float64).reshape(-1) for k in self.names["size"]])
        if size.size != len(self.flat) or not np.all(size > 0):
            return None
        out = {k: np.concatenate([np.asarray(values[n], dtype=np.float64).reshape(-1) for n in names])
               for k, names in self.names.items() if k != "size"}  # fmt: skip
        if out["x_mean"].size != self.channels.sum() or not all(np.all(np.isfinite(v)) for v in out.values()):
            return None
        if any(values[n].size != c for n, c in zip(self.names["x_mean"], self.channels)):
            return None
        out["n"] = np.repeat(size / self.channels, self.channels)
        return out

    def _gather_state(self) -> None:
        """The sites' statistics as one flat state (after a per-site fold), or None when a site has none yet."""
        sites = [self.stats.sites[p.site.output] for p in self.flat]
        if any(s.x.n.size == 0 for s in sites) or any((s.xf is None) != ("xf_ss" not in self.names) for s in sites):
            self.state = None
            return
        self.channels = np.array([s.x.n.size for s in sites], dtype=np.int64)
        self.ema_batches = np.array([s.ema.batches if s.ema is not None else 0 for s in sites], dtype=np.int64)

        def cat(get: Any) -> np.ndarray:
            return np.concatenate([np.asarray(get(s), dtype=np.float64).reshape(-1) for s in sites])

        zero = [np.zeros(s.x.n.size) for s in sites]
        ema = [s.ema or Ema(z, z, z, z) for s, z in zip(sites, zero)]
        self.state = {
            "xn": cat(lambda s: s.x.n), "xmean": cat(lambda s: s.x.mean), "xm2": cat(lambda s: s.x.m2),
            "fn": cat(lambda s: s.f.n), "fmean": cat(lambda s: s.f.mean), "fm2": cat(lambda s: s.f.m2),
            "d2": cat(lambda s: s.d2),
            "xf": cat(lambda s: s.xf if s.xf is not None else np.zeros(s.x.n.size)),
            "rho": np.concatenate([e.rho.reshape(-1) for e in ema]),
            "rho_c": np.concatenate([e.rho_centered.reshape(-1) for e in ema]),
            "drho": np.concatenate([e.drho.reshape(-1) for e in ema]),
            "mu": np.concatenate([e.mu.reshape(-1) for e in ema]),
        }  # fmt: skip

    def _merge(self, b: dict[str, np.ndarray]) -> None:
        """:meth:`.stats.SiteStats.add` on the concatenation: the same elementwise operations, in the same order."""
        st = self.state
        assert st is not None
        n = b["n"]
        x, f = Moments(n, b["x_mean"], b["x_ss"]), Moments(n, b["f_mean"], b["f_ss"])
        d2 = b["d_ss"] / np.where(n > 0, n, 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            var_x = x.var
            rho, rho_c, mu = f.mean_square / var_x, f.var / var_x, f.mean
        first = np.repeat(self.ema_batches == 0, self.channels)  # every site has n > 0 here: each one updates
        st["rho"] = np.where(first, rho, gated(st["rho"], rho))
        st["rho_c"] = np.where(first, rho_c, gated(st["rho_c"], rho_c))
        st["drho"] = np.where(first, d2, gated(st["drho"], d2))
        st["mu"] = np.where(first, mu, blend(st["mu"], mu))
        self.ema_batches += 1
        sx = Moments(st["xn"], st["xmean"], st["xm2"])
        sf = Moments(st["fn"], st["fmean"], st["fm2"])
        st["d2"] = mean_merge(sx.n, st["d2"], x.n, d2)
        if CROSS in b:
            st["xf"] = merge_cross(sx, sf, st["xf"], x, f, b[CROSS])
        mx, mf = sx.merge(x), sf.merge(f)
        st["xn"], st["xmean"], st["xm2"] = mx.n, mx.mean, mx.m2
        st["fn"], st["fmean"], st["fm2"] = mf.n, mf.mean, mf.m2

    def flush(self) -> None:
        """Write the flat state back to the sites (after the last batch, or before a per-site fold)."""
        st = self.state
        if st is None:
            return
        cuts = np.cumsum(self.channels)[:-1]
        parts = {k: np.split(st[k], cuts) for k in _STATE}
        for i, p in enumerate(self.flat):
            s = self.stats.sites[p.site.output]
            shape = s.x.n.shape
            v = {k: parts[k][i].reshape(shape).copy() for k in _STATE}
            s.x, s.f, s.d2 = Moments(v["xn"], v["xmean"], v["xm2"]), Moments(v["fn"], v["fmean"], v["fm2"]), v["d2"]
            if s.xf is not None:
                s.xf = v["xf"]
            if self.ema_batches[i] > 0:
                s.ema = Ema(v["rho"], v["rho_c"], v["drho"], v["mu"], int(self.ema_batches[i]))
        self.state = None
