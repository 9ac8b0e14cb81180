"""What the models from exporters first added in issue 24 broke, pinned down without the real-model cache.

The real models themselves (openWakeWord's tf2onnx speech embedding and torch-1.12 Silero v3, magika 0.5's Keras
model, faster-whisper's Silero v6) run through the parametrized real-model tests; these tests keep each fix
checked where the cache is missing, on the smallest graph that shows the failure, and check the new feed recipes.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from . import real_models as rm
from .conftest import run_model, tiny_model

torch = pytest.importorskip("torch")
from normact_onnx.training.torch_graph import TorchGraph  # noqa: E402


def _torch_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in TorchGraph(model)(feeds)]


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_torch_backend_pads_the_last_axis_of_a_4d_tensor(mode):
    """Silero v3 (torch 1.12) reflect-pads only the last axis of a 4-D tensor; torch's F.pad refuses that spec
    for rank 4, so the torch backend (finetune --backend torch) failed on the model."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 3, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    pads = numpy_helper.from_array(np.array([0, 0, 0, 3, 0, 0, 0, 2], np.int64), "pads")
    model = tiny_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Pad", ["r", "pads"], ["y"], mode=mode)],
        [x],
        [y],
        [pads],
        opset=13,
    )
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 1, 3, 8)).astype(np.float32)}
    (want,) = run_model(model, feeds)
    (got,) = _torch_outputs(model, feeds)
    assert got.shape == want.shape == (2, 1, 3, 13)
    np.testing.assert_array_equal(got, want)


def test_torch_backend_runs_onehot_as_onnx_defines_it():
    """magika 0.5 one-hot encodes its byte values: negative indices count from depth, out-of-range ones give an
    all-off row, ``axis`` places the new axis (the torch backend refused the op)."""
    idx = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    depth = numpy_helper.from_array(np.array(4, np.int64), "depth")
    values = numpy_helper.from_array(np.array([-1.0, 2.5], np.float32), "values")
    for axis in (-1, 0, 1):
        model = tiny_model(
            [helper.make_node("OneHot", ["i", "depth", "values"], ["y"], axis=axis)], [idx], [out], [depth, values]
        )
        feeds = {"i": np.array([[0, 3, -1], [-4, 7, 2]], np.int64)}  # -1 → 3, -4 → 0, 7 out of range
        (want,) = run_model(model, feeds)
        (got,) = _torch_outputs(model, feeds)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_a_model_that_fails_to_run_is_one_line_on_stderr(tmp_path):
    """A model ORT loads but cannot run on the given inputs (faster-whisper's Silero, whose LSTM state dimension
    synthetic data cannot guess): one line, exit 2. ONNX Runtime used to log the same failure itself first, in
    colour, once per nested graph."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])
    shape = numpy_helper.from_array(np.array([2, 5], np.int64), "shape")
    model = tiny_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Reshape", ["r", "shape"], ["y"]),  # holds only when n == 2
        ],
        [x],
        [y],
        [shape, numpy_helper.from_array(np.eye(5, dtype=np.float32), "w")],
    )
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "x.npz", x=np.ones((3, 5), np.float32))
    out = tmp_path / "out.onnx"
    for args in (
        ["calibrate", str(src), "--data", str(tmp_path / "x.npz"), "-o", str(out), "--quiet"],
        ["compare", str(src), str(src), "--data", str(tmp_path / "x.npz"), "--quiet"],
    ):
        r = subprocess.run([sys.executable, "-m", "normact_onnx", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("normact-onnx: error: ") and "Reshape" in lines[0]
        assert not out.exists()


def test_new_feed_recipes_follow_their_packages_preprocessing():
    """openWakeWord's embedding input is a log-mel window (dB / 10 + 2, 80 dB floor below the peak) of 76 frames
    × 32 mels; magika 0.5 reads 512 + 512 + 512 byte values as float32; the two Silero VADs get their own state
    shapes (v3: h and c [2, B, 64] and sr; faster-whisper's v6: [1, 1, 128] whatever the number of chunks)."""
    (mel,) = rm.sample_batches("oww_speech_embedding", 1, 3)
    m = mel["input_1"]
    assert m.shape == (3, 76, 32, 1) and m.dtype == np.float32
    peak = m.max(axis=(1, 2, 3))
    assert np.all(m.min(axis=(1, 2, 3)) >= peak - 8.0 - 1e-5)  # the 80 dB floor, in the model's units
    assert np.all(peak > 2.0) and np.all(peak < 12.0)  # audio in [-1, 1]: power below 10 log10(n_fft² / 4) dB
    assert m.std() > 0.5  # not flat: the harmonics stand out of the noise

    (mg,) = rm.sample_batches("magika_v1_keras", 1, 4)
    b = mg["bytes"]
    assert b.shape == (4, 1536) and b.dtype == np.float32
    assert b.min() >= 0 and b.max() <= 256 and np.array_equal(b, np.round(b))
    assert np.all(b[:, :512] != 256, axis=1).any()  # a file's first bytes (after lstrip) fill the head

    (v3,) = rm.sample_batches("oww_silero_vad_v3", 1, 3)
    assert v3["input"].shape == (3, 512) and v3["h"].shape == v3["c"].shape == (2, 3, 64)
    assert int(v3["sr"]) == 16000 and not v3["h"].any()
    (v6,) = rm.sample_batches("fw_silero_vad_v6", 1, 5)
    assert v6["input"].shape == (5, 576) and v6["h"].shape == v6["c"].shape == (1, 1, 128)


def test_torch_backend_runs_array_feature_extractor():
    """skl2onnx's label head picks the class label with ONNX-ML ArrayFeatureExtractor (classes[argmax]); the torch
    backend refused the whole model for it, though the loss reads the probabilities."""
    scores = helper.make_tensor_value_info("s", TensorProto.FLOAT, [3, 4])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, None)
    rows = helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)
    classes = numpy_helper.from_array(np.array([10, 11, 12, 13], np.int64), "classes")
    cols = numpy_helper.from_array(np.array([3, 0], np.int64), "cols")
    nodes = [
        helper.make_node("ArgMax", ["s"], ["am"], axis=1, keepdims=0),
        helper.make_node("ArrayFeatureExtractor", ["classes", "am"], ["label"], domain="ai.onnx.ml"),
        helper.make_node("ArrayFeatureExtractor", ["s", "cols"], ["rows"], domain="ai.onnx.ml"),
    ]
    model = tiny_model(nodes, [scores], [label, rows], [classes, cols])
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 1))
    feeds = {"s": np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)}
    want = run_model(model, feeds)
    got = _torch_outputs(model, feeds)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("item", rm.params(["skl_mlp_relu", "skl_mlp_tanh", "skl_mlp_logistic"]))
