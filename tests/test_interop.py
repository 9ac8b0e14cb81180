"""The public API takes the model types users hold and gives back the type it was given (issue 9 §2).

A path, an ``onnx.ModelProto``, an ``onnx_ir.Model`` and an onnx-graphsurgeon ``Graph`` go in; what
comes out runs in a real ONNX Runtime session and computes exactly what the path route computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import pytest

from normact_onnx import calibrate, compare, fold, inspect, rewrite
from normact_onnx.errors import NormactError

from .conftest import MODELS, random_feeds, run_model

KINDS = ("path", "proto", "onnx_ir", "graphsurgeon")
MODEL_NAMES = ("cnn_relu.dynamo", "transformer_gelu.torchscript", "if_branch.helper", "mobilenet_like.torchscript")


def held(kind: str, path) -> object:
    """The model at ``path`` as a user of ``kind`` holds it."""
    if kind == "path":
        return path
    if kind == "proto":
        return onnx.load(str(path))
    if kind == "onnx_ir":
        return ir.load(str(path))
    return gs.import_onnx(onnx.load(str(path)))


def as_proto(model: object) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    assert isinstance(model, gs.Graph), type(model)
    return gs.export_onnx(model)


def expected_type(kind: str) -> type:
    return {"path": onnx.ModelProto, "proto": onnx.ModelProto, "onnx_ir": ir.Model, "graphsurgeon": gs.Graph}[kind]


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for x, y in zip(run_model(a, feeds), run_model(b, feeds), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_rewrite_returns_the_type_it_was_given_and_computes_what_the_path_route_does(kind, name):
    path = MODELS / f"{name}.onnx"
    reference = rewrite(path)
    out = rewrite(held(kind, path))
    assert type(out) is expected_type(kind) or isinstance(out, expected_type(kind))
    proto = as_proto(out)
    assert sum(n.domain == "ai.normact" for n in proto.graph.node) == sum(
        n.domain == "ai.normact" for n in reference.graph.node
    )
    assert_same_outputs(reference, proto, random_feeds(path))


@pytest.mark.parametrize("kind", KINDS)
def test_fold_returns_the_type_it_was_given_and_computes_what_the_path_route_does(kind, tmp_path):
    src = MODELS / "cnn_relu.torchscript.onnx"
    normalized = tmp_path / "n.onnx"
    rewrite(src, normalized)
    reference = fold(normalized)
    out = fold(held(kind, normalized))
    assert isinstance(out, expected_type(kind))
    proto = as_proto(out)
    assert not any(n.domain == "ai.normact" for n in proto.graph.node)  # every site folded back to its plain op
    assert_same_outputs(reference, proto, random_feeds(src))


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_and_compare_take_every_type(kind):
    path = MODELS / "transformer_gelu.torchscript.onnx"
    assert inspect(held(kind, path)) == inspect(path)
    result = compare(held(kind, path), rewrite(held(kind, path), preserve_function=True), synthetic=True)
    assert result.passed, result.report()


@pytest.mark.parametrize("kind", ("onnx_ir", "graphsurgeon"))
def test_calibrate_takes_every_type_and_measures_what_the_path_route_measures(kind):
    path = MODELS / "mlp_relu.torchscript.onnx"
    reference = calibrate(path, synthetic=True, batches=2, seed=3)
    stats = calibrate(held(kind, path), synthetic=True, batches=2, seed=3)
    assert stats.as_dict()["sites"] == reference.as_dict()["sites"]


def test_rewrite_does_not_change_the_onnx_ir_model_it_was_given():
    model = ir.load(str(MODELS / "cnn_relu.dynamo.onnx"))
    before = ir.to_proto(model).SerializeToString()
    rewrite(model, preserve_function=True)
    assert ir.to_proto(model).SerializeToString() == before


def test_an_onnx_ir_model_with_external_data_is_read_from_its_files(tmp_path):
    src = MODELS / "mobilenet_like.torchscript.onnx"
    m = onnx.load(str(src))
    big = tmp_path / "big.onnx"
    onnx.save(m, str(big), save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    model = ir.load(str(big))
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    out = rewrite(model, preserve_function=True)
    assert isinstance(out, ir.Model)
    # the caller's model still reads its weights from the file
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    assert_same_outputs(rewrite(src, preserve_function=True), ir.to_proto(out), random_feeds(src))  # same weights


def test_writing_the_result_of_a_held_model_gives_the_same_file_as_the_path_route(tmp_path):
    path = MODELS / "transformer_gelu.torchscript.onnx"
    rewrite(path, tmp_path / "a.onnx")
    returned = rewrite(ir.load(str(path)), tmp_path / "b.onnx")
    assert isinstance(returned, ir.Model)
    assert_same_outputs(onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx")), random_feeds(path))


def test_details_keep_the_protobuf_result():
    res = rewrite(ir.load(str(MODELS / "cnn_relu.dynamo.onnx")), details=True)
    assert isinstance(res.model, onnx.ModelProto) and res.rewritten


@pytest.mark.parametrize("bad", [42, object(), ["model.onnx"]])
def test_something_else_is_refused_with_one_line(bad):
    with pytest.raises(NormactError, match=r"^not a model: \w+ \(give a path, an onnx.ModelProto, an onnx_ir.Model"):
        rewrite(bad)
