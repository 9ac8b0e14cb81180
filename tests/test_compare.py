"""compare: two models (or one model in two runtimes) on the same inputs, real ORT sessions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from normact_onnx import compare, fold
from normact_onnx.api import rewrite
from normact_onnx.errors import NormactError

from .conftest import MODELS, const, fvi, tiny_model

MLP = MODELS / "mlp_relu.torchscript.onnx"


def _relu_then_gemm(n_features: int = 64) -> onnx.ModelProto:
    """x → ReLU → Gemm: the ReLU's pre-activation is the input itself, so its statistics are known."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "w"], ["y"], name="fc"),
    ]
    inits = [const("w", rng.standard_normal((n_features, 3)))]
    return tiny_model(nodes, [fvi("x", ["N", n_features])], [fvi("y", ["N", 3])], inits)


def test_identical_models_pass_with_zero_error():
    res = compare(MLP, MLP, synthetic=True, batches=3)
    assert res.passed and res.batches == 3
    (out,) = res.outputs
    assert out["output"] == "y" and out["shape"] == [2, 10]
    assert out["max_abs"] == 0 and out["p99_abs"] == 0 and out["cosine"] == pytest.approx(1.0)


def test_a_rewrite_changes_outputs_and_fails(tmp_path):
    rewrite(MLP, tmp_path / "n.onnx")
    res = compare(MLP, tmp_path / "n.onnx", synthetic=True)
    (out,) = res.outputs
    assert not res.passed and not out["passed"] and out["violations"] > 0
    assert out["max_abs"] >= out["p99_abs"] >= 0 and out["max_abs"] >= out["mean_abs"] > 0
    assert -1 <= out["cosine"] < 0.9999


def test_errors_match_numpy_on_given_batches():
    """The statistics are exactly what numpy says for the same feeds."""
    model = _relu_then_gemm()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = other.graph.initializer[0]
    w.CopyFrom(const("w", onnx.numpy_helper.to_array(w) * 1.001))
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((7, 64)).astype(np.float32)} for _ in range(3)]
    res = compare(model, other, feeds, atol=1e-6, rtol=1e-4)
    wt = onnx.numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    a = np.concatenate([np.maximum(f["x"], 0).astype(np.float64) @ wt for f in feeds])
    b = a * 1.001
    err = np.abs(a - b)
    (out,) = res.outputs
    assert out["max_abs"] == pytest.approx(err.max(), rel=1e-3)
    assert out["mean_abs"] == pytest.approx(err.mean(), rel=1e-3)
    assert out["p99_abs"] == pytest.approx(np.percentile(err, 99), rel=1e-2)
    assert out["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert out["max_rel"] == pytest.approx(0.001, rel=1e-2)
    assert not res.passed  # 0.1 % off is outside rtol 1e-4
    assert compare(model, other, feeds, atol=1e-6, rtol=2e-3).passed


def test_sites_report_whether_normalization_holds():
    """Static normalization at q = 1 on N(0, 1) pre-activations: mean ≈ 0 and variance ≈ 1 after."""
    normed = rewrite(_relu_then_gemm())
    res = compare(normed, normed, synthetic=True, sites=True, batches=8, batch_size=256)
    rows = [r for r in res.sites if r["model"] == "A"]
    assert len(rows) == 1
    (row,) = rows
    assert row["kind"] == "relu" and row["design_q"] == 1.0
    assert row["pre_mean"] == pytest.approx(0.0, abs=0.02) and row["pre_var"] == pytest.approx(1.0, abs=0.03)
    assert row["mean"] == pytest.approx(0.0, abs=0.03) and row["var"] == pytest.approx(1.0, abs=0.05)
    assert res.outputs[0]["max_abs"] == 0  # the extra outputs do not change the comparison


def test_folded_model_has_no_sites_left_to_measure(tmp_path):
    normed = rewrite(MLP)
    res = compare(normed, fold(normed), synthetic=True, sites=True)
    assert res.passed
    assert {r["model"] for r in res.sites} == {"A"}


def test_onnx_reference_as_second_runtime(tmp_path):
    rewrite(MODELS / "mobilenet_like.torchscript.onnx", tmp_path / "n.onnx")
    res = compare(tmp_path / "n.onnx", reference=True, synthetic=True, batches=1)
    assert res.passed and res.runtimes == ("ort", "reference")
    res = compare(MODELS / "mobilenet_like.torchscript.onnx", tmp_path / "n.onnx", reference=True, synthetic=True)
    assert not res.passed


def test_data_from_npz_and_a_calibration_reader(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((5, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    assert compare(MLP, MLP, str(tmp_path / "d.npz")).batches == 1

    class Reader:
        def __init__(self) -> None:
            self.left = [{"x": x[:2]}, {"x": x[2:]}]

        def get_next(self):
            return self.left.pop(0) if self.left else None

    assert compare(MLP, MLP, Reader()).batches == 2


def test_user_errors_are_one_line():
    with pytest.raises(NormactError, match="--data"):
        compare(MLP, MLP)
    with pytest.raises(NormactError, match="second model"):
        compare(MLP)
    with pytest.raises(NormactError, match="'x'"):
        compare(MLP, MLP, [{"y": np.zeros((1, 64), np.float32)}])
    two = onnx.load(MLP)  # outputs renamed and one added: neither names nor positions correspond
    two.graph.node[-1].output[0] = two.graph.output[0].name = "z"
    two.graph.node.append(helper.make_node("Identity", ["z"], ["w"]))
    two.graph.output.append(fvi("w", ["N", 10]))
    with pytest.raises(NormactError, match="do not correspond"):
        compare(MLP, two, synthetic=True)


def test_cli_exit_codes_and_json(cli, tmp_path):
    rewrite(MLP, tmp_path / "n.onnx")
    r = cli("compare", MLP, MLP, "--synthetic")
    assert r.returncode == 0 and "PASS" in r.stdout, r.stderr
    r = cli("compare", MLP, "n.onnx", "--synthetic", "--json")
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert rep["passed"] is False and rep["outputs"][0]["output"] == "y"
    assert {"max_abs", "mean_abs", "max_rel", "mean_rel", "p99_abs", "cosine", "passed"} <= set(rep["outputs"][0])
    r = cli("compare", "n.onnx", "--reference", "--synthetic", "--sites")
    assert r.returncode == 0 and "/1/Relu" in r.stdout, r.stderr
    r = cli("compare", MLP, "n.onnx", "--synthetic", "--atol", "10", "--rtol", "0")
    assert r.returncode == 0
    r = cli("compare", MLP, "missing.onnx", "--synthetic")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
