"""compare, calibrate and fold read --data the same way: --batch-size splits files, --batches caps them.

Before issue 20, compare sized only synthetic batches with --batch-size (a file calibrate accepted was refused
for its batch dimension), ignored --batches for data, and refused one model with --sites.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from normact_onnx.api import calibrate
from normact_onnx.comparison import compare, measure_sites
from normact_onnx.data.options import DataOptions
from normact_onnx.errors import NormactError

from .conftest import tanh_sigmoid_mlp

WIDTH, SAMPLES = 16, 64


def fixed_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its batch dimension fixed to 1 (as many exporters write it)."""
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 1
    return model


@pytest.fixture
def files(tmp_path):
    """A dynamic-batch and a batch-1 model, both calibrated, and one .npz of 64 samples."""
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((SAMPLES, WIDTH)).astype(np.float32))
    out = {"data": data}
    for name, model in (("dyn", tanh_sigmoid_mlp(WIDTH, rng)), ("one", fixed_batch(tanh_sigmoid_mlp(WIDTH, rng)))):
        src = tmp_path / f"{name}.onnx"
        onnx.save(model, src)
        cal = tmp_path / f"{name}.cal.onnx"
        calibrate(src, data, cal, batch_size=1 if name == "one" else None, aggregate="mean")
        out[name], out[f"{name}_cal"] = src, cal
    return out


def test_batch_size_splits_data_files_like_calibrate(cli, files):
    """A batch-1 model: the .npz calibrate accepted with --batch-size 1 is accepted by compare and fold too."""
    r = cli("compare", files["one"], files["one"], "--data", files["data"], "--batch-size", 1, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["batches"] == SAMPLES and report["outputs"][0]["elements"] == SAMPLES * WIDTH
    r = cli("fold", files["one_cal"], "-o", files["one"].with_name("f.onnx"), "--data", files["data"],
            "--batch-size", 1)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("compare", files["one"], files["one"], "--data", files["data"])  # whole file: one batch of 64
    assert r.returncode == 2 and "expected shape [1, 16], given [64, 16]" in r.stderr


@pytest.mark.parametrize(("size", "cap", "batches"), [(8, 8, 8), (8, 3, 3), (10, None, 7), (None, None, 1)])
def test_batches_caps_the_data(cli, files, size, cap, batches):
    args = [] if size is None else ["--batch-size", size]
    args += [] if cap is None else ["--batches", cap]
    r = cli("compare", files["dyn"], files["dyn_cal"], "--data", files["data"], *args, "--json")
    assert r.returncode in (0, 1), r.stderr
    report = json.loads(r.stdout)
    assert report["batches"] == batches
    elements = min(SAMPLES, batches * (size or SAMPLES)) * WIDTH
    assert report["outputs"][0]["elements"] == elements


def test_one_model_sites(cli, files):
    """``compare A --data D --sites``: A's sites measured, nothing compared, exit 0 (the README's check)."""
    r = cli("compare", files["dyn_cal"], "--data", files["data"], "--batch-size", 16, "--sites", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["b"] is None and report["outputs"] == [] and report["batches"] == 4
    assert {s["site"] for s in report["sites"]} == {"tanh", "sigmoid"}
    assert all(s["model"] == "A" and "holds" in s for s in report["sites"])
    rows = measure_sites(files["dyn_cal"], DataOptions(files["data"], batch_size=16))
    assert [s["value"] for s in report["sites"]] == pytest.approx([s["value"] for s in rows], rel=1e-12)
    r = cli("compare", files["dyn_cal"], "--data", files["data"], "--sites")
    assert r.returncode == 0 and "one model, outputs not compared" in r.stdout and "2 of 2 measured" in r.stdout
    r = cli("compare", files["dyn_cal"], "--data", files["data"])
    assert r.returncode == 2 and "--sites to measure its sites" in r.stderr


def test_api_takes_the_data_options_bundle(files):
    loose = compare(files["dyn"], files["dyn_cal"], files["data"], batch_size=8, batches=5).report()
    bundle = compare(files["dyn"], files["dyn_cal"], data_options=DataOptions(files["data"], 5, 8)).report()
    assert loose["batches"] == bundle["batches"] == 5
    assert loose["outputs"][0]["max_abs"] == bundle["outputs"][0]["max_abs"]
    with pytest.raises(NormactError, match="not both"):
        compare(files["dyn"], files["dyn_cal"], files["data"], data_options=DataOptions(files["data"]))
    synthetic = compare(files["dyn"], files["dyn"], synthetic=True).report()
    assert synthetic["batches"] == 4 and synthetic["outputs"][0]["elements"] == 4 * 2 * WIDTH  # 4 batches of 2
