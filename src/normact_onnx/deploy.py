"""``fold``: the zero-cost deployment model (docs/math.md §3), as a Python API.

Normalized sites go back to their plain activation op and their affine part
moves into the next layers' weights, so the deployed model is the original op
set with new numbers. The result verifies itself before it is written: ONNX
checker, ONNX Runtime load, and the folded model against the unfolded one on
inputs (the user's ``data``, else synthetic ones by :mod:`.synthetic`'s rules).

The self-check's tolerance comes from the model itself: per output, the folded
model may differ from the unfolded one by ``NOISE_FACTOR`` times the unfolded
model's own float noise on the same inputs (its outputs with ONNX Runtime's
graph optimizations on against off: fusions reorder float operations), and
never less than ``EPS_FLOOR`` machine epsilons of the output's element type
(at most 1%) times the output's scale: weights folded in float32 round, and a
recurrent state carries that rounding where no fusion shows any noise.
``tolerance`` replaces the rule by a fixed fraction of the output's scale.
Either way the allowance never exceeds ``CHECK_CAP`` (1%) of the output's
scale: a model whose own float noise on synthetic inputs is larger than that
(a deep detector on random pixels) is checked on its real inputs (``--data``),
never with a wider allowance that could not catch a wrong fold.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

import onnx

from .data.feeding import LoadedModel, model_batches
from .data.options import DataOptions
from .errors import NormactError
from .interop import same_type
from .io import (
    ModelLike,
    check_output_path,
    clamp_ir,
    external_locations,
    load_model_like,
    model_folder,
    refuse_overwrite,
)
from .ort import make_session
from .passes.affine import PADDING
from .passes.fold import FoldOutcome, fold_sites
from .progress import bar as progress_bar
from .progress import stage
from .selection import SiteSelection
from .writer import OutputOptions, check_input, save_verified

if TYPE_CHECKING:
    from typing_extensions import Unpack

NOISE_FACTOR = 10.0
EPS_FLOOR = 1000  # machine epsilons of the output type (at most 1%), times the output's scale
CHECK_CAP = 1e-2  # the self-check never allows more than this fraction of an output's scale
# the self-check's inputs by default: two synthetic batches of one sample (a field left None takes these)
SELF_CHECK_BATCHES, SELF_CHECK_BATCH_SIZE = 2, 1


@dataclass
class FoldResult:
    """The folded model, what happened to each normalized site, and the self-check."""

    model: onnx.ModelProto
    outcomes: list[FoldOutcome]
    path: Path | None = None
    check: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def folded(self) -> list[FoldOutcome]:
        return [o for o in self.outcomes if o.action == "folded"]

    @property
    def kept(self) -> list[FoldOutcome]:
        return [o for o in self.outcomes if o.action == "kept"]

    def report(self) -> dict[str, Any]:
        return {
            "output": str(self.path) if self.path else None,
            "folded": len(self.folded),
            "kept": len(self.kept),
            "sites": [o.as_dict() for o in self.outcomes],
            "check": self.check,
            "notes": self.notes,
        }


class FoldKeywords(TypedDict, total=False):
    """The keywords of :func:`fold` (besides ``model``, ``output`` and ``details``), declared once."""

    padding: str
    nodes: str | None
    tolerance: float | None
    verify: bool  # or output_options=
    in_place: bool
    write_unchanged: bool
    output_options: OutputOptions | None
    data: Any  # or data_options=
    synthetic: bool
    shapes: Any
    values: Any
    batches: int | None
    batch_size: int | None
    seed: int
    data_options: DataOptions | None
    progress: bool


@overload
def fold(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    details: Literal[False] = False,
    **keywords: Unpack[FoldKeywords],
) -> onnx.ModelProto: ...


@overload
def fold(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    details: Literal[True],
    **keywords: Unpack[FoldKeywords],
) -> FoldResult: ...


@same_type("model")
def fold(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    details: bool = False,
    **keywords: Unpack[FoldKeywords],
) -> onnx.ModelProto | FoldResult:
    """Fold every normalized site (slope 0) whose affine part moves exactly into its neighbours.

    Into the consumers (forward), or, for sites whose activation is a clip of
    its input (ReLU, Clip/ReLU6), into the layer that produces the input
    (backward) when the consumers cannot take it for free (see
    :mod:`normact_onnx.passes.fold`).

    ``padding`` decides Conv consumers that pad with zeros (all exact):
    ``"keep-shift"`` (default: the scale folds, the shift stays as one
    depthwise 1×1 ``Conv`` with weight 1 in front of it),
    ``"pad"`` (an explicit ``Pad`` with the value a zero stood for, the Conv
    unpadded; slower on ONNX Runtime CPU, whose NCHWc layout cannot fuse it), or
    ``"refuse"`` (leave such sites normalized). ``nodes``: a regular expression
    on site names/outputs. ``data`` (as for ``compare``: a path, a reader, feed
    dicts, read as ``calibrate`` reads them: ``batch_size`` splits files, ``batches`` caps them; default all)
    or synthetic inputs (``shapes``, ``values``; default 2 batches of 1 sample) feed the self-check;
    ``tolerance`` overrides its noise-derived rule (module docstring).
    With ``output`` the file exists afterwards even when nothing folds (a verified
    copy), unless ``write_unchanged=False``. Folded weights of a model with external
    data are written as external data beside the output. Returns the folded
    ``ModelProto`` (the input is not modified), or the :class:`FoldResult` with
    ``details=True``. ``progress``: the stages on stderr when it is a terminal. ``output_options`` (a
    :class:`.writer.OutputOptions`) carries ``verify``/``in_place``/``write_unchanged`` as one value instead
    (its ``form`` does not apply: a folded site is a plain activation again). ``data_options`` (a
    :class:`.data.options.DataOptions`) carries ``data``/``synthetic``/``shapes``/``values``/``batches``/
    ``batch_size``/``seed`` as one value instead (its ``images`` is not read: the self-check reads no image folders).
    """
    unknown = sorted(set(keywords) - set(FoldKeywords.__annotations__))
    if unknown:
        raise TypeError(f"fold() got an unexpected keyword argument {unknown[0]!r}")
    kw: dict[str, Any] = dict(keywords)
    padding, nodes, tolerance = kw.get("padding", "keep-shift"), kw.get("nodes"), kw.get("tolerance")
    output_options, data_options = kw.get("output_options"), kw.get("data_options")
    loose = OutputOptions(
        verify=kw.get("verify", True),
        in_place=kw.get("in_place", False),
        write_unchanged=kw.get("write_unchanged", True),
    )
    if output_options is None:
        output_options = loose
    elif loose != OutputOptions():
        raise NormactError("pass the output options as output_options= or as verify/in_place/write_unchanged, not both")
    loose_data = DataOptions.from_keywords(kw.get("data"), kw)
    if data_options is None:
        data_options = loose_data
    elif loose_data != DataOptions():
        raise NormactError(
            "pass the self-check inputs as data_options= or as data/synthetic/shapes/values/batches/batch_size/seed, "
            "not both"
        )
    if output is not None:
        check_output_path(output)
    if tolerance is not None and not 0 <= tolerance <= CHECK_CAP:
        raise NormactError(
            f"--tolerance must be between 0 and {CHECK_CAP:g} (a check that allows more than 1% of an output's "
            f"scale cannot catch a wrong fold), got {tolerance}"
        )
    if padding not in PADDING:
        raise NormactError(f"unknown --padding {padding!r}; choose one of {', '.join(PADDING)}")
    pattern = SiteSelection(nodes=nodes).pattern
    with progress_bar(4, "fold", kw.get("progress", False), unit="stage") as bar:
        stage(bar, "loading")
        result = _fold(model, output, bar, padding, pattern, data_options, tolerance, output_options)
    return result if details else result.model


def _fold(
    model: ModelLike,
    output: str | os.PathLike | None,
    bar: Any,
    padding: str,
    pattern: re.Pattern[str] | None,
    inputs: DataOptions,
    tolerance: float | None,
    out: OutputOptions,
) -> FoldResult:
    """:func:`fold` after its arguments were checked, reporting its stages on ``bar``."""
    verify = out.verify
    src, path = load_model_like(model)
    if verify:
        check_input(src, path)
    refuse_overwrite(output, path, out.in_place)
    m = onnx.ModelProto()
    m.CopyFrom(src)
    base_dir = model_folder(path)
    select = None if pattern is None else (lambda s: bool(pattern.search(s.name) or pattern.search(s.output)))
    stage(bar, "folding")
    result = FoldResult(m, fold_sites(m, base_dir, padding, select))
    if not result.outcomes:
        result.notes.append("no normalized sites found (nothing to fold)")
    clamp_ir(m)
    external = bool(external_locations(src))  # the source's: folding may have replaced every external weight
    if verify and result.folded:
        if external:
            result.notes.append("external weights: the numeric self-check needs the written files; run compare")
        else:
            stage(bar, "checking against the unfolded model")
            result.check = _self_check(src, m, inputs, tolerance)
    same_file = path is not None and output is not None and Path(output).resolve() == path.resolve()
    if output is not None and (result.folded or (out.write_unchanged and not same_file)):
        stage(bar, "writing and verifying" if verify else "writing")
        result.path = Path(output)
        save_verified(m, result.path, path.parent if path else None, [], verify, external=external)
        if not result.folded:
            result.notes.append(f"nothing folded; {result.path} is an unchanged copy")
    return result


def _self_check(before: onnx.ModelProto, after: onnx.ModelProto, inputs: DataOptions, tolerance: float | None) -> dict:
    """Folded vs unfolded on the same inputs, each output within its allowed difference (module docstring)."""
    import numpy as np

    try:
        onnx.checker.check_model(after)
    except Exception as e:
        raise NormactError(f"verification failed: onnx checker: {str(e).strip().splitlines()[0]}") from None
    synthetic = inputs.synthetic or inputs.data is None
    model = LoadedModel(before, None, "unfolded")
    feeds = model_batches(model, replace(inputs, synthetic=synthetic), SELF_CHECK_BATCHES, SELF_CHECK_BATCH_SIZE)
    ref, plain = make_session(before.SerializeToString()), make_session(before.SerializeToString(), optimize=False)
    new = make_session(after.SerializeToString())
    names = [o.name for o in before.graph.output]
    err, scale, noise, eps = {n: 0.0 for n in names}, {n: 0.0 for n in names}, {n: 0.0 for n in names}, {}
    batches = 0
    for batch in feeds:
        try:
            want = ref.run(None, batch)
        except Exception as e:
            how = "give the model's inputs with --data, or --shape NAME=D1xD2… / --value NAME=V" if synthetic else ""
            raise NormactError(
                f"self-check: the unfolded model does not run on {'synthetic ' if synthetic else ''}inputs "
                f"({str(e).splitlines()[0][:160]}){'; ' + how if how else ''}; or skip it with --no-verify"
            ) from None
        got, base = new.run(None, batch), plain.run(None, batch)
        batches += 1
        for n, a, b, p in zip(names, want, got, base):
            a = np.asarray(a)
            if not np.issubdtype(a.dtype, np.inexact):
                if not np.array_equal(a, b):
                    err[n] = float("inf")
                continue
            eps[n] = float(np.finfo(a.dtype).eps)
            a64, b64, p64 = (np.asarray(v, np.float64) for v in (a, b, p))
            diff = np.abs(a64 - b64)
            if np.any(np.isnan(diff) & ~np.isnan(a64)):
                err[n] = float("inf")
            err[n] = max(err[n], float(np.nanmax(diff, initial=0.0)))
            scale[n] = max(scale[n], float(np.nanmax(np.abs(a64), initial=0.0)))
            noise[n] = max(noise[n], float(np.nanmax(np.abs(a64 - p64), initial=0.0)))
    worst, worst_allowed, worst_name = 0.0, 0.0, ""
    for n in names:
        derived = max(NOISE_FACTOR * noise[n], min(EPS_FLOOR * eps.get(n, 0.0), CHECK_CAP) * scale[n])
        allowed = tolerance * scale[n] if tolerance is not None else min(derived, CHECK_CAP * scale[n])
        rel = err[n] / max(scale[n], 1e-30)
        if not err[n] <= allowed:
            noisy = tolerance is None and derived > allowed  # the model's own noise is above what a check may allow
            rule = (
                f"--tolerance {tolerance:g} of the output scale"
                if tolerance is not None
                else f"{NOISE_FACTOR:g}× the unfolded model's float noise {noise[n] / max(scale[n], 1e-30):.3g}"
                f" of the output scale, at least {EPS_FLOOR}·eps, at most {CHECK_CAP:g}"
            )
            if noisy:
                hint = (
                    "the unfolded model's own float noise on synthetic inputs is above what a check may allow: "
                    "check with the model's own inputs (--data)"
                    if synthetic
                    else "the unfolded model's own float noise on these inputs is above what a check may allow: "
                    "check with other inputs (--data), or skip the check with --no-verify"
                )
            else:
                hint = (
                    f"check with the model's own inputs (--data) or pass a larger --tolerance (at most {CHECK_CAP:g})"
                    if synthetic
                    else f"pass a larger --tolerance (at most {CHECK_CAP:g}) if this is acceptable"
                )
            raise NormactError(
                f"verification failed: output {n!r} of the folded model differs from the unfolded one by {rel:.3g} "
                f"of its scale (allowed: {rule}); {hint}; nothing written"
            )
        if rel >= worst:
            worst, worst_allowed, worst_name = rel, allowed / max(scale[n], 1e-30), n
    return {
        "max_rel_to_scale": worst,
        "allowed_rel_to_scale": worst_allowed,
        "output": worst_name,
        "rule": "tolerance" if tolerance is not None else "float noise",
        "batches": batches,
        "synthetic": synthetic,
        "outputs": names,
    }
