"""Every catalogue entry's ONNX derivative body matches its numpy derivative (calibration's ρ' relies on it)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from normact_onnx.catalogue import CATALOGUE
from normact_onnx.passes.forms import LiteralBody

PARAMS = {"leaky_relu": {"alpha": 0.2}, "elu": {"alpha": 1.5}, "celu": {"alpha": 0.7}, "clip": {"min": 0.0, "max": 6.0}}


def _run_derivative(kind: str, x: np.ndarray, params: dict, opset: int = 17) -> np.ndarray:
    act = CATALOGUE[kind]
    b = LiteralBody(opset, "d/", TensorProto.FLOAT, act.with_defaults(params), gradient_safe=False)
    out = act.derivative_body(b, "x")
    graph = helper.make_graph(
        b.nodes,
        "d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(x.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", sorted(CATALOGUE))
def test_derivative_body_matches_numpy(kind: str) -> None:
    act = CATALOGUE[kind]
    assert act.derivative_body is not None, f"{kind} has no derivative_body"
    rng = np.random.default_rng(0)
    # avoid the kinks themselves (the one-sided value there is a convention)
    x = (rng.standard_normal(4096) * 4).astype(np.float32)
    params = PARAMS.get(kind, {})
    kinks = act.kinks(act.with_defaults(params))
    for k in kinks:
        x[np.abs(x - k) < 1e-3] += 2e-3
    got = _run_derivative(kind, x, params)
    want = act.df(x.astype(np.float64), params)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


def test_prelu_per_channel_slope() -> None:
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    alpha = np.array([0.1, 0.2, 0.3])
    got = _run_derivative("prelu", x, {"alpha": alpha})
    np.testing.assert_allclose(got, CATALOGUE["prelu"].df(x, {"alpha": alpha}), rtol=1e-6)
