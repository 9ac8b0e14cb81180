"""The training graph's preparation and loss, checked against ONNX Runtime inference and numpy (any env).

Every op the preparation rewrites must compute what the op computed (the exported model keeps the op),
and the in-graph losses must equal their numpy definitions.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normact_onnx.training.graph import build_train_graph
from normact_onnx.training.losses import LOSS_OUTPUT, find_head, with_loss
from normact_onnx.training.prepare import MIN_TRAIN_OPSET, Preparation, fix_input_shapes

ort = pytest.importorskip("onnxruntime")
NO_CPU_GRADIENT = {"HardSigmoid", "HardSwish", "Resize", "ConvTranspose", "BatchNormalization", "Sum", "Elu"}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def _net(opset: int) -> onnx.ModelProto:
    """Conv(SAME) → BN → HardSigmoid·x → MaxPool(SAME) → nearest Resize ×2 → ConvTranspose(k=s=2) → Sum → Elu."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, positive: bool = False) -> onnx.TensorProto:
        a = rng.standard_normal(shape).astype(np.float32)
        return numpy_helper.from_array(np.abs(a) + 0.5 if positive else a, name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("HardSigmoid", ["bn"], ["hs"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["bn", "hs"], ["gated"]),
        helper.make_node("MaxPool", ["gated"], ["mp"], kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node(
            "Resize",
            ["mp", "roi", "scales"],
            ["up"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        helper.make_node("ConvTranspose", ["mp", "wt", "bt"], ["ct"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Sum", ["up", "ct", "up"], ["s"]),
        helper.make_node("Elu", ["s"], ["e"], alpha=0.7),
        helper.make_node("GlobalAveragePool", ["e"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["f"]),
        helper.make_node("Gemm", ["f", "wf"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1 if opset >= 13 else 1),
    ]
    inits = [
        init("w1", 4, 3, 2, 2),
        init("g", 4),
        init("b", 4),
        init("m", 4),
        init("v", 4, positive=True),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
        init("wt", 4, 4, 2, 2),
        init("bt", 4),
        init("wf", 5, 4),
    ]
    g = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("opset", [11, 17])
def test_prepared_graph_computes_what_the_model_computes(opset: int) -> None:
    m = _net(opset)
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    tg = build_train_graph(m, method="none")
    ops = {n.op_type for n in tg.model.graph.node}
    assert not ops & NO_CPU_GRADIENT, ops & NO_CPU_GRADIENT
    assert {o.domain: o.version for o in tg.model.opset_import}[""] == max(opset, MIN_TRAIN_OPSET)
    assert m.opset_import[0].version == opset  # the input model is untouched
    np.testing.assert_allclose(_run(tg.model, {"x": x}, ["probs"])[0], _run(m, {"x": x})[0], rtol=1e-5, atol=1e-6)
    # BN statistics (m, v) are no weights; its scale/bias, conv, deconv and Gemm weights are
    assert set(tg.trainable) == {"w1", "g", "b", "wt", "bt", "wf"}


def test_losses_match_numpy() -> None:
    m = _net(17)
    x = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)
    tg = build_train_graph(m, method="none")
    head = find_head(tg.model, "probs", "cross-entropy")
    assert (head.head, head.input) == ("Softmax", "logits")
    y = np.array([0, 3, 4, 1])
    withl = with_loss(tg.model, head)
    withl.graph.output.append(helper.make_empty_tensor_value_info("logits"))
    loss, logits = _run(withl, {"x": x, "labels": y}, [LOSS_OUTPUT, "logits"])
    z = logits.astype(np.float64)
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    assert float(loss) == pytest.approx(-logp[np.arange(4), y].mean(), rel=1e-5)
    # mse on the output itself
    t = np.random.default_rng(3).random((4, 5)).astype(np.float32)
    mse = with_loss(tg.model, find_head(tg.model, "probs", "mse"))
    loss, probs = _run(mse, {"x": x, "target": t}, [LOSS_OUTPUT, "probs"])
    assert float(loss) == pytest.approx(((probs - t) ** 2).mean(), rel=1e-5)


def test_bce_reads_the_sigmoid_input_and_sequence_cross_entropy() -> None:
    """bce with logits behind a Sigmoid; per-position cross-entropy for [N, T, C] with labels [N, T]."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Softmax", ["z"], ["q"], axis=-1),
    ]
    w = numpy_helper.from_array(np.random.default_rng(4).standard_normal((6, 7)).astype(np.float32) * 3, "w")
    g = helper.make_graph(
        nodes,
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 6])],
        [
            helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", "T", 7]),
            helper.make_tensor_value_info("q", TensorProto.FLOAT, ["N", "T", 7]),
        ],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = np.random.default_rng(5).standard_normal((2, 3, 6)).astype(np.float32)
    z = (x @ numpy_helper.to_array(w)).astype(np.float64)
    t = (np.random.default_rng(6).random((2, 3, 7)) > 0.5).astype(np.float32)
    head = find_head(m, "p", "bce")
    assert (head.head, head.input) == ("Sigmoid", "z")
    (loss,) = _run(with_loss(m, head), {"x": x, "target": t}, [LOSS_OUTPUT])
    want = (np.logaddexp(0, z) - z * t).mean()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    y = np.array([[0, 6, 3], [2, 2, 5]])
    (loss,) = _run(with_loss(m, find_head(m, "q", "cross-entropy")), {"x": x, "labels": y}, [LOSS_OUTPUT])
    logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    assert float(loss) == pytest.approx(-np.take_along_axis(logp, y[..., None], -1).mean(), rel=1e-5)


def test_fix_input_shapes_sets_symbolic_axes_only() -> None:
    """Symbolic, −1 and unnamed axes take the data's sizes; axes the model fixes stay; the graph still runs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, -1, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    prep = Preparation()
    fix_input_shapes(m, {"x": (2, 3, 5, 7)}, prep)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert [(d.dim_value, d.dim_param) for d in dims] == [(2, ""), (3, ""), (5, ""), (7, "")]
    assert prep.decomposed == {"input shape fixed": 1}
    a = np.arange(210, dtype=np.float32).reshape(2, 3, 5, 7) - 100
    np.testing.assert_array_equal(_run(m, {"x": a})[0], np.maximum(a, 0))
