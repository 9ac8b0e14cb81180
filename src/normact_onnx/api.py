"""The Python API behind the CLI: ``inspect``, ``rewrite`` and ``calibrate``, the orchestration layer.

Each accepts a path or an ``onnx.ModelProto``. ``rewrite`` returns the rewritten
model and, given ``output``, writes it atomically after verifying it. ``calibrate``
drives :mod:`.calibration` (measure the statistics), :mod:`.policy` (their constants)
and ``rewrite`` (the calibrated model), as ONNX Runtime's ``quantize_static`` drives its
calibrator: nothing in ``calibration/`` imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import onnx

from .calibration.batches import DataOptions
from .calibration.distributed import collect_ray, is_dataset
from .calibration.insitu import Normalizer
from .calibration.report import write_html
from .calibration.run import collect
from .calibration.stats import CalibrationStats, check_stats_model
from .comparison import LoadedModel, data_bundle, measure_sites, model_batches
from .errors import NormactError
from .graph import SMALL_CONST, attr_value, const_value, containers, default_opset
from .interop import same_type
from .io import (
    ModelLike,
    atomic_path,
    check_output_path,
    clamp_ir,
    external_locations,
    load_model_like,
    model_folder,
    refuse_overwrite,
)
from .methods.anact import AGGREGATES, check_options
from .ort import kernel_library, make_session
from .outpaths import IN_PLACE, check_run_paths, model_files
from .passes.find import Site, find_sites
from .passes.kernel_form import mark_fused
from .passes.normalize import DOUBLE_REASON, FORMS, Plan, SiteOutcome, apply_plan
from .policy import Constants, MethodOptions, check_some_rewritten, method_constants, missed_targets, select
from .progress import bar as progress_bar
from .progress import stage
from .selection import SiteSelection
from .verify import check_whole_model
from .writer import OutputOptions, check_input, save_verified, verify_in_memory

MIN_OPSET = 7


def _check_opset(model: onnx.ModelProto) -> None:
    opset = default_opset(model.opset_import)
    if opset < MIN_OPSET:
        raise NormactError(f"model opset {opset} is older than normact-onnx supports (≥ {MIN_OPSET})")


def inspect(model: ModelLike) -> list[dict[str, Any]]:
    """Every activation site: name, kind, how it was written, graph path, normalized or not, skip reason."""
    m, path = load_model_like(model)
    check_input(m, path, runtime=False)
    return [s.summary() for s in find_sites(m, model_folder(path))]


@dataclass
class RewriteResult:
    model: onnx.ModelProto
    outcomes: list[SiteOutcome]
    path: Path | None = None
    notes: list[str] = field(default_factory=list)
    verification: list[dict[str, Any]] = field(default_factory=list)
    misses: list[dict[str, Any]] = field(default_factory=list)  # candidates that did not qualify, and why
    whole_model: dict[str, Any] = field(default_factory=dict)  # the rewritten model against the original

    @property
    def rewritten(self) -> list[SiteOutcome]:
        return [o for o in self.outcomes if o.action == "rewritten"]

    def report(self) -> dict[str, Any]:
        return {
            "output": str(self.path) if self.path else None,
            "notes": self.notes,
            "sites": [o.as_dict() for o in self.outcomes],
            "verification": self.verification,
            "whole_model_check": self.whole_model or None,
        }

    def table(self) -> str:
        """Before/after counts per kind, for people."""
        rows: dict[str, Counter] = {}
        for o in self.outcomes:
            rows.setdefault(o.site.kind, Counter())[o.action] += 1
        lines = [f"{'kind':<14}{'found':>7}{'rewritten':>11}{'skipped':>9}{'already':>9}"]
        for kind, c in rows.items():
            lines.append(f"{kind:<14}{sum(c.values()):>7}{c['rewritten']:>11}{c['skipped']:>9}{c['normalized']:>9}")
        return "\n".join(lines)


@overload
def rewrite(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    variant: str | None = None,
    q: float = 1.0,
    ratio: float | None = None,
    form: str = "function",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    nodes: str | None = None,
    all_sites: bool = False,
    preserve_function: bool = False,
    constants: Constants | None = None,
    method: str | dict[str, Any] | None = None,
    stats: Any = None,
    lambda_rule: str | None = None,
    centered_rho: bool | None = None,
    aggregate: str | None = None,
    force: bool = False,
    verify: bool = True,
    in_place: bool = False,
    dry_run: bool = False,
    write_unchanged: bool = True,
    details: Literal[False] = ...,
    progress: bool = False,
    selection: SiteSelection | None = None,
    output_options: OutputOptions | None = None,
) -> onnx.ModelProto: ...


@overload
def rewrite(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    variant: str | None = None,
    q: float = 1.0,
    ratio: float | None = None,
    form: str = "function",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    nodes: str | None = None,
    all_sites: bool = False,
    preserve_function: bool = False,
    constants: Constants | None = None,
    method: str | dict[str, Any] | None = None,
    stats: Any = None,
    lambda_rule: str | None = None,
    centered_rho: bool | None = None,
    aggregate: str | None = None,
    force: bool = False,
    verify: bool = True,
    in_place: bool = False,
    dry_run: bool = False,
    write_unchanged: bool = True,
    details: Literal[True],
    progress: bool = False,
    selection: SiteSelection | None = None,
    output_options: OutputOptions | None = None,
) -> RewriteResult: ...


@overload
def rewrite(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    variant: str | None = None,
    q: float = 1.0,
    ratio: float | None = None,
    form: str = "function",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    nodes: str | None = None,
    all_sites: bool = False,
    preserve_function: bool = False,
    constants: Constants | None = None,
    method: str | dict[str, Any] | None = None,
    stats: Any = None,
    lambda_rule: str | None = None,
    centered_rho: bool | None = None,
    aggregate: str | None = None,
    force: bool = False,
    verify: bool = True,
    in_place: bool = False,
    dry_run: bool = False,
    write_unchanged: bool = True,
    details: bool = ...,
    progress: bool = False,
    selection: SiteSelection | None = None,
    output_options: OutputOptions | None = None,
) -> onnx.ModelProto | RewriteResult: ...


@same_type("model")
def rewrite(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    variant: str | None = None,
    q: float = 1.0,
    ratio: float | None = None,
    form: str = "function",
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    nodes: str | None = None,
    all_sites: bool = False,
    preserve_function: bool = False,
    constants: Constants | None = None,
    method: str | dict[str, Any] | None = None,
    stats: Any = None,
    lambda_rule: str | None = None,
    centered_rho: bool | None = None,
    aggregate: str | None = None,
    force: bool = False,
    verify: bool = True,
    in_place: bool = False,
    dry_run: bool = False,
    write_unchanged: bool = True,
    details: bool = False,
    progress: bool = False,
    selection: SiteSelection | None = None,
    output_options: OutputOptions | None = None,
) -> onnx.ModelProto | RewriteResult:
    """Normalize the activations of ``model``; write to ``output`` when given.

    ``method`` is ``"static"`` (default; with ``stats``, each site at its measured q) or
    ``"anact"`` (λ and μ from ``stats``: a :class:`~normact_onnx.calibration.CalibrationStats`
    or the path of a stats JSON written by ``calibrate``). ``lambda_rule`` (``"anact"`` or ``"xavier"``),
    ``centered_rho`` and ``aggregate`` (``"ema"`` or ``"mean"``) choose ANAct's factors; left as None they
    take what the calibration recorded. The choice goes through :func:`.policy.method_constants`, the
    door the CLI uses too. Callers with their own ``constants(site)`` pass the provenance to stamp as a
    dict in ``method``.

    Statistics of another model (their graph fingerprint differs) are refused unless ``force``.
    With ``output`` the file exists afterwards even when nothing changes (a verified copy), unless
    ``write_unchanged=False`` (the CLI without ``-o``). Returns the rewritten ``ModelProto`` (or the
    full :class:`RewriteResult` with ``details=True``). The input model object is not modified.
    ``progress``: the stages on stderr when it is a terminal.

    ``selection`` (a :class:`.selection.SiteSelection`) and ``output_options`` (a :class:`.writer.OutputOptions`)
    carry the site-selection and writing options as one value each, instead of ``include``/``exclude``/``nodes``/
    ``all_sites`` and ``form``/``verify``/``in_place``/``write_unchanged``; pass one way or the other.
    """
    selection, out = _bundles(
        selection, output_options, include, exclude, nodes, all_sites, form, verify, in_place, write_unchanged
    )
    if output is not None and not dry_run:
        check_output_path(output)
    options = MethodOptions(
        method if isinstance(method, str) else "static", variant, q, ratio, lambda_rule, centered_rho, aggregate
    )
    if isinstance(method, str) or stats is not None:  # a named method: statistics decide, or plain static below
        stats = _load_stats(stats)
        constants, method = None, None
        if stats is not None or options.method != "static":
            constants, method = method_constants(options, stats)
    if out.form not in FORMS:
        raise NormactError(f"unknown --form {out.form!r}; choose one of {', '.join(FORMS)}")
    if out.form == "custom-op" and out.verify and not dry_run and kernel_library() is None:
        raise NormactError(
            "--form custom-op needs the kernel library to run (and to verify), and it was not built; "
            "install the package with its kernels, or pass --no-verify"
        )
    design_q = q if constants is None and not preserve_function else None  # plain static: is q plausible?
    if constants is None:
        constants, method = method_constants(options)
    with progress_bar(6 if out.verify else 4, "rewrite", progress, unit="stage") as bar:
        stage(bar, "loading")
        result = _rewrite(
            model,
            output,
            bar,
            Plan([], method or {}, out.form, preserve_function),
            selection,
            out,
            constants=constants,
            dry_run=dry_run,
            design_q=design_q,
            stats=stats,
            force=force,
        )
    if stats is not None:  # the one-line warning calibrate -o gives, for statistics calibrated earlier
        missed = missed_targets(stats, result.outcomes, options.method)
        if missed:
            result.notes.append(missed)
    return result if details else result.model


def _bundles(
    selection: SiteSelection | None,
    output_options: OutputOptions | None,
    include: Iterable[str] | str | None,
    exclude: Iterable[str] | str | None,
    nodes: str | None,
    all_sites: bool,
    form: str,
    verify: bool,
    in_place: bool,
    write_unchanged: bool,
) -> tuple[SiteSelection, OutputOptions]:
    """The selection and output bundles of a public call: as given, or built from the loose keywords."""
    if selection is None:
        selection = SiteSelection.parse(include, exclude, nodes, all_sites)
    elif (include, exclude, nodes, all_sites) != (None, None, None, False):
        raise NormactError("pass the site selection as selection= or as include/exclude/nodes/all_sites, not both")
    loose = OutputOptions(form, verify, in_place, write_unchanged)
    if output_options is None:
        output_options = loose
    elif loose != OutputOptions():
        raise NormactError(
            "pass the output options as output_options= or as form/verify/in_place/write_unchanged, not both"
        )
    return selection, output_options


def _rewrite(
    model: ModelLike,
    output: str | os.PathLike | None,
    bar: Any,
    plan: Plan,
    selection: SiteSelection,
    out: OutputOptions,
    *,
    constants: Constants,
    dry_run: bool,
    design_q: float | None = None,
    stats: Any = None,
    force: bool = False,
) -> RewriteResult:
    """:func:`rewrite` after its arguments were checked, reporting its stages on ``bar``.

    ``plan`` carries the method, form and preserve-function choice; its outcomes are filled here.
    ``selection`` picks the sites, ``out`` says how the model is written (``out.form`` is the plan's).
    ``design_q``: plain static constants at this q (say so when the model looks pretrained).
    ``stats``: the statistics the constants came from (refused for another model unless ``force``).
    """
    src, path = load_model_like(model)
    _check_opset(src)
    if stats is not None:
        check_stats_model(stats, src, model_folder(path), force)
    if out.verify:
        stage(bar, "checking the input")
        check_input(src, path)
    refuse_overwrite(output, path, out.in_place)
    if path is None:  # never modify the caller's object; a model we loaded ourselves is ours to edit
        m = onnx.ModelProto()
        m.CopyFrom(src)
    else:
        m = src
    base_dir = model_folder(path)
    misses: list[dict[str, Any]] = []
    stage(bar, "finding sites")
    sites = find_sites(m, base_dir, misses)
    outcomes = select(sites, selection, constants)
    result = RewriteResult(m, outcomes, misses=misses)
    if not sites:
        result.notes.append("no activation sites found")
    elif design_q is not None:
        why = looks_pretrained(m, [o.site for o in outcomes if o.action == "rewritten"], base_dir)
        if why:
            result.notes.append(
                f"this model looks pretrained ({why}): its sites' real pre-activation variance is unknown, so "
                f"constants at the design variance q={design_q:g} will not normalize them; calibrate it on sample "
                "data (normact-onnx calibrate MODEL --data …) or keep its function with --preserve-function"
            )
    if dry_run:
        return result
    mark_fused(m, outcomes, plan.form, base_dir)  # asked of the original, before the rewrite changes m
    had_external = bool(external_locations(m))  # its new weights go to external data too
    original = None
    if out.verify and any(o.action == "rewritten" for o in outcomes) and not had_external:
        original = onnx.ModelProto()
        original.CopyFrom(m)
    stage(bar, "rewriting")
    plan.outcomes = outcomes
    apply_plan(m, plan, base_dir)
    check_some_rewritten(outcomes)
    if any(o.reason == DOUBLE_REASON for o in outcomes):
        result.notes.append(f"{sum(o.reason == DOUBLE_REASON for o in outcomes)} site(s) {DOUBLE_REASON}")
    clamp_ir(m)
    if original is not None and result.rewritten:
        stage(bar, "checking the whole model")
        result.whole_model = check_whole_model(original, m, plan.preserve_function)
        if "skipped" in result.whole_model:
            result.notes.append(f"whole-model check skipped: {result.whole_model['skipped']}")
    elif out.verify and result.rewritten:
        result.notes.append("external weights: the whole-model check needs the written files; run compare")
    stage(bar, "writing and verifying" if out.verify else "writing")
    unchanged_copy = out.write_unchanged and not (path is not None and Path(output or "").resolve() == path.resolve())
    if output is not None and (result.rewritten or unchanged_copy):
        result.path = Path(output)
        result.verification = save_verified(
            m, result.path, path.parent if path else None, outcomes, out.verify, external=had_external
        )
        if not result.rewritten:
            result.notes.append(f"nothing to rewrite; {result.path} is an unchanged copy")
    elif out.verify and result.rewritten:
        result.verification = verify_in_memory(m, outcomes, base_dir)
    return result


FRESH_INIT = (0.2, 2.5)  # var(W)·fan_in of common initializations: 1/3 (torch default), 1 (LeCun), 2 (He)
MANY_SITES = 16
_LINEAR = {"Conv": 1, "ConvTranspose": 0, "Gemm": None, "MatMul": 0}  # op -> the weight's input-feature axis


def looks_pretrained(m: onnx.ModelProto, sites: list[Site], base_dir: str | None) -> str | None:
    """Why a model looks trained rather than freshly initialized (None: it does not).

    Static constants assume each site sees N(0, q): true at a fresh initialization, not
    in a trained network, whose weights have drifted from the initialization's scale.
    Weights are read only when small and stored inline (at most 32 layers).
    """
    if len(sites) >= MANY_SITES:
        return f"{len(sites)} sites"
    main = containers(m)[0]
    ratios: list[float] = []
    for node in main.nodes:
        if node.op_type not in _LINEAR or len(node.input) < 2 or len(ratios) >= 32:
            continue
        w = const_value(main, node.input[1], base_dir, limit=SMALL_CONST * 256)
        if w is None or w.ndim < 2 or w.size < 16 or not np.issubdtype(w.dtype, np.floating):
            continue
        axis = _LINEAR[node.op_type]
        if axis is None:  # Gemm: transB says which axis holds the inputs
            axis = 1 if attr_value(node, "transB", 0) else 0
        fan_in = w.shape[axis] * int(np.prod(w.shape[2:])) if w.ndim > 2 else w.shape[axis]
        ratios.append(float(np.var(w.astype(np.float64)) * fan_in))
    if len(ratios) < 2:
        return None
    lo, hi = FRESH_INIT
    outside = [r for r in ratios if not lo <= r <= hi]
    if len(outside) * 3 > len(ratios):
        return (
            f"{len(outside)} of {len(ratios)} layers have weights off a fresh initialization's scale "
            f"(var(W)·fan_in {min(ratios):.2g} … {max(ratios):.2g}, expected {lo:g} … {hi:g})"
        )
    return None


def _load_stats(stats: Any) -> Any:
    """``stats=``: a CalibrationStats as given, or the path of a stats JSON (validated on load)."""
    if stats is None:
        return None
    return stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)


@dataclass
class CalibrationResult:
    """What ``calibrate(..., details=True)`` returns: the statistics, the rewrite, and timing."""

    stats: CalibrationStats
    rewrite: RewriteResult | None = None  # when a model was written
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@overload
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
    details: Literal[False] = ...,
    images: Any = None,
    ray: bool | str | None = None,
    workers: int = 2,
    selection: SiteSelection | None = None,
    output_options: OutputOptions | None = None,
    data_options: DataOptions | None = None,
) -> CalibrationStats: ...


@overload
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
    details: Literal[True],
    images: Any = None,
    ray: bool | str | None = None,
    workers: int = 2,
    selection: SiteSelection | None = None,
    output_options: OutputOptions | None = None,
    data_options: DataOptions | None = None,
) -> CalibrationResult: ...


@overload
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
    details: bool = ...,
    images: Any = None,
    ray: bool | str | None = None,
    workers: int = 2,
    selection: SiteSelection | None = None,
    output_options: OutputOptions | None = None,
    data_options: DataOptions | None = None,
) -> CalibrationStats | CalibrationResult: ...


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
    selection: SiteSelection | None = None,
    output_options: OutputOptions | None = None,
    data_options: DataOptions | None = None,
) -> CalibrationStats | CalibrationResult:
    """ANAct (or static) calibration (docs/math.md §2) of ``model`` on ``data``.

    ``in_situ`` (default): every site the written model will normalize (the selection
    flags decide which) is normalized with each batch's statistics on its way through,
    so each site is measured where it sits, in the network as it will be written
    (:mod:`.calibration.insitu`). ``method``: ``"anact"`` (λ, μ) or ``"static"`` (``variant`` from
    each site's measured moments); the statistics file records which.

    ``data``: a path (.npz, .npy, a folder of them, a test_data_set_* folder), an
    object with ``get_next()`` (ONNX Runtime's CalibrationDataReader), an
    iterable of ``{input: array}`` dicts, or None with ``synthetic=True``.
    Parquet files and image folders (``images``: a :class:`.calibration.rows.ImageOptions`)
    are read too, and a ``ray.data.Dataset`` (columns named after the inputs).
    Writes the calibrated model to ``output``, the statistics to ``stats_path``
    and an HTML report to ``report`` when given; returns the statistics (or a
    :class:`CalibrationResult` with ``details=True``).

    ``ray``: run on Ray Data (:mod:`.calibration.distributed`) with ``workers`` actors: True
    starts a local cluster for the call, ``"auto"`` or an address joins one; a
    Dataset as ``data`` implies it. The moments equal the single-process run's;
    the EMA depends on batch order, so the factors use ``aggregate="mean"``.

    ``selection`` and ``output_options``: the site selection and the written model's options as one value
    each, as in :func:`rewrite`. ``data_options`` (a :class:`.calibration.batches.DataOptions`): ``data``,
    ``batches``, ``batch_size``, ``synthetic``, ``shapes``, ``values``, ``seed`` and ``images`` as one value.
    """
    selection, out = _bundles(
        selection, output_options, include, exclude, nodes, all_sites, form, verify, in_place, write_unchanged
    )
    source = data_bundle(data_options, DataOptions(data, batches, batch_size, synthetic, shapes, values, seed, images))
    read = model_files(model) if isinstance(model, str | os.PathLike) else []
    where = IN_PLACE if out.in_place else "output"  # in place: the output may be the model
    check_run_paths({where: output, "stats_path": stats_path, "report": report}, read)  # one rule, before work
    check_options(lambda_rule, aggregate)
    if aggregate not in AGGREGATES:
        raise NormactError(f"unknown aggregate {aggregate!r}")
    normalizer = Normalizer(method, lambda_rule, centered_rho, variant, ratio)  # checks the options
    start = time.perf_counter()
    notes = []
    normalize = normalizer if in_situ else None
    if ray not in (None, False) or is_dataset(source.data):
        if source.synthetic:
            raise NormactError("--synthetic runs single-process; --ray reads --data (files, Parquet, images)")
        if aggregate == "ema":
            aggregate = "mean"
            notes.append("--ray: factors from --aggregate mean (the EMA depends on the order of the batches)")
        stats = collect_ray(
            model,
            source,
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
            source,
            per_channel=per_channel,
            providers=providers,
            progress=progress,
            normalize=normalize,
            selection=selection,
        )
    stats.settings.update(
        {"method": method, "lambda_rule": lambda_rule, "centered_rho": centered_rho, "aggregate": aggregate}
    )
    if method == "static":
        stats.settings.update({"variant": variant, **({"ratio": ratio} if variant == "ratio" else {})})
    result = CalibrationResult(stats, notes=notes)
    if output is not None:
        constants, info = method_constants(MethodOptions(method), stats)
        result.rewrite = rewrite(
            model,
            output,
            constants=constants,
            method=info,
            selection=selection,
            output_options=out,
            details=True,
        )
        missed = missed_targets(stats, result.rewrite.outcomes, method)
        if missed:
            notes.append(missed)
    if result.rewrite is not None and result.rewrite.rewritten and _rereadable(source):
        try:
            note = _departure(model, result.rewrite.model, stats, source, selection)
        except Exception as e:  # a warning's own check never fails a calibration that succeeded
            note = f"note: the comparison with the original model did not run ({str(e).splitlines()[0][:160]})"
        if note:
            result.notes.append(note)
    if stats_path is not None:
        stats.save(stats_path)
    if report is not None:
        measured = None
        if result.rewrite is not None and result.rewrite.path is not None and _rereadable(source):
            measured = measure_sites(result.rewrite.path, source)
        write_html(stats, report, lambda_rule, centered_rho, aggregate, measured, _left_alone(stats, result))
    result.seconds = time.perf_counter() - start
    return result if details else stats


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


def write_report(result: RewriteResult, path: str | os.PathLike) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(result.report(), indent=2))
