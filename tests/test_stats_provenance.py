"""Statistics carry how they were measured; merge-stats refuses to mix files that differ (issue 20).

A merge labels its result with the first file's settings: merging in-situ with original-network
statistics, static with ANAct, or different λ rules would hand out numbers that mean something else
under that label. Each difference is one line naming the field and both values, exit 2, nothing written.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from normact_onnx.api import calibrate
from normact_onnx.calibration import CalibrationStats, merge

from .conftest import fvi, tiny_model

WIDTH = 8


def _model():
    nodes = [helper.make_node("Tanh", ["x"], ["a"]), helper.make_node("MatMul", ["a", "eye"], ["y"])]
    eye = onnx.numpy_helper.from_array(np.eye(WIDTH, dtype=np.float32), "eye")
    return tiny_model(nodes, [fvi("x", ["N", WIDTH])], [fvi("y", ["N", WIDTH])], [eye])


def _data(seed: int):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((32, WIDTH)).astype(np.float32)} for _ in range(2)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("prov") / "m.onnx"
    onnx.save(_model(), p)
    return p


@pytest.mark.parametrize(
    ("field", "other", "a_value", "b_value"),
    [
        ("in_situ", {"in_situ": False}, "true", "false"),
        ("method", {"method": "static"}, '"anact"', '"static"'),
        ("lambda_rule", {"lambda_rule": "xavier"}, '"anact"', '"xavier"'),
        ("centered_rho", {"centered_rho": True}, "false", "true"),
        ("per_channel", {"per_channel": True}, "false", "true"),
        ("aggregate", {"aggregate": "mean"}, '"ema"', '"mean"'),
    ],
)
def test_merge_stats_refuses_files_measured_differently(model_path, tmp_path, cli, field, other, a_value, b_value):
    calibrate(model_path, _data(0), stats_path=tmp_path / "a.json")
    calibrate(model_path, _data(1), stats_path=tmp_path / "b.json", **other)
    r = cli("merge-stats", "a.json", "b.json", "-o", "c.json", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"{field} is {a_value} in a.json but {b_value} in b.json" in line
    assert not (tmp_path / "c.json").exists()


def test_merge_of_a_merge_with_another_shard(model_path, tmp_path):
    """A merge turns ema into mean (the EMA depends on batch order) but remembers what was asked: shards still merge."""
    a, b, c = (calibrate(model_path, _data(i)) for i in range(3))
    ab = merge([a, b])
    assert ab.settings["aggregate"] == "mean"
    abc = merge([ab, c])
    assert abc.merged_from == 3 and abc.batches == 6


def test_old_file_without_measurement_record_is_refused(model_path, tmp_path, cli):
    """Files written before the settings were recorded cannot be checked: refuse to merge them, saying so."""
    calibrate(model_path, _data(0), stats_path=tmp_path / "a.json")
    calibrate(model_path, _data(1), stats_path=tmp_path / "old.json")
    doc = json.loads((tmp_path / "old.json").read_text())
    doc["settings"] = {}
    (tmp_path / "old.json").write_text(json.dumps(doc))
    r = cli("merge-stats", "a.json", "old.json", "-o", "c.json", cwd=tmp_path)
    assert r.returncode == 2
    assert "old.json does not record how it was measured" in r.stderr and "calibrate" in r.stderr
    assert not (tmp_path / "c.json").exists()
    # the old file still drives a rewrite (its defaults are the documented ones)
    assert CalibrationStats.load(tmp_path / "old.json").sites


def test_same_settings_merge_and_keep_them(model_path, tmp_path, cli):
    for i, name in enumerate(("a.json", "b.json")):
        calibrate(model_path, _data(i), stats_path=tmp_path / name, lambda_rule="xavier", centered_rho=True)
    r = cli("merge-stats", "a.json", "b.json", "-o", "c.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = CalibrationStats.load(tmp_path / "c.json").settings
    assert s["lambda_rule"] == "xavier" and s["centered_rho"] is True and s["in_situ"] is True


def test_merge_drops_the_shards_closing_records(model_path, tmp_path):
    """A shard's closing check held that shard's constants: the merged file keeps the moments, not the record."""
    parts = []
    for i in range(2):
        calibrate(model_path, _data(i), stats_path=tmp_path / f"{i}.json", closing=True)
        parts.append(CalibrationStats.load(tmp_path / f"{i}.json"))
    assert all("closing" in p.settings for p in parts)
    merged = merge(parts)
    assert "closing" not in merged.settings and merged.settings["in_situ"] is True
