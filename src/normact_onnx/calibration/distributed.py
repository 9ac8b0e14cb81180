"""Calibration over Ray Data: the single-process pieces, run where the data lives.

Map: each worker is a Ray Data actor (``map_batches`` with a callable class)
holding one ONNX Runtime session (kernel library registered) over the *same*
instrumented model :func:`.run.prepare` builds for the single-process run; every
batch goes through :func:`.run.run_batch` and :func:`.run.batch_moments`
(``Probe.read``); the batches of one call (a batch file's pieces, or one batch of
rows) come back as one row of per-site moments: n, mean and M2 of x and of f(x),
and the mean of f'(x)², flattened into one float64 vector.

Reduce: the driver folds the rows as they stream in with a pairwise (binary
counter) tree of Chan merges, which are associative, so memory is O(log batches)
and the result equals one pass over the data up to float64 rounding. The gated EMA
depends on batch order and is not reproduced: a distributed run's factors use
``--aggregate mean``.

The cluster, the work plan, the workers' readers, the tree merge and fault handling are the generic Ray
plumbing of :mod:`normact_onnx.data.ray_data`, shared with ``compare``'s Ray run (:mod:`normact_onnx.comparison`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx

from ..data.inputs import model_inputs
from ..data.options import DataOptions
from ..data.ray_data import (
    CRASH_ENV,
    Feeder,
    TreeMerge,
    batch_samples,
    check_exists,
    cluster,
    map_rows,
    maybe_crash,
    plan_work,
    require_ray,
)
from ..errors import NormactError
from ..graph import structure_fingerprint
from ..io import ModelLike, load_model_like, model_folder
from ..progress import bar as progress_bar
from ..streaming import Moments, mean_merge, merge_cross
from .run import SiteRecord, batch_moments, calibration_session, empty_stats, finish, prepare, run_batch
from .stats import CalibrationStats

# ---- calibration: workers return per-batch moments, the driver merges them ---------------------------------------


class StatsWorker:
    """A Ray Data actor: one ORT session over the instrumented model; each batch → one row of per-site moments."""

    def __init__(
        self,
        model: list[Any],  # [ObjectRef of the serialized model]
        base_dir: str | None,
        per_channel: bool,
        providers: list[str] | None,
        kind: str,
        batch_size: int | None,
        images: Any,
        sites: list[str],
        crash_marker: str | None = None,
        normalize: Any = None,
        selection: Any = None,
    ) -> None:
        model = onnx.load_from_string(require_ray().get(model[0]))
        self.specs = model_inputs(model)
        self.inst = prepare(model, base_dir, per_channel, normalize, selection, providers)
        got = [p.site.output for p in self.inst.probes]
        if got != sites:
            raise NormactError("the workers instrumented the model differently from the driver (sites differ)")
        self.sess = calibration_session(self.inst.model, base_dir, providers, threads=1)
        self.feeder = Feeder(kind, self.specs, batch_size, images)
        self.crash_marker = crash_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model batches of one call (a batch file's pieces, or one batch of rows), merged into one record.

        A call's output is all or nothing (a call that dies with its worker is run again from the start), so
        merging inside it keeps every batch counted once and cuts the driver's merges to one per call.
        """
        merged, batches, samples = None, 0, 0
        for where, feed in self.feeder.feeds(batch):
            values = run_batch(self.sess, self.inst, feed, where)
            maybe_crash(self.crash_marker)
            rec = batch_moments(self.inst, values, where)
            merged = rec if merged is None else merge_records(merged, rec)
            batches += 1
            samples += batch_samples(feed)
        record = encode_moments(merged).tobytes() if merged is not None else b""
        return {
            "stats": np.array([record], dtype=object),
            "batches": np.array([batches], dtype=np.int64),
            "samples": np.array([samples], dtype=np.int64),
        }


def encode_moments(sites: list[SiteRecord]) -> np.ndarray:
    """Per site: channel count C and whether the co-moment is there, then n, mean, M2 of x, of f, mean f'²
    (and the x·f co-moment): 7·C or 8·C values (C = 0 for no data)."""
    parts = []
    for x, f, d2, xf in sites:
        c = x.n.size
        if not c:
            parts.append(np.zeros(2))
            continue
        parts += [np.array([c, xf is not None], np.float64), x.n, x.mean, x.m2, f.n, f.mean, f.m2, d2]
        if xf is not None:
            parts.append(xf)
    return np.concatenate(parts).astype(np.float64)


