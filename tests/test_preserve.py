"""``rewrite --preserve-function`` on the consumers real networks have: every hidden site, outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from normact_onnx.api import rewrite
from normact_onnx.deploy import fold

from .conftest import const, fvi, light_models, run_model, tiny_model

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return const(name, RNG.standard_normal(shape) * 0.5)


def _check_exact(model: onnx.ModelProto, x: np.ndarray, **kw) -> onnx.ModelProto:
    res = rewrite(model, preserve_function=True, details=True, **kw)
    hidden = [o for o in res.outcomes if o.site.skip is None]
    assert hidden and all(o.action == "rewritten" for o in hidden), [o.reason for o in hidden]
    onnx.checker.check_model(res.model)
    want = run_model(model, {"x": x})
    for a, b in zip(want, run_model(res.model, {"x": x})):
        assert np.all(np.isfinite(b))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
    return res.model


def _out(name: str, rank: int = 4) -> onnx.ValueInfoProto:
    return fvi(name, [f"{name}_{k}" for k in range(rank)])


def _ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def test_zero_padded_conv_gets_an_explicit_pad():
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [_w("w1", 4, 3, 3, 3), _w("w2", 5, 4, 3, 3), _w("b2", 5)]
    m = tiny_model(nodes, [fvi("x", [2, 3, 8, 8])], [_out("y")], inits)
    out = _check_exact(m, RNG.standard_normal((2, 3, 8, 8)).astype(np.float32))
    assert "Pad" in _ops(out) and "Mul" not in _ops(out)  # absorbed into the weights, the border made explicit


def test_gating_mul_and_concat_read_the_inverse_affine_written_in_front():
    """Squeeze-excitation: the gate's input Relu feeds a Mul with a computed scale, and a Concat."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Conv", ["p", "ws"], ["g0"]),
        helper.make_node("Sigmoid", ["g0"], ["g"]),
        helper.make_node("Mul", ["r", "g"], ["m"]),
        helper.make_node("Concat", ["m", "r"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w2"], ["y"]),
    ]
    inits = [_w("w1", 4, 3, 1, 1), _w("ws", 4, 4, 1, 1), _w("w2", 2, 8, 1, 1)]
    m = tiny_model(nodes, [fvi("x", [2, 3, 5, 5])], [_out("y")], inits)
    out = _check_exact(m, RNG.standard_normal((2, 3, 5, 5)).astype(np.float32), all_sites=False)
    restored = [n for n in out.graph.node if "normact_restore" in n.name]
    assert [n.op_type for n in restored] == ["Mul", "Add"]  # one inverse, shared by the Mul and the Concat


def test_conv_transpose_takes_the_scale_and_the_shift_stays_in_front():
    """Strided ConvTranspose: output positions sum different numbers of inputs, so the shift is not a bias."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    m = tiny_model(nodes, [fvi("x", [2, 4, 6, 6])], [_out("y")], [_w("w", 4, 3, 3, 3), _w("b", 3)])
    _check_exact(m, RNG.standard_normal((2, 4, 6, 6)).astype(np.float32))
    # fold without an inserted op refuses the shift; with one, it folds exactly
    r = rewrite(m)
    res = fold(r, details=True, padding="refuse", data={"x": RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)})
    assert res.kept and "ConvTranspose" in res.kept[0].reason


def test_shape_resize_split_and_reshape_are_looked_through():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Resize", ["r", "", "scales"], ["u"], mode="linear"),
        helper.make_node("Split", ["u", "split"], ["u1", "u2"], axis=3),
        helper.make_node("Reshape", ["u1", "s"], ["v"]),
        helper.make_node("Conv", ["v", "w1"], ["y1"]),
        helper.make_node("Conv", ["u2", "w2"], ["y2"]),
    ]
    inits = [
        const("scales", [1, 1, 1, 2]),
        onnx.numpy_helper.from_array(np.array([4, 4], np.int64), "split"),
        _w("w1", 2, 3, 1, 1),
        _w("w2", 2, 3, 1, 1),
    ]
    m = tiny_model(nodes, [fvi("x", [1, 3, 2, 4])], [_out("y1"), _out("y2")], inits)
    out = _check_exact(m, RNG.standard_normal((1, 3, 2, 4)).astype(np.float32))
    assert not any("normact_restore" in n.name for n in out.graph.node)  # all absorbed by the two Convs


def test_chained_sites_and_a_site_feeding_a_site():
    """A Relu feeding a Sigmoid site: the second reads the first's inverse; both normalized, exact."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Sigmoid", ["r"], ["s"]),
        helper.make_node("Gemm", ["s", "w2"], ["y"]),
    ]
    m = tiny_model(nodes, [fvi("x", [3, 4])], [_out("y", 2)], [_w("w1", 4, 5), _w("w2", 5, 2)])
    for form in ("function", "subgraph"):
        _check_exact(m, RNG.standard_normal((3, 4)).astype(np.float32), form=form)


