"""``calibrate``: sample batches → per-site statistics → ANAct constants → the calibrated model.

One ONNX Runtime session runs an instrumented copy of the model (see
:mod:`.instrument`) and returns only the statistics outputs; each batch's numbers
are folded into running moments at once, so nothing grows with the number of
batches. The calibrated model is written by the same rewrite pass as static
normalization (``Norm<Act>`` with scale = λ, shift = μ).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import NormactError
from ..graph import structure_fingerprint
from ..io import ModelLike, check_output_path, clamp_ir, external_locations, load_model_like, model_folder
from ..methods.anact import AGGREGATES, Factors, anact_affine, check_options, site_factors
from ..methods.static import Affine, measured_affine
from ..outcome import Refusal
from ..passes.find import Site
from ..progress import bar as progress_bar
from .insitu import Normalizer
from .instrument import Instrumented, instrument
from .readers import check_header, conform, model_inputs, open_source
from .stats import CalibrationStats, Moments, SiteStats

Constants = Callable[[Site], Affine | str]
Selection = tuple[Any, Any, str | None, bool]  # include, exclude, nodes, all_sites: as the rewrite selects
# ORT level for calibration sessions: all of ONNX Runtime's graph optimizations. They cannot erase a site: the
# statistics (and, in situ, the normalization) read each site's pre-activation and raw output, so those values stay
# (a fusion needs the fused values to have no other reader); what a fusion changes is float rounding only.
OPTIMIZATION: bool | str = True


def calibration_session(
    model: onnx.ModelProto, base_dir: str | None, providers: list[str] | None = None, threads: int = 0
) -> Any:
    """An ORT session for the instrumented copy: kernel library registered, all graph optimizations.

    External data stays where it is: ORT is told the model's folder instead of the
    copy being written next to it. ``threads``: intra-op threads (0: ORT's default;
    a Ray worker uses its one CPU).
    """
    from ..ort import make_session, require_onnxruntime

    require_onnxruntime()
    config = {}
    if external_locations(model) and base_dir:
        config["session.model_external_initializers_file_folder_path"] = base_dir
    try:
        return make_session(model.SerializeToString(), providers, optimize=OPTIMIZATION, threads=threads, config=config)
    except Exception as e:
        raise NormactError(f"onnxruntime cannot run the model: {str(e).strip().splitlines()[0]}") from None


@dataclass
class CalibrationResult:
    """What ``calibrate(..., details=True)`` returns: the statistics, the rewrite, and timing."""

    stats: CalibrationStats
    rewrite: Any = None  # api.RewriteResult when a model was written
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def collect(
    model: ModelLike,
    data: Any = None,
    *,
    batches: int | None = None,
    batch_size: int | None = None,
    synthetic: bool = False,
    shapes: Any = None,
    seed: int = 0,
    values: Any = None,
    per_channel: bool = False,
    providers: list[str] | None = None,
    progress: bool = False,
    normalize: Normalizer | None = None,
    selection: Selection | None = None,
    images: Any = None,
) -> CalibrationStats:
    """Run the batches through the instrumented model and return the merged per-site statistics.

    ``normalize``: calibrate in situ (:mod:`.insitu`): the sites the ``selection`` flags
    (when None: a default rewrite's) leave to be normalized are normalized with each batch's
    statistics on their way through the copy, so every site is measured with the sites
    before it already normalized. None: measure the original network as it is.
    """
    src, path = load_model_like(model)
    base_dir = model_folder(path)
    specs = model_inputs(src)
    source = open_source(data, specs, batch_size, synthetic, shapes, batches, seed, values, images=images)
    if source.headers is not None:  # files: every batch checked before the first run
        for i, (where, header) in enumerate(source.headers()):
            if batches is not None and i >= batches:
                break
            check_header(specs, header, where)
    inst = prepare(src, base_dir, per_channel, normalize, selection)
    sess = calibration_session(inst.model, base_dir, providers)
    stats = empty_stats(inst, per_channel, structure_fingerprint(src))
    total = min(source.total, batches) if source.total and batches else (batches or source.total)
    bar = progress_bar(total, "calibrating", progress, unit="batch")
    n = 0
    try:
        for where, raw in source.batches():
            if batches is not None and n >= batches:
                break
            fold(stats, inst, run_batch(sess, inst, conform(specs, raw, where), where), where)
            n += 1
            bar.update()
    finally:
        bar.close()
    if n == 0:
        raise NormactError(f"{source.describe}: no batches")
    stats.batches = n
    stats.sources = [source.describe]
    return finish(stats, inst, normalize)


def _check_finite(site: Site, where: str, x: Any, f: Any, d2: np.ndarray, xf: np.ndarray | None) -> None:
    """A batch whose statistics are not finite poisons every later merge: refuse it by name."""
    parts = [x.mean, x.m2, f.mean, f.m2, d2] + ([xf] if xf is not None else [])
    if not all(np.all(np.isfinite(p)) for p in parts):
        what = "its input" if not (np.all(np.isfinite(x.mean)) and np.all(np.isfinite(x.m2))) else "its output"
        raise NormactError(
            f"{where}: site {site.name} ({site.kind}): {what} holds NaN or Inf on this batch "
            "(check the data, or the model overflows on it)"
        )


def finish(stats: CalibrationStats, inst: Instrumented, normalize: Normalizer | None) -> CalibrationStats:
    """Record how the statistics were measured; refuse a site to be normalized whose statistics are undefined."""
    stats.settings["in_situ"] = normalize is not None
    if normalize is not None:
        stats.settings.update(normalize.as_dict())
        stats.settings["normalized_in_situ"] = inst.in_situ
    for s in stats.ordered():  # a site left alone may be constant (a rewrite skips it with the reason)
        if s.key in inst.in_situ and s.x.n.size and np.all(s.x.n > 0) and not np.any(s.x.var > 0):
            raise NormactError(
                f"site {s.name} ({s.kind}): its pre-activation is constant on all {stats.batches} batches "
                "(zero variance): its statistics are undefined; calibrate on varied data or exclude it (--nodes)"
            )
    return stats


# ---- the pieces the single-process and the distributed (Ray) runs share ----------------------------------------


def prepare(
    src: onnx.ModelProto,
    base_dir: str | None,
    per_channel: bool,
    normalize: Normalizer | None = None,
    selection: Selection | None = None,
) -> Instrumented:
    """The instrumented copy (IR clamped for ONNX Runtime), or why nothing in the model can be calibrated.

    ``normalize``: in situ (:mod:`.insitu`), for the sites the ``selection`` flags (include, exclude,
    nodes, all_sites; None: a default rewrite's) leave to be normalized.
    """
    selected = None
    if normalize is not None:
        from ..api import site_filter

        why = site_filter(*(selection or (None, None, None, False)))
        selected = lambda site: why(site) is None  # noqa: E731
    inst = instrument(src, base_dir, per_channel, normalize=normalize, selected=selected)
    if not inst.probes:
        if not inst.sites:
            raise NormactError("no activation sites found: nothing to calibrate")
        why = "; ".join(sorted(set(inst.skipped.values())))
        raise NormactError(f"none of the {len(inst.sites)} activation sites can be calibrated ({why})")
    clamp_ir(inst.model)
    return inst


def run_batch(sess: Any, inst: Instrumented, feed: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """One checked batch through the instrumented model: statistic output name → value."""
    names = inst.output_names
    try:
        return dict(zip(names, sess.run(names, feed)))
    except Exception as e:
        raise NormactError(f"{where}: onnxruntime failed: {str(e).strip().splitlines()[0]}") from None


SiteRecord = tuple[Moments, Moments, np.ndarray, np.ndarray | None]  # x, f, mean f'², x·f co-moment


def batch_moments(inst: Instrumented, values: dict[str, np.ndarray], where: str = "") -> list[SiteRecord]:
    """One run's outputs → per probe (site) this batch's moments of x and f, mean of f'(x)², co-moment.

    A batch whose statistics are not finite is refused, naming the site and ``where``.
    """
    records = [probe.read(values) for probe in inst.probes]
    if not np.isfinite(sum(float(np.sum(v)) for v in values.values())):  # one check per batch
        for probe, rec in zip(inst.probes, records):
            if rec[0].n.size:
                _check_finite(probe.site, where, *rec)
    return records


def fold(stats: CalibrationStats, inst: Instrumented, values: dict[str, np.ndarray], where: str = "") -> None:
    """Fold one batch's outputs into the running statistics (moments exactly, plus the gated EMA)."""
    for probe, (x, f, d2, xf) in zip(inst.probes, batch_moments(inst, values, where)):
        if x.n.size:
            stats.sites[probe.site.output].add(x, f, d2, xf)


def empty_stats(inst: Instrumented, per_channel: bool, fp: str) -> CalibrationStats:
    """One SiteStats per probe, no data yet (the first batch fixes each site's channel count).

    ``fp``: the model's structure fingerprint (statistics are refused for another model).
    """
    sites = {}
    for p in inst.probes:
        s = p.site
        sites[s.output] = SiteStats(
            s.output, s.name, s.kind, s.path, p.depth, p.channel_axis, p.channel_shape,
            Moments.empty(0), Moments.empty(0), np.zeros(0),
        )  # fmt: skip
    return CalibrationStats(sites, per_channel, 0, fp, [], dict(inst.skipped))


def anact_constants(
    stats: CalibrationStats, lambda_rule: str = "anact", centered_rho: bool = False, aggregate: str = "ema"
) -> Constants:
    """The rewrite's per-site constants: λ and μ from each site's statistics, or why there are none."""
    check_options(lambda_rule, aggregate)

    def constants(site: Site) -> Affine | str:
        s = _site_stats(stats, site)
        if isinstance(s, str):
            return s
        fac = site_factors(s, lambda_rule, centered_rho, aggregate)
        return fac.reason if isinstance(fac, Refusal) else anact_affine(s, fac)

    return constants


def _site_stats(stats: CalibrationStats, site: Site) -> SiteStats | str:
    s = stats.sites.get(site.output)
    if s is None:
        return f"no statistics: {stats.skipped.get(site.output, 'site not in the statistics file')}"
    if s.kind != site.kind:
        return f"the statistics are for a {s.kind} site, this one is {site.kind}"
    if s.x.n.size == 0 or not np.all(s.x.n > 0):
        return "no data reached this site"
    return s


def static_stats_constants(
    stats: CalibrationStats, variant: str = "center-scale", ratio: float | None = None
) -> Constants:
    """Static constants from each site's measured moments (see :func:`..methods.static.measured_affine`)."""

    def constants(site: Site) -> Affine | str:
        s = _site_stats(stats, site)
        if isinstance(s, str):
            return s
        got = measured_affine(s.f.mean, s.f.var, s.x.mean, s.x.var, s.cov, variant, ratio)
        if isinstance(got, Refusal):
            return got.reason
        return _shaped(s, *got)

    return constants


def _shaped(s: SiteStats, scale: np.ndarray, shift: np.ndarray, slope: np.ndarray) -> Affine:
    """Per-site floats, or per-channel arrays shaped to broadcast against the pre-activation."""
    if s.channel_axis is None:
        return Affine(float(scale[0]), float(shift[0]), float(slope[0]))
    shape = [scale.size if d == -1 else d for d in s.channel_shape]
    return Affine(scale.reshape(shape), shift.reshape(shape), slope.reshape(shape))


def stats_constants(
    stats: CalibrationStats,
    method: str = "anact",
    *,
    lambda_rule: str | None = None,
    centered_rho: bool | None = None,
    aggregate: str | None = None,
    variant: str | None = None,
    q: float = 1.0,
    ratio: float | None = None,
) -> tuple[Constants, dict[str, Any]]:
    """Constants and provenance for ``rewrite`` from statistics: ANAct, or static from each site's measured moments.

    Options left as None take what the calibration run was asked for (stored in the file).
    Statistics measured in situ describe the network as normalized by one method: using
    them for another is refused (the constants would not hold in the written model).
    """
    settings = stats.settings
    if method not in ("static", "anact"):
        raise NormactError(f"unknown method {method!r}; choose static or anact")
    if settings.get("in_situ"):
        measured = settings.get("method", "anact")
        if method != measured:
            raise NormactError(
                f"these statistics were measured in situ with {measured} sites upstream; {method} constants from "
                f"them would not hold in the written model: run normact-onnx calibrate --method {method}"
            )
        if method == "static" and variant is not None and variant != settings.get("variant", "center-scale"):
            raise NormactError(
                f"these statistics were measured in situ with --variant {settings.get('variant')}; for {variant} "
                f"run normact-onnx calibrate --method static --variant {variant}"
            )
    if method == "static":
        variant = variant or settings.get("variant", "center-scale")
        ratio = ratio if ratio is not None else settings.get("ratio")
        info = {"method": "static", "variant": variant, "q": "measured", "in_situ": bool(settings.get("in_situ"))}
        if variant == "ratio":
            info["ratio"] = ratio
        return static_stats_constants(stats, variant, ratio), info
    rule = lambda_rule or settings.get("lambda_rule", "anact")
    centered = bool(settings.get("centered_rho", False)) if centered_rho is None else centered_rho
    agg = aggregate or settings.get("aggregate", "ema")
    if agg == "ema" and stats.merged_from > 1:
        agg = "mean"  # merged files carry no EMA state (it depends on batch order)
    info = {
        "method": "anact",
        "lambda_rule": rule,
        "centered_rho": centered,
        "aggregate": agg,
        "per_channel": stats.per_channel,
        "batches": stats.batches,
        "in_situ": bool(settings.get("in_situ")),
    }
    return anact_constants(stats, rule, centered, agg), info


def factors_table(
    stats: CalibrationStats, lambda_rule: str, centered_rho: bool, aggregate: str
) -> list[tuple[SiteStats, Factors | Refusal]]:
    """Every site with its factors (or why none), in depth order: the terminal table and the report."""
    return [(s, site_factors(s, lambda_rule, centered_rho, aggregate)) for s in stats.ordered()]


def calibrate(
    model: ModelLike,
    data: Any = None,
    output: str | os.PathLike | None = None,
    *,
    stats_path: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    batches: int | None = None,
    batch_size: int | None = None,
    synthetic: bool = False,
    shapes: Any = None,
    seed: int = 0,
    values: Any = None,
    per_channel: bool = False,
    lambda_rule: str = "anact",
    centered_rho: bool = False,
    aggregate: str = "ema",
    method: str = "anact",
    variant: str = "center-scale",
    ratio: float | None = None,
    in_situ: bool = True,
    providers: list[str] | None = None,
    progress: bool = False,
    include: Any = None,
    exclude: Any = None,
    nodes: str | None = None,
    all_sites: bool = False,
    form: str = "function",
    verify: bool = True,
    in_place: bool = False,
    write_unchanged: bool = True,
    details: bool = False,
    images: Any = None,
    ray: bool | str | None = None,
    workers: int = 2,
) -> CalibrationStats | CalibrationResult:
    """ANAct (or static) calibration (docs/math.md §2) of ``model`` on ``data``.

    ``in_situ`` (default): every site the written model will normalize (the selection
    flags decide which) is normalized with each batch's statistics on its way through,
    so each site is measured where it sits, in the network as it will be written
    (:mod:`.insitu`). ``method``: ``"anact"`` (λ, μ) or ``"static"`` (``variant`` from
    each site's measured moments); the statistics file records which.

    ``data``: a path (.npz, .npy, a folder of them, a test_data_set_* folder), an
    object with ``get_next()`` (ONNX Runtime's CalibrationDataReader), an
    iterable of ``{input: array}`` dicts, or None with ``synthetic=True``.
    Parquet files and image folders (``images``: a :class:`.rows.ImageOptions`)
    are read too, and a ``ray.data.Dataset`` (columns named after the inputs).
    Writes the calibrated model to ``output``, the statistics to ``stats_path``
    and an HTML report to ``report`` when given; returns the statistics (or a
    :class:`CalibrationResult` with ``details=True``).

    ``ray``: run on Ray Data (:mod:`.distributed`) with ``workers`` actors: True
    starts a local cluster for the call, ``"auto"`` or an address joins one; a
    Dataset as ``data`` implies it. The moments equal the single-process run's;
    the EMA depends on batch order, so the factors use ``aggregate="mean"``.
    """
    for dest in (output, stats_path, report):
        if dest is not None:
            check_output_path(dest)
    check_options(lambda_rule, aggregate)
    if aggregate not in AGGREGATES:
        raise NormactError(f"unknown aggregate {aggregate!r}")
    normalizer = Normalizer(method, lambda_rule, centered_rho, variant, ratio)  # checks the options
    from ..api import _kinds

    start = time.perf_counter()
    notes = []
    from .distributed import is_dataset

    normalize = normalizer if in_situ else None
    selection = (_kinds(include, "--include"), _kinds(exclude, "--exclude"), nodes, all_sites)
    if ray not in (None, False) or is_dataset(data):
        if synthetic:
            raise NormactError("--synthetic runs single-process; --ray reads --data (files, Parquet, images)")
        if aggregate == "ema":
            aggregate = "mean"
            notes.append("--ray: factors from --aggregate mean (the EMA depends on the order of the batches)")
        from .distributed import collect_ray

        stats = collect_ray(
            model,
            data,
            address=None if ray in (None, True) else str(ray),
            workers=workers,
            batches=batches,
            batch_size=batch_size,
            per_channel=per_channel,
            providers=providers,
            progress=progress,
            images=images,
            normalize=normalize,
            selection=selection,
        )
    else:
        stats = collect(
            model,
            data,
            batches=batches,
            batch_size=batch_size,
            synthetic=synthetic,
            shapes=shapes,
            seed=seed,
            values=values,
            per_channel=per_channel,
            providers=providers,
            progress=progress,
            normalize=normalize,
            selection=selection,
            images=images,
        )
    stats.settings.update(
        {"method": method, "lambda_rule": lambda_rule, "centered_rho": centered_rho, "aggregate": aggregate}
    )
    if method == "static":
        stats.settings.update({"variant": variant, **({"ratio": ratio} if variant == "ratio" else {})})
    result = CalibrationResult(stats, notes=notes)
    if output is not None:
        from ..api import rewrite

        constants, info = stats_constants(stats, method)
        result.rewrite = rewrite(
            model,
            output,
            constants=constants,
            method=info,
            include=include,
            exclude=exclude,
            nodes=nodes,
            all_sites=all_sites,
            form=form,
            verify=verify,
            in_place=in_place,
            write_unchanged=write_unchanged,
            details=True,
        )
    if stats_path is not None:
        stats.save(stats_path)
    if report is not None:
        from .report import write_html

        measured = None
        if result.rewrite is not None and result.rewrite.path is not None and _rereadable(data, synthetic):
            from ..comparison import measure_sites

            measured = measure_sites(
                result.rewrite.path,
                data,
                synthetic=synthetic,
                shapes=shapes,
                batches=batches or 10,
                seed=seed,
                split=batch_size,
            )
        write_html(stats, report, lambda_rule, centered_rho, aggregate, measured)
    result.seconds = time.perf_counter() - start
    return result if details else stats


def _rereadable(data: Any, synthetic: bool) -> bool:
    """Whether the data can be read a second time (the report measures the written model on it)."""
    return synthetic or isinstance(data, str | os.PathLike | list | tuple | dict)
