"""The public Python API: ``inspect``, ``rewrite`` and ``calibrate`` as keyword calls, a facade over the operations.

Each operation has one home in :mod:`.operations` (``rewrite_model``, ``calibrate_model``), which takes its options
as values, one per concern (:class:`.policy.MethodOptions`, :class:`.selection.SiteSelection`,
:class:`.writer.OutputOptions`, :class:`.data.options.DataOptions`), and always returns a result object.
This module only turns the keyword form (loose keywords, or the same values as ``method_options=``,
``selection=``, ``output_options=``, ``data_options=``) into those values, and returns the result's model (or
statistics), or the whole result with ``details=True``. The keywords are declared once, as :class:`RewriteKeywords`
and :class:`CalibrateKeywords`, so the two typed overloads per function do not repeat them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

import onnx

from .calibration.stats import CalibrationStats
from .data.options import DataOptions, data_bundle
from .data.rows import ImageOptions
from .errors import NormactError
from .interop import same_type
from .io import ModelLike
from .operations.calibrate import CALIBRATE_METHOD, CalibrationResult, calibrate_model
from .operations.rewrite import MIN_OPSET, RewriteResult, inspect_sites, looks_pretrained, rewrite_model, write_report
from .policy import Constants, MethodOptions
from .selection import SiteSelection
from .writer import OutputOptions

if TYPE_CHECKING:
    from collections.abc import Iterable

    from typing_extensions import Unpack

__all__ = [
    "MIN_OPSET",
    "CalibrateKeywords",
    "CalibrationResult",
    "RewriteKeywords",
    "RewriteResult",
    "calibrate",
    "inspect",
    "looks_pretrained",
    "rewrite",
    "write_report",
]


def inspect(model: ModelLike) -> list[dict[str, Any]]:
    """Every activation site: name, kind, how it was written, graph path, normalized or not, skip reason."""
    return inspect_sites(model)


class _Shared(TypedDict, total=False):
    """The keywords ``rewrite`` and ``calibrate`` share: the site selection, the written model, the method."""

    include: Iterable[str] | str | None  # or selection=
    exclude: Iterable[str] | str | None
    nodes: str | None
    all_sites: bool
    selection: SiteSelection | None
    form: str  # or output_options=
    verify: bool
    in_place: bool
    write_unchanged: bool
    output_options: OutputOptions | None
    variant: str | None  # or method_options= (with method as a name)
    ratio: float | None
    lambda_rule: str | None
    centered_rho: bool | None
    aggregate: str | None
    method_options: MethodOptions | None
    progress: bool


class RewriteKeywords(_Shared, total=False):
    """The keywords of :func:`rewrite` (besides ``model``, ``output`` and ``details``)."""

    q: float
    method: str | dict[str, Any] | None
    stats: CalibrationStats | str | os.PathLike | None
    constants: Constants | None
    preserve_function: bool
    force: bool
    dry_run: bool


class CalibrateKeywords(_Shared, total=False):
    """The keywords of :func:`calibrate` (besides ``model``, ``data``, ``output`` and ``details``)."""

    method: str
    stats_path: str | os.PathLike | None
    report: str | os.PathLike | None
    batches: int | None  # or data_options= (with data)
    batch_size: int | None
    synthetic: bool
    shapes: Any
    seed: int
    values: Any
    images: ImageOptions | None
    data_options: DataOptions | None
    per_channel: bool
    in_situ: bool
    closing: bool | None
    providers: list[str] | None
    ray: bool | str | None
    workers: int


@overload
def rewrite(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    details: Literal[False] = False,
    **keywords: Unpack[RewriteKeywords],
) -> onnx.ModelProto: ...


@overload
def rewrite(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    details: Literal[True],
    **keywords: Unpack[RewriteKeywords],
) -> RewriteResult: ...


@same_type("model")
def rewrite(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    details: bool = False,
    **keywords: Unpack[RewriteKeywords],
) -> onnx.ModelProto | RewriteResult:
    """Normalize the activations of ``model``; write to ``output`` when given.

    ``method`` is ``"static"`` (default; with ``stats``, each site at its measured q) or
    ``"anact"`` (λ and μ from ``stats``: a :class:`~normact_onnx.calibration.CalibrationStats`
    or the path of a stats JSON written by ``calibrate``). ``lambda_rule`` (``"anact"`` or ``"xavier"``),
    ``centered_rho`` and ``aggregate`` (``"ema"`` or ``"mean"``) choose ANAct's factors; left as None they
    take what the calibration recorded. ``variant``, ``q`` (default 1) and ``ratio``: the static variant.
    The choice goes through :func:`.policy.method_constants`, the door the CLI uses too. Callers with their
    own ``constants(site)`` pass the provenance to stamp as a dict in ``method``.
    ``preserve_function``: fold the inverse into the next layers (outputs unchanged).

    Statistics of another model (their graph fingerprint differs) are refused unless ``force``.
    With ``output`` the file exists afterwards even when nothing changes (a verified copy), unless
    ``write_unchanged=False`` (the CLI without ``-o``). ``form`` (``function``, ``subgraph``, ``custom-op``),
    ``verify`` (default True) and ``in_place`` say how it is written; ``dry_run`` writes nothing.
    Returns the rewritten ``ModelProto`` (or the full :class:`RewriteResult` with ``details=True``).
    The input model object is not modified. ``progress``: the stages on stderr when it is a terminal.

    ``selection`` (a :class:`.selection.SiteSelection`), ``output_options`` (a :class:`.writer.OutputOptions`)
    and ``method_options`` (a :class:`.policy.MethodOptions`) carry the site-selection, writing and method options
    as one value each, instead of ``include``/``exclude``/``nodes``/``all_sites``,
    ``form``/``verify``/``in_place``/``write_unchanged`` and ``method``/``variant``/``q``/``ratio``/
    ``lambda_rule``/``centered_rho``/``aggregate``; pass one way or the other.
    """
    kw: dict[str, Any] = _known("rewrite", keywords, RewriteKeywords)
    selection, out = _bundles(kw)
    method, stats = kw.get("method"), kw.get("stats")
    options = _method_options(kw, MethodOptions(method if isinstance(method, str) else "static", q=kw.get("q", 1.0)))
    named = isinstance(method, str) or stats is not None or kw.get("method_options") is not None
    result = rewrite_model(
        model,
        output,
        method=options,
        selection=selection,
        out=out,
        stats=stats if named else None,
        constants=None if named else kw.get("constants"),
        provenance=None if named else method,
        preserve_function=kw.get("preserve_function", False),
        force=kw.get("force", False),
        dry_run=kw.get("dry_run", False),
        progress=kw.get("progress", False),
    )
    return result if details else result.model


@overload
def calibrate(
    model: ModelLike,
    data: Any = None,
    output: str | os.PathLike | None = None,
    *,
    details: Literal[False] = False,
    **keywords: Unpack[CalibrateKeywords],
) -> CalibrationStats: ...


@overload
def calibrate(
    model: ModelLike,
    data: Any = None,
    output: str | os.PathLike | None = None,
    *,
    details: Literal[True],
    **keywords: Unpack[CalibrateKeywords],
) -> CalibrationResult: ...


def calibrate(
    model: ModelLike,
    data: Any = None,
    output: str | os.PathLike | None = None,
    *,
    details: bool = False,
    **keywords: Unpack[CalibrateKeywords],
) -> CalibrationStats | CalibrationResult:
    """ANAct (or static) calibration (docs/math.md §2) of ``model`` on ``data``.

    ``in_situ`` (default): every site the written model will normalize (the selection
    flags decide which) is normalized with each batch's statistics on its way through,
    so each site is measured where it sits, in the network as it will be written
    (:mod:`.calibration.insitu`); ``closing`` (None: auto, when the batches hold fewer than 32 rows; True;
    False) then checks the pooled constants in the model as written and repairs the sites they leave off, in
    depth order (:mod:`.calibration.closing`). ``method``: ``"anact"`` (λ, μ; default) or ``"static"`` (``variant``,
    default ``center-scale``, from each site's measured moments); the statistics file records which.
    ``lambda_rule`` (default ``"anact"``), ``centered_rho`` and ``aggregate`` (default ``"ema"``): ANAct's
    factor options. ``per_channel``: one λ, μ per channel.

    ``data``: a path (.npz, .npy, a folder of them, a test_data_set_* folder), an
    object with ``get_next()`` (ONNX Runtime's CalibrationDataReader), an
    iterable of ``{input: array}`` dicts, or None with ``synthetic=True``.
    Parquet files and image folders (``images``: a :class:`.data.rows.ImageOptions`)
    are read too, and a ``ray.data.Dataset`` (columns named after the inputs).
    Writes the calibrated model to ``output``, the statistics to ``stats_path``
    and an HTML report to ``report`` when given; returns the statistics (or a
    :class:`CalibrationResult` with ``details=True``).

    ``ray``: run on Ray Data (:mod:`.calibration.distributed`) with ``workers`` actors (default 2): True
    starts a local cluster for the call, ``"auto"`` or an address joins one; a
    Dataset as ``data`` implies it. The moments equal the single-process run's;
    the EMA depends on batch order, so the factors use ``aggregate="mean"``.

    ``selection``, ``output_options`` and ``method_options``: the site selection, the written model's options and
    the method as one value each, as in :func:`rewrite` (a ``method_options`` option left as None takes
    calibrate's default). ``data_options`` (a :class:`.data.options.DataOptions`): ``data``,
    ``batches``, ``batch_size``, ``synthetic``, ``shapes``, ``values``, ``seed`` and ``images`` as one value.
    """
    kw: dict[str, Any] = _known("calibrate", keywords, CalibrateKeywords)
    selection, out = _bundles(kw)
    source = data_bundle(kw.get("data_options"), DataOptions.from_keywords(data, kw))
    d = CALIBRATE_METHOD
    defaults = MethodOptions(
        kw.get("method", d.method), d.variant, d.q, None, d.lambda_rule, d.centered_rho, d.aggregate
    )
    result = calibrate_model(
        model,
        source,
        output,
        method=_method_options(kw, defaults),
        selection=selection,
        out=out,
        stats_path=kw.get("stats_path"),
        report=kw.get("report"),
        per_channel=kw.get("per_channel", False),
        in_situ=kw.get("in_situ", True),
        closing=kw.get("closing"),
        providers=kw.get("providers"),
        progress=kw.get("progress", False),
        ray=kw.get("ray"),
        workers=kw.get("workers", 2),
    )
    return result if details else result.stats


def _known(function: str, keywords: Any, declared: type) -> dict[str, Any]:
    """The keywords as a dict, refusing names the function does not take (as Python would for a signature)."""
    unknown = sorted(set(keywords) - set(declared.__annotations__) - set(_Shared.__annotations__))
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    return dict(keywords)


def _bundles(kw: dict[str, Any]) -> tuple[SiteSelection, OutputOptions]:
    """The selection and output values of a public call: as given, or built from the loose keywords."""
    loose = (kw.get("include"), kw.get("exclude"), kw.get("nodes"), kw.get("all_sites", False))
    selection = kw.get("selection")
    if selection is None:
        selection = SiteSelection.parse(*loose)
    elif loose != (None, None, None, False):
        raise NormactError("pass the site selection as selection= or as include/exclude/nodes/all_sites, not both")
    written = OutputOptions(
        kw.get("form", "function"), kw.get("verify", True), kw.get("in_place", False), kw.get("write_unchanged", True)
    )
    out = kw.get("output_options")
    if out is None:
        out = written
    elif written != OutputOptions():
        raise NormactError(
            "pass the output options as output_options= or as form/verify/in_place/write_unchanged, not both"
        )
    return selection, out


_METHOD_KEYWORDS = ("variant", "q", "ratio", "lambda_rule", "centered_rho", "aggregate")


def _method_options(kw: dict[str, Any], named: MethodOptions) -> MethodOptions:
    """The method value of a public call: ``method_options`` as given, or ``named`` with the loose keywords.

    ``named`` carries the method (``method=`` as a name, or the function's default) and the defaults the loose
    keywords fall back to.
    """
    given = kw.get("method_options")
    if given is None:
        return MethodOptions(
            named.method,
            kw.get("variant", named.variant),
            kw.get("q", named.q),
            kw.get("ratio", named.ratio),
            kw.get("lambda_rule", named.lambda_rule),
            kw.get("centered_rho", named.centered_rho),
            kw.get("aggregate", named.aggregate),
        )
    if isinstance(kw.get("method"), str) or any(kw.get(k) is not None for k in _METHOD_KEYWORDS):
        raise NormactError(
            "pass the method as method_options= or as method/variant/q/ratio/lambda_rule/centered_rho/aggregate, "
            "not both"
        )
    return given
