"""rewrite says on each site ONNX Runtime fused into its Conv/Gemm in the original that fold is the deployment path."""

from __future__ import annotations

import json

import onnx

from normact_onnx.api import rewrite
from normact_onnx.passes.find import find_sites
from normact_onnx.passes.kernel_form import FUSED_REASON, fused_sites

from .conftest import MODELS


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
    plain = rewrite(MODELS / "hardswish_net.torchscript.onnx", tmp_path / "b.onnx", details=True)
    assert plain.rewritten and not any(o.reason == FUSED_REASON for o in plain.outcomes)
    sub = rewrite(MODELS / "cnn_relu.torchscript.onnx", tmp_path / "c.onnx", form="subgraph", details=True)
    assert not any(o.reason == FUSED_REASON for o in sub.outcomes)  # standard ops after the activation: still fused
    fast = rewrite(MODELS / "cnn_relu.torchscript.onnx", tmp_path / "d.onnx", verify=False, details=True)
    assert fast.rewritten and not any(o.reason for o in fast.rewritten)  # --no-verify: no ORT optimizer run


def test_transformer_gelu_fused_with_its_matmul_bias_is_marked(tmp_path) -> None:
    """Not only Conv/Gemm: ORT fuses a GELU with the MatMul bias before it, so the bundled transformer block's GELU
    sites are marked too (fold keeps the original chain, which ORT fuses again)."""
    res = rewrite(MODELS / "transformer_gelu.dynamo.onnx", tmp_path / "t.onnx", details=True)
    assert [(o.site.kind, o.reason) for o in res.rewritten] == [("gelu", FUSED_REASON)]


def test_cli_table_and_report_say_it(cli, tmp_path) -> None:
    r = cli(
        "rewrite", MODELS / "cnn_relu.torchscript.onnx", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json"
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr  # stdout's per-site table, not a warning
    assert "deploy through `normact-onnx fold`" in r.stdout
    sites = json.loads((tmp_path / "r.json").read_text())["sites"]
    assert [s["reason"] for s in sites if s["action"] == "rewritten"] == [FUSED_REASON] * 2
