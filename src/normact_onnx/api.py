"""The Python API behind the CLI: ``inspect`` and ``rewrite``.

Both accept a path or an ``onnx.ModelProto``. ``rewrite`` returns the rewritten
model and, given ``output``, writes it atomically after verifying it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .catalogue import known_kinds, resolve
from .errors import NormactError
from .graph import default_opset
from .interop import same_type
from .io import (
    ModelLike,
    atomic_path,
    carry_external_data,
    check_output_path,
    clamp_ir,
    external_locations,
    externalize_computed,
    load_model_like,
    make_folders,
    model_folder,
    refuse_overwrite,
    remove_created,
    write_model,
)
from .methods.static import VARIANTS, Affine, static_affine
from .passes.find import Site, find_sites
from .passes.normalize import FORMS, Plan, SiteOutcome, apply_plan
from .progress import bar as progress_bar
from .progress import stage

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


def check_input(m: onnx.ModelProto, path: Path | None, runtime: bool = True) -> None:
    """A model that already fails the checker is the user's problem to hear about first, not ours.

    With ``runtime``, also ops onnxruntime does not know (a custom op without its library): the
    verification of the result would fail on them, and the input, not the result, is the cause.
    """
    where = path or "model"
    target = str(path) if path is not None and external_locations(m) else m
    try:
        onnx.checker.check_model(target)
    except Exception as e:
        why = " ".join(str(e).split())  # the checker's message spans lines; the reason is in all of them
        raise NormactError(f"{where}: fails the ONNX checker: {why[:300]}") from None
    if runtime:
        from .ort import unknown_ops

        ops = unknown_ops(m)
        if ops:
            raise NormactError(
                f"{where}: the input model uses op {', '.join(ops)}, which onnxruntime does not know "
                "(a custom op?), so the result cannot be verified; pass --no-verify to skip verification"
            )


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


def _kinds(names: Iterable[str] | str | None, flag: str) -> set[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    resolved = {n.strip(): resolve(n) for n in names}
    unknown = sorted(n for n, kind in resolved.items() if kind is None)
    if unknown:
        raise NormactError(f"{flag}: unknown activation kind(s) {', '.join(unknown)}; known: {known_kinds()}")
    return {kind for kind in resolved.values() if kind is not None}


Constants = Callable[[Site], Affine | str]


SiteFilter = Callable[[Site], str | None]


def site_filter(
    include: set[str] | None, exclude: set[str] | None, nodes: str | None, all_sites: bool
) -> SiteFilter:
    """Why a site is left alone by the selection flags (None: it is to be normalized).

    One rule for every command: rewrite applies it, and calibration normalizes exactly
    these sites in situ, so the statistics describe the network the rewrite will write.
    """
    pattern = None
    if nodes:
        try:
            pattern = re.compile(nodes)
        except re.error as e:
            raise NormactError(f"--nodes: bad regular expression ({e})") from None

    def why(s: Site) -> str | None:
        if s.normalized is not None:
            return "already normalized"
        if include is not None and s.kind not in include:
            return f"kind {s.kind} not in --include"
        if exclude is not None and s.kind in exclude:
            return f"kind {s.kind} in --exclude"
        if pattern is not None and not (pattern.search(s.name) or pattern.search(s.output)):
            return "name does not match --nodes"
        if s.skip and not all_sites:
            return f"{s.skip} (use --all-sites to include)"
        return None

    return why


def select(
    sites: list[Site],
    include: set[str] | None,
    exclude: set[str] | None,
    nodes: str | None,
    all_sites: bool,
    constants: Constants,
) -> list[SiteOutcome]:
    """Decide per site: rewrite (with constants) or skip (with the reason a person would want)."""
    why = site_filter(include, exclude, nodes, all_sites)
    out = []
    for s in sites:
        reason = why(s)
        if s.normalized is not None:
            out.append(SiteOutcome(s, "normalized", reason or "already normalized"))
        elif reason:
            out.append(SiteOutcome(s, "skipped", reason))
        else:
            aff = constants(s)
            if isinstance(aff, str):
                out.append(SiteOutcome(s, "skipped", aff))
            else:
                out.append(SiteOutcome(s, "rewritten", affine=aff))
    return out


def static_constants(
    q: float = 1.0,
    variant: str = "center-scale",
    ratio: float | None = None,
    q_per_site: dict[str, float] | None = None,
) -> Constants:
    """Static normalization (docs/math.md §1) at design variance q, or at each site's measured q."""
    if variant not in VARIANTS:
        raise NormactError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not (math.isfinite(q) and q > 0):
        raise NormactError(f"--q must be a positive finite number (a variance), got {q}")
    if variant == "ratio" and ratio is None:
        raise NormactError("--variant ratio needs --ratio r (0 = zeta-zero … q·b²/v = center-scale)")
    if variant != "ratio" and ratio is not None:
        raise NormactError(f"--ratio only applies to --variant ratio (got --variant {variant})")

    def constants(site: Site) -> Affine | str:
        site_q = (q_per_site or {}).get(site.output, q)
        try:
            return static_affine(site.activation, site.params, site_q, variant, ratio)
        except NormactError as e:
            return str(e)

    return constants


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
) -> onnx.ModelProto | RewriteResult:
    """Normalize the activations of ``model``; write to ``output`` when given.

    ``method`` is ``"static"`` (default; with ``stats``, each site at its measured q) or
    ``"anact"`` (λ and μ from ``stats``: a :class:`~normact_onnx.calibration.CalibrationStats`
    or the path of a stats JSON written by ``calibrate``). Callers with their own
    ``constants(site)`` pass the provenance to stamp as a dict in ``method``.

    Statistics of another model (their graph fingerprint differs) are refused unless ``force``.
    With ``output`` the file exists afterwards even when nothing changes (a verified copy), unless
    ``write_unchanged=False`` (the CLI without ``-o``). Returns the rewritten ``ModelProto`` (or the
    full :class:`RewriteResult` with ``details=True``). The input model object is not modified.
    ``progress``: the stages on stderr when it is a terminal.
    """
    if output is not None and not dry_run:
        check_output_path(output)
    if isinstance(method, str) or stats is not None:
        stats = _load_stats(stats)
        options = {"lambda_rule": lambda_rule, "centered_rho": centered_rho, "aggregate": aggregate}
        constants, method = _method_constants(method or "static", stats, variant, q, ratio, **options)
    if form not in FORMS:
        raise NormactError(f"unknown --form {form!r}; choose one of {', '.join(FORMS)}")
    if form == "custom-op" and verify and not dry_run:
        from .ort import kernel_library

        if kernel_library() is None:
            raise NormactError(
                "--form custom-op needs the kernel library to run (and to verify), and it was not built; "
                "install the package with its kernels, or pass --no-verify"
            )
    inc, exc = _kinds(include, "--include"), _kinds(exclude, "--exclude")
    design_q = q if constants is None and not preserve_function else None  # plain static: is q plausible?
    if constants is None:
        variant = variant or "center-scale"
        constants = static_constants(q, variant, ratio)
        method = {
            "method": "static",
            "variant": variant,
            "q": q,
            **({"ratio": ratio} if ratio is not None else {}),
        }
    with progress_bar(6 if verify else 4, "rewrite", progress, unit="stage") as bar:
        stage(bar, "loading")
        return _rewrite(
            model,
            output,
            bar,
            Plan([], method or {}, form, preserve_function),
            inc=inc,
            exc=exc,
            nodes=nodes,
            all_sites=all_sites,
            constants=constants,
            verify=verify,
            in_place=in_place,
            dry_run=dry_run,
            details=details,
            design_q=design_q,
            stats=stats,
            force=force,
            write_unchanged=write_unchanged,
        )


