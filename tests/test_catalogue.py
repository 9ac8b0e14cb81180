"""The catalogue's numbers: Gaussian moments and static constants against docs/math.md, Monte Carlo and ORT."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto

from normact_onnx.catalogue import CATALOGUE
from normact_onnx.methods.static import Affine, static_affine
from normact_onnx.moments import gaussian_moments
from normact_onnx.passes.forms import literal_site

from .conftest import fvi, run_model, tiny_model

# docs/math.md §1.7 oracle table: kind, params, m1, m2, v, b, d2, center-scale scale, zeta-zero scale
ORACLE = [
    ("relu", {}, 0.398942, 0.500000, 0.340845, 0.500000, 0.500000, 1.712859, 3.317793),
    ("leaky_relu", {"alpha": 0.01}, 0.394953, 0.500050, 0.344062, 0.505000, 0.500050, 1.704832, 3.351307),
    ("leaky_relu", {"alpha": 0.2}, 0.319154, 0.520000, 0.418141, 0.600000, 0.520000, 1.546460, 4.147242),
    ("abs", {}, 0.797885, 1.0, 0.363380, 0.0, 1.0, 1.658897, 1.658897),
    ("tanh", {}, 0.0, 0.394294, 0.394294, 0.605706, 0.464403, 1.592537, 6.039532),
    ("sigmoid", {}, 0.5, 0.293379, 0.043379, 0.206621, 0.044836, 4.801313, 38.157572),
    ("softplus", {}, 0.806059, 0.921246, 0.271515, 0.5, 0.293379, 1.919126, 6.817645),
    ("silu", {}, 0.206621, 0.355776, 0.313083, 0.5, 0.379482, 1.787187, 3.981464),
    ("gelu", {}, 0.282095, 0.425221, 0.345644, 0.5, 0.455851, 1.700926, 3.233487),
    ("gelu_tanh", {}, 0.282039, 0.425194, 0.345648, 0.5, 0.455818, 1.700917, 3.233420),
    ("elu", {"alpha": 1.0}, 0.160521, 0.644945, 0.619179, 0.761578, 0.668102, 1.270843, 5.052241),
    ("selu", {}, 0.0, 1.0, 1.0, 0.985231, 1.071575, 1.0, 5.840105),
    ("mish", {}, 0.240404, 0.452342, 0.394548, 0.563748, 0.479084, 1.592025, 3.609924),
    ("hard_swish", {}, 0.166217, 0.331567, 0.303939, 0.5, 0.358532, 1.813871, 4.305732),
]


# non-default parameters exercised by the tests (Clip's defaults are the identity)
PARAMS = {"clip": {"min": -1.0, "max": 2.0}, "celu": {"alpha": 1.5}, "leaky_relu": {"alpha": 0.2}}


@pytest.mark.parametrize("row", ORACLE, ids=lambda r: f"{r[0]}{r[1] or ''}")
def test_moments_and_static_constants_match_math_md(row):
    kind, params, m1, m2, v, b, d2, cs, zz = row
    act = CATALOGUE[kind]
    m = gaussian_moments(act, 1.0, params)
    got = [m.m1, m.m2, m.v, m.b, m.d2]
    assert got == pytest.approx([m1, m2, v, b, d2], abs=2e-6)
    assert static_affine(act, params, 1.0, "center-scale").scale == pytest.approx(cs, rel=2e-6)
    assert static_affine(act, params, 1.0, "zeta-zero").scale == pytest.approx(zz, rel=2e-6)


@pytest.mark.parametrize("kind", sorted(CATALOGUE))
def test_every_variant_normalizes_a_gaussian_monte_carlo(kind):
    """E f̃ = 0, E f̃² = 1 at q (and E f̃' = 0 for zeta-zero), checked on 2·10^6 samples at q = 2."""
    act, params = CATALOGUE[kind], PARAMS.get(kind, {})
    q = 2.0
    x = np.random.default_rng(1).standard_normal(2_000_000) * math.sqrt(q)
    for variant in ("center-scale", "zeta-zero"):
        a = static_affine(act, params, q, variant)
        y = a.scale * (act.f(x, params) - a.shift - a.slope * x)
        assert abs(y.mean()) < 5e-3, variant
        assert y.var() == pytest.approx(1.0, abs=1e-2), variant
        if variant == "zeta-zero":
            dy = a.scale * (act.df(x, params) - a.slope)
            assert abs(dy.mean()) < 5e-3 * a.scale


def test_leaky_relu_zeta_zero_equals_shifted_abs_for_every_alpha():
    """docs/math.md §1.3: zeta-zero of any LeakyReLU(a<1) is (|x| − √(2q/π)) / √(q(1 − 2/π))."""
    q = 1.7
    x = np.linspace(-4, 4, 101)
    want = (np.abs(x) - math.sqrt(2 * q / math.pi)) / math.sqrt(q * (1 - 2 / math.pi))
    for alpha in (0.0, 0.01, 0.2, 0.5):
        a = static_affine(CATALOGUE["leaky_relu"], {"alpha": alpha}, q, "zeta-zero")
        got = a.scale * (CATALOGUE["leaky_relu"].f(x, {"alpha": alpha}) - a.shift - a.slope * x)
        np.testing.assert_allclose(got, want, atol=1e-9)


def test_ratio_variant_spans_zeta_zero_to_center_scale():
    act = CATALOGUE["tanh"]
    m = gaussian_moments(act)
    r_max = m.b**2 / m.v
    zz = static_affine(act, variant="zeta-zero")
    assert static_affine(act, variant="ratio", ratio=0.0) == zz
    top = static_affine(act, variant="ratio", ratio=r_max)
    assert top.scale == pytest.approx(static_affine(act).scale) and top.slope == 0.0
    mid = static_affine(act, variant="ratio", ratio=r_max / 2)
    x = np.random.default_rng(2).standard_normal(2_000_000)
    y = mid.scale * (act.f(x) - mid.shift - mid.slope * x)
    dy_mean = mid.scale * (m.b - mid.slope)  # η-type term E f̃'
    assert y.var() == pytest.approx(1.0, abs=1e-2)
    assert dy_mean**2 / 1.0 == pytest.approx(r_max / 2, rel=2e-2)  # ζ/η = (E f̃')² q / Var f̃


def test_homogeneous_activations_scale_with_q_like_quadrature():
    for kind in ("relu", "leaky_relu", "abs"):
        act = CATALOGUE[kind]
        closed = gaussian_moments(act, 3.0)
        # the same integral by brute force on a fine grid
        x = np.linspace(-12 * math.sqrt(3), 12 * math.sqrt(3), 400001)
        w = np.exp(-x * x / 6) / math.sqrt(6 * math.pi) * (x[1] - x[0])
        assert closed.m1 == pytest.approx(float(np.sum(w * act.f(x))), abs=1e-6)
        assert closed.m2 == pytest.approx(float(np.sum(w * act.f(x) ** 2)), abs=1e-6)


@pytest.mark.parametrize("kind", sorted(CATALOGUE))
def test_derivative_matches_finite_differences(kind):
    act, params = CATALOGUE[kind], PARAMS.get(kind, {})
    x = np.linspace(-5, 5, 2001)
    kinks = np.array(act.kinks(act.with_defaults(params)) or [99.0])
    x = x[np.all(np.abs(x[:, None] - kinks) > 1e-3, axis=1)]
    h = 1e-6
    fd = (act.f(x + h, params) - act.f(x - h, params)) / (2 * h)
    np.testing.assert_allclose(act.df(x, params), fd, atol=1e-5)


@pytest.mark.parametrize("gradient_safe", [False, True])
@pytest.mark.parametrize("opset", [13, 17, 21])
@pytest.mark.parametrize("kind", sorted(CATALOGUE))
def test_onnx_body_matches_numpy_reference(kind, opset, gradient_safe):
    """The catalogue's ONNX body (ORT) agrees with its numpy forward, including the affine tail."""
    act = CATALOGUE[kind]
    params = PARAMS.get(kind, {})
    affine = Affine(1.7, 0.3, 0.2)
    nodes = literal_site(act, "x", "y", affine, params, TensorProto.FLOAT, "s/", gradient_safe, opset)
    model = tiny_model(nodes, [fvi("x", [4001])], [fvi("y", [4001])], opset=opset)
    x = np.linspace(-8, 8, 4001).astype(np.float32)
    (y,) = run_model(model, {"x": x})
    x64 = x.astype(np.float64)
    want = 1.7 * (act.f(x64, params) - 0.3 - 0.2 * x64)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)


