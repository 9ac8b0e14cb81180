"""docs/architecture.md §8: the rewrite rules, each with a test: preservation, versions, provenance, files on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from normact_onnx import io as nio
from normact_onnx.api import inspect, rewrite
from normact_onnx.errors import NormactError
from normact_onnx.passes.find import find_sites

from .conftest import MODELS, bundled_models, const, fvi, random_feeds, run_model, tiny_model

FORMS = ["function", "subgraph"]


NodeKey = tuple[str, str, tuple[str, ...]]


def _node_key(n: onnx.NodeProto) -> NodeKey:
    """A node's identity that outlives its Python wrapper: op, name and outputs (outputs are unique)."""
    return (n.op_type, n.name, tuple(n.output))


def _site_node_keys(model: onnx.ModelProto) -> set[NodeKey]:
    return {_node_key(n) for s in find_sites(model) for n in s.nodes + s.const_nodes}


def _graphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]


def _assert_preserved(src: onnx.GraphProto, out: onnx.GraphProto, site_keys: set[NodeKey]) -> None:
    """Nodes outside sites are byte-identical and in the same order; control-flow nodes recurse."""
    kept = [n for n in src.node if _node_key(n) not in site_keys]
    outs = list(out.node)
    pos = 0
    for n in kept:
        if _graphs(n):
            match = next(m for m in outs[pos:] if m.op_type == n.op_type and list(m.output) == list(n.output))
            for a, b in zip(_graphs(n), _graphs(match)):
                _assert_preserved(a, b, site_keys)
        else:
            blob = n.SerializeToString()
            match = next(m for m in outs[pos:] if m.SerializeToString() == blob)
        pos = outs.index(match) + 1


@pytest.mark.parametrize("path", bundled_models(), ids=lambda p: p.name)
@pytest.mark.parametrize("form", FORMS)
def test_bundled_models_rewrite_run_and_keep_everything_else(path, form, tmp_path):
    src = onnx.load(str(path))
    out_path = tmp_path / "out.onnx"
    res = rewrite(path, out_path, form=form, details=True)
    assert res.rewritten and out_path.exists()
    out = onnx.load(str(out_path))
    # every node outside the sites survives byte for byte, in order, in every scope
    _assert_preserved(src.graph, out.graph, _site_node_keys(src))
    # initializers: the same bytes (pattern constants that only deleted nodes read may go)
    out_inits = {t.name: t.SerializeToString() for t in out.graph.initializer}
    for t in src.graph.initializer:
        if t.name in out_inits:
            assert out_inits[t.name] == t.SerializeToString()
        else:
            assert not any(t.name in n.input for n in out.graph.node)
    assert [i.SerializeToString() for i in out.graph.input] == [i.SerializeToString() for i in src.graph.input]
    assert [o.SerializeToString() for o in out.graph.output] == [o.SerializeToString() for o in src.graph.output]
    for p in src.metadata_props:
        assert (p.key, p.value) in {(q.key, q.value) for q in out.metadata_props}
    # opsets kept (our domain added), IR kept or clamped
    assert [(o.domain, o.version) for o in src.opset_import] == [(o.domain, o.version) for o in out.opset_import][
        : len(src.opset_import)
    ]
    assert out.ir_version == min(src.ir_version, nio.max_ir_version())
    assert out.producer_name == src.producer_name and out.graph.name == src.graph.name
    # and it runs, with outputs of the right shapes
    feeds = random_feeds(path)
    for a, b in zip(run_model(path, feeds), run_model(out_path, feeds)):
        assert a.shape == b.shape and np.all(np.isfinite(b))


@pytest.mark.parametrize("form", FORMS)
def test_second_rewrite_normalizes_nothing_twice(form, tmp_path):
    path = MODELS / "mobilenet_like.torchscript.onnx"
    first = rewrite(path, tmp_path / "a.onnx", form=form, details=True)
    second = rewrite(tmp_path / "a.onnx", tmp_path / "b.onnx", form=form, details=True)
    assert len(first.rewritten) == 7
    assert second.rewritten == []
    assert inspect(tmp_path / "b.onnx") == inspect(tmp_path / "a.onnx")  # an output, unchanged (issue 16)
    third = rewrite(tmp_path / "a.onnx", tmp_path / "c.onnx", form=form, write_unchanged=False, details=True)
    assert third.path is None
    assert not (tmp_path / "c.onnx").exists()
    assert sum(o.action == "normalized" for o in second.outcomes) == 7
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "a.onnx")).metadata_props}
    assert meta["normact.version"] and '"variant":"center-scale"' in meta["normact.sites"]