def test_skl2onnx_mlp_fine_tunes_on_its_probabilities(item, tmp_path):
    """A skl2onnx classifier's first output is its int64 label: cross-entropy on it is refused in one line that
    names --output-name; on ``probabilities`` the torch backend trains (the loss falls from the model's own) and the
    export reproduces the training graph, label head included."""
    from normact_onnx.errors import NormactError
    from normact_onnx.training import finetune

    e, path = item
    path = rm.require_path(e, path)
    x = rm.sample_batches(e, 1, 64)[0]["X"]
    y = np.rint(x.reshape(-1, 8, 8)[:, 2:6, 2:6].mean(axis=(1, 2)) * 9).astype(np.int64)  # not the model's labels
    data = {"X": x, "y": y}
    opts = {"backend": "torch", "device": "cpu", "threads": 1, "progress": False, "loss": "cross-entropy"}
    with pytest.raises(NormactError, match="choose the scores with --output-name"):
        finetune(path, data, output=tmp_path / "no.onnx", epochs=1, **opts)
    out = tmp_path / "tuned.onnx"
    res = finetune(path, data, output=out, output_name="probabilities", epochs=4, batch_size=64, lr=1e-2, **opts)
    assert all(np.isfinite(res.losses)) and res.losses[-1] < res.losses[0], res.losses
    label, probs = run_model(out, {"X": x})
    assert label.dtype == np.int64 and probs.shape == (64, 10)
    np.testing.assert_array_equal(label, probs.argmax(1))  # the label head still reads the tuned probabilities
    assert res.export_max_abs_diff < 1e-5


