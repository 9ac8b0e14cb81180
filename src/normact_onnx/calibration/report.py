"""What a person reads after calibration: a terminal table and an HTML page of plots against depth.

The plots are hand-written SVG (no plotting dependency): per site, in depth
order, the forward gain ρ before normalization and *measured in the written
model* after it (each site's property, run on the calibration data with every
site normalized, as deployed), the backward gain ρ' before and λ²·E f'² after,
λ, μ and the measured design variance q.
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
from ..outcome import Refusal
from ..texttable import table
from .stats import CalibrationStats, SiteStats

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


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


def line_chart(
    title: str,
    labels: list[str],
    series: dict[str, list[float]],
    width: int = 640,
    height: int = 260,
    log: bool = False,
) -> str:
    """A small SVG line chart: x = site depth, one polyline per series, a legend and a few y ticks."""
    left, right, top, bottom = 56, 12, 28, 44
    pw, ph = width - left - right, height - top - bottom
    values = [v for vs in series.values() for v in vs if math.isfinite(v) and (v > 0 or not log)]
    if not values:  # nothing to draw (no site has factors): an empty frame; a log axis cannot hold 0
        values = [1.0, 10.0] if log else [0.0, 1.0]
    tr = math.log10 if log else float
    lo, hi = min(map(tr, values)), max(map(tr, values))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    n = max(len(labels), 1)
    x_of = lambda i: left + (pw * (i + 0.5) / n)  # noqa: E731
    y_of = lambda v: top + ph * (1 - (tr(v) - lo) / (hi - lo))  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><title>{html.escape(title)}</title>',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for k in range(5):
        t = lo + (hi - lo) * k / 4
        y = top + ph * (1 - k / 4)
        shown = 10**t if log else t
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{shown:.3g}</text>')
    step = max(1, n // 16)
    for i, lab in enumerate(labels):
        if i % step == 0:
            parts.append(
                f'<text x="{x_of(i):.1f}" y="{top + ph + 14}" text-anchor="middle">{i}</text>'
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
        lx = left + 8 + j * 150
        parts.append(f'<rect x="{lx}" y="{top + 6}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{lx + 14}" y="{top + 15}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(
    stats: CalibrationStats,
    rows: list[tuple[SiteStats, Factors | Refusal]],
    title: str = "ANAct calibration",
    measured: list[dict] | None = None,
) -> str:
    """``measured``: per-site rows of :func:`normact_onnx.comparison.measure_sites` on the written model."""
    ok = [(s, f) for s, f in rows if not isinstance(f, Refusal)]
    labels = [f"{s.depth}: {s.name} ({s.kind})" for s, _ in ok]
    col = lambda attr: [_scalar(getattr(f, attr)) for _, f in ok]  # noqa: E731
    after = {r["site"]: r for r in measured or () if "value" in r}
    forward = {"before": col("rho")}
    if after:
        forward["after: measured in the written model"] = [after.get(s.name, {}).get("value", math.nan) for s, _ in ok]
        prop = next(iter(after.values()))["property"]
    charts = [
        line_chart("Forward gain ρ = E f² / var x", labels, forward),
        line_chart("Backward gain ρ' = E f'²", labels, {"before": col("drho"), "after λ·(f−μ)": col("drho_after")}),
        line_chart("λ (scale)", labels, {"λ": col("lam")}),
        line_chart("μ (shift) = E f", labels, {"μ": col("mu")}),
        line_chart("Measured q = var x (log scale)", labels, {"q": col("q")}, log=True),
    ]
    head = ["#", "site", "kind", "graph", "n", "q", "μ", "ρ", "ρ'", "λ", "ρ' after", "measured after", "holds", "note"]
    trs = []
    for s, f in rows:
        cells = [str(s.depth), s.name, s.kind, s.graph, f"{int(s.x.n.sum()):,}"]
        m = after.get(s.name)
        if isinstance(f, Refusal):
            cells += [""] * 8 + [f.reason]
        else:
            cells += [f"{_scalar(getattr(f, a)):.5g}" for a in ("q", "mu", "rho", "drho", "lam", "drho_after")]
            cells += [f"{m['value']:.5g} ({m['property']})" if m else "not measured", _holds(m)]
            cells += [f"{f.lam.size} channels" if f.lam.size > 1 else ""]
        trs.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    held = sum(1 for r in after.values() if r["holds"])
    summary = (
        f"<p>Measured in the written model on the calibration data: {held} of {len(after)} sites hold "
        f"their property ({html.escape(prop)}, target {html.escape(next(iter(after.values()))['target'])}).</p>"
        if after
        else "<p>The written model was not measured (no model written, or data that cannot be read twice).</p>"
    )
    skipped = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in stats.skipped.items())
    settings = ", ".join(f"{k}={v}" for k, v in stats.settings.items())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1400px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
td:nth-child(2),td:nth-child(3),td:nth-child(4){{text-align:left}}
.charts{{display:flex;flex-wrap:wrap;gap:12px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{stats.batches} batches from {html.escape("; ".join(stats.sources))}; {len(stats.sites)} sites
{"per channel" if stats.per_channel else "per site"}; {html.escape(settings)}.
ANAct (docs/math.md §2.2) wants both gains near 1 after normalization; λ is the compromise between them
(Var f ≤ E f'², so no single scale makes both exactly 1). "Measured after" is each site's property in the
written model, run on the same data (every site normalized, as deployed); ρ' after is λ²·E f'².</p>
{summary}
<div class="charts">{"".join(charts)}</div>
<h2>Sites</h2><table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{"".join(trs)}</table>
{f"<h2>Not calibrated</h2><ul>{skipped}</ul>" if skipped else ""}
</body></html>
"""


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
) -> Path:
    dest = Path(path)
    if dest.suffix.lower() not in (".html", ".htm"):
        raise NormactError(f"--report {dest}: write an .html file (plots are inline SVG)")
    rows = factors_table(stats, lambda_rule, centered_rho, aggregate)
    with atomic_path(dest) as tmp:
        tmp.write_text(render_html(stats, rows, measured=measured), encoding="utf-8")
    return dest
