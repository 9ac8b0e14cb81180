"""Which sites a command normalizes, with which constants, and why not: the per-site decisions, in one place.

``rewrite``, ``calibrate`` (its written model) and the fine-tuning graph all decide here, so a site is
rewritten, or left alone with its reason, by one rule (the selection flags themselves: :mod:`.selection`).
:func:`method_constants` is the one door from the CLI and the Python API to a method's per-site constants:
plain static at a design variance, static from measured moments, or ANAct's λ and μ from calibration
statistics (docs/math.md §1, §2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .calibration.insitu import Normalizer
from .calibration.stats import CalibrationStats, SiteStats
from .errors import NormactError
from .methods import METHODS
from .methods.anact import anact_affine, check_options, site_factors
from .methods.static import VARIANTS, Affine, measured_affine, static_affine
from .outcome import Refusal
from .passes.find import Site
from .passes.normalize import SiteOutcome
from .selection import SiteSelection

Constants = Callable[[Site], Affine | Refusal]
"""A site's constants, or why it has none (the site is then skipped with that reason)."""


def select(sites: list[Site], selection: SiteSelection, constants: Constants) -> list[SiteOutcome]:
    """Decide per site: rewrite (with constants) or skip (with the reason a person would want).

    A ``constants`` callback of a caller's own may still give its reason as a plain string, as before
    :class:`.outcome.Refusal` existed; it is taken as a reason all the same.
    """
    out = []
    for s in sites:
        reason = selection.why(s)
        if s.normalized is not None:
            out.append(SiteOutcome(s, "normalized", reason or "already normalized"))
        elif reason:
            out.append(SiteOutcome(s, "skipped", reason))
        else:
            aff = constants(s)
            if isinstance(aff, Refusal | str):
                out.append(SiteOutcome(s, "skipped", str(aff), refused=True))
            else:
                out.append(SiteOutcome(s, "rewritten", affine=aff))
    return out


def check_some_rewritten(outcomes: list[SiteOutcome]) -> None:
    """Sites were selected but every one was refused: an error, not an "unchanged copy" that looks like success.

    Options that no site can honour (``--ratio -3``, ``--variant zeta-zero --preserve-function``, another
    model's statistics with ``--force``) would otherwise exit 0 having done nothing. A model that simply has
    no sites (or none the selection picks) still gets its unchanged copy.
    """
    refused = [o for o in outcomes if o.refused]
    if refused and not any(o.action == "rewritten" for o in outcomes):
        first = refused[0]
        raise NormactError(
            f"no site could be rewritten: {_count(len(refused))} refused (first, {first.site.name}: {first.reason}); "
            "nothing written"
        )


def _count(n: int) -> str:
    return "the one selected site was" if n == 1 else f"all {n} selected sites were"


# What each method promises at a normalized site (compare --sites measures it in the written model): static,
# E y ≈ 0 and E y² ≈ 1; ANAct, the forward gain E y² / Var x near 1 (λ is a compromise with the backward gain,
# so a factor of two either way is what "holds" means).
GAIN_RANGE = (0.5, 2.0)


def predicted_property(s: SiteStats, affine: Affine, method: str) -> float | None:
    """The property a site's constants give on its own calibration data (within channels), or None if unknown.

    y = a·(f − b − c·x), so E y = a·(E f − b − c·E x) and Var y = a²·(Var f − 2c·Cov(x, f) + c²·Var x) per
    channel; ANAct's is Σ E y² / Σ Var x over the channels, static's Σ E y² / channels.
    """
    a, b, c = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (affine.scale, affine.shift, affine.slope))
    cov = s.cov
    if np.any(c != 0) and cov is None:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_y = a * (s.f.mean - b - c * s.x.mean)
        var_y = a * a * (s.f.var - 2 * c * (cov if cov is not None else 0.0) + c * c * s.x.var)
        second = np.broadcast_to(var_y + mean_y * mean_y, s.x.n.shape)
        value = second.sum() / s.x.var.sum() if method == "anact" else second.mean()
    return float(value) if np.isfinite(value) else None


def missed_targets(stats: CalibrationStats, outcomes: list[SiteOutcome], method: str) -> str | None:
    """One warning line naming the rewritten sites whose constants miss their own target on the calibration data.

    A result that does not hold where it was measured will not hold anywhere: better said at once than
    printed as "verified" (per-channel ANAct on mostly-dead channels, for one).
    """
    lo, hi = GAIN_RANGE
    missed = []
    for o in outcomes:
        s = stats.sites.get(o.site.output)
        if o.action != "rewritten" or o.affine is None or s is None:
            continue
        v = predicted_property(s, o.affine, method)
        if v is not None and not lo <= v <= hi:
            missed.append(f"{o.site.name} {v:.3g}")
    if not missed:
        return None
    what = "E y²/Var x" if method == "anact" else "E y²"
    who = "1 site misses its" if len(missed) == 1 else f"{len(missed)} sites miss their"
    return (
        f"warning: {who} target ({what} in [{lo:g}, {hi:g}]) on "
        f"the calibration data: {', '.join(missed)}; check with compare --sites, or exclude them (--nodes)"
    )


