"""fold: normalized sites back to plain activations, the affine part moved into the consumers (MATH.md §3).

Every test runs real ONNX Runtime sessions: the folded model must reproduce the
unfolded one within 1e-5 of each output's scale, on Gaussian and on "real"
(non-Gaussian, image-like) inputs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from normact_onnx import fold
from normact_onnx.api import rewrite
from normact_onnx.catalogue import NORM_DOMAIN
from normact_onnx.errors import NormactError
from normact_onnx.passes.find import recorded_sites

from .conftest import MODELS, const, fvi, random_feeds, run_model, tiny_model

TOL = 1e-5


def _feeds_like(feeds: dict[str, np.ndarray], kind: str, seed: int) -> dict[str, np.ndarray]:
    """Inputs of the same shapes: Gaussian, or image-like (uniform in [0, 1], like real pixels)."""
    rng = np.random.default_rng(seed)
    draw = rng.standard_normal if kind == "gaussian" else rng.random
    return {k: draw(v.shape).astype(v.dtype) for k, v in feeds.items()}


def assert_reproduces(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for kind, seed in (("gaussian", 1), ("image-like", 2)):
        f = _feeds_like(feeds, kind, seed)
        for a, b in zip(run_model(before, f), run_model(after, f), strict=True):
            scale = max(float(np.abs(a).max()), 1e-30)
            assert float(np.abs(a - b).max()) / scale < TOL, kind


def _norm_nodes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.domain == NORM_DOMAIN]


@pytest.mark.parametrize(
    "name",
    [
        "mlp_relu.torchscript",
        "mlp_relu.dynamo",
        "cnn_relu.torchscript",
        "transformer_gelu.torchscript",
        "mlp_mixed.dynamo",
    ],
)
def test_every_site_folds_back_to_the_plain_op(name, tmp_path):
    normed = rewrite(MODELS / f"{name}.onnx", tmp_path / "n.onnx")
    res = fold(tmp_path / "n.onnx", tmp_path / "f.onnx", details=True)
    assert res.folded and not res.kept, [o.reason for o in res.kept]
    folded = onnx.load(tmp_path / "f.onnx")
    assert not _norm_nodes(folded)
    assert not [f for f in folded.functions if f.domain == NORM_DOMAIN]
    assert all(i.domain != NORM_DOMAIN for i in folded.opset_import)
    assert res.check["max_rel_to_scale"] < TOL
    assert_reproduces(normed, folded, random_feeds(MODELS / f"{name}.onnx"))
    assert all(r.get("folded") for r in recorded_sites(folded))


def test_original_ops_come_back():
    m = fold(rewrite(MODELS / "mlp_relu.torchscript.onnx"))
    src = onnx.load(MODELS / "mlp_relu.torchscript.onnx")
    assert [n.op_type for n in m.graph.node] == [n.op_type for n in src.graph.node]
    assert [n.name for n in m.graph.node if n.op_type == "Relu"] == [
        n.name for n in src.graph.node if n.op_type == "Relu"
    ]


def test_site_feeding_a_residual_add_stays_with_its_reason(tmp_path):
    normed = rewrite(MODELS / "resblock.torchscript.onnx")
    res = fold(normed, details=True)
    kept = {o.site.name: o.reason for o in res.kept}
    assert list(kept) == ["/Relu"] and "Add" in kept["/Relu"]
    assert len(res.folded) == 2
    assert [n.name for n in _norm_nodes(res.model)] == ["/Relu"]
    assert any(f.name == "NormRelu" for f in res.model.functions)  # still called: kept
    assert_reproduces(normed, res.model, random_feeds(MODELS / "resblock.torchscript.onnx"))


def _conv_model(pads: list[int], group: int = 1, per_channel: bool = False) -> onnx.ModelProto:
    """Conv → ReLU (or per-channel PRelu) → Conv(pads, group) → output."""
    rng = np.random.default_rng(0)
    c = 4
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1])]
    inits = [const("w1", rng.standard_normal((c, 3, 3, 3)) * 0.3), const("b1", rng.standard_normal(c) * 0.1)]
    if per_channel:
        nodes.append(helper.make_node("PRelu", ["h", "alpha"], ["a"], name="act"))
        inits.append(const("alpha", np.array([0.05, 0.1, 0.2, 0.3]).reshape(c, 1, 1)))
    else:
        nodes.append(helper.make_node("Relu", ["h"], ["a"], name="act"))
    nodes.append(
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2", pads=pads, group=group, dilations=[2, 2])
    )
    inits += [const("w2", rng.standard_normal((6, c // group, 3, 3)) * 0.3), const("b2", rng.standard_normal(6) * 0.1)]
    return tiny_model(nodes, [fvi("x", [1, 3, 12, 12])], [fvi("y", ["n", "c", "h", "w"])], inits)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("padding, inserted", [("pad", "Pad"), ("keep-shift", "Add")])
def test_conv_with_padding_is_exact(padding, inserted, group):
    normed = rewrite(_conv_model([1, 2, 1, 0], group))
    res = fold(normed, padding=padding, details=True)
    assert len(res.folded) == 1
    ops = [n.op_type for n in res.model.graph.node]
    assert inserted in ops and not _norm_nodes(res.model)
    conv2 = next(n for n in res.model.graph.node if n.name == "conv2")
    pads = [list(a.ints) for a in conv2.attribute if a.name == "pads"]
    assert pads == ([] if padding == "pad" else [[1, 2, 1, 0]])
    assert_reproduces(normed, res.model, {"x": np.zeros((1, 3, 12, 12), np.float32)})


def test_conv_with_padding_can_be_refused():
    res = fold(rewrite(_conv_model([1, 1, 1, 1])), padding="refuse", details=True)
    assert not res.folded and "pads with zeros" in res.kept[0].reason


def test_conv_without_padding_needs_nothing_inserted():
    normed = rewrite(_conv_model([0, 0, 0, 0]))
    m = fold(normed)
    assert [n.op_type for n in m.graph.node] == ["Conv", "Relu", "Conv"]
    assert_reproduces(normed, m, {"x": np.zeros((1, 3, 12, 12), np.float32)})


def test_per_channel_constants_fold_into_a_padded_conv():
    normed = rewrite(_conv_model([1, 1, 1, 1], per_channel=True))
    assert any(r["form"] == "subgraph" and isinstance(r["scale"], list) for r in recorded_sites(normed))
    res = fold(normed, padding="pad", details=True)
    assert len(res.folded) == 1
    ops = [n.op_type for n in res.model.graph.node]
    assert "PRelu" in ops and "Add" in ops  # Pad takes one value; per-channel shifts stay as one Add
    assert_reproduces(normed, res.model, {"x": np.zeros((1, 3, 12, 12), np.float32)})


def _gemm_model(shared: bool, out_is_site: bool = False, matmul: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1)]
    nodes.append(helper.make_node("Relu", ["h"], ["a"], name="act"))
    inits = [const("w1", rng.standard_normal((8, 8)) * 0.4), const("b1", rng.standard_normal(8) * 0.1)]
    inits.append(const("ws", rng.standard_normal((8, 8)) * 0.4))
    outputs = [fvi("y", ["n", "c", "h", "w"])]
    if matmul:
        nodes.append(helper.make_node("MatMul", ["a", "ws"], ["y"], name="mm"))
    else:
        nodes.append(helper.make_node("Gemm", ["a", "ws"], ["y"], name="fc2"))
    if shared:  # a second layer reads the same weight from the raw input
        nodes.append(helper.make_node("Gemm", ["x", "ws"], ["z"], name="other"))
        outputs.append(fvi("z", [3, 8]))
    if out_is_site:
        outputs.append(fvi("a", [3, 8]))
    return tiny_model(nodes, [fvi("x", [3, 8])], outputs, inits)


def test_shared_weight_is_copied_not_corrupted():
    normed = rewrite(_gemm_model(shared=True))
    m = fold(normed)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    src = {t.name: onnx.numpy_helper.to_array(t) for t in normed.graph.initializer}
    np.testing.assert_array_equal(inits["ws"], src["ws"])
    other = next(n for n in m.graph.node if n.name == "other")
    fc2 = next(n for n in m.graph.node if n.name == "fc2")
    assert other.input[1] == "ws" and fc2.input[1] != "ws"
    assert_reproduces(normed, m, {"x": np.zeros((3, 8), np.float32)})


def test_matmul_without_bias_gets_one():
    normed = rewrite(_gemm_model(shared=False, matmul=True))
    m = fold(normed)
    assert [n.op_type for n in m.graph.node] == ["Gemm", "Relu", "MatMul", "Add"]
    assert_reproduces(normed, m, {"x": np.zeros((3, 8), np.float32)})


def test_site_that_is_a_graph_output_stays():
    normed = rewrite(_gemm_model(shared=False, out_is_site=True), all_sites=True)
    res = fold(normed, details=True)
    assert not res.folded and res.kept[0].reason == "the value is a graph output"
    assert res.path is None


def test_slope_variants_stay_normalized():
    res = fold(rewrite(MODELS / "mlp_relu.torchscript.onnx", variant="zeta-zero"), details=True)
    assert not res.folded and all("slope" in o.reason for o in res.kept)


def test_site_inside_an_if_branch_folds(tmp_path):
    normed = rewrite(MODELS / "if_branch.helper.onnx")
    res = fold(normed, details=True)
    assert any(o.site.path != "main" for o in res.folded), [(o.site.path, o.reason) for o in res.outcomes]
    assert_reproduces(normed, res.model, random_feeds(MODELS / "if_branch.helper.onnx"))


def test_cli_fold_writes_and_reports(cli, tmp_path):
    rewrite(MODELS / "resblock.torchscript.onnx", tmp_path / "m.normact.onnx")
    r = cli("fold", "m.normact.onnx", "--report", "rep.json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.normact.folded.onnx").exists()
    assert "2 folded, 1 kept" in r.stdout and "(verified)" in r.stdout
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [s["action"] for s in rep["sites"]] == ["kept", "folded", "folded"]
    r = cli("fold", "m.normact.onnx", "-o", "m.normact.onnx")
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    r = cli("fold", "missing.onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_unknown_padding_is_a_user_error():
    with pytest.raises(NormactError):
        fold(MODELS / "mlp_relu.torchscript.onnx", padding="zeros")


def test_model_without_normalized_sites_writes_nothing(tmp_path):
    res = fold(MODELS / "mlp_relu.torchscript.onnx", tmp_path / "f.onnx", details=True)
    assert not res.outcomes and res.path is None and not (tmp_path / "f.onnx").exists()
