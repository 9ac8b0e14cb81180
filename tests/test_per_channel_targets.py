"""Per-channel calibration is measured per channel, and a result that misses its own target says so (issue 20).

``calibrate --per-channel`` printed "verified" while ``compare --sites`` showed gains of 0.05 on a bundled
model: compare pooled the pre-activation over channels, so the spread of the channel means (which
per-channel constants do not touch) swelled Var x twenty-fold. The gain is now taken within channels; a
site whose constants miss the target on the very data they were measured on is one warning line.
"""

from __future__ import annotations

import numpy as np
import pytest

from normact_onnx.api import calibrate
from normact_onnx.comparison import compare, per_channel_moments

from .conftest import MODELS

MODEL = MODELS / "mobilenet_like.dynamo.onnx"


def test_per_channel_moments_are_within_channels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4, 5, 5)) * 0.1 + np.arange(4).reshape(1, 4, 1, 1)
    m = per_channel_moments(x, (4, 1, 1))
    np.testing.assert_allclose(m.mean, x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(m.var, x.var(axis=(0, 2, 3)))
    assert m.n.tolist() == [400.0] * 4


@pytest.fixture(scope="module")
def per_channel(tmp_path_factory):
    out = tmp_path_factory.mktemp("pc") / "pc.onnx"
    calibrate(MODEL, synthetic=True, output=out, per_channel=True)
    return out


def test_per_channel_anact_holds_its_gain_in_compare(per_channel):
    rows = [r for r in compare(MODEL, per_channel, synthetic=True, sites=True).sites if "holds" in r]
    assert len(rows) >= 5
    missed = {r["site"]: r["value"] for r in rows if not r["holds"]}
    assert not missed, missed  # main: n0_6 at 0.05 (pooled over channels)
    for r in rows:
        assert 0.5 <= r["value"] <= 2.0


def test_a_result_missing_its_target_warns_naming_the_site(tmp_path, cli):
    """Batches of 32: the SE gate's mostly-dead ReLU channels get λ from a backward gain far off the forward one."""
    r = cli(
        "calibrate", MODEL, "--synthetic", "--per-channel", "--shape", "x=32x3x32x32", "-o", "pc.onnx", cwd=tmp_path
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 site misses its target (E y²/Var x in [0.5, 2])" in warnings[0]
    assert "node_relu 0.2" in warnings[0]
    got = compare(MODEL, tmp_path / "pc.onnx", synthetic=True, sites=True, shapes=["x=32x3x32x32"])
    row = next(s for s in got.sites if s["site"] == "node_relu")
    assert not row["holds"] and row["value"] == pytest.approx(0.23, abs=0.03)  # the warning foretold it


def test_rewrite_with_the_statistics_gives_calibrates_warning(tmp_path, cli):
    """rewrite --method anact --stats S.json: the same one line as calibrate -o (it was computed for calibrate only)."""
    shape = "x=32x3x32x32"
    r = cli("calibrate", MODEL, "--synthetic", "--per-channel", "--shape", shape, "-o", "pc.onnx", "--stats", "pc.json",
            cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    calibrated = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    r = cli("rewrite", MODEL, "--method", "anact", "--stats", "pc.json", "-o", "r.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "target" in line]
    assert len(calibrated) == 1 and warned == calibrated and "node_relu 0.2" in warned[0]
    # static constants at each site's measured q hold their target (E y² ≈ 1): no warning, a real check
    r = cli("calibrate", MODEL, "--synthetic", "--method", "static", "--shape", shape, "--stats-only", "--stats",
            "st.json", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("rewrite", MODEL, "--method", "static", "--stats", "st.json", "-o", "s.onnx", cwd=tmp_path)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