def test_ir3_weights_listed_as_inputs_and_constant_subgraphs_are_constants():
    """IR 3: initializers are graph inputs too (defaults); a bias from ConstantOfShape and a reshaped Constant."""
    shape = onnx.numpy_helper.from_array(np.array([4], np.int64), "bshape")
    wflat = onnx.numpy_helper.from_array((RNG.standard_normal(4 * 3 * 9) * 0.5).astype(np.float32), "wflat")
    wshape = onnx.numpy_helper.from_array(np.array([4, 3, 3, 3], np.int64), "wshape")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node(
            "ConstantOfShape",
            ["bshape"],
            ["b"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1]),
        ),
        helper.make_node("Constant", [], ["wf"], value=wflat),
        helper.make_node("Reshape", ["wf", "wshape"], ["w"]),
        helper.make_node("Conv", ["r", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inputs = [fvi("x", [2, 3, 6, 6]), helper.make_tensor_value_info("bshape", TensorProto.INT64, [1])]
    inputs.append(helper.make_tensor_value_info("wshape", TensorProto.INT64, [4]))
    m = tiny_model(nodes, inputs, [_out("y")], [shape, wshape], opset=9, ir=3)
    out = _check_exact(m, RNG.standard_normal((2, 3, 6, 6)).astype(np.float32))
    assert out.ir_version == 3
    inputs = {i.name for i in out.graph.input}
    assert all(t.name in inputs for t in out.graph.initializer)  # the checker's rule below IR 4


FAST_LIGHT = ("light_inception_v1.onnx", "light_shufflenet.onnx", "light_squeezenet.onnx")


@pytest.mark.parametrize("path", [p for p in light_models() if p.name in FAST_LIGHT], ids=lambda p: p.name)
def test_onnx_light_models_preserve_every_site_and_fold_back(path, tmp_path):
    """Classic CNNs at IR 3 (weights from ConstantOfShape): every Relu normalized exactly, then folded; checker ok."""
    m = onnx.load(str(path))
    weights = {t.name for t in m.graph.initializer}
    (data,) = [i for i in m.graph.input if i.name not in weights]
    x = RNG.standard_normal([d.dim_value for d in data.type.tensor_type.shape.dim]).astype(np.float32)
    res = rewrite(path, tmp_path / "p.onnx", preserve_function=True, details=True)
    assert res.rewritten and all(o.action == "rewritten" for o in res.outcomes if o.site.skip is None)
    onnx.checker.check_model(str(tmp_path / "p.onnx"))
    want = run_model(path, {data.name: x})[0]
    got = run_model(tmp_path / "p.onnx", {data.name: x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    normalized = rewrite(path, tmp_path / "n.onnx")
    out = fold(normalized, tmp_path / "f.onnx", data={data.name: x}, details=True)
    assert out.folded
    onnx.checker.check_model(str(tmp_path / "f.onnx"))
