"""Integer and boolean values are never activation sites, inside subgraphs too (issue 20).

A dynamo export computes shapes with int64 arithmetic, an ``Abs`` of a shape difference inside an ``If``
branch among them; taken for an activation, the default rewrite failed verification ("Type 'tensor(int64)'
… NormAbs"). The models here carry no value_info: the types are inferred (ONNX's inference, then the
types carried from Shape/Cast/Constant where it gives up).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from normact_onnx.api import inspect, rewrite
from normact_onnx.passes.find import find_sites
from normact_onnx.valuetypes import infer_value_types

from .conftest import fvi, run_model, tiny_model


def _int_abs_in_if() -> onnx.ModelProto:
    """x → Relu → MatMul → y (one real site); Shape(x) − 8 → If(then: Abs, else: Neg) → Reshape of y."""
    then = helper.make_graph(
        [helper.make_node("Abs", ["d"], ["t_out"])], "then", [], [helper.make_tensor_value_info("t_out", 7, [2])]
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["d"], ["e_out"])], "else", [], [helper.make_tensor_value_info("e_out", 7, [2])]
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["h"]),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Sub", ["s", "eight"], ["d"]),
        helper.make_node("ReduceSum", ["d"], ["total"], keepdims=1),
        helper.make_node("Greater", ["total", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["k"], then_branch=then, else_branch=other),
        helper.make_node("Abs", ["k"], ["ka"]),
        helper.make_node("Reshape", ["h", "ka"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
        onnx.numpy_helper.from_array(np.array([0, 0], np.int64), "eight"),
        onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
    ]
    return tiny_model(nodes, [fvi("x", [3, 4])], [fvi("y", [3, 4])], inits)


def _int_relu_clip_main(int_op: str = "Relu") -> onnx.ModelProto:
    """A Relu (or Abs) on int64 and a Clip on int32 (shape arithmetic) beside a float Relu."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node(int_op, ["s"], ["sr"]),
        helper.make_node("Cast", ["sr"], ["s32"], to=TensorProto.INT32),
        helper.make_node("Clip", ["s32", "lo", "hi"], ["sc"]),
        helper.make_node("Cast", ["sc"], ["s64"], to=TensorProto.INT64),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["h"]),
        helper.make_node("Reshape", ["h", "s64"], ["y"]),
    ]
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    bounds = [onnx.numpy_helper.from_array(np.array(v, np.int32), n) for n, v in (("lo", 0), ("hi", 6))]
    return tiny_model(nodes, [fvi("x", [3, 4])], [fvi("y", [3, 4])], [w, *bounds])


def test_int_abs_in_if_branch_is_not_a_site(tmp_path):
    model = _int_abs_in_if()
    assert not model.graph.value_info
    sites = find_sites(model)
    assert [(s.kind, s.input) for s in sites] == [("relu", "x")]
    onnx.save(model, tmp_path / "m.onnx")
    assert [s["kind"] for s in inspect(tmp_path / "m.onnx")] == ["relu"]
    res = rewrite(tmp_path / "m.onnx", tmp_path / "out.onnx", details=True)  # verification included
    assert len(res.rewritten) == 1
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (y,) = run_model(tmp_path / "out.onnx", {"x": x})
    assert y.shape == (3, 4)


def test_int_relu_and_clip_in_main_graph_are_not_sites(tmp_path):
    model = _int_relu_clip_main()
    misses: list[dict] = []
    sites = find_sites(model, misses=misses)
    assert [s.input for s in sites] == ["x"]
    assert {m["op"] for m in misses if "not floating point" in m["why"]} == {"Relu", "Clip"}
    model = _int_relu_clip_main("Abs")  # ONNX Runtime has no int64 Relu kernel: run the Abs twin
    assert [s.input for s in find_sites(model)] == ["x"]
    onnx.save(model, tmp_path / "m.onnx")
    assert len(rewrite(tmp_path / "m.onnx", tmp_path / "out.onnx", details=True).rewritten) == 1


def test_types_carried_where_inference_gives_up():
    """An op ONNX does not know stops its inference; Shape/Cast/Constant still type what follows them."""
    nodes = [
        helper.make_node("Mystery", ["x"], ["m"], domain="com.example"),
        helper.make_node("Shape", ["m"], ["s"]),
        helper.make_node("Abs", ["s"], ["a"]),
        helper.make_node("Constant", [], ["k"], value_ints=[1, 2]),
        helper.make_node("Mul", ["k", "a"], ["b"]),
        helper.make_node("Cast", ["m"], ["f"], to=TensorProto.DOUBLE),
        helper.make_node("Relu", ["f"], ["y"]),
    ]
    model = tiny_model(nodes, [fvi("x", [3, 4])], [fvi("y", None)])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    types = infer_value_types(model)
    assert types.elem["a"] == TensorProto.INT64 and types.elem["b"] == TensorProto.INT64
    assert types.elem["f"] == TensorProto.DOUBLE
    assert [s.input for s in find_sites(model)] == ["f"]
