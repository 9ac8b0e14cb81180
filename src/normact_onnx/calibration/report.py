"""What a person reads after calibration: a terminal table and an HTML page of plots against depth.

The plots are hand-written SVG (no plotting dependency): per site, in depth
order, the forward gain ρ before normalization and *measured in the written
model* after it (each site's property, run on the calibration data with every
site normalized, as deployed), the backward gain ρ' before and λ²·E f'² after,
λ, μ and the measured design variance q; for static normalization the second
moment before and after, the scale and the shift. Sites the rewrite leaves alone
(gates, graph outputs) are marked in the table and kept out of the charts.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import numpy as np

from ..errors import NormactError
from ..io import atomic_path
from ..methods.anact import Factors, site_factors
from ..methods.static import measured_affine
from ..outcome import Refusal
from ..texttable import table
from .stats import CalibrationStats, SiteStats

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
GAIN_TARGET = (0.5, 2.0)  # the property a normalized site should show (comparison.GAIN_RANGE; drawn as a band)


def _scalar(v: np.ndarray) -> float:
    """One number per site for tables and plots (the channel mean when per-channel)."""
    return float(np.mean(v)) if np.size(v) else float("nan")


def factors_table(
    stats: CalibrationStats, lambda_rule: str, centered_rho: bool, aggregate: str
) -> list[tuple[SiteStats, Factors | Refusal]]:
    """Every site with its factors (or why none), in depth order: the terminal table and the report."""
    return [(s, site_factors(s, lambda_rule, centered_rho, aggregate)) for s in stats.ordered()]


def terminal_table(rows: list[tuple[SiteStats, Factors | Refusal]]) -> str:
    out = []
    for s, fac in rows:
        row = {"#": s.depth, "site": s.name, "kind": s.kind, "n": f"{int(s.x.n.sum()):,}"}
        if isinstance(fac, Refusal):
            row["note"] = fac.reason
        else:
            per = f"mean of {fac.lam.size} channels" if fac.lam.size > 1 else ""
            row.update(
                {
                    "q=var x": f"{_scalar(fac.q):.4g}",
                    "μ": f"{_scalar(fac.mu):.4g}",
                    "ρ": f"{_scalar(fac.rho):.4g}",
                    "ρ'": f"{_scalar(fac.drho):.4g}",
                    "λ": f"{_scalar(fac.lam):.4g}",
                    "ρ after": f"{_scalar(fac.rho_after):.3g}",
                    "ρ' after": f"{_scalar(fac.drho_after):.3g}",
                    "note": per,
                }
            )
        out.append(row)
    cols = ["#", "site", "kind", "n", "q=var x", "μ", "ρ", "ρ'", "λ", "ρ after", "ρ' after", "note"]
    return table(out, cols)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 2.5 or 5 × a power of ten) that cover [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _tick_label(v: float) -> str:
    return f"{v:.4g}"


def line_chart(
    title: str,
    labels: list[str],
    series: dict[str, list[float]],
    width: int = 640,
    height: int = 260,
    log: bool = False,
    band: tuple[float, float] | None = None,
    nonnegative: bool = False,
) -> str:
    """A small SVG line chart: x = site depth (each label starts "depth:"), one polyline per series, a legend
    and round y ticks.

    ``band``: a target range drawn as a shaded strip (and kept in view). ``nonnegative``: the quantity cannot
    be below zero, so the axis does not start below it. The axis ends on round ticks (powers of ten on a log axis).
    """
    left, right, top, bottom = 56, 12, 28, 44
    pw, ph = width - left - right, height - top - bottom
    values = [v for vs in series.values() for v in vs if math.isfinite(v) and (v > 0 or not log)]
    if band is not None:
        values += list(band)
    if not values:  # nothing to draw (no site has factors): an empty frame; a log axis cannot hold 0
        values = [1.0, 10.0] if log else [0.0, 1.0]
    tr = math.log10 if log else float
    lo, hi = min(map(tr, values)), max(map(tr, values))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    if log:
        ticks = [float(k) for k in range(math.floor(lo), math.ceil(hi) + 1)]
        if len(ticks) < 2:
            ticks = [ticks[0], ticks[0] + 1]
    else:
        pad = (hi - lo) * 0.05
        lo, hi = lo - pad, hi + pad
        if nonnegative:
            lo = max(lo, 0.0)
        ticks = nice_ticks(lo, hi)
    lo, hi = ticks[0], ticks[-1]
    n = max(len(labels), 1)
    x_of = lambda i: left + (pw * (i + 0.5) / n)  # noqa: E731
    y_of = lambda v: top + ph * (1 - (tr(v) - lo) / (hi - lo))  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><title>{html.escape(title)}</title>',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    if band is not None:
        y1, y2 = y_of(band[1]), y_of(band[0])
        parts.append(
            f'<rect class="target-band" x="{left}" y="{y1:.1f}" width="{pw}" height="{y2 - y1:.1f}" '
            f'fill="#2ca02c" fill-opacity="0.12"><title>target [{band[0]:g}, {band[1]:g}]</title></rect>'
        )
    for t in ticks:
        y = y_of(10**t if log else t)
        shown = 10**t if log else t
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text class="tick" x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(shown)}</text>')
    step = max(1, n // 16)
    for i, lab in enumerate(labels):
        if i % step == 0:
            parts.append(
                f'<text x="{x_of(i):.1f}" y="{top + ph + 14}" text-anchor="middle">'
                f"{html.escape(lab.split(':', 1)[0])}</text>"
                f"<title>{html.escape(lab)}</title>"
            )
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">site (depth order)</text>')
    for j, (name, vs) in enumerate(series.items()):
        color = PALETTE[j % len(PALETTE)]
        pts = [(x_of(i), y_of(v)) for i, v in enumerate(vs) if math.isfinite(v) and (v > 0 or not log)]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.6" fill="{color}"/>')
        lx = left + 8 + j * 190
        parts.append(f'<rect x="{lx}" y="{top + 6}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{lx + 14}" y="{top + 15}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# What each method's report says: its title, what it promises at a site, and how to read the page.
WORDING = {
    "anact": (
        "ANAct calibration",
        "ANAct (docs/math.md §2.2) wants both gains near 1 after normalization; λ is the compromise between "
        "them (Var f ≤ E f'², so no single scale makes both exactly 1). \"Measured after\" is each site's "
        "forward gain E y²/Var x in the written model, run on the same data (every site normalized, as "
        "deployed); ρ' after is λ²·E f'².",
    ),
    "static": (
        "Static normalization calibration",
        "Static normalization (docs/math.md §4.3) scales and shifts each activation's output with constants "
        'from its measured moments so that, on the calibration data, E y = 0 and E y² = 1. "Measured after" '
        "is E y² of each normalized output in the written model, run on the same data (every site normalized, "
        "as deployed).",
    ),
}


def _static_constants(s: SiteStats, settings: dict) -> tuple[float, float, float] | Refusal:
    """The scale, shift and slope static normalization takes from a site's moments (channel means)."""
    got = measured_affine(
        s.f.mean, s.f.var, s.x.mean, s.x.var, s.cov, settings.get("variant") or "center-scale", settings.get("ratio")
    )
    if isinstance(got, Refusal):
        return got
    return _scalar(got[0]), _scalar(got[1]), _scalar(got[2])


