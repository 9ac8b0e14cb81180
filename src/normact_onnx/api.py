"""The Python API behind the CLI: ``inspect`` and ``rewrite``.

Both accept a path or an ``onnx.ModelProto``. ``rewrite`` returns the rewritten
model and, given ``output``, writes it atomically after verifying it.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .catalogue import CATALOGUE
from .errors import NormactError
from .graph import default_opset
from .io import (
    ModelLike,
    atomic_path,
    carry_external_data,
    clamp_ir,
    external_locations,
    load_model_like,
    model_folder,
    refuse_overwrite,
    write_model,
)
from .methods.static import VARIANTS, Affine, static_affine
from .passes.find import Site, find_sites
from .passes.normalize import FORMS, Plan, SiteOutcome, apply_plan

MIN_OPSET = 7


def _check_opset(model: onnx.ModelProto) -> None:
    opset = default_opset(model.opset_import)
    if opset < MIN_OPSET:
        raise NormactError(f"model opset {opset} is older than normact-onnx supports (≥ {MIN_OPSET})")


def inspect(model: ModelLike) -> list[dict[str, Any]]:
    """Every activation site: name, kind, how it was written, graph path, normalized or not, skip reason."""
    m, path = load_model_like(model)
    return [s.summary() for s in find_sites(m, model_folder(path))]


def _check_input(m: onnx.ModelProto, path: Path | None) -> None:
    """A model that already fails the checker is the user's problem to hear about first, not ours."""
    target = str(path) if path is not None and external_locations(m) else m
    try:
        onnx.checker.check_model(target)
    except Exception as e:
        where = path or "model"
        raise NormactError(f"{where}: fails the ONNX checker: {str(e).strip().splitlines()[0]}") from None


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
    out = {n.strip().replace("-", "_").lower() for n in names}
    unknown = sorted(out - set(CATALOGUE))
    if unknown:
        raise NormactError(f"{flag}: unknown activation kind(s) {', '.join(unknown)}; known: {', '.join(CATALOGUE)}")
    return out


Constants = Callable[[Site], Affine | str]


def select(
    sites: list[Site],
    include: set[str] | None,
    exclude: set[str] | None,
    nodes: str | None,
    all_sites: bool,
    constants: Constants,
) -> list[SiteOutcome]:
    """Decide per site: rewrite (with constants) or skip (with the reason a person would want)."""
    pattern = None
    if nodes:
        try:
            pattern = re.compile(nodes)
        except re.error as e:
            raise NormactError(f"--nodes: bad regular expression ({e})") from None
    out = []
    for s in sites:
        if s.normalized is not None:
            out.append(SiteOutcome(s, "normalized", "already normalized"))
        elif include is not None and s.kind not in include:
            out.append(SiteOutcome(s, "skipped", f"kind {s.kind} not in --include"))
        elif exclude is not None and s.kind in exclude:
            out.append(SiteOutcome(s, "skipped", f"kind {s.kind} in --exclude"))
        elif pattern is not None and not (pattern.search(s.name) or pattern.search(s.output)):
            out.append(SiteOutcome(s, "skipped", "name does not match --nodes"))
        elif s.skip and not all_sites:
            out.append(SiteOutcome(s, "skipped", f"{s.skip} (use --all-sites to include)"))
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
    """Static normalization (MATH.md §1) at design variance q, or at each site's measured q."""
    if variant not in VARIANTS:
        raise NormactError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not q > 0:
        raise NormactError(f"--q must be positive, got {q}")
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


