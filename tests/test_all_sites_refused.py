"""Options that leave no site rewritable are an error, not an "unchanged copy" with exit 0 (issue 20).

Sites were selected but every one was refused: one line with the count and the first reason, exit 2,
nothing written. A model that genuinely has no sites still gets its unchanged copy.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from .conftest import MODELS, fvi, tiny_model

MODEL = MODELS / "mlp_relu.dynamo.onnx"


def _refused(r, tmp_path, reason: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "all 2 selected sites were refused" in lines[0] and reason in lines[0] and "nothing written" in lines[0]
    assert not list(tmp_path.glob("out*")), "nothing may be written"


def test_impossible_ratio(tmp_path, cli):
    r = cli("rewrite", MODEL, "--variant", "ratio", "--ratio", "-3", "-o", "out.onnx", cwd=tmp_path)
    _refused(r, tmp_path, "ratio must lie in")


def test_zeta_zero_cannot_preserve(tmp_path, cli):
    r = cli("rewrite", MODEL, "--variant", "zeta-zero", "--preserve-function", "-o", "out.onnx", cwd=tmp_path)
    _refused(r, tmp_path, "the inverse needs the pre-activation")


def test_forced_statistics_of_another_model(tmp_path, cli):
    other = MODELS / "silu_net.dynamo.onnx"
    r = cli("calibrate", other, "--synthetic", "--batches", "2", "--stats", "other.json", "--stats-only", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("rewrite", MODEL, "--method", "anact", "--stats", "other.json", "--force", "-o", "out.onnx", cwd=tmp_path)
    _refused(r, tmp_path, "no statistics")


def test_calibrate_output_refused_writes_no_statistics(tmp_path, cli):
    """calibrate -o whose rewrite refuses every site leaves neither the model nor the statistics."""
    r = cli(
        "calibrate", MODEL, "--synthetic", "--batches", "2", "--method", "static", "--variant", "ratio",
        "--ratio", "-3", "-o", "out.onnx", "--stats", "out.json", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert not list(tmp_path.glob("out*"))


def test_model_without_sites_still_gets_its_unchanged_copy(tmp_path, cli):
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    model = tiny_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [fvi("x", [2, 4])], [fvi("y", [2, 4])], [w])
    onnx.save(model, tmp_path / "plain.onnx")
    r = cli("rewrite", "plain.onnx", "-o", "out.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.onnx").is_file() and "unchanged copy" in r.stderr


def test_the_api_raises_too(tmp_path):
    from normact_onnx.api import rewrite
    from normact_onnx.errors import NormactError

    with pytest.raises(NormactError, match="all 2 selected sites were refused"):
        rewrite(MODEL, tmp_path / "out.onnx", variant="ratio", ratio=-3.0)
    assert not (tmp_path / "out.onnx").exists()