def _rewrite(
    model: ModelLike,
    output: str | os.PathLike | None,
    bar: Any,
    plan: Plan,
    *,
    inc: set[str] | None,
    exc: set[str] | None,
    nodes: str | None,
    all_sites: bool,
    constants: Constants,
    verify: bool,
    in_place: bool,
    dry_run: bool,
    details: bool,
    design_q: float | None = None,
    stats: Any = None,
    force: bool = False,
    write_unchanged: bool = True,
) -> onnx.ModelProto | RewriteResult:
    """:func:`rewrite` after its arguments were checked, reporting its stages on ``bar``.

    ``plan`` carries the method, form and preserve-function choice; its outcomes are filled here.
    ``design_q``: plain static constants at this q (say so when the model looks pretrained).
    ``stats``: the statistics the constants came from (refused for another model unless ``force``).
    """
    src, path = load_model_like(model)
    _check_opset(src)
    if stats is not None:
        from .calibration.stats import check_stats_model

        check_stats_model(stats, src, model_folder(path), force)
    if verify:
        stage(bar, "checking the input")
        check_input(src, path)
    refuse_overwrite(output, path, in_place)
    if path is None:  # never modify the caller's object; a model we loaded ourselves is ours to edit
        m = onnx.ModelProto()
        m.CopyFrom(src)
    else:
        m = src
    base_dir = model_folder(path)
    misses: list[dict[str, Any]] = []
    stage(bar, "finding sites")
    sites = find_sites(m, base_dir, misses)
    outcomes = select(sites, inc, exc, nodes, all_sites, constants)
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
        return result if details else m
    had_external = bool(external_locations(m))  # its new weights go to external data too
    original = None
    if verify and any(o.action == "rewritten" for o in outcomes) and not had_external:
        original = onnx.ModelProto()
        original.CopyFrom(m)
    stage(bar, "rewriting")
    plan.outcomes = outcomes
    apply_plan(m, plan, base_dir)
    clamp_ir(m)
    if original is not None and result.rewritten:
        stage(bar, "checking the whole model")
        result.whole_model = _whole_model_check(original, m, plan.preserve_function)
        if "skipped" in result.whole_model:
            result.notes.append(f"whole-model check skipped: {result.whole_model['skipped']}")
    elif verify and result.rewritten:
        result.notes.append("external weights: the whole-model check needs the written files; run compare")
    stage(bar, "writing and verifying" if verify else "writing")
    unchanged_copy = write_unchanged and not (path is not None and Path(output or "").resolve() == path.resolve())
    if output is not None and (result.rewritten or unchanged_copy):
        result.path = Path(output)
        result.verification = save_verified(
            m, result.path, path.parent if path else None, outcomes, verify, external=had_external
        )
        if not result.rewritten:
            result.notes.append(f"nothing to rewrite; {result.path} is an unchanged copy")
    elif verify and result.rewritten:
        result.verification = verify_in_memory(m, outcomes, base_dir)
    return result if details else m


