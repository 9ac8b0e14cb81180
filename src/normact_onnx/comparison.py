"""``compare``: run two models (or one model in two runtimes) on the same inputs and measure the difference.

This is how a user proves that a rewrite or a fold did what it claims: every
output is compared with error statistics and a pass/fail against ``atol``/``rtol``
(numpy ``allclose`` semantics, model A is the reference), and with ``sites=True``
each normalized site reports the mean and variance it actually sees on the data
(does normalization hold?). Statistics are accumulated batch by batch, so memory
does not grow with the number of batches (p99 uses a bounded sample).

Runtimes: ONNX Runtime with the kernel library registered when it is built
(what a deployment runs), or ``onnx.reference`` (model-local functions inlined
first) as an independent second opinion.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .data.feeding import Feeds, LoadedModel, Runner, feeds_for, model_batches
from .data.inputs import model_inputs
from .data.options import DataOptions, data_bundle
from .data.ray_data import (
    CRASH_ENV,
    Feeder,
    TreeMerge,
    batch_samples,
    check_exists,
    cluster,
    is_dataset,
    map_rows,
    maybe_crash,
    plan_work,
    require_ray,
)
from .errors import NormactError
from .io import ModelLike
from .passes.fold import normalized_sites
from .policy import GAIN_RANGE
from .progress import bar as progress_bar
from .provenance import read_records
from .streaming import Moments
from .texttable import table

P99_SAMPLE = 1 << 20  # error values kept per output for the percentile


# ---- statistics -----------------------------------------------------------------------------


UNCOMPARED = ("max_abs", "max_ref", "mean_abs", "max_rel", "mean_rel", "p99_abs", "cosine")


@dataclass
class _ErrorStats:
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

    def merge(self, other: _ErrorStats) -> _ErrorStats:
        """Two partial results: counts, sums and maxima exactly; the p99 sample re-drawn from both, weighted."""
        out = _ErrorStats(self.atol, self.rtol)
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


def _summary(m: Moments) -> tuple[int, float, float]:
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
    (pre_n, _, pre_var), (post_n, post_mean, post_var) = _summary(pre_moments), _summary(post_moments)
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
class _SiteProbe:
    """One normalized site to measure: its pre-activation and its normalized output."""

    info: dict[str, Any]
    pre: str
    post: str
    pre_stats: Moments = field(default_factory=lambda: Moments.empty(1))
    post_stats: Moments = field(default_factory=lambda: Moments.empty(1))
    channels: tuple[int, ...] | None = None  # the constants' shape when they are per channel (e.g. (C, 1, 1))

    def pre_moments(self, x: np.ndarray) -> Moments:
        """The pre-activation's moments: per channel when the site's constants are (see :func:`_summary`)."""
        return per_channel_moments(x, self.channels) if self.channels else Moments.of(x)

    def result(self) -> dict[str, Any]:
        return {
            **self.info,
            "pre_mean": _summary(self.pre_stats)[1],
            "pre_var": _summary(self.pre_stats)[2],
            "mean": _summary(self.post_stats)[1],
            "var": _summary(self.post_stats)[2],
            **site_property(self.info.get("method"), self.pre_stats, self.post_stats),
        }


def _site_probes(model: LoadedModel) -> tuple[list[_SiteProbe], list[dict[str, Any]]]:
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
            probes.append(_SiteProbe(info, s.input, post, channels=scale.shape if scale.ndim else None))
    return probes, unreachable


# What compare reads when the options leave it open (calibrate's are the readers' own: all batches of the data; 10
# synthetic batches of one sample): every batch of the data as stored, or 4 synthetic batches of 2 samples.
SYNTHETIC_BATCHES, SYNTHETIC_BATCH_SIZE = 4, 2


# ---- the comparison -------------------------------------------------------------------------


@dataclass
class CompareResult:
    """Per-output error statistics, per-site measurements, and the verdict."""

    outputs: list[dict[str, Any]]
    sites: list[dict[str, Any]]
    passed: bool
    atol: float
    rtol: float
    batches: int
    runtimes: tuple[str, str]
    models: tuple[str, str | None]  # B None: one model's sites measured, no outputs compared

    def report(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "batches": self.batches,
            "a": {"model": self.models[0], "runtime": self.runtimes[0]},
            "b": None if self.models[1] is None else {"model": self.models[1], "runtime": self.runtimes[1]},
            "outputs": self.outputs,
            "sites": self.sites,
        }

    def table(self) -> str:
        """Human-readable tables (outputs, then sites)."""

        def num(v: float | None, spec: str) -> str:
            return "n/a" if v is None else format(v, spec)

        rows = [
            {
                "output": o["output"],
                "max_abs": num(o["max_abs"], ".3g"),
                "mean_abs": num(o["mean_abs"], ".3g"),
                "max_rel": num(o["max_rel"], ".3g"),
                "mean_rel": num(o["mean_rel"], ".3g"),
                "p99_abs": num(o["p99_abs"], ".3g"),
                "cosine": num(o["cosine"], ".8f"),
                "result": ("pass" if o["passed"] else "FAIL") + (f" ({o['error']})" if "error" in o else ""),
            }
            for o in self.outputs
        ]
        cols = ["output", "max_abs", "mean_abs", "max_rel", "mean_rel", "p99_abs", "cosine", "result"]
        text = table(rows, cols) if self.models[1] is not None else f"{self.models[0]}: one model, outputs not compared"
        if self.sites:
            fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
            srows = [{k: fmt(v) for k, v in s.items()} for s in self.sites]
            for row, site in zip(srows, self.sites):
                if "holds" in site:
                    row["holds"] = "yes" if site["holds"] else "MISSED"
            scols = ["model", "site", "kind", "method", "pre_mean", "pre_var", "mean", "var", "property", "value"]
            scols += ["target", "holds", "note"]
            missed = sum(1 for site in self.sites if site.get("holds") is False)
            text += "\n\nnormalized sites (pre = the activation's input; mean/var = the normalized output):\n"
            text += table(srows, [c for c in scols if any(c in s for s in self.sites)])
            measured = sum(1 for site in self.sites if "holds" in site)
            text += f"\n{measured - missed} of {measured} measured sites hold their property"
            if missed:
                text += f"; {missed} MISSED (calibrate on representative data, in situ, to fix)"
        if self.models[1] is None:
            return text + f"\n\nmeasured on {self.batches} batch(es)"
        verdict = "PASS" if self.passed else "FAIL"
        text += f"\n\n{verdict}: atol={self.atol:g} rtol={self.rtol:g}, {self.batches} batch(es)"
        return text


@dataclass
class Tally:
    """What one or more batches measured: error statistics per output, moments per site probe, output shapes.

    Tallies merge exactly (counts, sums, maxima; the p99 sample is re-drawn), so batches measured on
    different Ray workers add up to the single-process result.
    """

    errors: dict[str, _ErrorStats]
    sites: list[tuple[Moments, Moments]]  # (pre, post) per probe, in Comparison.probes order
    shapes: dict[str, tuple[int, ...]]
    batches: int = 0

    def merge(self, other: Tally) -> Tally:
        return Tally(
            {k: v.merge(other.errors[k]) for k, v in self.errors.items()},
            [(a.merge(c), b.merge(d)) for (a, b), (c, d) in zip(self.sites, other.sites)],
            {**other.shapes, **self.shapes},
            self.batches + other.batches,
        )


class Comparison:
    """Two models ready to run side by side; :meth:`tally` measures one batch (the single-process and Ray runs).

    ``b`` None: model A alone, its sites measured and no outputs compared (``compare A --sites``).
    """

    def __init__(
        self, a: LoadedModel, b: LoadedModel | None, two: bool, sites: bool, reference: bool,
        providers: list[str] | None, atol: float, rtol: float,
    ) -> None:  # fmt: skip
        self.atol, self.rtol = atol, rtol
        self.runtimes = ("ort", "reference" if reference else "ort")
        self.unreachable: list[dict[str, Any]] = []
        self.per_model: dict[str, list[_SiteProbe]] = {"A": [], "B": []}
        if sites:
            for m in (a, b) if two and b is not None else (a,):
                p, u = _site_probes(m)
                self.per_model[m.label] = p
                self.unreachable += u
        self.probes = self.per_model["A"] + self.per_model["B"]
        extra = {lbl: [n for p in self.per_model[lbl] for n in (p.pre, p.post)] for lbl in self.per_model}
        self.run_a = Runner(a, self.runtimes[0], providers, extra["A"])
        self.run_b = None if b is None else Runner(b, self.runtimes[1], providers, extra["B"])
        self.b = b
        self.pairs = [] if b is None else _pair_outputs(a.output_names, b.output_names)

    def empty(self) -> Tally:
        return Tally({na: _ErrorStats(self.atol, self.rtol) for na, _ in self.pairs},
                     [(Moments.empty(1), Moments.empty(1)) for _ in self.probes], {})  # fmt: skip

    def tally(self, feeds: Feeds, into: Tally | None = None) -> Tally:
        """One batch measured, added into ``into`` (the single-process run) or into a fresh tally (a Ray worker's)."""
        t = self.empty() if into is None else into
        out_a = dict(zip(self.run_a.names, self.run_a.outputs(feeds)))
        out_b: dict[str, np.ndarray] = {}
        if self.run_b is not None and self.b is not None:
            out_b = dict(zip(self.run_b.names, self.run_b.outputs(feeds_for(self.b, feeds))))
        for na, nb in self.pairs:
            t.errors[na].add(np.asarray(out_a[na]), np.asarray(out_b[nb]))
            t.shapes.setdefault(na, np.shape(out_a[na]))
        outs = [out_a] * len(self.per_model["A"]) + [out_b] * len(self.per_model["B"])
        for k, (p, o) in enumerate(zip(self.probes, outs)):
            pre, post = t.sites[k]
            t.sites[k] = (pre.merge(p.pre_moments(o[p.pre])), post.merge(Moments.of(o[p.post])))
        t.batches += 1
        return t

    def result(self, t: Tally, labels: tuple[str, str | None]) -> CompareResult:
        if t.batches == 0:
            raise NormactError("the data source gave no batches")
        outputs = [
            t.errors[na].result(na if na == nb else f"{na} / {nb}", t.shapes.get(na, ())) for na, nb in self.pairs
        ]
        for p, (pre, post) in zip(self.probes, t.sites):
            p.pre_stats, p.post_stats = pre, post
        site_rows = [p.result() for p in self.probes] + self.unreachable
        passed = all(o["passed"] for o in outputs)
        return CompareResult(outputs, site_rows, passed, self.atol, self.rtol, t.batches, self.runtimes, labels)


def compare(
    model_a: ModelLike,
    model_b: ModelLike | None = None,
    data: Any = None,
    *,
    synthetic: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    sites: bool = False,
    reference: bool = False,
    providers: list[str] | None = None,
    shapes: Any = None,
    batches: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    images: Any = None,
    ray: bool | str | None = None,
    workers: int = 2,
    values: Any = None,
    data_options: DataOptions | None = None,
) -> CompareResult:
    """Run A and B on the same inputs and compare every output (A is the reference).

    ``model_b=None`` compares A with itself in the other runtime (``reference=True``), or
    with ``sites=True`` only measures A's normalized sites (no outputs compared). ``reference=True`` runs B
    (or A's second copy) in ``onnx.reference`` instead of ONNX Runtime.

    The inputs are read as ``calibrate`` reads them: ``data_options`` (a :class:`.data.options.DataOptions`),
    or the same fields as keywords. ``data``: an iterable of feed dicts, a ``CalibrationDataReader``, a path
    the data readers accept (``.npz``, folders of ``.npy``/``.npz``, ``test_data_set_*``, Parquet, image
    folders with ``images`` options), or None with ``synthetic=True``. ``batch_size`` splits data files into
    batches of that many samples (synthetic: the batch dimension, default 2); ``batches`` caps the number of
    batches (default: all of the data, 4 synthetic). Synthetic inputs follow the one rule of
    :mod:`.data.synthetic`, as in ``calibrate`` and ``fold``: sizes given in ``shapes`` (``{"x": [1, 3, 224,
    224]}`` or ``["x=1x3x224x224"]``) fix the dimension names they carry, a named dimension is one size across
    inputs, and the rest default (the batch size on the leading axis, 64 for image axes, 512 for a signal, 16
    elsewhere); floats N(0, 1), integers 0/1, and ``values`` (``{"sr": 16000}``) fills an input with one value.
    ``progress``: a bar on stderr when it is a terminal.

    ``ray`` (or a ``ray.data.Dataset`` as ``data``): the batches run on Ray Data
    actors (``workers``), each holding both models; their tallies merge exactly
    (maxima, sums, counts), the p99 from a bounded merged sample.
    """
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):
        raise NormactError(f"--atol and --rtol must be non-negative finite numbers, got {atol:g} and {rtol:g}")
    source = data_bundle(data_options, DataOptions(data, batches, batch_size, synthetic, shapes, values, seed, images))
    for flag, n in (("--batches", source.batches), ("--batch-size", source.batch_size)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise NormactError(f"{flag} must be a positive integer, got {n}")
    if source.shapes and not source.synthetic:
        raise NormactError("--shape sets the shapes of --synthetic inputs; data files bring their own shapes")
    if model_b is None and not reference and not sites:
        raise NormactError(
            "give a second model, --reference to compare one model across runtimes, or --sites to measure its sites"
        )
    a = LoadedModel.load(model_a, "A")
    one = model_b is None and not reference  # A's sites alone
    b = None if one else LoadedModel.load(model_b if model_b is not None else model_a, "B")
    labels = (_label(a), None if b is None else _label(b))
    setup = (model_b is not None, sites, reference, providers, atol, rtol)
    comparison = Comparison(a, b, *setup)
    if ray not in (None, False) or is_dataset(source.data):
        if source.synthetic:
            raise NormactError("--synthetic runs single-process; --ray reads --data (files, Parquet, images)")
        address = None if ray in (None, True) else str(ray)
        tally = compare_ray(comparison, (a, b), setup, source, address, workers)
        return comparison.result(tally, labels)
    tally = comparison.empty()
    source = source.with_synthetic_defaults(SYNTHETIC_BATCHES, SYNTHETIC_BATCH_SIZE)
    bar = progress_bar(source.batches, "compare", progress, unit="batch")
    try:
        for feeds in model_batches(a, source, SYNTHETIC_BATCHES, SYNTHETIC_BATCH_SIZE):
            comparison.tally(feeds, tally)
            bar.update()
    finally:
        bar.close()
    return comparison.result(tally, labels)


def _label(m: LoadedModel) -> str:
    return str(m.path) if m.path else "<in-memory model>"


# calibrate's synthetic defaults: the report measures the written model on the very batches it was calibrated on
CALIBRATE_BATCHES, CALIBRATE_BATCH_SIZE = 10, 1


def measure_sites(
    model: ModelLike,
    data_options: DataOptions,
    *,
    providers: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Each normalized site's property measured in ``model`` as written, on the data ``data_options`` names.

    The data is read as ``calibrate`` reads it (same defaults: every batch of the data; 10 synthetic batches
    of one sample). One row per site: the pre-activation's mean and variance, the normalized output's
    mean and variance, the property its method promises (static: E y² near 1 and E y
    near 0; ANAct: the forward gain E y²/Var x), the target, and whether it holds.
    Sites inside subgraphs or functions are listed as not measurable.
    """
    m = LoadedModel.load(model, "model")
    probes, unreachable = _site_probes(m)
    runner = Runner(m, "ort", providers, [n for p in probes for n in (p.pre, p.post)])
    n_batches = 0
    for feeds in model_batches(m, data_options, CALIBRATE_BATCHES, CALIBRATE_BATCH_SIZE):
        outs = dict(zip(runner.names, runner.outputs(feeds)))
        for p in probes:
            p.pre_stats = p.pre_stats.merge(p.pre_moments(outs[p.pre]))
            p.post_stats = p.post_stats.merge(Moments.of(outs[p.post]))
        n_batches += 1
    if n_batches == 0:
        raise NormactError("the data source gave no batches")
    return [p.result() for p in probes] + unreachable


def _pair_outputs(a: list[str], b: list[str]) -> list[tuple[str, str]]:
    """Outputs matched by name, or by position when the two models name them differently."""
    if set(a) <= set(b):
        return [(n, n) for n in a]
    if len(a) == len(b):
        return list(zip(a, b))
    raise NormactError(f"the models' outputs do not correspond: A has {', '.join(a)}; B has {', '.join(b)}")


# ---- on Ray Data: workers return per-batch tallies, the driver merges them (plumbing: .data.ray_data) ---------


class CompareWorker:
    """A Ray Data actor holding both models (comparison.Comparison); each batch → one pickled Tally row."""

    def __init__(
        self,
        models: list[Any],  # [ObjectRef of A's serialized proto, of B's (absent: A's sites alone)]
        paths: list[str | None],
        setup: tuple,
        kind: str,
        batch_size: int | None,
        images: Any,
        crash_marker: str | None = None,
    ) -> None:
        ray = require_ray()
        a, *b = (
            LoadedModel(onnx.load_from_string(ray.get(ref)), Path(p) if p else None, label)
            for ref, p, label in zip(models, paths, ("A", "B"))
        )
        self.comparison = Comparison(a, b[0] if b else None, *setup)
        self.feeder = Feeder(kind, model_inputs(a.proto), batch_size, images)
        self.crash_marker = crash_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tally, samples = None, 0
        for _, feed in self.feeder.feeds(batch):  # one call's batches in one tally (see StatsWorker.__call__)
            tally = self.comparison.tally(feed, tally)
            maybe_crash(self.crash_marker)
            samples += batch_samples(feed)
        return {"tally": np.array([pickle.dumps(tally)], dtype=object), "samples": np.array([samples], np.int64)}


def compare_ray(
    comparison: Comparison,
    models: tuple[LoadedModel, LoadedModel | None],
    setup: tuple,
    source: DataOptions,
    address: str | None,
    workers: int,
) -> Tally:
    """``compare`` over Ray Data: the driver's Comparison gives the layout, workers measure, tallies merge in a tree.

    ``source``'s ``batch_size`` and ``batches`` cut and cap the data as in the single-process run.
    """
    if workers < 1:
        raise NormactError(f"--workers must be ≥ 1, got {workers}")
    a = models[0]
    loaded = [m for m in models if m is not None]
    check_exists(source.data)
    with cluster(address, workers):
        ray = require_ray()
        work = plan_work(source.data, model_inputs(a.proto), source.batch_size, source.batches, source.images)
        refs = [ray.put(m.proto.SerializeToString()) for m in loaded]
        kwargs = {
            "models": refs,
            "paths": [str(m.path) if m.path else None for m in loaded],
            "setup": setup,
            "kind": work.kind,
            "batch_size": source.batch_size,
            "images": source.images,
            "crash_marker": os.environ.get(CRASH_ENV),
        }
        tree: TreeMerge[Any] = TreeMerge(lambda x, y: x.merge(y))
        for block in map_rows(work, CompareWorker, kwargs, workers):
            for rec in block["tally"]:
                tree.push(pickle.loads(rec))
    return tree.result() or comparison.empty()
