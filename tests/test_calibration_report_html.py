"""The calibration HTML report as a person reads it: skipped sites marked and not plotted, wording per method,
settings as a table, round ticks, the target band (issue 20: the page looked at in a browser)."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from normact_onnx.api import calibrate
from normact_onnx.calibration.report import nice_ticks

from .conftest import MODELS

MOBILENET = MODELS / "mobilenet_like.torchscript.onnx"  # 8 sites, one a squeeze-excitation HardSigmoid gate
GATE = "/block2/se/gate/HardSigmoid"
NON_NEGATIVE = ("Forward gain", "Backward gain", "λ (scale)", "Second moment", "scale")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = {}
    folder = tmp_path_factory.mktemp("reports")
    for method in ("anact", "static"):
        page = folder / f"{method}.html"
        calibrate(MOBILENET, synthetic=True, output=folder / f"{method}.onnx", report=page, method=method)
        out[method] = page.read_text()
    return out


def charts(page: str) -> dict[str, str]:
    return {re.search(r"<title>(.*?)</title>", svg).group(1): svg for svg in re.findall(r"<svg.*?</svg>", page, re.S)}


def ticks(svg: str) -> list[float]:
    return [float(t) for t in re.findall(r'<text class="tick"[^>]*>([^<]*)</text>', svg)]


def rows(page: str) -> dict[str, str]:
    table = page[page.index('<table class="sites">') :]
    return {re.search(r"<td>\d+</td><td>(.*?)</td>", tr).group(1): tr for tr in re.findall(r"<tr[^>]*>.*?</tr>", table)
            if "<td>" in tr}  # fmt: skip


@pytest.mark.parametrize("method", ["anact", "static"])
def test_a_skipped_gate_is_marked_and_not_plotted(reports, method):
    page = reports[method]
    gate = rows(page)[GATE]
    assert gate.startswith('<tr class="skipped">') and "left alone by the rewrite: multiplicative gate" in gate
    assert sum(tr.startswith('<tr class="skipped">') for tr in rows(page).values()) == 1
    for title, svg in charts(page).items():
        assert len(re.findall(r"<circle", svg)) % 7 == 0, title  # the 7 normalized sites per series, no gate
        assert svg.count("<circle") >= 7, title
    assert "1 site left alone by the rewrite (marked <em>skipped</em> in the table) is not plotted" in page


def test_intro_and_settings(reports):
    page = reports["anact"]
    assert "sites per site" not in page and "8 sites, statistics per site" in page
    settings = page[page.index('<table class="settings">') :].split("</table>")[0]
    assert "<tr><th>method</th><td>anact</td></tr>" in settings and "<tr><th>in_situ</th><td>yes</td></tr>" in settings
    assert "['" not in page and "=[" not in page  # no raw Python lists


def test_static_report_is_worded_for_static_normalization(reports):
    static, anact = reports["static"], reports["anact"]
    assert "<title>Static normalization calibration</title>" in static and "<h1>Static normalization" in static
    assert "ANAct" not in static and "λ" not in static and "μ" not in static
    assert "<h1>ANAct calibration</h1>" in anact and "λ (scale)" in charts(anact)
    heads = re.findall(r"<th>(.*?)</th>", static[static.index('<table class="sites">') :])
    assert {"scale", "shift", "E f", "Var f"} <= set(heads)
    assert "7 of 7 normalized sites hold their property (E y² (|E y|)" in static


@pytest.mark.parametrize("method", ["anact", "static"])
def test_ticks_round_non_negative_and_band(reports, method):
    found = charts(reports[method])
    for title, svg in found.items():
        t = ticks(svg)
        assert len(t) >= 2, title
        if "log scale" in title:
            assert all(math.log10(v) == round(math.log10(v)) for v in t), (title, t)  # powers of ten
            continue
        steps = {round(b - a, 12) for a, b in itertools.pairwise(t)}
        assert len(steps) == 1, (title, t)
        step = steps.pop()
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5)), (title, step)
        if title.startswith(NON_NEGATIVE):
            assert t[0] >= 0, (title, t)
    gains = [svg for title, svg in found.items() if "gain" in title or "Second moment" in title]
    assert gains and all('class="target-band"' in svg and "target [0.5, 2]" in svg for svg in gains)


def test_nice_ticks():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0.13, 1.87) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert nice_ticks(-3.2, 68000.0)[0] <= -3.2 and nice_ticks(-3.2, 68000.0)[-1] >= 68000