def rewrite(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    variant: str = "center-scale",
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
    verify: bool = True,
    in_place: bool = False,
    dry_run: bool = False,
    details: bool = False,
) -> onnx.ModelProto | RewriteResult:
    """Normalize the activations of ``model``; write to ``output`` when given.

    ``method`` is ``"static"`` (default; with ``stats``, each site at its measured q) or
    ``"anact"`` (λ and μ from ``stats``: a :class:`~normact_onnx.calibration.CalibrationStats`
    or the path of a stats JSON written by ``calibrate``). Callers with their own
    ``constants(site)`` pass the provenance to stamp as a dict in ``method``.

    Returns the rewritten ``ModelProto`` (or the full :class:`RewriteResult` with
    ``details=True``). The input model object is not modified.
    """
    if isinstance(method, str) or stats is not None:
        constants, method = _method_constants(method or "static", stats, variant, q, ratio)
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
    src, path = load_model_like(model)
    _check_opset(src)
    if verify:
        _check_input(src, path)
    refuse_overwrite(output, path, in_place)
    if path is None:  # never modify the caller's object; a model we loaded ourselves is ours to edit
        m = onnx.ModelProto()
        m.CopyFrom(src)
    else:
        m = src
    base_dir = model_folder(path)
    if constants is None:
        constants = static_constants(q, variant, ratio)
        method = {
            "method": "static",
            "variant": variant,
            "q": q,
            **({"ratio": ratio} if ratio is not None else {}),
        }
    misses: list[dict[str, Any]] = []
    sites = find_sites(m, base_dir, misses)
    outcomes = select(sites, inc, exc, nodes, all_sites, constants)
    result = RewriteResult(m, outcomes, misses=misses)
    if not sites:
        result.notes.append("no activation sites found")
    if dry_run:
        return result if details else m
    original = None
    if verify and any(o.action == "rewritten" for o in outcomes) and not external_locations(m):
        original = onnx.ModelProto()
        original.CopyFrom(m)
    apply_plan(m, Plan(outcomes, method or {}, form, preserve_function), base_dir)
    clamp_ir(m)
    if original is not None and result.rewritten:
        result.whole_model = _whole_model_check(original, m, preserve_function)
        if "skipped" in result.whole_model:
            result.notes.append(f"whole-model check skipped: {result.whole_model['skipped']}")
    elif verify and result.rewritten:
        result.notes.append("external weights: the whole-model check needs the written files; run compare")
    if output is not None and result.rewritten:
        result.path = Path(output)
        result.verification = save_verified(m, result.path, path.parent if path else None, outcomes, verify)
    elif verify and result.rewritten:
        result.verification = verify_in_memory(m, outcomes, base_dir)
    return result if details else m


def _method_constants(method: str, stats: Any, variant: str, q: float, ratio: float | None) -> tuple[Any, Any]:
    """(constants, provenance) for a named method; ``None`` constants mean plain static."""
    if stats is None:
        if method == "static":
            return None, None
        raise NormactError(f"method {method!r} needs calibration statistics (stats=…; see normact-onnx calibrate)")
    from .calibration.run import stats_constants
    from .calibration.stats import CalibrationStats

    if not isinstance(stats, CalibrationStats):
        stats = CalibrationStats.load(stats)
    return stats_constants(stats, method, variant=variant, q=q, ratio=ratio)


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
    m: onnx.ModelProto, dest: Path, src_dir: Path | None, outcomes: list[SiteOutcome], verify: bool
) -> list[dict[str, Any]]:
    """Write atomically beside ``dest``; verify the written file before it takes the final name."""
    from .verify import check_model_file, check_sites, ort_load

    created: list[Path] = []
    dest_dir = dest.parent
    dest_dir.mkdir(parents=True, exist_ok=True)
    if src_dir is not None:
        before = {loc: (dest_dir / loc).exists() for loc in external_locations(m)}
        carry_external_data(m, src_dir, dest_dir)
        created = [dest_dir / loc for loc, existed in before.items() if not existed]
    try:
        with atomic_path(dest) as tmp:
            write_model(m, tmp)
            report: list[dict[str, Any]] = []
            if verify:
                check_model_file(tmp)
                ort_load(tmp)
                report = check_sites(m, outcomes, str(src_dir) if src_dir else None)
    except BaseException:
        for p in created:
            p.unlink(missing_ok=True)
        raise
    return report


def write_report(result: RewriteResult, path: str | os.PathLike) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(result.report(), indent=2))