def decode_moments(vec: np.ndarray, count: int) -> list[SiteRecord]:
    out: list[SiteRecord] = []
    i = 0
    for _ in range(count):
        c, cross = int(vec[i]), bool(vec[i + 1])
        i += 2
        if c == 0:
            out.append((Moments.empty(0), Moments.empty(0), np.zeros(0), None))
            continue
        rows = 8 if cross else 7
        a = vec[i : i + rows * c].reshape(rows, c)
        i += rows * c
        out.append((Moments(a[0], a[1], a[2]), Moments(a[3], a[4], a[5]), a[6], a[7] if cross else None))
    return out


def merge_records(a: list[SiteRecord], b: list[SiteRecord]) -> list[SiteRecord]:
    """Two partial results, site by site: Chan merges for the moments (and co-moment), count-weighted mean for f'²."""
    out: list[SiteRecord] = []
    for ra, rb in zip(a, b):
        (xa, fa, da, ca), (xb, fb, db, cb) = ra, rb
        if xa.n.size == 0 or xb.n.size == 0:
            out.append(rb if xa.n.size == 0 else ra)
            continue
        if xa.n.size != xb.n.size:
            raise NormactError(f"a site's channel count differs between batches ({xa.n.size} vs {xb.n.size})")
        cross = merge_cross(xa, fa, ca, xb, fb, cb) if ca is not None and cb is not None else None
        out.append((xa.merge(xb), fa.merge(fb), mean_merge(xa.n, da, xb.n, db), cross))
    return out


def collect_ray(
    model: ModelLike,
    source: DataOptions,
    *,
    address: str | None = None,
    workers: int = 2,
    per_channel: bool = False,
    providers: list[str] | None = None,
    progress: bool = False,
    normalize: Any = None,
    selection: Any = None,
) -> CalibrationStats:
    """:func:`.run.collect` over Ray Data: same instrumented model and statistics, merged in a tree (no EMA).

    ``source``: its ``data`` (files, Parquet, an image folder with ``images``, a Dataset), ``batches`` and
    ``batch_size``; synthetic inputs are the single-process run's (``calibrate`` refuses them here).

    ``normalize``/``selection``: in-situ calibration, as in :func:`.run.collect` (each batch normalizes
    with its own statistics, so the workers' results merge exactly whatever the order).
    """
    if workers < 1:
        raise NormactError(f"--workers must be ≥ 1, got {workers}")
    src, path = load_model_like(model)
    base_dir = model_folder(path)
    specs = model_inputs(src)
    # the driver's copy: the site list, and errors before any cluster starts
    inst = prepare(src, base_dir, per_channel, normalize, selection)
    stats = empty_stats(inst, per_channel, structure_fingerprint(src))
    sites = [p.site.output for p in inst.probes]
    check_exists(source.data)
    with cluster(address, workers):
        work = plan_work(source.data, specs, source.batch_size, source.batches, source.images)
        # the model by reference, held by this driver for the run: inline (small) constructor arguments are what
        # Ray can replay when it restarts an actor (see Ray issue 53727)
        model_ref = require_ray().put(src.SerializeToString())
        kwargs = {
            "model": [model_ref],
            "base_dir": base_dir,
            "per_channel": per_channel,
            "providers": providers,
            "kind": work.kind,
            "batch_size": source.batch_size,
            "images": source.images,
            "sites": sites,
            "crash_marker": os.environ.get(CRASH_ENV),
            "normalize": normalize,
            "selection": selection,
        }
        tree: TreeMerge[list[SiteRecord]] = TreeMerge(merge_records)
        bar = progress_bar(work.total, "calibrating (ray)", progress, unit="batch")
        batches = samples = 0
        try:
            for block in map_rows(work, StatsWorker, kwargs, workers):
                for rec, k, n in zip(block["stats"], block["batches"], block["samples"]):
                    if k:
                        tree.push(decode_moments(np.frombuffer(rec, np.float64), len(sites)))
                    batches += int(k)
                    samples += int(n)
                    bar.update(int(k))
                    if not bar.disable:  # samples per second beside the batches
                        rate = samples / max(bar.format_dict.get("elapsed", 0.0), 1e-9)
                        bar.set_postfix_str(f"{rate:.0f} samples/s", refresh=False)
        finally:
            bar.close()
    merged = tree.result()
    if merged is None:
        raise NormactError(f"{work.describe}: no batches")
    for probe, (x, f, d2, xf) in zip(inst.probes, merged):
        if x.n.size:
            s = stats.sites[probe.site.output]
            s.x, s.f, s.d2, s.xf = x, f, d2, xf
    stats.batches = batches
    stats.sources = [f"{work.describe} on Ray ({workers} workers, {samples} samples)"]
    return finish(stats, inst, normalize)