FRESH_INIT = (0.2, 2.5)  # var(W)·fan_in of common initializations: 1/3 (torch default), 1 (LeCun), 2 (He)
MANY_SITES = 16
_LINEAR = {"Conv": 1, "ConvTranspose": 0, "Gemm": None, "MatMul": 0}  # op -> the weight's input-feature axis


def looks_pretrained(m: onnx.ModelProto, sites: list[Site], base_dir: str | None) -> str | None:
    """Why a model looks trained rather than freshly initialized (None: it does not).

    Static constants assume each site sees N(0, q): true at a fresh initialization, not
    in a trained network, whose weights have drifted from the initialization's scale.
    Weights are read only when small and stored inline (at most 32 layers).
    """
    from .graph import SMALL_CONST, const_value, containers

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
            from .graph import attr_value

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


def _method_constants(
    method: str, stats: Any, variant: str | None, q: float, ratio: float | None, **factor_options: Any
) -> tuple[Any, Any]:
    """(constants, provenance) for a named method; ``None`` constants mean plain static.

    ``factor_options`` (lambda_rule, centered_rho, aggregate): None takes what the calibration asked for.
    """
    if stats is None:
        if method == "static":
            return None, None
        raise NormactError(f"method {method!r} needs calibration statistics (stats=…; see normact-onnx calibrate)")
    from .calibration.run import stats_constants

    constants, info = stats_constants(stats, method, variant=variant, q=q, ratio=ratio, **factor_options)
    return constants, {**info, "stats": stats.origin} if stats.origin else info


def _load_stats(stats: Any) -> Any:
    """``stats=``: a CalibrationStats as given, or the path of a stats JSON (validated on load)."""
    if stats is None:
        return None
    from .calibration.stats import CalibrationStats

    return stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)


def _whole_model_check(original: onnx.ModelProto, m: onnx.ModelProto, preserve: bool) -> dict[str, Any]:
    from .verify import check_whole_model

    return check_whole_model(original, m, preserve)


def verify_in_memory(m: onnx.ModelProto, outcomes: list[SiteOutcome], base_dir: str | None) -> list[dict]:
    from .verify import check_sites

    if not external_locations(m):
        try:
            onnx.checker.check_model(m)
        except Exception as e:
            raise NormactError(f"verification failed: onnx checker: {str(e).splitlines()[0]}") from None
    return check_sites(m, outcomes, base_dir)


def save_verified(
    m: onnx.ModelProto,
    dest: Path,
    src_dir: Path | None,
    outcomes: list[SiteOutcome],
    verify: bool,
    external: bool = False,
) -> list[dict[str, Any]]:
    """Write atomically beside ``dest``; verify the written file before it takes the final name.

    External data is carried (untouched weights); computed weights of a model that had external
    data (``external``; possibly all of them replaced by now) are streamed into a new data file
    beside ``dest``. Whatever the write created is removed again when it fails.
    """
    from .verify import check_model_file, check_sites, ort_load

    dest_dir = dest.parent
    created = make_folders(dest_dir)
    try:
        if src_dir is not None:
            created += carry_external_data(m, src_dir, dest_dir)
        if external or external_locations(m):
            data = externalize_computed(m, dest)
            created += [data] if data is not None else []
        with atomic_path(dest) as tmp:
            write_model(m, tmp)
            report: list[dict[str, Any]] = []
            if verify:
                check_model_file(tmp)
                ort_load(tmp, dest)
                report = check_sites(m, outcomes, str(dest_dir) if external_locations(m) else None)
    except BaseException:
        remove_created(created)
        raise
    return report


def write_report(result: RewriteResult, path: str | os.PathLike) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(result.report(), indent=2))