def render_html(
    stats: CalibrationStats,
    rows: list[tuple[SiteStats, Factors | Refusal]],
    title: str | None = None,
    measured: list[dict] | None = None,
    left_alone: dict[str, str] | None = None,
) -> str:
    """The report page. ``measured``: per-site rows of :func:`normact_onnx.comparison.measure_sites` on the
    written model. ``left_alone``: site key → why the rewrite leaves that site as it is (a multiplicative gate,
    a graph output): marked in the table and kept out of the charts, whose scale it would otherwise set.
    """
    method = "static" if stats.settings.get("method") == "static" else "anact"
    default_title, intro = WORDING[method]
    title = title or default_title
    left_alone = left_alone or {}
    ok = [(s, f) for s, f in rows if not isinstance(f, Refusal) and s.key not in left_alone]
    labels = [f"{s.depth}: {s.name} ({s.kind})" for s, _ in ok]
    col = lambda attr: [_scalar(getattr(f, attr)) for _, f in ok]  # noqa: E731
    after = {r["site"]: r for r in measured or () if "value" in r}
    measured_after = [after.get(s.name, {}).get("value", math.nan) for s, _ in ok]
    band = GAIN_TARGET
    if method == "anact":
        forward = {"before": col("rho")}
        if after:
            forward["after: measured in the written model"] = measured_after
        charts = [
            line_chart("Forward gain ρ = E f² / var x", labels, forward, band=band, nonnegative=True),
            line_chart(
                "Backward gain ρ' = E f'²",
                labels,
                {"before": col("drho"), "after λ·(f−μ)": col("drho_after")},
                band=band,
                nonnegative=True,
            ),
            line_chart("λ (scale)", labels, {"λ": col("lam")}, nonnegative=True),
            line_chart("μ (shift) = E f", labels, {"μ": col("mu")}),
        ]
    else:
        constants = [_static_constants(s, stats.settings) for s, _ in ok]
        pick = lambda k: [c[k] if not isinstance(c, Refusal) else math.nan for c in constants]  # noqa: E731
        second = {"before: E f²": [_scalar(s.f.var + s.f.mean**2) for s, _ in ok]}
        if after:
            second["after: E y² measured in the written model"] = measured_after
        charts = [
            line_chart("Second moment of the output", labels, second, band=band, nonnegative=True),
            line_chart("scale", labels, {"scale": pick(0)}, nonnegative=True),
            line_chart("shift = E f", labels, {"shift": pick(1)}),
        ]
    charts.append(line_chart("Measured q = var x (log scale)", labels, {"q": col("q")}, log=True))
    constant_cols = ["μ", "ρ", "ρ'", "λ", "ρ' after"] if method == "anact" else ["E f", "Var f", "scale", "shift"]
    head = ["#", "site", "kind", "graph", "n", "q", *constant_cols, "measured after", "holds", "note"]
    trs = []
    for s, f in rows:
        cells = [str(s.depth), s.name, s.kind, s.graph, f"{int(s.x.n.sum()):,}"]
        m = after.get(s.name)
        skipped = left_alone.get(s.key)
        if isinstance(f, Refusal):
            cells += [""] * (len(constant_cols) + 3) + [f.reason]
        else:
            cells.append(f"{_scalar(f.q):.5g}")
            if method == "anact":
                cells += [f"{_scalar(getattr(f, a)):.5g}" for a in ("mu", "rho", "drho", "lam", "drho_after")]
            else:
                c = _static_constants(s, stats.settings)
                cells += [f"{_scalar(s.f.mean):.5g}", f"{_scalar(s.f.var):.5g}"]
                cells += ["", ""] if isinstance(c, Refusal) else [f"{c[0]:.5g}", f"{c[1]:.5g}"]
            if skipped is not None:
                cells += ["", "skipped", f"left alone by the rewrite: {skipped}"]
            else:
                cells += [f"{m['value']:.5g} ({m['property']})" if m else "not measured", _holds(m)]
                cells += [f"{f.lam.size} channels" if f.lam.size > 1 else ""]
        attr = ' class="skipped"' if skipped is not None else ""
        trs.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    held = sum(1 for r in after.values() if r["holds"])
    summary = (
        f"<p>Measured in the written model on the calibration data: {held} of {len(after)} normalized sites hold "
        f"their property ({html.escape(next(iter(after.values()))['property'])}, target "
        f"{html.escape(next(iter(after.values()))['target'])}, the shaded band in the charts).</p>"
        if after
        else "<p>The written model was not measured (no model written, or data that cannot be read twice).</p>"
    )
    if left_alone:
        summary += (
            f"<p>{len(left_alone)} site{'s' * (len(left_alone) != 1)} left alone by the rewrite (marked "
            f"<em>skipped</em> in the table) {'are' if len(left_alone) != 1 else 'is'} not plotted.</p>"
        )
    not_calibrated = "".join(
        f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in stats.skipped.items()
    )
    n_sites = len(stats.sites)
    settings = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_setting(v))}</td></tr>" for k, v in stats.settings.items()
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1400px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
td:nth-child(2),td:nth-child(3),td:nth-child(4){{text-align:left}}
table.settings th,table.settings td{{text-align:left}} tr.skipped td{{color:#888;background:#f6f6f6}}
.charts{{display:flex;flex-wrap:wrap;gap:12px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{stats.batches} batch{"es" * (stats.batches != 1)} from {html.escape("; ".join(stats.sources))};
{n_sites} site{"s" * (n_sites != 1)}, statistics {"per channel" if stats.per_channel else "per site"}.
{html.escape(intro)}</p>
{summary}
<h2>Settings</h2><table class="settings">{settings}</table>
<div class="charts">{"".join(charts)}</div>
<h2>Sites</h2><table class="sites"><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{"".join(trs)}</table>
{f"<h2>Not calibrated</h2><ul>{not_calibrated}</ul>" if not_calibrated else ""}
</body></html>
"""


def _setting(v: object) -> str:
    """A setting's value as a person reads it: lists joined, booleans as yes/no, None as "—"."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "—"
    if isinstance(v, list | tuple):
        shown = ", ".join(map(str, v[:3])) + (", …" if len(v) > 3 else "")
        return f"{len(v)}: {shown}" if len(v) > 3 else (shown or "none")
    return str(v)


def _holds(row: dict | None) -> str:
    if row is None:
        return ""
    return "yes" if row["holds"] else "MISSED"


def write_html(
    stats: CalibrationStats,
    path: str | os.PathLike,
    lambda_rule: str,
    centered_rho: bool,
    aggregate: str,
    measured: list[dict] | None = None,
    left_alone: dict[str, str] | None = None,
) -> Path:
    """The HTML report at ``path``; ``left_alone``: site key → why the rewrite leaves it (see render_html)."""
    dest = Path(path)
    if dest.suffix.lower() not in (".html", ".htm"):
        raise NormactError(f"--report {dest}: write an .html file (plots are inline SVG)")
    rows = factors_table(stats, lambda_rule, centered_rho, aggregate)
    with atomic_path(dest) as tmp:
        tmp.write_text(render_html(stats, rows, measured=measured, left_alone=left_alone), encoding="utf-8")
    return dest
