"""``calibrate``: sample batches → per-site statistics → ANAct constants → the calibrated model.

One ONNX Runtime session runs an instrumented copy of the model (see
:mod:`.instrument`) and returns only the statistics outputs; each batch's numbers
are folded into running moments at once, so nothing grows with the number of
batches. The calibrated model is written by the same rewrite pass as static
normalization (``Norm<Act>`` with scale = λ, shift = μ).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import onnx

from ..errors import NormactError
from ..io import ModelLike, clamp_ir, external_locations, load_model_like, model_folder
from ..methods.anact import AGGREGATES, Factors, anact_affine, check_options, site_factors
from ..methods.static import Affine
from ..passes.find import Site
from .instrument import Instrumented, instrument
from .readers import check_header, conform, model_inputs, open_source
from .stats import CalibrationStats, SiteStats, fingerprint

Constants = Callable[[Site], Affine | str]
OPTIMIZATION = "basic"  # ORT level for calibration sessions: constant folding only, no fusions


class Progress:
    """A one-line progress bar on a terminal (stderr); silent when not asked for or not a terminal."""

    def __init__(self, total: int | None, enabled: bool, stream: TextIO | None = None, label: str = "calibrating"):
        self.total, self.stream, self.label = total, stream or sys.stderr, label
        self.enabled = enabled
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0

    def step(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            eta = (self.total - self.done) / rate if rate else 0.0
            text = f"\r{self.label} [{bar:<30}] {self.done}/{self.total} batches  {rate:.1f}/s  eta {eta:.0f}s"
        else:
            text = f"\r{self.label}: {self.done} batches  {rate:.1f}/s"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


def calibration_session(model: onnx.ModelProto, base_dir: str | None, providers: list[str] | None = None) -> Any:
    """An ORT session for the instrumented copy: kernel library registered, no fusions.

    External data stays where it is: ORT is told the model's folder instead of the
    copy being written next to it.
    """
    from ..ort import make_session, require_onnxruntime

    require_onnxruntime()
    config = {}
    if external_locations(model) and base_dir:
        config["session.model_external_initializers_file_folder_path"] = base_dir
    try:
        return make_session(model.SerializeToString(), providers, optimize=OPTIMIZATION, **config)
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
) -> CalibrationStats:
    """Run the batches through the instrumented model and return the merged per-site statistics."""
    src, path = load_model_like(model)
    base_dir = model_folder(path)
    specs = model_inputs(src)
    source = open_source(data, specs, batch_size, synthetic, shapes, batches, seed, values)
    if source.headers is not None:  # files: every batch checked before the first run
        for i, (where, header) in enumerate(source.headers()):
            if batches is not None and i >= batches:
                break
            check_header(specs, header, where)
    inst = instrument(src, base_dir, per_channel)
    if not inst.probes:
        if not inst.sites:
            raise NormactError("no activation sites found: nothing to calibrate")
        why = "; ".join(sorted(set(inst.skipped.values())))
        raise NormactError(f"none of the {len(inst.sites)} activation sites can be calibrated ({why})")
    clamp_ir(inst.model)
    sess = calibration_session(inst.model, base_dir, providers)
    stats = _empty_stats(inst, per_channel)
    names = inst.output_names
    total = min(source.total, batches) if source.total and batches else (batches or source.total)
    bar = Progress(total, progress)
    n = 0
    try:
        for where, raw in source.batches():
            if batches is not None and n >= batches:
                break
            feed = conform(specs, raw, where)
            try:
                values = dict(zip(names, sess.run(names, feed)))
            except Exception as e:
                raise NormactError(f"{where}: onnxruntime failed: {str(e).strip().splitlines()[0]}") from None
            for probe in inst.probes:
                x, f, d2 = probe.read(values)
                if x.n.size:
                    stats.sites[probe.site.output].add(x, f, d2)
            n += 1
            bar.step()
    finally:
        bar.close()
    if n == 0:
        raise NormactError(f"{source.describe}: no batches")
    stats.batches = n
    stats.sources = [source.describe]
    return stats


def _empty_stats(inst: Instrumented, per_channel: bool) -> CalibrationStats:
    from .stats import Moments

    sites = {}
    for p in inst.probes:
        s = p.site
        sites[s.output] = SiteStats(
            s.output, s.name, s.kind, s.path, p.depth, p.channel_axis, p.channel_shape,
            Moments.empty(0), Moments.empty(0), np.zeros(0),
        )  # fmt: skip
    fp = fingerprint([(s.output, s.kind) for s in inst.sites])
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
        return fac if isinstance(fac, str) else anact_affine(s, fac)

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


def stats_constants(
    stats: CalibrationStats,
    method: str = "anact",
    *,
    lambda_rule: str | None = None,
    centered_rho: bool | None = None,
    aggregate: str | None = None,
    variant: str = "center-scale",
    q: float = 1.0,
    ratio: float | None = None,
) -> tuple[Constants, dict[str, Any]]:
    """Constants and provenance for ``rewrite`` from statistics: ANAct, or static at each site's measured q.

    Options left as None take what the calibration run was asked for (stored in the file).
    """
    settings = stats.settings
    if method == "static":
        from ..api import static_constants

        base = static_constants(q, variant, ratio, q_per_site=stats.q_per_site())

        def static(site: Site) -> Affine | str:
            s = _site_stats(stats, site)
            return s if isinstance(s, str) else base(site)

        info = {"method": "static", "variant": variant, "q": "measured", **({"ratio": ratio} if ratio else {})}
        return static, info
    if method != "anact":
        raise NormactError(f"unknown method {method!r}; choose static or anact")
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
    }
    return anact_constants(stats, rule, centered, agg), info


def factors_table(
    stats: CalibrationStats, lambda_rule: str, centered_rho: bool, aggregate: str
) -> list[tuple[SiteStats, Factors | str]]:
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
    providers: list[str] | None = None,
    progress: bool = False,
    include: Any = None,
    exclude: Any = None,
    nodes: str | None = None,
    all_sites: bool = False,
    form: str = "function",
    verify: bool = True,
    in_place: bool = False,
    details: bool = False,
) -> CalibrationStats | CalibrationResult:
    """ANAct calibration (MATH.md §2) of ``model`` on ``data``.

    ``data``: a path (.npz, .npy, a folder of them, a test_data_set_* folder), an
    object with ``get_next()`` (ONNX Runtime's CalibrationDataReader), an
    iterable of ``{input: array}`` dicts, or None with ``synthetic=True``.
    Writes the calibrated model to ``output``, the statistics to ``stats_path``
    and an HTML report to ``report`` when given; returns the statistics (or a
    :class:`CalibrationResult` with ``details=True``).
    """
    check_options(lambda_rule, aggregate)
    if aggregate not in AGGREGATES:
        raise NormactError(f"unknown aggregate {aggregate!r}")
    start = time.perf_counter()
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
    )
    stats.settings = {"lambda_rule": lambda_rule, "centered_rho": centered_rho, "aggregate": aggregate}
    result = CalibrationResult(stats)
    if output is not None:
        from ..api import rewrite

        constants, info = stats_constants(stats, "anact")
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
            details=True,
        )
    if stats_path is not None:
        stats.save(stats_path)
    if report is not None:
        from .report import write_html

        write_html(stats, report, lambda_rule, centered_rho, aggregate)
    result.seconds = time.perf_counter() - start
    return result if details else stats


def constants_for_cli(args: Any) -> tuple[Constants | None, dict[str, Any] | None]:
    """``rewrite --method static|anact --stats FILE``: (None, None) keeps plain static normalization."""
    if args.stats is None:
        if args.method == "anact":
            raise NormactError("--method anact needs --stats STATS.json (from normact-onnx calibrate)")
        return None, None
    stats = CalibrationStats.load(args.stats)
    constants, info = stats_constants(
        stats,
        args.method,
        lambda_rule=args.lambda_rule,
        centered_rho=args.centered_rho,
        aggregate=args.aggregate,
        variant=args.variant,
        q=args.q,
        ratio=args.ratio,
    )
    return constants, {**info, "stats": str(args.stats)}
