"""fold: normalized sites back to plain activations, the affine part moved into the consumers (docs/math.md §3).

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
from normact_onnx.provenance import read_records as recorded_sites

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


def test_site_feeding_a_residual_add_folds(tmp_path):
    """resblock's stem ReLU feeds a padded Conv and the residual Add: it folds into the stem Conv (backward)."""
    normed = rewrite(MODELS / "resblock.torchscript.onnx")
    res = fold(normed, details=True)
    assert not res.kept, [o.reason for o in res.kept]
    into = {o.site.name: o.into for o in res.folded}
    assert into["/Relu"] == "producer"
    assert not _norm_nodes(res.model) and not any(f.domain == NORM_DOMAIN for f in res.model.functions)
    ops = [n.op_type for n in res.model.graph.node]
    src = [n.op_type for n in onnx.load(MODELS / "resblock.torchscript.onnx").graph.node]
    assert len(ops) == len(src)  # nothing inserted: the sites are Relu/Clip again
    assert_reproduces(normed, res.model, random_feeds(MODELS / "resblock.torchscript.onnx"))


def test_mobilenet_folds_every_site_but_the_gated_one():
    """Residual Add (through the other branch's Conv), padded depthwise Convs, and layers that absorb one
    site on their input side and another on their output side: only the HardSwish that feeds the SE gate's
    Mul stays."""
    path = MODELS / "mobilenet_like.torchscript.onnx"
    normed = rewrite(path)
    res = fold(normed, details=True)
    kept = {o.site.name: o.reason for o in res.kept}
    assert list(kept) == ["/block2/dw/dw.1/HardSwish"] and "Mul" in kept["/block2/dw/dw.1/HardSwish"]
    into = {o.site.name: o.into for o in res.folded}
    assert into["/stem/stem.1/HardSwish"] == "consumers"  # through the residual Add
    assert into["/block1/expand/expand.1/Clip"] == "producer"  # ReLU6 in front of a padded depthwise Conv
    assert res.check["max_rel_to_scale"] < TOL
    assert_reproduces(normed, res.model, random_feeds(path))


