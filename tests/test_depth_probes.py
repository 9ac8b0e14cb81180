"""The measurement helpers of the training benchmarks (benchmarks/depth_probes.py, benchmarks/significance.py).

They produce the numbers the depth and ANAct write-ups rest on, so they are checked
against cases with a known answer: orthogonal linear networks (every gain and singular
value exactly 1), the closed-form ReLU mean field, and a hand-computed paired t-test.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import depth_probes as probes
from significance import paired_test

from normact_onnx.catalogue import CATALOGUE
from normact_onnx.methods.static import static_affine


def _relu(x):
    return np.maximum(x, 0.0)


def _step(x):
    return (x > 0).astype(np.float64)


@pytest.mark.parametrize(("init", "var"), [("lecun", 1.0), ("he", 2.0)])
def test_init_linear_variance(init, var):
    torch.manual_seed(0)
    lin = torch.nn.Linear(400, 500)
    probes.init_linear(lin, init)
    w = lin.weight.detach()
    assert float(w.var()) * 400 == pytest.approx(var, rel=0.02)
    assert abs(float(w.mean())) < 1e-3
    assert not lin.bias.any()
    with pytest.raises(ValueError, match="unknown init"):
        probes.init_linear(lin, "xavier")


def test_mean_field_relu_closed_forms():
    he = lambda x: math.sqrt(2) * _relu(x)  # noqa: E731
    assert probes.variance_map(_relu, 1.7) == pytest.approx(0.85, rel=1e-12)  # LeCun halves the variance
    assert probes.variance_map(he, 1.7) == pytest.approx(1.7, rel=1e-12)  # He keeps it
    assert probes.backward_gain(_step, 1.0) == pytest.approx(0.5, rel=1e-12)
    assert probes.backward_gain(lambda x: math.sqrt(2) * _step(x), 1.0) == pytest.approx(1.0, rel=1e-12)
    assert probes.fixed_point(_relu) == 0.0
    # arc-cosine kernel: c' = (√(1 − c²) + (π − arccos c)·c)/π for ReLU, any scale
    c = 0.3
    want = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
    assert probes.correlation_map(_relu, 1.0, c) == pytest.approx(want, abs=2e-4)
    cd = probes.correlation_depth(he, 1.0, lambda x: math.sqrt(2) * _step(x))
    assert cd["c_star"] == 1.0 and cd["chi_c"] == pytest.approx(1.0, rel=1e-9) and math.isinf(cd["depth"])


def test_mean_field_center_scale_is_chaotic():
    a = static_affine(CATALOGUE["relu"], {}, 1.0, "center-scale")
    f = lambda x: a.scale * (_relu(x) - a.shift)  # noqa: E731
    df = lambda x: a.scale * _step(x)  # noqa: E731
    assert probes.fixed_point(f) == pytest.approx(1.0, abs=1e-9)
    chi = probes.backward_gain(df, 1.0)
    assert chi == pytest.approx(1 / (1 - 1 / math.pi), rel=1e-12)  # 1/(2v), v = 1/2 − 1/(2π)
    cd = probes.correlation_depth(f, 1.0, df)
    assert abs(cd["c_star"]) < 1e-4  # two inputs decorrelate completely
    # slope at c* = 0 is (E f̃')² = scale²/4 (Price/Stein), ξ = −1/ln of it
    assert cd["chi_c"] == pytest.approx(a.scale**2 / 4, rel=1e-3)
    assert cd["depth"] == pytest.approx(-1 / math.log(a.scale**2 / 4), rel=1e-2)


def _orthogonal_linear_mlp(depth: int, width: int) -> torch.nn.Sequential:
    torch.manual_seed(1)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        lin = torch.nn.Linear(width, width)
        torch.nn.init.orthogonal_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        layers += [lin, torch.nn.Identity()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 3))


def test_probes_on_an_orthogonal_linear_network():
    net = _orthogonal_linear_mlp(6, 16)
    x = torch.randn(32, 16)
    prop = probes.propagation(net, x)
    assert len(prop["q"]) == 6 and len(prop["backward_gain"]) == 5
    np.testing.assert_allclose(prop["q"], float(x.pow(2).mean()), rtol=1e-5)  # norms kept layer to layer
    np.testing.assert_allclose(prop["backward_gain"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(prop["correlation"], prop["correlation"][0], atol=1e-6)  # angles kept
    spec = probes.weight_spectra(net)
    np.testing.assert_allclose(spec["max"] + spec["min"], 1.0, rtol=1e-6)
    jac = probes.jacobian_spectrum(net, x[:3])
    assert len(jac) == 16
    np.testing.assert_allclose(jac, 1.0, rtol=1e-5)
    assert all(p.grad is None for p in net.parameters())  # probing leaves no gradients behind


def test_probes_measure_relu_gains():
    torch.manual_seed(2)
    for init, want in (("lecun", 0.5), ("he", 1.0)):
        layers: list[torch.nn.Module] = []
        for _ in range(6):
            lin = torch.nn.Linear(256, 256)
            probes.init_linear(lin, init)
            layers += [lin, torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers, torch.nn.Linear(256, 10))
        gains = probes.propagation(net, torch.randn(128, 256))["backward_gain"]
        assert float(np.exp(np.mean(np.log(gains)))) == pytest.approx(want, rel=0.1)


def test_jacobian_spectrum_reports_non_finite_signal():
    net = _orthogonal_linear_mlp(3, 8)
    with torch.no_grad():
        net[2].weight.fill_(float("inf"))
    assert probes.jacobian_spectrum(net, torch.randn(2, 8)) is None


def test_paired_test_by_hand():
    a = [0.90, 0.91, 0.89, 0.92, 0.90]
    b = [0.91, 0.93, 0.89, 0.94, 0.92]
    d = np.array(b) - np.array(a)  # 0.01 0.02 0 0.02 0.02
    mean, sd = d.mean(), d.std(ddof=1)
    t = mean / (sd / math.sqrt(5))
    res = paired_test(a, b)
    assert res["n"] == 5
    assert res["mean_diff"] == pytest.approx(0.014, rel=1e-9)
    assert t == pytest.approx(3.5, rel=1e-9)
    # two-sided p for t = 3.5 with 4 degrees of freedom, and the 95% CI with t(0.975, 4) = 2.776445
    assert res["p_paired"] == pytest.approx(0.02490, abs=5e-5)
    half = 2.776445 * sd / math.sqrt(5)
    assert res["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-5)
    assert res["cohen_dz"] == pytest.approx(mean / sd, rel=1e-12)
    assert 0 < res["p_welch"] < 1 and res["p_welch"] > res["p_paired"]  # ignoring the pairing loses power
