"""Data files may hold arrays that name no model input (a fine-tuning file's labels): ignored, one note.

Before issue 20, calibrate and compare refused such a file ("unknown input 'y'").
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from normact_onnx.api import calibrate

from .conftest import tanh_sigmoid_mlp

WIDTH = 16


@pytest.fixture
def setup(tmp_path):
    """A model, its calibrated copy, and a folder of three .npz files holding inputs x and labels y."""
    rng = np.random.default_rng(1)
    model = tmp_path / "m.onnx"
    onnx.save(tanh_sigmoid_mlp(WIDTH, rng), model)
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"part{i}.npz", x=rng.standard_normal((20, WIDTH)).astype(np.float32),
                 y=rng.integers(0, 10, 20), w=np.ones(20, np.float32))  # fmt: skip
    inputs_only = tmp_path / "inputs"  # the same batches without the extra arrays
    inputs_only.mkdir()
    for f in sorted(folder.iterdir()):
        np.savez(inputs_only / f.name, x=np.load(f)["x"])
    cal = tmp_path / "cal.onnx"
    calibrate(model, inputs_only, cal, aggregate="mean")
    return model, cal, folder, inputs_only


def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_calibrate_compare_fold_ignore_labels_with_one_note(cli, setup, tmp_path):
    model, cal, folder, inputs_only = setup
    stats, plain = tmp_path / "s.json", tmp_path / "plain.json"
    r = cli("calibrate", model, "--data", folder, "--stats-only", "--stats", stats, "--aggregate", "mean")
    assert r.returncode == 0, r.stderr
    lines = [line for line in notes(r.stderr) if "ignoring" in line]
    assert lines == [f"note: {folder / 'part0.npz'}: ignoring arrays 'w', 'y' (not an input of the model; "
                     "its inputs: 'x')"]  # fmt: skip
    assert cli("calibrate", model, "--data", inputs_only, "--stats-only", "--stats", plain,
               "--aggregate", "mean").returncode == 0  # fmt: skip
    assert stats.read_text().count('"m2"') == plain.read_text().count('"m2"')  # the same sites, the same data
    assert [s["x"]["m2"][0] for s in _sites(stats)] == pytest.approx(
        [s["x"]["m2"][0] for s in _sites(plain)], rel=1e-12
    )

    r = cli("compare", model, cal, "--data", folder, "--sites", "--json")
    assert r.returncode in (0, 1), r.stderr
    assert notes(r.stderr) == [f"note: {folder / 'part0.npz'}: ignoring arrays 'w', 'y' (not an input of the "
                               "model; its inputs: 'x')"]  # fmt: skip
    r = cli("fold", cal, "-o", tmp_path / "f.onnx", "--data", folder / "part1.npz")
    assert r.returncode == 0, r.stderr
    assert sum("ignoring arrays 'w', 'y'" in line for line in notes(r.stderr)) == 1


def test_a_missing_input_is_still_an_error(cli, setup, tmp_path):
    model, _, _, _ = setup
    bad = tmp_path / "labels.npz"
    np.savez(bad, y=np.zeros(4), z=np.zeros((4, WIDTH), np.float32))
    r = cli("calibrate", model, "--data", bad, "--stats-only")
    assert r.returncode == 2 and "missing input 'x'" in r.stderr and "given 'y', 'z'" in r.stderr
    assert len(notes(r.stderr)) == 1


def test_api_feed_dicts_with_extra_keys(setup, caplog):
    model, _, _, inputs_only = setup
    x = np.concatenate([np.load(f)["x"] for f in sorted(inputs_only.iterdir())])
    batches = [{"x": x[i : i + 10], "label": np.arange(10)} for i in range(0, 60, 10)]
    with caplog.at_level("WARNING", logger="normact_onnx"):
        got = calibrate(model, batches, aggregate="mean")
    assert [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()] == [
        "note: batch 0: ignoring array 'label' (not an input of the model; its inputs: 'x')"
    ]
    want = calibrate(model, [{"x": b["x"]} for b in batches], aggregate="mean")
    for key, s in want.sites.items():
        np.testing.assert_allclose(got.sites[key].x.m2, s.x.m2, rtol=1e-12)


def _sites(path):
    import json

    return list(json.loads(path.read_text())["sites"].values())
