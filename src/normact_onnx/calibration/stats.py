"""Per-site calibration statistics: exact, mergeable moments plus ANAct's running (EMA) state.

The moments and the gated rule themselves are :mod:`..streaming`'s; this module keeps them per site and
reads and writes the statistics file.

What is kept per site (per channel with ``--per-channel``) is a handful of numbers,
never activations: the element count n, the mean and the centred sum of squares
(M2) of the pre-activation x and of f(x), and the mean of f'(x)². Batches and
shards are combined with Chan, Golub & LeVeque's pairwise update

    n = na + nb,  δ = mb − ma,  mean = ma + δ·nb/n,  M2 = M2a + M2b + δ²·na·nb/n

which is exact in real arithmetic and stable in floating point (no E[x²] − E[x]²
cancellation), so ``merge-stats a.json b.json`` equals one run over both data
sets up to float64 rounding. The paper's gated EMA (docs/math.md §2.4) depends on the
order of the batches and is *not* reproduced by merging: a merged file keeps the
moments only, and factors from it use ``--aggregate mean``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import NormactError
from ..graph import structure_fingerprint
from ..io import atomic_path
from ..passes.find import find_sites
from ..streaming import Moments, blend, gated, mean_merge, merge_cross
from .stats_check import check_document

FORMAT = "normact-onnx/calibration-stats"
VERSION = 2  # 2: "fingerprint" identifies the model's graph (1: its set of sites)


@dataclass
class Ema:
    """The paper's running statistics: first batch sets them, later ones enter only within [0.8, 1.2]×."""

    rho: np.ndarray  # forward gain E f² / var x
    rho_centered: np.ndarray  # Var f / var x (--centered-rho)
    drho: np.ndarray  # backward gain E f'²
    mu: np.ndarray  # E f (blended without the gate)
    batches: int = 0

    def update(self, rho: np.ndarray, rho_c: np.ndarray, drho: np.ndarray, mu: np.ndarray) -> None:
        if self.batches == 0:
            self.rho, self.rho_centered, self.drho, self.mu = rho, rho_c, drho, mu
        else:
            self.rho = gated(self.rho, rho)
            self.rho_centered = gated(self.rho_centered, rho_c)
            self.drho = gated(self.drho, drho)
            self.mu = blend(self.mu, mu)
        self.batches += 1

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k).tolist() for k in ("rho", "rho_centered", "drho", "mu")}
        d["batches"] = self.batches
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ema:
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in ("rho", "rho_centered", "drho", "mu")}
        return cls(**arrays, batches=int(d["batches"]))


@dataclass
class SiteStats:
    """Everything measured at one activation site."""

    key: str  # the site's output value name: how a model's site is matched to its statistics
    name: str
    kind: str
    graph: str
    depth: int  # position among the model's sites (plots against depth)
    channel_axis: int | None  # None: one scalar per site
    channel_shape: list[int]  # shape the per-channel constants take to broadcast against x ([] for scalars)
    x: Moments
    f: Moments
    d2: np.ndarray  # mean of f'(x)²
    ema: Ema | None = None
    xf: np.ndarray | None = None  # co-moment Σ (x − mean x)(f − mean f), when measured (static variants with a slope)

    @property
    def channels(self) -> int:
        return int(self.x.n.size)

    @property
    def cov(self) -> np.ndarray | None:
        """Cov(x, f) = co-moment / n, or None when not measured."""
        if self.xf is None:
            return None
        return self.xf / np.where(self.x.n > 0, self.x.n, 1.0)

    def add(self, x: Moments, f: Moments, d2: np.ndarray, xf: np.ndarray | None = None) -> None:
        """Fold one batch in: moments exactly, and the gated EMA from this batch's own gains."""
        with np.errstate(invalid="ignore", divide="ignore"):
            var_x = x.var
            rho, rho_c, mu = f.mean_square / var_x, f.var / var_x, f.mean
        if np.all(x.n > 0):
            if self.ema is None:
                self.ema = Ema(rho, rho_c, d2, mu)
            self.ema.update(rho, rho_c, d2, mu)
        if self.x.n.size == 0:  # the first batch fixes the channel count
            self.x, self.f, self.d2 = Moments.empty(x.n.size), Moments.empty(x.n.size), np.zeros(x.n.size)
            self.xf = None if xf is None else np.zeros(x.n.size)
        self.d2 = mean_merge(self.x.n, self.d2, x.n, d2)
        if self.xf is not None and xf is not None:
            self.xf = merge_cross(self.x, self.f, self.xf, x, f, xf)
        self.x, self.f = self.x.merge(x), self.f.merge(f)

    def merged(self, other: SiteStats) -> SiteStats:
        if other.kind != self.kind or other.channels != self.channels:
            raise NormactError(
                f"site {self.key!r}: statistics disagree ({self.kind}×{self.channels} vs {other.kind}×{other.channels})"
            )
        d2 = mean_merge(self.x.n, self.d2, other.x.n, other.d2)
        xf = None
        if self.xf is not None and other.xf is not None:
            xf = merge_cross(self.x, self.f, self.xf, other.x, other.f, other.xf)
        return SiteStats(
            self.key,
            self.name,
            self.kind,
            self.graph,
            self.depth,
            self.channel_axis,
            self.channel_shape,
            self.x.merge(other.x),
            self.f.merge(other.f),
            d2,
            None,
            xf,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "graph": self.graph,
            "depth": self.depth,
            "channel_axis": self.channel_axis,
            "channel_shape": self.channel_shape,
            "x": self.x.as_dict(),
            "f": self.f.as_dict(),
            "d2_mean": self.d2.tolist(),
            "ema": self.ema.as_dict() if self.ema else None,
            **({"xf_c2": self.xf.tolist()} if self.xf is not None else {}),
        }

    @classmethod
    def from_dict(cls, key: str, d: dict[str, Any]) -> SiteStats:
        return cls(
            key,
            d["name"],
            d["kind"],
            d["graph"],
            int(d["depth"]),
            d["channel_axis"],
            list(d["channel_shape"]),
            Moments.from_dict(d["x"]),
            Moments.from_dict(d["f"]),
            np.asarray(d["d2_mean"], dtype=np.float64),
            Ema.from_dict(d["ema"]) if d.get("ema") else None,
            np.asarray(d["xf_c2"], dtype=np.float64) if d.get("xf_c2") is not None else None,
        )


