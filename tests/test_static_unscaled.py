"""The unscaled ζ = 0 static variant (docs/math.md §1.3.1) and the center-scale variance map (§1.8).

Constants are checked against an independent reference: scipy's adaptive quadrature of the
Gaussian integrals, not the library's own Gauss–Legendre moments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper
from scipy import integrate

from normact_onnx.api import rewrite
from normact_onnx.catalogue import CATALOGUE
from normact_onnx.errors import NormactError
from normact_onnx.methods.static import MEASURED_VARIANTS, VARIANTS, measured_affine, static_affine
from normact_onnx.outcome import Refusal

from .conftest import fvi, run_model, tiny_model

KINDS = ("relu", "silu", "gelu", "tanh", "sigmoid")


def _expect(g, q: float) -> float:
    """E g(x), x ~ N(0, q), by scipy's adaptive quadrature split at the kink 0."""
    dens = lambda x: g(x) * math.exp(-0.5 * x * x / q) / math.sqrt(2 * math.pi * q)  # noqa: E731
    s = 14 * math.sqrt(q)
    return (
        integrate.quad(dens, -s, 0, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
        + integrate.quad(dens, 0, s, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
    )


def _scalar(fn):
    return lambda x: float(fn(np.array([x], dtype=np.float64))[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q", [0.5, 1.0, 2.0])
def test_unscaled_zeta_zero_constants_match_quadrature(kind, q):
    act = CATALOGUE[kind]
    f, df = _scalar(act.forward), _scalar(act.derivative)
    m1, b, d2 = _expect(f, q), _expect(df, q), _expect(lambda x: df(x) ** 2, q)
    a = static_affine(act, {}, q, "zeta-zero-unscaled")
    assert a.shift == pytest.approx(m1, rel=1e-9, abs=1e-12)
    assert a.slope == pytest.approx(b, rel=1e-9, abs=1e-12)
    assert a.scale == pytest.approx(1.0 / math.sqrt(d2 - b * b), rel=1e-9)
    # what the user relies on: centred, uncorrelated with x, unit backward gain at the design q
    g = lambda x: a.scale * (f(x) - a.shift - a.slope * x)  # noqa: E731
    dg = lambda x: a.scale * (df(x) - a.slope)  # noqa: E731
    assert abs(_expect(g, q)) < 1e-9
    assert abs(_expect(lambda x: x * g(x), q)) < 1e-9
    assert _expect(lambda x: dg(x) ** 2, q) == pytest.approx(1.0, rel=1e-9)
    # and, by the Gaussian Poincaré inequality, a forward variance of at most q
    assert _expect(lambda x: g(x) ** 2, q) <= q * (1 + 1e-9)


@pytest.mark.parametrize("q", [0.25, 1.0, 3.0])
def test_unscaled_zeta_zero_relu_is_abs_minus_mean(q):
    a = static_affine(CATALOGUE["relu"], {}, q, "zeta-zero-unscaled")
    x = np.linspace(-4, 4, 101)
    y = a.scale * (np.maximum(x, 0) - a.shift - a.slope * x)
    np.testing.assert_allclose(y, np.abs(x) - math.sqrt(2 * q / math.pi), atol=1e-12)
    # the rescaled zeta-zero is the same function divided by its standard deviation √(q·(1 − 2/π)): 1.659 at q = 1
    scaled = static_affine(CATALOGUE["relu"], {}, q, "zeta-zero")
    assert scaled.scale / a.scale == pytest.approx(1.0 / math.sqrt(q * (1 - 2 / math.pi)), rel=1e-12)
    if q == 1.0:
        assert scaled.scale / a.scale == pytest.approx(1.659, abs=5e-4)


def test_unscaled_zeta_zero_refuses_affine_activation():
    with pytest.raises(NormactError, match="affine"):
        static_affine(CATALOGUE["leaky_relu"], {"alpha": 1.0}, 1.0, "zeta-zero-unscaled")


def test_unscaled_variant_is_gaussian_only():
    assert "zeta-zero-unscaled" in VARIANTS and "zeta-zero-unscaled" not in MEASURED_VARIANTS
    one = np.ones(3)
    why = measured_affine(one, one, 0 * one, one, 0.5 * one, "zeta-zero-unscaled")
    assert isinstance(why, Refusal) and "E f'²" in why.reason


def test_rewrite_with_unscaled_variant_runs_in_onnxruntime(tmp_path):
    model = tiny_model([helper.make_node("Relu", ["x"], ["y"])], [fvi("x", [2, 50])], [fvi("y", [2, 50])])
    out = tmp_path / "out.onnx"
    rewrite(model, out, variant="zeta-zero-unscaled", q=2.0, all_sites=True)
    x = np.linspace(-3, 3, 100, dtype=np.float32).reshape(2, 50)
    (y,) = run_model(out, {"x": x})
    np.testing.assert_allclose(y, np.abs(x) - math.sqrt(4 / math.pi), atol=1e-5)


def test_rewrite_cli_offers_unscaled_and_calibrate_refuses_it(cli, tmp_path):
    from .conftest import MODELS

    proc = cli(
        "rewrite", MODELS / "mlp_relu.torchscript.onnx", "-o", tmp_path / "o.onnx", "--variant", "zeta-zero-unscaled"
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o.onnx").exists()
    proc = cli(
        "calibrate", MODELS / "mlp_relu.torchscript.onnx", "--method", "static", "--variant", "zeta-zero-unscaled"
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("q", [0.1, 0.5, 1.0, 2.0, 7.0])
def test_center_scale_relu_variance_map(q):
    """q' = E f̃(√q z)² = q + (√q − 1)²/(2πv) at σ_w² = 1 for ReLU center-scale designed at q = 1."""
    a = static_affine(CATALOGUE["relu"], {}, 1.0, "center-scale")
    v = 0.5 - 1 / (2 * math.pi)
    got = _expect(lambda x: (a.scale * (max(x, 0.0) - a.shift)) ** 2, q)
    assert got == pytest.approx(q + (math.sqrt(q) - 1) ** 2 / (2 * math.pi * v), rel=1e-9)
    assert got >= q  # touches the identity only at the design q: every deviation grows
    # backward gain at the design point: scale²·E f'² = 1/(2v) ≈ 1.467 > 1 (chaotic)
    assert a.scale**2 * 0.5 == pytest.approx(1 / (2 * v), rel=1e-12)
    assert 1 / (2 * v) == pytest.approx(1.4669, abs=1e-4)
