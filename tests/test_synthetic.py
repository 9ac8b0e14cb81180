"""Synthetic inputs (one rule for calibrate, compare, fold, rewrite's check) and fold's self-check options."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from normact_onnx.api import rewrite
from normact_onnx.comparison import compare
from normact_onnx.data.inputs import InputSpec, model_inputs
from normact_onnx.data.synthetic import SAMPLE_RATE, resolve_shapes, synthetic_batch
from normact_onnx.deploy import fold
from normact_onnx.errors import NormactError

from .conftest import MODELS, const, fvi, tiny_model


def _spec(name, shape, dtype=np.float32):
    return InputSpec(name, np.dtype(dtype), shape)


def test_named_dims_are_shared_and_anonymous_ones_independent():
    specs = [
        _spec("input", ["batch", 512]),
        _spec("state", [2, "batch", 128]),
        _spec("image", [1, 3, "?", "?"]),
        _spec("tokens", ["unk__1", "unk__2"], np.int64),
    ]
    got = resolve_shapes(specs, {"image": [1, 3, 48, 192]}, batch_size=3)
    assert got["input"] == [3, 512] and got["state"] == [2, 3, 128]  # 'batch' is one size everywhere
    assert got["image"] == [1, 3, 48, 192]  # two '?' are not forced equal
    assert got["tokens"] == [3, 16]
    # a given shape fixes the name it carries for the other inputs
    assert resolve_shapes(specs, {"state": [2, 5, 128]})["input"] == [5, 512]


def test_integer_defaults_and_given_values():
    specs = [_spec("x", [2, 4]), _spec("sr", [], np.int64), _spec("ids", [2, 4], np.int64)]
    shapes = resolve_shapes(specs, {})
    b = synthetic_batch(specs, shapes, np.random.default_rng(0))
    assert b["sr"] == SAMPLE_RATE and set(np.unique(b["ids"])) <= {0, 1}
    b = synthetic_batch(specs, shapes, np.random.default_rng(0), {"sr": 8000, "x": 0.5})
    assert b["sr"] == 8000 and np.all(b["x"] == 0.5)
    with pytest.raises(NormactError, match="--value y: the model has no such input"):
        synthetic_batch(specs, shapes, np.random.default_rng(0), {"y": 1})


def _two_input_model() -> onnx.ModelProto:
    """input [batch, 4] and state [2, batch, 4]: the positional fill used to give 'batch' two sizes."""
    nodes = [
        helper.make_node("ReduceSum", ["state"], ["s"], keepdims=0, axes=[0]),
        helper.make_node("Add", ["input", "s"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    w = const("w", np.random.default_rng(0).standard_normal((4, 4)))
    ins = [fvi("input", ["batch", 4]), fvi("state", [2, "batch", 4])]
    return tiny_model(nodes, ins, [fvi("y", ["batch", 4])], [w], opset=12)


def test_compare_and_fold_run_synthetic_data_on_shared_named_dims(tmp_path):
    m = _two_input_model()
    assert compare(m, m, synthetic=True, batch_size=3).passed
    res = fold(rewrite(m), details=True)
    assert res.folded and res.check["synthetic"] and res.check["rule"] == "float noise"


def test_image_input_with_two_anonymous_dims_takes_non_square_data():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Conv", ["r", "w"], ["y"])]
    w = const("w", np.random.default_rng(0).standard_normal((2, 3, 1, 1)))
    m = tiny_model(nodes, [fvi("x", [1, 3, "?", "?"])], [fvi("y", [1, 2, "?", "?"])], [w])
    x = np.random.default_rng(1).standard_normal((1, 3, 48, 192)).astype(np.float32)
    res = fold(rewrite(m), data=[{"x": x}], details=True)
    assert res.folded and not res.check["synthetic"]


def test_fold_cli_takes_data_and_says_which_option_when_the_check_fails(tmp_path, cli):
    normed = tmp_path / "n.onnx"
    rewrite(MODELS / "cnn_relu.dynamo.onnx", normed)
    spec = model_inputs(onnx.load(str(normed)))[0]
    shape = [d if isinstance(d, int) and d > 0 else 2 for d in spec.shape]
    np.savez(tmp_path / "d.npz", **{spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    r = cli("fold", normed, "-o", tmp_path / "f.onnx", "--data", tmp_path / "d.npz")
    assert r.returncode == 0, r.stderr
    assert "self-check (1 batch(es))" in r.stdout and "from the float noise" in r.stdout
    assert (tmp_path / "f.onnx").exists()
    r = cli("fold", normed, "-o", tmp_path / "g.onnx", "--synthetic", "--tolerance", "1e-30")
    assert r.returncode == 2 and "--tolerance" in r.stderr and "--data" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "g.onnx").exists()
    r = cli("fold", normed, "--value", "nope=1", "--synthetic")
    assert r.returncode == 2 and "--value nope" in r.stderr


def test_fold_self_check_names_the_options_when_synthetic_inputs_do_not_fit():
    """An integer input used as an index: 0/1 is fine, but a Reshape to a given value is not satisfiable."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["y"]),
    ]
    w = const("w", np.random.default_rng(0).standard_normal((4, 4)))
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    m = tiny_model(nodes, [fvi("x", [2, 4]), shape], [fvi("y", ["a", "b"])], [w])
    normed = rewrite(m, verify=False)
    with pytest.raises(NormactError, match="--value NAME=V"):
        fold(normed)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    assert fold(normed, data=[{"x": x, "shape": np.array([4, 2], np.int64)}], details=True).folded
