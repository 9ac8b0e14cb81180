"""``compare`` and ``measure_sites``: the data read, the models run, the result put together."""

from __future__ import annotations

import math
from typing import Any

from ..data.feeding import LoadedModel, Runner, model_batches
from ..data.options import DataOptions, data_bundle
from ..data.ray_data import is_dataset
from ..errors import NormactError
from ..io import ModelLike
from ..progress import bar as progress_bar
from ..streaming import Moments
from .on_ray import compare_ray
from .result import CompareResult
from .sites import site_probes
from .tally import Comparison

# What compare reads when the options leave it open (calibrate's are the readers' own: all batches of the data; 10
# synthetic batches of one sample): every batch of the data as stored, or 4 synthetic batches of 2 samples.
SYNTHETIC_BATCHES, SYNTHETIC_BATCH_SIZE = 4, 2


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
    probes, unreachable = site_probes(m)
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
