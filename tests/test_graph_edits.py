"""graph.Container's edits: the one way passes change a model (docs/architecture.md §4).

Each edit lands in the protobuf at once and keeps the index true; untouched nodes keep their bytes and
order; the edited model runs in ONNX Runtime and computes what the edits say.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from normact_onnx.graph import containers, remove_unused, upstream

from .conftest import MODELS, const, fvi, random_feeds, run_model, tiny_model


def _index_is_true(c) -> None:
    """The maps equal a fresh index of the node list as it now is."""
    assert [c.position(n) for n in c.nodes] == list(range(len(c.nodes)))
    producer = dict(c.producer)
    consumers = {k: [id(n) for n in v] for k, v in c.consumers.items()}
    c.index(c.opset)
    assert producer == c.producer
    assert consumers == {k: [id(n) for n in v] for k, v in c.consumers.items()}


def test_many_insertions_at_one_spot_keep_order_index_and_bytes():
    path = MODELS / "cnn_relu.torchscript.onnx"
    m = onnx.load(str(path))
    c = containers(m)[0]
    relu = next(n for n in c.nodes if n.op_type == "Relu")
    value = relu.output[0]
    consumers = list(c.consumers[value])
    edited = {id(n) for n in consumers}  # they read the last Identity instead
    before = [n.SerializeToString() for n in m.graph.node if id(n) not in edited]
    # 60 Identity nodes chained after the Relu, each inserted right after it: far more than the key spacing
    # allows at one spot, so the positions are spread again on the way
    for k in range(60):
        out = f"{value}_id{k}"
        (ident,) = c.insert_after(relu, [helper.make_node("Identity", [value], [out], name=out)])
        for n in consumers:
            c.rename_input(n, value, out)
        consumers = [ident]
    _index_is_true(c)
    kept = [n.SerializeToString() for n in m.graph.node if not n.name.startswith(f"{value}_id") and id(n) not in edited]
    assert kept == before  # every original node, in its order, with its bytes
    onnx.checker.check_model(m)
    feeds = random_feeds(path)
    for a, b in zip(run_model(path, feeds), run_model(m, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def test_replace_remove_and_constants_in_a_function_body():
    f = helper.make_function(
        "local", "F", ["X"], ["Y"], [helper.make_node("Relu", ["X"], ["Y"])], [helper.make_opsetid("", 17)]
    )
    m = tiny_model(
        [helper.make_node("F", ["x"], ["y"], domain="local")],
        [fvi("x", [2, 3])],
        [fvi("y", [2, 3])],
        functions=[f],
    )
    m.opset_import.append(helper.make_opsetid("local", 1))
    body = containers(m)[1]
    relu = body.nodes[0]
    (mul,) = body.replace(relu, [helper.make_node("Mul", ["X", "k"], ["Y"])])
    body.add_constant("k", np.asarray(2.0, np.float32), mul)  # a Constant node before its reader
    assert [n.op_type for n in m.functions[0].node] == ["Constant", "Mul"]
    assert body.producer["Y"] is mul and body.consumers["k"] == [mul]
    body.set_constant("k", np.asarray(-3.0, np.float32))
    _index_is_true(body)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (y,) = run_model(m, {"x": x})
    np.testing.assert_array_equal(y, -3 * x)


def test_remove_unused_drops_orphans_only():
    m = tiny_model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [fvi("x", [3])],
        [fvi("y", [3])],
        [const("w", np.ones(3, np.float32)), const("orphan", np.ones(3, np.float32)), const("own", np.ones(3))],
    )
    remove_unused(m, initializers={"orphan", "w"})
    assert [t.name for t in m.graph.initializer] == ["w", "own"]  # "own" was not a candidate: the model's own
    remove_unused(m, initializers=True)
    assert [t.name for t in m.graph.initializer] == ["w"]


def test_upstream_walks_back_to_the_stop_value():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Mul", ["a", "s"], ["b"]),
        helper.make_node("Sub", ["b", "h"], ["y"]),
    ]
    m = tiny_model(nodes, [fvi("x", [3]), fvi("h", [3])], [fvi("y", [3])], [const("s", np.ones(3, np.float32))])
    c = containers(m)[0]
    found, reads = upstream(c, c.producer["y"], "a")
    assert [n.op_type for n in found] == ["Sub", "Mul"]
    assert reads == ["h", "s"]


def test_a_node_and_its_graph_gain_outputs_and_a_scan_its_axes():
    """What calibration's hoister uses: a new node output, a new graph output, a non-graph attribute."""
    body = helper.make_graph(
        [helper.make_node("Relu", ["x_t"], ["r"]), helper.make_node("Neg", ["r"], ["n"])],
        "step",
        [fvi("x_t", [3])],
        [fvi("r", [3])],
    )
    scan = helper.make_node("Scan", ["xs"], ["rs"], num_scan_inputs=1, body=body, scan_output_axes=[0])
    m = tiny_model([scan], [fvi("xs", [4, 3])], [fvi("rs", [4, 3])])
    main, inner = containers(m)
    scan = main.nodes[0]  # the node in the model (make_graph copied it)
    inner.add_output(fvi("n", [3]))
    main.set_output(scan, 1, "ns")  # one past the last output: a new output
    main.set_attribute(scan, "scan_output_axes", [0, 0])
    main.add_output(fvi("ns", [4, 3]))
    assert main.producer["ns"] is scan and "ns" in main.outputs and "n" in inner.outputs
    _index_is_true(main)
    _index_is_true(inner)
    xs = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    rs, ns = run_model(m, {"xs": xs})
    np.testing.assert_array_equal(rs, np.maximum(xs, 0))
    np.testing.assert_array_equal(ns, -np.maximum(xs, 0))
    assert [a.name for a in scan.attribute].count("scan_output_axes") == 1  # replaced in place
    with pytest.raises(ValueError, match="subgraph attribute"):
        main.set_attribute(scan, "body", body)
