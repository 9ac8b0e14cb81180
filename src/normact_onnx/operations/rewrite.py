"""The ``rewrite`` operation (and ``inspect``): find the sites, decide them, apply the plan, write and verify.

One home for the operation the CLI's ``rewrite`` command, :func:`normact_onnx.api.rewrite`, ``calibrate``'s
written model and the fine-tuning export all run. It takes its options as values, one per concern
(:class:`.policy.MethodOptions`, :class:`.selection.SiteSelection`, :class:`.writer.OutputOptions`), and always
returns a :class:`RewriteResult`; the keyword form of the public API is a facade over it (:mod:`..api`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..calibration.stats import CalibrationStats, check_stats_model
from ..errors import NormactError
from ..graph import SMALL_CONST, attr_value, const_value, containers, default_opset
from ..io import (
    ModelLike,
    atomic_path,
    check_output_path,
    clamp_ir,
    external_locations,
    load_model_like,
    model_folder,
    refuse_overwrite,
)
from ..ort import kernel_library
from ..passes.find import PartialMatch, Site, find_sites
from ..passes.kernel_form import choose_layout_form, mark_fused
from ..passes.normalize import DOUBLE_REASON, FORMS, Plan, SiteOutcome, apply_plan
from ..policy import Constants, MethodOptions, check_some_rewritten, method_constants, missed_targets, select
from ..progress import bar as progress_bar
from ..progress import stage
from ..selection import SiteSelection
from ..verify import check_whole_model
from ..writer import OutputOptions, check_input, save_verified, verify_in_memory

MIN_OPSET = 7


def _check_opset(model: onnx.ModelProto) -> None:
    opset = default_opset(model.opset_import)
    if opset < MIN_OPSET:
        raise NormactError(f"model opset {opset} is older than normact-onnx supports (≥ {MIN_OPSET})")


def inspect_sites(model: ModelLike) -> list[dict[str, Any]]:
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
    partial: list[PartialMatch] = field(default_factory=list)  # dry runs: forms that matched part of the way
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


def rewrite_model(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    method: MethodOptions | None = None,
    selection: SiteSelection | None = None,
    out: OutputOptions | None = None,
    stats: CalibrationStats | str | os.PathLike | None = None,
    constants: Constants | None = None,
    provenance: dict[str, Any] | None = None,
    preserve_function: bool = False,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = False,
) -> RewriteResult:
    """Normalize the activations of ``model``; write to ``output`` when given (see :func:`normact_onnx.api.rewrite`).

    The constants come from ``method`` (through :func:`.policy.method_constants`, with ``stats`` when given: a
    :class:`.calibration.stats.CalibrationStats` or the path of a stats JSON), or from the caller's own
    ``constants(site)`` with the ``provenance`` to stamp. Statistics of another model are refused unless ``force``.
    Options left as None take their defaults (plain static at q=1, the default selection, a verified write).
    """
    method, selection, out = method or MethodOptions(), selection or SiteSelection(), out or OutputOptions()
    if output is not None and not dry_run:
        check_output_path(output)
    loaded = _load_stats(stats)
    if constants is None and (loaded is not None or method.method != "static"):
        constants, provenance = method_constants(method, loaded)
    if out.form not in FORMS:
        raise NormactError(f"unknown --form {out.form!r}; choose one of {', '.join(FORMS)}")
    if out.form == "custom-op" and out.verify and not dry_run and kernel_library() is None:
        raise NormactError(
            "--form custom-op needs the kernel library to run (and to verify), and it was not built; "
            "install the package with its kernels, or pass --no-verify"
        )
    design_q = method.q if constants is None and not preserve_function else None  # plain static: is q plausible?
    if constants is None:
        constants, provenance = method_constants(method)
    with progress_bar(6 if out.verify else 4, "rewrite", progress, unit="stage") as bar:
        stage(bar, "loading")
        result = _run(
            model,
            output,
            bar,
            Plan([], provenance or {}, out.form, preserve_function),
            selection,
            out,
            constants=constants,
            dry_run=dry_run,
            design_q=design_q,
            stats=loaded,
            force=force,
        )
    if loaded is not None:  # the one-line warning calibrate -o gives, for statistics calibrated earlier
        missed = missed_targets(loaded, result.outcomes, method.method)
        if missed:
            result.notes.append(missed)
    return result


def _load_stats(stats: CalibrationStats | str | os.PathLike | None) -> CalibrationStats | None:
    """``stats=``: a CalibrationStats as given, or the path of a stats JSON (validated on load)."""
    if stats is None:
        return None
    return stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)


def _run(
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
    stats: CalibrationStats | None = None,
    force: bool = False,
) -> RewriteResult:
    """:func:`rewrite_model` after its arguments were checked, reporting its stages on ``bar``.

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
    partial: list[PartialMatch] | None = [] if dry_run else None  # traced only when someone will read it
    sites = find_sites(m, base_dir, misses, partial)
    outcomes = select(sites, selection, constants)
    result = RewriteResult(m, outcomes, misses=misses, partial=partial or [])
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
    if out.verify:  # ONNX Runtime's optimizer answers it (0.6 s of MiniLM's 0.9 s rewrite): with the checks,
        mark_fused(m, outcomes, plan.form, base_dir)  # not in --no-verify; asked of the original, before the edit
    choose_layout_form(m, outcomes, plan.form, base_dir)  # --form layout, with or without checks: the same file
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


def write_report(result: RewriteResult, path: str | os.PathLike) -> None:
    """``rewrite --report``: every site's constants and decisions as JSON, written atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(result.report(), indent=2))