# ---- constants --------------------------------------------------------------------------------------------------


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

    def constants(site: Site) -> Affine | Refusal:
        site_q = (q_per_site or {}).get(site.output, q)
        try:
            return static_affine(site.activation, site.params, site_q, variant, ratio)
        except NormactError as e:
            return Refusal(str(e))

    return constants


def anact_constants(
    stats: CalibrationStats, lambda_rule: str = "anact", centered_rho: bool = False, aggregate: str = "ema"
) -> Constants:
    """The rewrite's per-site constants: λ and μ from each site's statistics, or why there are none."""
    check_options(lambda_rule, aggregate)

    def constants(site: Site) -> Affine | Refusal:
        s = _site_stats(stats, site)
        if isinstance(s, Refusal):
            return s
        fac = site_factors(s, lambda_rule, centered_rho, aggregate)
        return fac if isinstance(fac, Refusal) else anact_affine(s, fac)

    return constants


def _site_stats(stats: CalibrationStats, site: Site) -> SiteStats | Refusal:
    """The site's statistics, or why they cannot give it constants."""
    s = stats.sites.get(site.output)
    if s is None:
        return Refusal(f"no statistics: {stats.skipped.get(site.output, 'site not in the statistics file')}")
    if s.kind != site.kind:
        return Refusal(f"the statistics are for a {s.kind} site, this one is {site.kind}")
    if s.x.n.size == 0 or not np.all(s.x.n > 0):
        return Refusal("no data reached this site")
    return s


def static_stats_constants(
    stats: CalibrationStats, variant: str = "center-scale", ratio: float | None = None
) -> Constants:
    """Static constants from each site's measured moments (see :func:`.methods.static.measured_affine`)."""

    def constants(site: Site) -> Affine | Refusal:
        s = _site_stats(stats, site)
        if isinstance(s, Refusal):
            return s
        got = measured_affine(s.f.mean, s.f.var, s.x.mean, s.x.var, s.cov, variant, ratio)
        return got if isinstance(got, Refusal) else _shaped(s, *got)

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
    if method not in METHODS:
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


@dataclass(frozen=True)
class MethodOptions:
    """How a method's constants are chosen: the options ``rewrite`` and ``calibrate`` take, CLI and API alike.

    ``method``: ``"static"`` (Gaussian constants at the design variance ``q``; with statistics, at each site's
    measured moments) or ``"anact"`` (λ and μ from statistics). ``variant``/``ratio``: the static variant.
    ``lambda_rule``, ``centered_rho``, ``aggregate``: ANAct's factor options. With statistics, an option left
    as None takes what the calibration run was asked for (recorded in the statistics).
    """

    method: str = "static"
    variant: str | None = None
    q: float = 1.0
    ratio: float | None = None
    lambda_rule: str | None = None
    centered_rho: bool | None = None
    aggregate: str | None = None

    def filled(self, defaults: MethodOptions) -> MethodOptions:
        """These options with the ones left as None taken from ``defaults`` (calibrate's, when no statistics exist
        yet to take them from)."""
        return replace(
            self, **{f.name: getattr(defaults, f.name) for f in fields(self) if getattr(self, f.name) is None}
        )

    def normalizer(self) -> Normalizer:
        """How in-situ calibration normalizes the sites on the way: this value, as :mod:`.calibration` takes it.

        Checks the options first (the λ rule and the aggregate, :func:`.methods.anact.check_options`; the method,
        variant and ratio, :class:`.calibration.insitu.Normalizer`). Call it on :meth:`filled` options.
        """
        check_options(str(self.lambda_rule), str(self.aggregate))
        return Normalizer(self.method, str(self.lambda_rule), bool(self.centered_rho), str(self.variant), self.ratio)


def method_constants(options: MethodOptions, stats: CalibrationStats | None = None) -> tuple[Constants, dict[str, Any]]:
    """The one door to a method's per-site constants: (constants, provenance stamped into the model).

    Without ``stats`` only ``static`` applies (the design variance ``q``); with them, ``static`` uses each
    site's measured moments and ``anact`` its λ and μ (:func:`stats_constants`).
    """
    o = options
    if o.method not in METHODS:
        raise NormactError(f"unknown method {o.method!r}; choose static or anact")
    if stats is None:
        if o.method != "static":
            raise NormactError(
                f"method {o.method!r} needs calibration statistics (stats=…; see normact-onnx calibrate)"
            )
        variant = o.variant or "center-scale"
        info: dict[str, Any] = {"method": "static", "variant": variant, "q": o.q}
        if o.ratio is not None:
            info["ratio"] = o.ratio
        return static_constants(o.q, variant, o.ratio), info
    constants, info = stats_constants(
        stats,
        o.method,
        lambda_rule=o.lambda_rule,
        centered_rho=o.centered_rho,
        aggregate=o.aggregate,
        variant=o.variant,
        q=o.q,
        ratio=o.ratio,
    )
    return constants, {**info, "stats": stats.origin} if stats.origin else info
