"""``fold``: the zero-cost deployment model (docs/math.md §3), as a Python API.

Normalized sites go back to their plain activation op and their affine part
moves into the next layers' weights, so the deployed model is the original op
set with new numbers. The result verifies itself before it is written: ONNX
checker, ONNX Runtime load, and the folded model against the unfolded one on
inputs (synthetic unless given) within ``tolerance`` of each output's scale.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .api import check_input, save_verified
from .errors import NormactError
from .io import (
    ModelLike,
    check_output_path,
    clamp_ir,
    external_locations,
    load_model_like,
    model_folder,
    refuse_overwrite,
)
from .passes.affine import PADDING
from .passes.fold import FoldOutcome, fold_sites
from .progress import bar as progress_bar
from .progress import stage

DEFAULT_TOLERANCE = 1e-5  # float32 outputs
TOLERANCE_EPS = 8  # lower-precision outputs: this many rounding steps (machine epsilons) of their type


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


def fold(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    padding: str = "keep-shift",
    nodes: str | None = None,
    verify: bool = True,
    data: Any = None,
    tolerance: float | None = None,
    in_place: bool = False,
    write_unchanged: bool = True,
    details: bool = False,
    progress: bool = False,
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
    on site names/outputs. ``tolerance`` of the self-check: None follows the outputs'
    element type (:func:`default_tolerance`). With ``output`` the file exists afterwards
    even when nothing folds (a verified copy), unless ``write_unchanged=False``. Folded
    weights of a model with external data are written as external data beside the
    output. Returns the folded ``ModelProto`` (the input is not modified), or the
    :class:`FoldResult` with ``details=True``. ``progress``: the stages on stderr when it
    is a terminal.
    """
    if output is not None:
        check_output_path(output)
    if padding not in PADDING:
        raise NormactError(f"unknown --padding {padding!r}; choose one of {', '.join(PADDING)}")
    pattern = _regex(nodes)
    with progress_bar(4, "fold", progress, unit="stage") as bar:
        stage(bar, "loading")
        result = _fold(model, output, bar, padding, pattern, verify, data, tolerance, in_place, write_unchanged)
    return result if details else result.model


def _fold(
    model: ModelLike,
    output: str | os.PathLike | None,
    bar: Any,
    padding: str,
    pattern: re.Pattern[str] | None,
    verify: bool,
    data: Any,
    tolerance: float | None,
    in_place: bool,
    write_unchanged: bool = True,
) -> FoldResult:
    """:func:`fold` after its arguments were checked, reporting its stages on ``bar``."""
    src, path = load_model_like(model)
    if verify:
        check_input(src, path)
    refuse_overwrite(output, path, in_place)
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
            result.check = _self_check(src, m, data, default_tolerance(m) if tolerance is None else tolerance)
    same_file = path is not None and output is not None and Path(output).resolve() == path.resolve()
    if output is not None and (result.folded or (write_unchanged and not same_file)):
        stage(bar, "writing and verifying" if verify else "writing")
        result.path = Path(output)
        save_verified(m, result.path, path.parent if path else None, [], verify, external=external)
        if not result.folded:
            result.notes.append(f"nothing folded; {result.path} is an unchanged copy")
    return result


def default_tolerance(model: onnx.ModelProto) -> float:
    """The self-check's tolerance for this model's outputs: 1e-5 for float32, looser for float16/bfloat16.

    Folding rounds the new weights to the model's own type, so a float16 model cannot agree with
    its unfolded self to better than a few float16 rounding steps (about 1e-3 each).
    """
    from onnx import helper

    from .catalogue.patterns import rounding

    tol = DEFAULT_TOLERANCE
    for o in model.graph.output:
        elem = o.type.tensor_type.elem_type
        if elem in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            tol = max(tol, TOLERANCE_EPS * rounding(helper.tensor_dtype_to_np_dtype(elem)))
    return tol


def _regex(nodes: str | None) -> re.Pattern[str] | None:
    if not nodes:
        return None
    try:
        return re.compile(nodes)
    except re.error as e:
        raise NormactError(f"--nodes: bad regular expression ({e})") from None


def _self_check(before: onnx.ModelProto, after: onnx.ModelProto, data: Any, tolerance: float) -> dict[str, Any]:
    """Folded vs unfolded on the same inputs: every output within ``tolerance`` of its own scale."""
    from .comparison import compare

    try:
        onnx.checker.check_model(after)
    except Exception as e:
        raise NormactError(f"verification failed: onnx checker: {str(e).strip().splitlines()[0]}") from None
    res = compare(before, after, data, synthetic=data is None, atol=0.0, rtol=0.0)
    broken = [o for o in res.outputs if "error" in o]
    if broken:
        raise NormactError(f"verification failed: output {broken[0]['output']}: {broken[0]['error']}; nothing written")
    worst = max((o["max_abs"] / max(o["max_ref"], 1e-30) for o in res.outputs), default=0.0)
    if not worst <= tolerance:
        raise NormactError(
            f"verification failed: the folded model differs from the unfolded one by {worst:.3g} "
            f"of the output scale (tolerance {tolerance:g}); nothing written"
        )
    return {"max_rel_to_scale": worst, "batches": res.batches, "outputs": [o["output"] for o in res.outputs]}
