"""The instrumented copy of calibration: statistics hoisted out of Scan and nested If-in-Loop bodies.

Checked against numpy on the values the body really computes, with the original outputs unchanged, and
the copy's container index still true after the edits (what a later edit would read).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from normact_onnx.calibration.instrument import instrument
from normact_onnx.graph import containers
from normact_onnx.ort import make_session
from normact_onnx.streaming import Moments

from .conftest import fvi, run_model, tiny_model


def _scan_model() -> onnx.ModelProto:
    """s_t = Relu(s_{t-1} + x_t) over xs' first axis (2×4 states); the last state and every state, stacked."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["s_in", "x_t"], ["h"]),
            helper.make_node("Relu", ["h"], ["s_out"]),
            helper.make_node("Identity", ["s_out"], ["y_t"]),
        ],
        "step",
        [fvi("s_in", [2, 4]), fvi("x_t", [2, 4])],
        [fvi("s_out", [2, 4]), fvi("y_t", [2, 4])],
    )
    scan = helper.make_node(
        "Scan", ["s0", "xs"], ["s_last", "ys"], num_scan_inputs=1, body=body, scan_output_axes=[0], name="scan"
    )
    return tiny_model([scan], [fvi("s0", [2, 4]), fvi("xs", [5, 2, 4])], [fvi("s_last", [2, 4]), fvi("ys", [5, 2, 4])])


def _loop_with_if_model() -> onnx.ModelProto:
    """Three iterations; iteration i takes Relu(x·(i+1)) when i is even (the then branch), else Tanh(x)."""
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["hx"]), helper.make_node("Relu", ["hx"], ["a"])],
        "then",
        [],
        [fvi("a", [2, 3])],
    )
    else_g = helper.make_graph([helper.make_node("Tanh", ["x"], ["b"])], "else", [], [fvi("b", [2, 3])])
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["i_f", "one"], ["k"]),
            helper.make_node("Mod", ["i", "two"], ["parity"]),
            helper.make_node("Equal", ["parity", "zero"], ["even"]),
            helper.make_node("If", ["even"], ["v"], then_branch=then_g, else_branch=else_g, name="branch"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), fvi("v", [2, 3])],
    )
    loop = helper.make_node("Loop", ["n", ""], ["vs"], body=body, name="loop")
    inits = [
        helper.make_tensor("n", TensorProto.INT64, [], [3]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("two", TensorProto.INT64, [], [2]),
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
    ]
    return tiny_model([loop], [fvi("x", [2, 3])], [fvi("vs", [3, 2, 3])], inits)


def _index_is_true(model: onnx.ModelProto, edited) -> None:
    """The containers the edits went through agree with an index built afresh from the edited model."""
    fresh = {c.path: c for c in containers(model)}

    def producers(c):
        return {k: (v.op_type, list(v.input), list(v.output)) for k, v in c.producer.items()}

    for c in edited:
        f = fresh[c.path]
        assert producers(c) == producers(f)
        assert {k: len(v) for k, v in c.consumers.items()} == {k: len(v) for k, v in f.consumers.items()}
        assert c.outputs == f.outputs and c.inputs == f.inputs
        assert [c.position(n) for n in c.nodes] == list(range(len(c.nodes)))  # every node where the index says


def _site_containers(inst):
    seen, out = set(), []
    for s in inst.sites:
        c = s.container
        while c is not None:
            if id(c) not in seen:
                seen.add(id(c))
                out.append(c)
            c = c.parent
    return out


@pytest.mark.parametrize("per_channel", [False, True], ids=["per tensor", "per channel"])
@pytest.mark.parametrize("fused", [False, None], ids=["standard ops", "statistics op when the library has it"])
def test_statistics_leave_a_scan_body_one_record_per_iteration(fused, per_channel):
    model = _scan_model()
    rng = np.random.default_rng(0)
    feeds = {"s0": rng.standard_normal((2, 4)), "xs": rng.standard_normal((5, 2, 4))}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    want = run_model(model, feeds)
    inst = instrument(model, None, per_channel=per_channel, fused=fused)
    got = make_session(inst.model.SerializeToString()).run(None, feeds)  # with the kernel library when built
    names = [o.name for o in inst.model.graph.output]
    assert names[:2] == ["s_last", "ys"]
    np.testing.assert_array_equal(got[0], want[0])  # the model's own outputs are untouched
    np.testing.assert_array_equal(got[1], want[1])
    scan = inst.model.graph.node[0]
    axes = next(a for a in scan.attribute if a.name == "scan_output_axes")
    assert list(axes.ints) == [0] * (len(scan.output) - 1)  # one axis per scan output, the new ones stack on 0

    (probe,) = inst.probes
    values = dict(zip(names, got))
    assert np.asarray(values[probe.outputs["size"]]).reshape(-1).tolist() == [8] * 5  # one record per iteration
    x, f, d2, _ = probe.read(values)
    s, hs = feeds["s0"].astype(np.float64), []
    for row in feeds["xs"]:
        hs.append(s + row)
        s = np.maximum(hs[-1], 0.0)
    h = np.concatenate(hs).reshape(-1, 4)
    columns = [h[:, k] for k in range(4)] if per_channel else [h]
    ref_x = [Moments.of(v) for v in columns]
    ref_f = [Moments.of(np.maximum(v, 0.0)) for v in columns]
    assert probe.channel_axis == (1 if per_channel else None)
    np.testing.assert_allclose(x.n, [r.n[0] for r in ref_x])
    np.testing.assert_allclose(x.mean, [r.mean[0] for r in ref_x], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.m2, [r.m2[0] for r in ref_x], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.mean, [r.mean[0] for r in ref_f], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f.m2, [r.m2[0] for r in ref_f], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d2, [np.mean(v > 0) for v in columns], rtol=1e-6)  # Relu' = 1 above zero
    _index_is_true(inst.model, _site_containers(inst))


def test_statistics_leave_an_if_inside_a_loop_with_empty_records_from_the_branch_not_taken():
    model = _loop_with_if_model()
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    (want,) = run_model(model, {"x": x})
    inst = instrument(model, None, fused=False)
    got = run_model(inst.model, {"x": x})
    names = [o.name for o in inst.model.graph.output]
    np.testing.assert_array_equal(got[0], want)  # the loop's own output is untouched
    values = dict(zip(names, got))
    by_kind = {p.site.kind: p for p in inst.probes}
    assert set(by_kind) == {"relu", "tanh"} and not inst.skipped

    relu_x, relu_f, _, _ = by_kind["relu"].read(values)
    pre = np.concatenate([x.astype(np.float64) * k for k in (1.0, 3.0)])  # iterations 0 and 2 take the then branch
    np.testing.assert_allclose(relu_x.n, [pre.size])  # iteration 1's empty record (n = 0) drops out
    np.testing.assert_allclose(relu_x.mean, [pre.mean()], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(relu_x.m2, [np.square(pre - pre.mean()).sum()], rtol=1e-5)
    np.testing.assert_allclose(relu_f.mean, [np.maximum(pre, 0).mean()], rtol=1e-5, atol=1e-6)

    tanh_x, tanh_f, _, _ = by_kind["tanh"].read(values)
    np.testing.assert_allclose(tanh_x.n, [x.size])  # only iteration 1
    np.testing.assert_allclose(tanh_f.mean, [np.tanh(x.astype(np.float64)).mean()], rtol=1e-5, atol=1e-6)
    sizes = np.asarray(values[by_kind["tanh"].outputs["size"]]).reshape(-1).tolist()
    assert sizes == [0, x.size, 0]  # the then branch returns empty records where it ran
    _index_is_true(inst.model, _site_containers(inst))