def _conv_model(
    pads: list[int], group: int = 1, per_channel: bool = False, act: str = "Relu", shared: bool = False
) -> onnx.ModelProto:
    """Conv → ``act`` (or per-channel PRelu) → Conv(pads, group) → output.

    ReLU folds backward (into conv1); LeakyRelu (shift ≠ 0, not a clip) only forward, into conv2.
    ``shared``: a second Conv reads conv1's weight from the input (output ``z``).
    """
    rng = np.random.default_rng(0)
    c = 4
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1])]
    inits = [const("w1", rng.standard_normal((c, 3, 3, 3)) * 0.3), const("b1", rng.standard_normal(c) * 0.1)]
    if per_channel:
        nodes.append(helper.make_node("PRelu", ["h", "alpha"], ["a"], name="act"))
        inits.append(const("alpha", np.array([0.05, 0.1, 0.2, 0.3]).reshape(c, 1, 1)))
    elif act == "LeakyRelu":
        nodes.append(helper.make_node("LeakyRelu", ["h"], ["a"], name="act", alpha=0.1))
    elif act == "Relu6":
        inits += [const("lo", 0.0), const("hi", 6.0)]
        nodes.append(helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="act"))
    else:
        nodes.append(helper.make_node(act, ["h"], ["a"], name="act"))
    outputs = [fvi("y", ["n", "c", "h", "w"])]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", "w1"], ["z"], name="other", pads=[1, 1, 1, 1]))
        outputs.append(fvi("z", [1, c, 12, 12]))
    nodes.append(
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2", pads=pads, group=group, dilations=[2, 2])
    )
    inits += [const("w2", rng.standard_normal((6, c // group, 3, 3)) * 0.3), const("b2", rng.standard_normal(6) * 0.1)]
    return tiny_model(nodes, [fvi("x", [1, 3, 12, 12])], outputs, inits)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("padding, inserted", [("pad", "Pad"), ("keep-shift", "Conv")])
def test_conv_with_padding_is_exact(padding, inserted, group):
    normed = rewrite(_conv_model([1, 2, 1, 0], group, act="LeakyRelu"))
    res = fold(normed, padding=padding, details=True)
    assert len(res.folded) == 1 and res.folded[0].into == "consumers"
    ops = [n.op_type for n in res.model.graph.node]
    assert ops == ["Conv", "LeakyRelu", inserted, "Conv"] and not _norm_nodes(res.model)
    if padding == "keep-shift":  # the shift as a depthwise 1×1 Conv with weight 1: x·1 + b is exact
        shift = res.model.graph.node[2]
        assert {a.name: onnx.helper.get_attribute_value(a) for a in shift.attribute} == {
            "group": 4,
            "kernel_shape": [1, 1],
        }
    conv2 = next(n for n in res.model.graph.node if n.name == "conv2")
    pads = [list(a.ints) for a in conv2.attribute if a.name == "pads"]
    assert pads == ([] if padding == "pad" else [[1, 2, 1, 0]])
    assert_reproduces(normed, res.model, {"x": np.zeros((1, 3, 12, 12), np.float32)})


def test_conv_with_padding_can_be_refused():
    res = fold(rewrite(_conv_model([1, 1, 1, 1], act="LeakyRelu")), padding="refuse", details=True)
    assert not res.folded and "pads with zeros" in res.kept[0].reason


@pytest.mark.parametrize("act, plain", [("Relu", "Clip"), ("Relu6", "Clip")])
def test_clip_site_folds_into_its_producer_whatever_the_padding(act, plain):
    """s·(clip(x, lo, hi) − h) = clip(s·x − s·h, s·lo − s·h, s·hi − s·h): conv1 takes s and −s·h."""
    normed = rewrite(_conv_model([1, 1, 1, 1], act=act))
    rec = recorded_sites(normed)[0]
    for padding in ("refuse", "keep-shift"):
        res = fold(normed, padding=padding, details=True)
        assert [o.into for o in res.folded] == ["producer"]
        nodes = list(res.model.graph.node)
        assert [n.op_type for n in nodes] == ["Conv", plain, "Conv"]
        conv2 = next(n for n in nodes if n.name == "conv2")
        assert [list(a.ints) for a in conv2.attribute if a.name == "pads"] == [[1, 1, 1, 1]]
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
        s, h = rec["scale"], rec["shift"]
        lo = float(inits[nodes[1].input[1]])
        assert lo == pytest.approx(-s * h, rel=1e-6)
        if act == "Relu6":
            assert float(inits[nodes[1].input[2]]) == pytest.approx(s * (6.0 - h), rel=1e-6)
        else:
            assert len(nodes[1].input) == 2  # no upper bound
        src = {t.name: onnx.numpy_helper.to_array(t) for t in normed.graph.initializer}
        np.testing.assert_allclose(inits["w1"], s * src["w1"], rtol=1e-6)
        np.testing.assert_allclose(inits["b1"], s * src["b1"] - s * h, rtol=1e-6, atol=1e-7)
        assert_reproduces(normed, res.model, {"x": np.zeros((1, 3, 12, 12), np.float32)})


def test_shared_producer_weight_is_copied():
    normed = rewrite(_conv_model([1, 1, 1, 1], shared=True))
    res = fold(normed, details=True)
    assert [o.into for o in res.folded] == ["producer"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    src = {t.name: onnx.numpy_helper.to_array(t) for t in normed.graph.initializer}
    np.testing.assert_array_equal(inits["w1"], src["w1"])
    conv1, other = (next(n for n in res.model.graph.node if n.name == k) for k in ("conv1", "other"))
    assert other.input[1] == "w1" and conv1.input[1] != "w1"
    assert_reproduces(normed, res.model, {"x": np.zeros((1, 3, 12, 12), np.float32)})


def test_producer_with_another_reader_blocks_backward_folding():
    model = _conv_model([1, 1, 1, 1])
    model.graph.output.append(fvi("h", [1, 4, 12, 12]))  # conv1's output is read by more than the ReLU
    normed = rewrite(model)
    res = fold(normed, padding="refuse", details=True)
    assert not res.folded
    assert "pads with zeros" in res.kept[0].reason and "backward: the layer output it reads" in res.kept[0].reason
    res = fold(normed, details=True)  # keep-shift: forward, one op inserted
    assert [o.into for o in res.folded] == ["consumers"]
    assert_reproduces(normed, res.model, {"x": np.zeros((1, 3, 12, 12), np.float32)})


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
    assert ops == ["Conv", "PRelu", "Conv", "Conv"]  # Pad takes one value; per-channel shifts stay (1×1 Conv)
    assert_reproduces(normed, res.model, {"x": np.zeros((1, 3, 12, 12), np.float32)})


def _gemm_model(shared: bool, out_is_site: bool = False, matmul: bool = False, act: str = "Relu") -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1)]
    nodes.append(helper.make_node(act, ["h"], ["a"], name="act"))
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
    normed = rewrite(_gemm_model(shared=False, matmul=True, act="Elu"))
    m = fold(normed)
    assert [n.op_type for n in m.graph.node] == ["Gemm", "Elu", "MatMul", "Add"]
    assert_reproduces(normed, m, {"x": np.zeros((3, 8), np.float32)})


def test_relu_before_a_matmul_without_bias_folds_backward():
    normed = rewrite(_gemm_model(shared=False, matmul=True))
    res = fold(normed, details=True)
    assert [o.into for o in res.folded] == ["producer"]
    assert [n.op_type for n in res.model.graph.node] == ["Gemm", "Clip", "MatMul"]  # no Add inserted
    assert_reproduces(normed, res.model, {"x": np.zeros((3, 8), np.float32)})


def test_site_that_is_a_graph_output():
    """A clip site keeps its output's value when it folds backward; any other site stays."""
    normed = rewrite(_gemm_model(shared=False, out_is_site=True), all_sites=True)
    res = fold(normed, details=True)
    assert [o.into for o in res.folded] == ["producer"]
    assert_reproduces(normed, res.model, {"x": np.zeros((3, 8), np.float32)})
    normed = rewrite(_gemm_model(shared=False, out_is_site=True, act="Elu"), all_sites=True)
    res = fold(normed, details=True)
    assert not res.folded and res.kept[0].reason == "the value is a graph output"
    assert res.path is None


def _residual_model(act: str, other_reads_elsewhere: bool = False) -> onnx.ModelProto:
    """x → conv0 → act → a; a → conv1 (1×1) → b; Add(a, b) → conv2 (3×3, padded) → y."""
    rng = np.random.default_rng(3)
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node(act, ["h"], ["a"], name="act"),
        helper.make_node("Conv", ["a", "w1", "b1"], ["b"], name="conv1"),
        helper.make_node("Add", ["a", "b"], ["z"], name="residual"),
        helper.make_node("Conv", ["z", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [
        const("w0", rng.standard_normal((c, 3, 3, 3)) * 0.3),
        const("b0", rng.standard_normal(c) * 0.1),
        const("w1", rng.standard_normal((c, c, 1, 1)) * 0.3),
        const("b1", rng.standard_normal(c) * 0.1),
        const("w2", rng.standard_normal((5, c, 3, 3)) * 0.3),
        const("b2", rng.standard_normal(5) * 0.1),
    ]
    outputs = [fvi("y", [1, 5, 10, 10])] + ([fvi("b", [1, c, 10, 10])] if other_reads_elsewhere else [])
    return tiny_model(nodes, [fvi("x", [1, 3, 10, 10])], outputs, inits, opset=17)


def test_non_clip_site_folds_through_a_residual_add():
    """(s·f − s·h) + b = s·(f + (b − s·h)/s): conv1 takes 1/s and −h, conv2 takes s; nothing inserted."""
    normed = rewrite(_residual_model("Elu"))
    res = fold(normed, details=True)
    assert [o.into for o in res.folded] == ["consumers"], [o.reason for o in res.kept]
    assert [n.op_type for n in res.model.graph.node] == ["Conv", "Elu", "Conv", "Add", "Conv"]
    assert_reproduces(normed, res.model, {"x": np.zeros((1, 3, 10, 10), np.float32)})
    res = fold(rewrite(_residual_model("Elu", other_reads_elsewhere=True)), details=True)
    assert not res.folded and "Add" in res.kept[0].reason and "also used elsewhere" in res.kept[0].reason


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
    assert "3 folded, 0 kept" in r.stdout and "(verified" in r.stdout
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [s["action"] for s in rep["sites"]] == ["folded", "folded", "folded"]
    assert rep["sites"][0]["folded_into"] == "producer"
    r = cli("fold", "m.normact.onnx", "-o", "m.normact.onnx")
    assert r.returncode == 2 and "would overwrite the input model" in r.stderr and "--in-place" in r.stderr
    r = cli("fold", "missing.onnx")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_unknown_padding_is_a_user_error():
    with pytest.raises(NormactError):
        fold(MODELS / "mlp_relu.torchscript.onnx", padding="zeros")


def test_model_without_normalized_sites_writes_nothing(tmp_path):
    res = fold(MODELS / "mlp_relu.torchscript.onnx", tmp_path / "f.onnx", write_unchanged=False, details=True)
    assert not res.outcomes and res.path is None and not (tmp_path / "f.onnx").exists()
    res = fold(MODELS / "mlp_relu.torchscript.onnx", tmp_path / "f.onnx", details=True)  # an output: a copy
    assert not res.outcomes and res.path == tmp_path / "f.onnx"
    assert onnx.load(str(res.path)).graph == onnx.load(str(MODELS / "mlp_relu.torchscript.onnx")).graph


@pytest.mark.parametrize("file", ["transformer_gelu.torchscript.onnx", "silu_net.torchscript.onnx"])
def test_fold_of_a_float16_model_self_checks_at_float16_precision(file, tmp_path):
    from .conftest import to_low_precision

    half = to_low_precision(onnx.load(str(MODELS / file)))
    onnx.save(half, str(tmp_path / "half.onnx"))
    rewrite(tmp_path / "half.onnx", tmp_path / "n.onnx")
    res = fold(tmp_path / "n.onnx", tmp_path / "f.onnx", details=True)
    assert res.folded and (tmp_path / "f.onnx").exists()
    assert 1e-5 < res.check["allowed_rel_to_scale"] <= 1e-2  # float16's rounding, not float32's
    assert res.check["max_rel_to_scale"] <= res.check["allowed_rel_to_scale"]
    with pytest.raises(NormactError, match="differs from the unfolded one"):  # an explicit tolerance still rules
        fold(tmp_path / "n.onnx", tmp_path / "f2.onnx", tolerance=1e-7)