def test_function_form_sites_carry_their_constants_and_kernel_names(tmp_path):
    res = rewrite(MODELS / "transformer_gelu.torchscript.onnx", details=True, variant="zeta-zero", q=2.0)
    (node,) = [n for n in res.model.graph.node if n.domain == "ai.normact"]
    attrs = {a.name: a.f for a in node.attribute}
    assert node.op_type == "NormGelu"
    from normact_onnx.catalogue import CATALOGUE
    from normact_onnx.methods.static import static_affine

    want = static_affine(CATALOGUE["gelu"], q=2.0, variant="zeta-zero")
    assert attrs["scale"] == pytest.approx(want.scale, rel=1e-6) and attrs["slope"] == pytest.approx(0.5, rel=1e-6)
    assert {(f.domain, f.name) for f in res.model.functions} == {("ai.normact", "NormGelu")}


def test_function_and_subgraph_forms_compute_the_same(tmp_path):
    path = MODELS / "mlp_mixed.torchscript.onnx"
    feeds = random_feeds(path, batch=16)
    a = run_model(rewrite(path, form="function"), feeds)
    b = run_model(rewrite(path, form="subgraph"), feeds)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-5)


def test_onnx_reference_runs_both_forms():
    from onnx.inliner import inline_local_functions
    from onnx.reference import ReferenceEvaluator

    path = MODELS / "silu_net.torchscript.onnx"
    feeds = random_feeds(path)
    want = run_model(rewrite(path), feeds)[0]
    for m in (inline_local_functions(rewrite(path)), rewrite(path, form="subgraph")):
        got = ReferenceEvaluator(m).run(None, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name",
    [
        "mlp_relu.torchscript.onnx",
        "cnn_relu.dynamo.onnx",
        "transformer_gelu.dynamo.onnx",
        "hardswish_net.torchscript.onnx",
        "if_branch.helper.onnx",
        "mobilenet_like.torchscript.onnx",
    ],
)
def test_preserve_function_reproduces_the_original_outputs(name, tmp_path):
    path = MODELS / name
    res = rewrite(path, tmp_path / "p.onnx", preserve_function=True, details=True)
    assert res.rewritten
    feeds = random_feeds(path, batch=3)
    for a, b in zip(run_model(path, feeds), run_model(tmp_path / "p.onnx", feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
    for o in res.outcomes:
        if o.action == "skipped" and o.site.skip is None:
            assert o.reason.startswith("--preserve-function:")


def test_preserve_function_covers_padded_convs_and_residual_adds_exactly(tmp_path):
    """Padded Convs get an explicit Pad; a residual Add reads the inverse affine written in front of it."""
    for name in ("resblock.torchscript.onnx", "mobilenet_like.torchscript.onnx"):
        path = MODELS / name
        res = rewrite(path, tmp_path / name, preserve_function=True, details=True)
        hidden = [o for o in res.outcomes if o.site.skip is None]
        assert hidden and all(o.action == "rewritten" for o in hidden)
        ops = [n.op_type for n in res.model.graph.node]
        assert "Pad" in ops or name != "resblock.torchscript.onnx"
        feeds = random_feeds(path, batch=3)
        for a, b in zip(run_model(path, feeds), run_model(tmp_path / name, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
    with pytest.raises(NormactError, match=r"all 2 selected sites were refused .*slope"):  # issue 20: no silent copy
        rewrite(MODELS / "mlp_relu.torchscript.onnx", preserve_function=True, variant="zeta-zero", details=True)


def test_shared_weight_is_copied_not_corrupted():
    w = const("W", np.random.default_rng(0).standard_normal((4, 4)))
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["r", "W"], ["a"]),
        helper.make_node("MatMul", ["x", "W"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    model = tiny_model(nodes, [fvi("x", [2, 4])], [fvi("y", [2, 4])], [w])
    out = rewrite(model, preserve_function=True)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    assert any(t.name == "W" and t.SerializeToString() == w.SerializeToString() for t in out.graph.initializer)


def test_per_channel_prelu_is_normalized_per_channel():
    slope = const("slope", np.array([0.0, 0.1, 0.3]).reshape(3, 1, 1))
    nodes = [helper.make_node("PRelu", ["x", "slope"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = tiny_model(nodes, [fvi("x", ["N", 3, 4, 4])], [fvi("y", ["N", 3, 4, 4])], [slope])
    res = rewrite(model, details=True)
    o = res.outcomes[0]
    assert o.form == "subgraph" and "per-channel" in o.reason
    res.model.graph.output.append(fvi("h", None))  # look at the normalized PRelu output itself
    x = np.random.default_rng(0).standard_normal((20000, 3, 4, 4)).astype(np.float32)
    h = run_model(res.model, {"x": x})[1]
    np.testing.assert_allclose(h.mean(axis=(0, 2, 3)), 0, atol=1e-2)
    np.testing.assert_allclose(h.var(axis=(0, 2, 3)), 1, atol=2e-2)


def test_ir_version_is_clamped_to_what_onnxruntime_reads(monkeypatch):
    model = tiny_model(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [fvi("x", [4])],
        [fvi("y", [4])],
        ir=10,
    )
    assert rewrite(model).ir_version == 10
    monkeypatch.setattr(nio, "max_ir_version", lambda: 9)  # as with an older onnxruntime installed
    assert rewrite(model, verify=False).ir_version == 9


def _external_copy(src: Path, dest_dir: Path) -> Path:
    m = onnx.load(str(src))
    dest_dir.mkdir()
    out = dest_dir / "model.onnx"
    onnx.save(
        m, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    return out


def test_external_data_is_carried_not_loaded(tmp_path):
    path = _external_copy(MODELS / "transformer_gelu.torchscript.onnx", tmp_path / "in")
    out = tmp_path / "elsewhere" / "m.normact.onnx"
    rewrite(path, out)
    m = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    assert (out.parent / "weights.bin").read_bytes() == (path.parent / "weights.bin").read_bytes()
    assert os.path.getsize(out) < 64_000
    feeds = random_feeds(MODELS / "transformer_gelu.torchscript.onnx")
    want = run_model(rewrite(MODELS / "transformer_gelu.torchscript.onnx"), feeds)
    np.testing.assert_allclose(run_model(out, feeds)[0], want[0], rtol=1e-5, atol=1e-6)


def test_model_over_2gb_with_external_data(tmp_path):
    """A 2.1 GB weight (a sparse file: zeros, no disk use) is never read; the rewrite is a small file."""
    d = tmp_path / "big"
    d.mkdir()
    n_in, n_out = 8, 2**26 + 2**22  # 8 × 71M floats = 2.28 GB
    w = onnx.TensorProto(name="W", data_type=onnx.TensorProto.FLOAT, dims=[n_in, n_out])
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(4 * n_in * n_out))):
        w.external_data.add(key=k, value=v)
    with open(d / "w.bin", "wb") as fh:
        fh.truncate(4 * n_in * n_out)
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])]
    model = tiny_model(nodes, [fvi("x", [1, n_in])], [fvi("y", [1, n_out])], [w])
    onnx.save(model, str(d / "big.onnx"))
    res = rewrite(d / "big.onnx", d / "big.normact.onnx", verify=False, details=True)
    assert len(res.rewritten) == 1
    assert os.path.getsize(d / "big.normact.onnx") < 10_000
    assert [s["written_as"] for s in inspect(d / "big.normact.onnx")] == ["normalized NormRelu"]


def test_external_data_escaping_the_folder_is_refused(tmp_path):
    path = _external_copy(MODELS / "mlp_relu.torchscript.onnx", tmp_path / "in")
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../stolen.bin"
    shutil.copy(path.parent / "weights.bin", tmp_path / "stolen.bin")
    onnx.save(m, str(path))
    with pytest.raises(NormactError, match="escapes the model's folder"):
        rewrite(path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_input_is_never_overwritten_without_in_place(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "mlp_relu.torchscript.onnx", path)
    before = path.read_bytes()
    with pytest.raises(NormactError, match="--in-place"):
        rewrite(path, path)
    assert path.read_bytes() == before
    rewrite(path, path, in_place=True)
    assert [s["normalized"] for s in inspect(path)] == [True, True]


def test_failed_verification_writes_nothing(tmp_path):
    """A model ONNX Runtime cannot load (unknown custom op) passes the checker but fails verification."""
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Frobnicate", ["h"], ["y"], domain="com.example")]
    model = tiny_model(nodes, [fvi("x", [4])], [fvi("y", [4])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(NormactError, match=r"the input model uses op com\.example::Frobnicate, which onnxruntime"):
        rewrite(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    rewrite(tmp_path / "m.onnx", tmp_path / "out.onnx", verify=False)
    assert (tmp_path / "out.onnx").exists()


def test_functions_need_ir8_and_opset12_else_standard_ops():
    m = onnx.load(str(MODELS / "hardswish_net.torchscript_opset13.onnx"))
    assert m.ir_version == 7
    assert {o.form for o in rewrite(m, details=True).rewritten} == {"subgraph"}
    m.ir_version = 8
    res = rewrite(m, details=True)
    assert {o.form for o in res.rewritten} == {"function"}  # opset 13: typed function bodies
    feeds = random_feeds(MODELS / "hardswish_net.torchscript_opset13.onnx")
    np.testing.assert_allclose(
        run_model(res.model, feeds)[0], run_model(rewrite(m, form="subgraph"), feeds)[0], rtol=1e-5, atol=1e-6
    )
    from .conftest import light_models

    res = rewrite(light_models()[0], details=True)
    assert {o.form for o in res.rewritten} == {"subgraph"}
    assert "function form needs IR" in res.rewritten[0].reason


def test_folded_sites_are_not_normalized_again(tmp_path):
    from normact_onnx import fold

    rewrite(MODELS / "mlp_relu.torchscript.onnx", tmp_path / "n.onnx")
    fold(tmp_path / "n.onnx", tmp_path / "f.onnx")
    sites = inspect(tmp_path / "f.onnx")
    assert [s["written_as"] for s in sites] == ["op Relu (normalized, folded)"] * 2
    res = rewrite(tmp_path / "f.onnx", tmp_path / "again.onnx", details=True)
    assert res.rewritten == [] and inspect(tmp_path / "again.onnx") == sites  # an unchanged copy