def test_per_channel_prelu_gives_per_channel_constants():
    slopes = np.array([0.0, 0.1, 0.25]).reshape(3, 1, 1)
    a = static_affine(CATALOGUE["prelu"], {"alpha": slopes})
    assert np.shape(a.scale) == (3, 1, 1)
    for i, s in enumerate(slopes.ravel()):
        one = static_affine(CATALOGUE["leaky_relu"], {"alpha": float(s)})
        assert a.scale.ravel()[i] == pytest.approx(one.scale)
        assert a.shift.ravel()[i] == pytest.approx(one.shift)


def test_constant_tolerance_follows_the_constants_dtype():
    """√2 stored as float16 (1.4140625) is 1.1e-4 from √2 — beyond 1e-4, within float16's own rounding."""
    from onnx import helper, numpy_helper

    from normact_onnx.catalogue.patterns import C

    assert C(2**0.5).read(np.array(2**0.5, dtype=np.float16)) == pytest.approx(1.4140625)
    assert C(2**0.5).read(np.array(1.4140625, dtype=np.float32)) is None  # float32 constants stay strict
    assert C(2**0.5).read(np.array(1.45, dtype=np.float16)) is None
    bf16 = numpy_helper.to_array(helper.make_tensor("c", TensorProto.BFLOAT16, [], [2**0.5]))
    assert C(2**0.5).read(bf16) == pytest.approx(1.4140625)
    assert C(3.0).read(np.array([3, 3], dtype=np.int64)) == 3.0
    assert C(3.0).read(np.array([3.0, 2.0], dtype=np.float16)) is None  # not one value


def test_kind_aliases_are_defined_once_and_resolve_for_every_flag():
    from normact_onnx.catalogue import ALIASES, get, resolve
    from normact_onnx.errors import NormactError
    from normact_onnx.selection import parse_kinds

    assert set(ALIASES.values()) <= set(CATALOGUE)
    assert not set(ALIASES) & set(CATALOGUE)
    assert resolve("Swish") == "silu" and resolve("relu6") == "clip" and resolve("hard-swish") == "hard_swish"
    assert resolve("HardSwish") == "hard_swish" and resolve("GELU") == "gelu" and resolve("swishy") is None
    assert get("swish") is CATALOGUE["silu"]
    assert parse_kinds("swish, relu6,hardswish", "--include") == {"silu", "clip", "hard_swish"}
    with pytest.raises(NormactError, match=r"--exclude: unknown activation kind\(s\) nope; known: relu, .*swish=silu"):
        parse_kinds(["nope"], "--exclude")