def _score_then_verify() -> onnx.ModelProto:
    """openWakeWord's wake-word models (torch 1.12): a score p = Sigmoid(Gemm(x)); below the threshold the model
    returns p itself (the else branch reads it from the enclosing graph), above it a verifier network runs."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    verify = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "wv"], ["hv"]),
            helper.make_node("Relu", ["hv"], ["rv"]),
            helper.make_node("MatMul", ["rv", "wq"], ["q"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("q", f, [2, 1])],
        [
            numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "wv"),
            numpy_helper.from_array(rng.normal(size=(4, 1)).astype(np.float32), "wq"),
        ],
    )
    p_out = helper.make_tensor_value_info("p_out", f, [2, 1])
    passthrough = helper.make_graph([helper.make_node("Identity", ["p"], ["p_out"])], "else", [], [p_out])
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
        helper.make_node("ReduceMax", ["p"], ["pmax"], keepdims=0),
        helper.make_node("GreaterOrEqual", ["pmax", "threshold"], ["hit"]),
        helper.make_node("If", ["hit"], ["score"], then_branch=verify, else_branch=passthrough),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([-6.0], np.float32), "b"),
        numpy_helper.from_array(np.array(0.5, np.float32), "threshold"),
    ]
    x = helper.make_tensor_value_info("x", f, [2, 8])
    return tiny_model(nodes, [x], [helper.make_tensor_value_info("score", f, [2, 1])], inits)


def test_a_score_returned_through_one_if_branch_is_an_output_head(tmp_path):
    """The score reaches the graph output through the else branch: an output head, skipped by default (it was
    rewritten, so the model returned a normalized score in place of a probability); the Relu in the verifier
    branch stays a hidden site."""
    from normact_onnx.api import inspect, rewrite

    model = _score_then_verify()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    sites = {s["name"] or s["output"]: s for s in inspect(path)}
    (sig,) = [s for s in sites.values() if s["kind"] == "sigmoid"]
    assert sig["skipped"] is not None and "output head" in sig["skipped"] and "'score'" in sig["skipped"]
    (relu,) = [s for s in sites.values() if s["kind"] == "relu"]
    assert relu["skipped"] is None
    out = tmp_path / "r.onnx"
    rewrite(path, out)
    feeds = {"x": np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32) * 0.1}  # p ≈ 0.0025: else
    np.testing.assert_array_equal(run_model(out, feeds)[0], run_model(path, feeds)[0])


def _scorer(seed: int) -> onnx.ModelProto:
    """A hidden ReLU layer and a sigmoid score near 3e-4 (logit ≈ −8), as a wake-word model gives on silence."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.normal(size=(96, 64)) / np.sqrt(96)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(64, np.float32), "b1"),
        numpy_helper.from_array((rng.normal(size=(64, 1)) / 8.0).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([-8.0], np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96])
    return tiny_model(nodes, [x], [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 1])], inits)


def test_preserve_check_allows_the_absolute_precision_of_a_small_sigmoid_score():
    """--preserve-function on openWakeWord's hey_jarvis refused: its score (3e-4) moved by 2e-4 of itself, which
    is ONNX Runtime's float32 Sigmoid stepping by ~3e-8 near 0 when the logit moves by one rounding; 'float noise
    0' (both sessions use the same kernel). Over 30 such scorers none is refused now; a real change still is."""
    from normact_onnx.api import rewrite
    from normact_onnx.errors import NormactError
    from normact_onnx.verify import check_whole_model

    for seed in range(30):
        rewrite(_scorer(seed), preserve_function=True)  # raises on a refusal
    original = _scorer(0)
    broken = onnx.ModelProto()
    broken.CopyFrom(original)
    b2 = broken.graph.initializer[3]
    b2.CopyFrom(numpy_helper.from_array(np.array([-7.99], np.float32), "b2"))  # the score moves by 1 %
    with pytest.raises(NormactError, match="changed output 'p'"):
        check_whole_model(original, broken, preserve=True)


NEW = ["oww_speech_embedding", "oww_silero_vad_v3", "magika_v1_keras", "fw_silero_vad_v6", "skl_mlp_tanh"]


@pytest.mark.parametrize("item", rm.params(NEW))
def test_new_exporters_calibrate_rewrite_from_stats_and_fold(item, tmp_path):
    """What a user runs on a new model, on its own data: in-situ calibration by both methods writes a model that
    runs with finite outputs, ``rewrite --method anact --stats`` normalizes the sites calibration measured, and
    ``fold`` of the calibrated model passes its self-check (Silero v3's 8 kHz branch sees no data: its sites are
    left alone, not normalized with empty statistics)."""
    from normact_onnx.api import calibrate, inspect, rewrite
    from normact_onnx.deploy import fold

    e, path = item
    path = rm.require_path(e, path)
    data = rm.sample_batches(e, 3, 4)
    for method in ("anact", "static"):
        out, stats = tmp_path / f"cal_{method}.onnx", tmp_path / f"{method}.json"
        res = calibrate(path, data, out, method=method, stats_path=stats, details=True, progress=False)
        assert out.is_file() and stats.is_file() and res.rewrite is not None
        done = {o.site.name for o in res.rewrite.outcomes if o.action == "rewritten"}
        hidden = sum(e["sites"]["hidden"].values())
        assert 0 < len(done) <= hidden
        if e["id"] == "oww_silero_vad_v3":
            assert len(done) == hidden // 2  # the 16 kHz branch only
        for feeds in data[:1]:
            for want, got in zip(run_model(path, feeds), run_model(out, feeds)):
                if np.issubdtype(want.dtype, np.floating):
                    assert np.all(np.isfinite(got[np.isfinite(want)]))
    from_stats = rewrite(path, tmp_path / "rw.onnx", method="anact", stats=tmp_path / "anact.json", details=True)
    calibrated = {s["name"] for s in inspect(tmp_path / "cal_anact.onnx") if s["normalized"]}
    assert {o.site.name for o in from_stats.outcomes if o.action == "rewritten"} == calibrated
    folded = fold(tmp_path / "cal_anact.onnx", tmp_path / "f.onnx", data=data, details=True)
    assert (tmp_path / "f.onnx").is_file() and folded.check["rule"] == "float noise"
