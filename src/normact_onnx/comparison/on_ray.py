"""``compare`` on Ray Data: workers return per-batch tallies, the driver merges them in a tree.

The cluster, the work plan, the workers' readers and the tree merge are :mod:`normact_onnx.data.ray_data`'s.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..data.feeding import LoadedModel
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
from .tally import Comparison, Tally


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
