"""The ``calibrate`` operation: measure each site on sample data, then write the calibrated model and its files.

It drives :mod:`..calibration` (the statistics, single-process or on Ray), :mod:`..policy` (their constants)
and the rewrite operation (:mod:`.rewrite`, the calibrated model), as ONNX Runtime's ``quantize_static``
drives its calibrator: nothing in ``calibration/`` imports it. Options come as values, one per concern
(:class:`..data.options.DataOptions`, :class:`..policy.MethodOptions`, :class:`..selection.SiteSelection`,
:class:`..writer.OutputOptions`); the result is always a :class:`CalibrationResult`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..calibration.closing import close, wanted
from ..calibration.distributed import collect_ray
from ..calibration.report import write_html
from ..calibration.run import collect
from ..calibration.stats import CalibrationStats
from ..comparison import measure_sites
from ..data.feeding import LoadedModel, model_batches
from ..data.options import DataOptions
from ..data.ray_data import is_dataset
from ..errors import NormactError
from ..io import ModelLike
from ..ort import make_session
from ..outpaths import IN_PLACE, check_run_paths, model_files
from ..policy import MethodOptions, method_constants, missed_targets
from ..selection import SiteSelection
from ..writer import OutputOptions
from .rewrite import RewriteResult, rewrite_model

CALIBRATE_METHOD = MethodOptions("anact", "center-scale", 1.0, None, "anact", False, "ema")
"""What ``calibrate`` measures for when not told otherwise (the defaults of its CLI flags and API keywords)."""


@dataclass
class CalibrationResult:
    """What a calibration gives: the statistics, the rewrite (when a model was written), timing and notes."""

    stats: CalibrationStats
    rewrite: RewriteResult | None = None  # when a model was written
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def calibrate_model(
    model: ModelLike,
    data: DataOptions,
    output: str | os.PathLike | None = None,
    *,
    method: MethodOptions = CALIBRATE_METHOD,
    selection: SiteSelection | None = None,
    out: OutputOptions | None = None,
    stats_path: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    per_channel: bool = False,
    in_situ: bool = True,
    closing: bool | None = None,
    providers: list[str] | None = None,
    progress: bool = False,
    ray: bool | str | None = None,
    workers: int = 2,
) -> CalibrationResult:
    """ANAct (or static) calibration of ``model`` on ``data`` (see :func:`normact_onnx.api.calibrate`).

    ``method``'s options left as None take :data:`CALIBRATE_METHOD`'s (a run has no earlier statistics to
    take them from); ``q`` plays no part (the sites' variances are measured).
    """
    selection, out = selection or SiteSelection(), out or OutputOptions()
    read = model_files(model) if isinstance(model, str | os.PathLike) else []
    where = IN_PLACE if out.in_place else "output"  # in place: the output may be the model
    check_run_paths({where: output, "stats_path": stats_path, "report": report}, read)  # one rule, before work
    method = method.filled(CALIBRATE_METHOD)
    normalizer = method.normalizer()  # checks the options (MethodOptions.check: the λ rule and the aggregate)
    lambda_rule, centered_rho, aggregate = str(method.lambda_rule), bool(method.centered_rho), str(method.aggregate)
    start = time.perf_counter()
    notes = []
    normalize = normalizer if in_situ else None
    if ray not in (None, False) or is_dataset(data.data):
        if data.synthetic:
            raise NormactError("--synthetic runs single-process; --ray reads --data (files, Parquet, images)")
        if aggregate == "ema":
            aggregate = "mean"
            notes.append("--ray: factors from --aggregate mean (the EMA depends on the order of the batches)")
        stats = collect_ray(
            model,
            data,
            address=None if ray in (None, True) else str(ray),
            workers=workers,
            per_channel=per_channel,
            providers=providers,
            progress=progress,
            normalize=normalize,
            selection=selection,
        )
    else:
        stats = collect(
            model,
            data,
            per_channel=per_channel,
            providers=providers,
            progress=progress,
            normalize=normalize,
            selection=selection,
        )
    stats.settings.update(
        {"method": method.method, "lambda_rule": lambda_rule, "centered_rho": centered_rho, "aggregate": aggregate}
    )
    if method.method == "static":
        stats.settings.update(
            {"variant": method.variant, **({"ratio": method.ratio} if method.variant == "ratio" else {})}
        )
    if closing is not False and normalize is not None:
        distributed = ray not in (None, False) or is_dataset(data.data)
        stats = _closed(model, data, stats, method, providers, notes, distributed, closing)
    result = CalibrationResult(stats, notes=notes)
    if output is not None:
        constants, info = method_constants(MethodOptions(method.method), stats)
        result.rewrite = rewrite_model(
            model, output, constants=constants, provenance=info, selection=selection, out=out
        )
        missed = missed_targets(stats, result.rewrite.outcomes, method.method)
        if missed:
            notes.append(missed)
    if result.rewrite is not None and result.rewrite.rewritten and _rereadable(data):
        try:
            note = _departure(model, result.rewrite.model, stats, data, selection)
        except Exception as e:  # a warning's own check never fails a calibration that succeeded
            note = f"note: the comparison with the original model did not run ({str(e).splitlines()[0][:160]})"
        if note:
            result.notes.append(note)
    if stats_path is not None:
        stats.save(stats_path)
    if report is not None:
        measured = None
        if result.rewrite is not None and result.rewrite.path is not None and _rereadable(data):
            measured = measure_sites(result.rewrite.path, data)
        write_html(stats, report, lambda_rule, centered_rho, aggregate, measured, _left_alone(stats, result))
    result.seconds = time.perf_counter() - start
    return result


def _closed(
    model: ModelLike,
    data: DataOptions,
    stats: CalibrationStats,
    method: MethodOptions,
    providers: list[str] | None,
    notes: list[str],
    distributed: bool,
    closing: bool | None,
) -> CalibrationStats:
    """The in-situ statistics checked in the written model and repaired in depth order (:mod:`..calibration.closing`).

    ``closing``: True always, None (auto) when the batches hold fewer than ``closing.AUTO_BELOW`` rows. Needs
    the data a second time: a one-shot reader or a Ray run keeps the single in-situ pass (asked for: said so).
    """
    if distributed or not _rereadable(data):
        if closing:
            why = "--ray" if distributed else "the data cannot be read twice"
            notes.append(f"note: the closing check did not run ({why}): the constants are the single in-situ pass's")
        return stats
    if not wanted(closing, model, data):
        return stats
    options = MethodOptions(method.method)
    closed, done = close(model, data, stats, lambda st: method_constants(options, st)[0], providers=providers)
    if not done.converged:
        notes.append(
            f"note: the closing check stopped after {done.passes} passes (the cap) before every site settled; "
            f"the last pass found {len(done.off)} off ({', '.join(done.off[:5])}{', …' if len(done.off) > 5 else ''}"
            "), repaired the shallowest and could not re-check them"
        )
    return closed


def _left_alone(stats: CalibrationStats, result: CalibrationResult) -> dict[str, str]:
    """Calibrated sites the rewrite leaves as they are (gates, graph outputs), with why: the report marks them.

    From the written model's outcomes; without one, from the in-situ run's record of the sites it normalized.
    """
    if result.rewrite is not None:
        return {o.site.output: o.reason for o in result.rewrite.outcomes if o.action != "rewritten" and
                o.site.output in stats.sites}  # fmt: skip
    normalized = stats.settings.get("normalized_in_situ")
    if not isinstance(normalized, list):
        return {}
    why = "not selected (a multiplicative gate or a graph output; --all-sites includes it)"
    return {k: why for k in stats.sites if k not in normalized}


DEPARTURE = 100.0  # calibrate warns when the written model's scales depart from the original's by more than this


def _departure(
    model: ModelLike, written: onnx.ModelProto, stats: CalibrationStats, source: DataOptions, selection: SiteSelection
) -> str | None:
    """One warning line when the calibrated model's outputs (or, in situ, a site's input variance) are more than
    ``DEPARTURE``× (or less than 1/``DEPARTURE``×) the original's on the first batch; None when they are not.

    ANAct's per-site gain compounds with a pretrained network's own weight gains: a deep detector's last sites
    reach variances of 1e16 while every site's normalization "holds" (issue 21); the user is told what to use.
    """
    original = LoadedModel.load(model, "original")
    one = dataclasses.replace(source, batches=1)
    feeds = next(model_batches(original, one, synthetic_batches=1, synthetic_batch_size=one.batch_size or 1))
    want = make_session(original.proto.SerializeToString()).run(None, feeds)
    got = make_session(written.SerializeToString()).run(None, feeds)
    worst, where = 1.0, ""
    for out, a, b in zip(original.proto.graph.output, want, got):
        if np.issubdtype(np.asarray(a).dtype, np.floating):
            ra, rb = (float(np.sqrt(np.mean(np.square(np.asarray(v, np.float64))))) for v in (a, b))
            r = max(rb, 1e-30) / max(ra, 1e-30)
            if max(r, 1 / r) > max(worst, 1 / worst):
                worst, where = r, f"output {out.name!r}"
    if stats.settings.get("in_situ"):
        before = collect(model, one, selection=selection).q_per_site()
        for key, q in stats.q_per_site().items():
            r = q / before[key] if before.get(key) else 1.0
            if max(r, 1 / r) > max(worst, 1 / worst):
                worst, where = r, f"the input variance of site {stats.sites[key].name!r}"
    if max(worst, 1 / worst) <= DEPARTURE:
        return None
    return (
        f"warning: the calibrated model departs from the original: {where} is {worst:.3g}× the original's (more "
        f"than {DEPARTURE:g}×); on a deep pretrained model use --preserve-function, --method static or --centered-rho"
    )


def _rereadable(source: DataOptions) -> bool:
    """Whether the data can be read a second time (the report measures the written model on it)."""
    return source.synthetic or isinstance(source.data, str | os.PathLike | list | tuple | dict)
