"""Data with no samples is bad input for calibrate and compare: one line, exit 2, nothing written (issue 20).

Before, ``calibrate`` exited 0 with empty statistics and ``compare`` died with an IndexError.
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import MODELS

MODEL = MODELS / "mlp_relu.dynamo.onnx"


@pytest.fixture
def zero(tmp_path):
    np.savez(tmp_path / "zero.npz", x=np.zeros((0, 64), np.float32))
    return tmp_path / "zero.npz"


def _one_line(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    return lines[0]


def test_calibrate_refuses_zero_samples(zero, tmp_path, cli):
    r = cli("calibrate", MODEL, "--data", zero, "--stats", "s.json", "-o", "c.onnx", cwd=tmp_path)
    line = _one_line(r)
    assert "input 'x' holds no samples (shape [0, 64])" in line
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "c.onnx").exists()


def test_calibrate_refuses_zero_samples_after_batch_split(zero, tmp_path, cli):
    r = cli("calibrate", MODEL, "--data", zero, "--batch-size", "8", "--stats", "s.json", cwd=tmp_path)
    assert "holds no samples" in _one_line(r)


def test_compare_refuses_zero_samples(zero, tmp_path, cli):
    r = cli("compare", MODEL, MODEL, "--data", zero, cwd=tmp_path)
    assert "input 'x' holds no samples" in _one_line(r)
