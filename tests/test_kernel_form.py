"""rewrite says when ONNX Runtime fused a rewritten activation into its producer: fold is then the deployment path."""

from __future__ import annotations

import onnx

from normact_onnx.api import rewrite
from normact_onnx.passes.find import find_sites
from normact_onnx.passes.kernel_form import fused_sites

from .conftest import MODELS


def test_conv_and_gemm_relus_are_fused_hardswish_is_not() -> None:
    cnn = onnx.load(MODELS / "cnn_relu.torchscript.onnx")
    sites = find_sites(cnn)
    producers = {cnn.graph.node[i].op_type for i, n in enumerate(cnn.graph.node) for s in sites if s.input in n.output}
    assert [s.kind for s in fused_sites(cnn, sites)] == ["relu"] * len(sites) and producers <= {"Conv", "Gemm"}
    hs = onnx.load(MODELS / "hardswish_net.torchscript.onnx")  # ORT has no Conv+HardSwish fusion on the CPU
    assert find_sites(hs) and fused_sites(hs, find_sites(hs)) == []


def test_rewrite_notes_fold_as_the_deployment_path(tmp_path) -> None:
    res = rewrite(MODELS / "cnn_relu.torchscript.onnx", tmp_path / "a.onnx", details=True)
    [note] = [n for n in res.notes if "fuses into" in n]
    assert note.startswith("2 of the 2 rewritten sites (relu)") and "normact-onnx fold" in note
    plain = rewrite(MODELS / "hardswish_net.torchscript.onnx", tmp_path / "b.onnx", details=True)
    assert not [n for n in plain.notes if "fuses into" in n]
    sub = rewrite(MODELS / "cnn_relu.torchscript.onnx", tmp_path / "c.onnx", form="subgraph", details=True)
    assert not [n for n in sub.notes if "fuses into" in n]  # standard ops after the activation: ORT still fuses


def test_cli_prints_the_note(cli, tmp_path) -> None:
    r = cli("rewrite", MODELS / "cnn_relu.torchscript.onnx", "-o", tmp_path / "out.onnx")
    assert r.returncode == 0, r.stderr
    assert "deploy this model through `normact-onnx fold`" in r.stdout + r.stderr