@dataclass
class CalibrationStats:
    """A whole calibration run (or a merge of several): per-site statistics and what produced them."""

    sites: dict[str, SiteStats]
    per_channel: bool = False
    batches: int = 0
    fingerprint: str = ""
    sources: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # site output -> why it has no statistics
    merged_from: int = 1
    settings: dict[str, Any] = field(default_factory=dict)  # factor options the run was asked for
    version: int = VERSION  # of the file it was read from: what ``fingerprint`` means
    origin: str = ""  # the file it was read from (for error messages and provenance)

    def ordered(self) -> list[SiteStats]:
        return sorted(self.sites.values(), key=lambda s: s.depth)

    def q_per_site(self) -> dict[str, float]:
        """Measured design variance per site (channels pooled): what ``rewrite --method static --stats`` uses."""
        out = {}
        for s in self.sites.values():
            q = float(s.x.pooled().var[0])
            if np.isfinite(q) and q > 0:
                out[s.key] = q
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "tool": f"normact-onnx {__version__}",
            "fingerprint": self.fingerprint,
            "per_channel": self.per_channel,
            "batches": self.batches,
            "merged_from": self.merged_from,
            "sources": self.sources,
            "settings": self.settings,
            "skipped": self.skipped,
            "sites": {k: s.as_dict() for k, s in self.sites.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Strict JSON (no NaN/Infinity tokens): undefined EMA gains are ``null``; non-finite moments refuse."""
        dest = Path(path)
        doc = self.as_dict()
        for key, site in doc["sites"].items():
            for part in ("x", "f"):
                if not all(np.isfinite(v) for arr in site[part].values() for v in arr):
                    raise NormactError(f"site {key!r}: the statistics overflowed (non-finite); nothing written")
            if site["ema"] is not None:
                for k, v in site["ema"].items():
                    if isinstance(v, list):
                        site["ema"][k] = [x if np.isfinite(x) else None for x in v]
        text = json.dumps(doc, indent=1, allow_nan=False)
        with atomic_path(dest) as tmp:
            tmp.write_text(text)
        return dest

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "stats") -> CalibrationStats:
        check_document(d, origin, FORMAT, VERSION)  # every field below is present and well-formed
        sites = {k: SiteStats.from_dict(k, v) for k, v in d["sites"].items()}
        return cls(
            sites,
            bool(d.get("per_channel")),
            int(d.get("batches", 0)),
            str(d.get("fingerprint", "")),
            list(d.get("sources", [])),
            dict(d.get("skipped", {})),
            int(d.get("merged_from", 1)),
            dict(d.get("settings", {})),
            int(d["version"]),
            origin,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        p = Path(path)
        if not p.is_file():
            raise NormactError(f"{p}: no such statistics file")
        try:
            d = json.loads(p.read_text(), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise NormactError(f"{p}: not JSON ({e})") from None
        return cls.from_dict(d, str(p))


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON (statistics files hold finite numbers only)")


def fingerprint(sites: list[tuple[str, str]]) -> str:
    """Identifies a model's set of sites (output, kind): what format version 1 stored as the model's identity."""
    h = hashlib.sha256(json.dumps(sorted(sites)).encode())
    return h.hexdigest()[:16]


def check_stats_model(stats: CalibrationStats, model: Any, base_dir: str | None = None, force: bool = False) -> None:
    """Refuse statistics measured on another model (their fingerprint is not this model's), unless ``force``.

    Statistics are matched to sites by value name; another model with a few equal names would
    otherwise get their numbers silently.
    """
    if force or not stats.fingerprint:
        return
    if stats.version >= 2:
        want = structure_fingerprint(model)
    else:
        want = fingerprint([(s.output, s.kind) for s in find_sites(model, base_dir)])
    if stats.fingerprint != want:
        raise NormactError(
            f"{stats.origin or 'statistics'}: measured on another model (fingerprint {stats.fingerprint}, "
            f"this model {want}); calibrate this model, or pass --force to use them anyway"
        )


MEASURED_WITH = ("method", "in_situ", "normalized_in_situ", "lambda_rule", "centered_rho", "variant", "ratio")
"""Settings that change what a file's numbers mean: files that differ in any of them do not merge."""


def measured_with(stats: CalibrationStats) -> dict[str, Any]:
    """How a file's statistics were measured, field by field (what :func:`merge` compares).

    ``aggregate`` is the factor rule the run was asked for (a merge turns ``ema`` into ``mean`` and
    remembers the request as ``asked_aggregate``, so merging a merged file with another shard still works).
    """
    s = stats.settings
    out: dict[str, Any] = {"fingerprint": stats.fingerprint, "per_channel": stats.per_channel}
    out.update({k: s.get(k) for k in MEASURED_WITH})
    out["aggregate"] = s.get("asked_aggregate", s.get("aggregate"))
    if isinstance(out["normalized_in_situ"], list):
        out["normalized_in_situ"] = sorted(out["normalized_in_situ"])
    return out


def _shown(v: Any) -> str:
    if isinstance(v, list):
        return f"{len(v)} sites" if v else "no sites"
    return "unknown" if v is None else json.dumps(v)


def _check_mergeable(parts: list[CalibrationStats]) -> None:
    """One line naming the first field two files differ in, or a file that does not record how it was measured."""
    for p in parts:
        if "method" not in p.settings or "in_situ" not in p.settings:
            raise NormactError(
                f"merge-stats: {p.origin or 'a file'} does not record how it was measured (method, in situ; written "
                "by an older normact-onnx), so it cannot be merged safely: calibrate that shard again"
            )
    first = measured_with(parts[0])
    for p in parts[1:]:
        other = measured_with(p)
        for field_name, value in first.items():
            if other[field_name] != value:
                a, b = parts[0].origin or "the first file", p.origin or "another file"
                why = "come from different models" if field_name == "fingerprint" else "were measured differently"
                raise NormactError(
                    f"merge-stats: the files {why}: {field_name} is {_shown(value)} in {a} "
                    f"but {_shown(other[field_name])} in {b}; merge only shards of one calibration setting"
                )


def merge(parts: list[CalibrationStats]) -> CalibrationStats:
    """Exact merge of shards (moments); the EMA state is dropped because it depends on batch order.

    Shards must have been measured the same way (:data:`MEASURED_WITH`, the model, per-channel, the
    aggregate asked for): otherwise the result would carry the first file's label over numbers that
    mean something else, so the merge is refused naming the field. A shard's closing-check record is
    not carried over: it describes that shard's constants, not the merged ones.
    """
    if not parts:
        raise NormactError("merge-stats: nothing to merge")
    _check_mergeable(parts)
    first = parts[0]
    sites: dict[str, SiteStats] = {}
    for p in parts:
        for k, s in p.sites.items():
            sites[k] = sites[k].merged(s) if k in sites else s.merged(_empty_like(s))
    skipped = {k: v for p in parts for k, v in p.skipped.items() if k not in sites}
    settings = dict(first.settings)
    # each shard's closing check (.closing) held its own constants; the merged moments were not checked
    settings.pop("closing", None)
    if settings.get("aggregate") == "ema":
        settings["aggregate"] = "mean"  # the only aggregate a merge reproduces exactly
        settings["asked_aggregate"] = "ema"
    return CalibrationStats(
        sites,
        first.per_channel,
        sum(p.batches for p in parts),
        first.fingerprint,
        [s for p in parts for s in p.sources],
        skipped,
        sum(p.merged_from for p in parts),
        settings,
        min(p.version for p in parts),
    )


def _empty_like(s: SiteStats) -> SiteStats:
    c = s.channels
    return SiteStats(
        s.key,
        s.name,
        s.kind,
        s.graph,
        s.depth,
        s.channel_axis,
        s.channel_shape,
        Moments.empty(c),
        Moments.empty(c),
        np.zeros(c),
        None,
        None if s.xf is None else np.zeros(c),
    )
