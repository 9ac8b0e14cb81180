"""Issue 20, what a command prints and names: clean stderr, honest "(verified: …)", default names, counts, hints.

ONNX Runtime's and numpy's own warnings stay off the terminal unless ``--verbose``; ``--quiet`` silences the
progress bar only, never a warning of this tool.
"""

from __future__ import annotations

import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .conftest import MODELS, ROOT, fvi, listing, one_line_error, run_cli, tiny_model
from .test_io_files_and_data import SYN, external_copy

MLP = MODELS / "mlp_relu.torchscript.onnx"


def _trained_looking(path: Path, unused: bool = False) -> Path:
    """x → MatMul → Relu → MatMul → y with small weights (a trained net's scale), optionally an unused weight."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((0.01 * rng.standard_normal((16, 16))).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((0.01 * rng.standard_normal((16, 16))).astype(np.float32), "w2")
    extra = [numpy_helper.from_array(np.ones((4, 4), np.float32), "unused")] if unused else []
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    onnx.save(tiny_model(nodes, [fvi("x", ["N", 16])], [fvi("y", ["N", 16])], [w1, w2, *extra]), str(path))
    return path


def test_quiet_silences_progress_never_warnings(tmp_path):
    _trained_looking(tmp_path / "m.onnx")
    r = run_cli("rewrite", "m.onnx", "-o", "n.onnx", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "looks pretrained" in r.stderr


def test_onnx_runtime_warnings_only_with_verbose(tmp_path):
    """ONNX Runtime warns about an unused initializer when a session opens: the user's model, not a result."""
    _trained_looking(tmp_path / "m.onnx", unused=True)
    for args in (["rewrite", "m.onnx", "-o", "n.onnx"], ["compare", "m.onnx", "m.onnx", "--synthetic"]):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 0 and "onnxruntime" not in r.stderr, r.stderr
        r = run_cli(*args, "--verbose", cwd=tmp_path)
        assert r.returncode == 0 and "Removing initializer 'unused'" in r.stderr, r.stderr


def test_numpy_runtime_warnings_are_kept_off_unless_verbose():
    from normact_onnx.progress import quiet_libraries

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries(verbose=False):
            np.log(np.zeros(2, np.float32))
        assert seen == []
        with quiet_libraries(verbose=True):
            np.log(np.zeros(2, np.float32))
        assert [w.category for w in seen] == [RuntimeWarning]


def test_verified_says_what_was_checked(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    r = run_cli("rewrite", "m.onnx", "-o", "n.onnx", cwd=tmp_path)
    assert "(verified: checker, ONNX Runtime load, 2 sites against the numpy reference, whole model" in r.stdout
    src = external_copy(MLP, tmp_path / "ext")
    r = run_cli("rewrite", src, "-o", "e.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    wrote = r.stdout.strip().splitlines()[-1]
    assert "whole model not checked" in wrote and "whole model against" not in wrote, wrote
    r = run_cli("fold", "n.onnx", "-o", "f.onnx", cwd=tmp_path)
    assert "(verified: checker, ONNX Runtime load, folded against unfolded)" in r.stdout


def test_the_default_output_replaces_the_suffix_in_any_case(tmp_path):
    shutil.copy(MLP, tmp_path / "M.ONNX")
    assert run_cli("rewrite", "M.ONNX", cwd=tmp_path).returncode == 0
    assert listing(tmp_path) == ["M.ONNX", "M.normact.onnx"]


def test_counts_agree_with_their_noun(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    onnx.save(tiny_model(nodes, [fvi("x", [2, 4])], [fvi("y", [2, 4])]), str(tmp_path / "one.onnx"))
    nodes = [helper.make_node("Tanh", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    onnx.save(tiny_model(nodes, [fvi("x", [2, 4])], [fvi("y", [2, 4])]), str(tmp_path / "m.onnx"))
    r = run_cli("inspect", "one.onnx", cwd=tmp_path)
    assert "\n1 site, " in r.stdout, r.stdout
    r = run_cli("calibrate", "m.onnx", "--synthetic", "--batches", "1", "--all-sites", cwd=tmp_path)
    assert r.returncode == 0 and "\n1 batch, 2 sites in" in r.stdout, r.stdout


def test_calibrate_o_on_a_model_without_sites_leaves_the_verified_unchanged_copy(tmp_path):
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    onnx.save(tiny_model(nodes, [fvi("x", ["N", 4])], [fvi("y", ["N", 4])], [w]), str(tmp_path / "m.onnx"))
    r = run_cli("calibrate", "m.onnx", "--synthetic", "-o", "c.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote c.onnx (verified" in r.stdout and "unchanged copy" in r.stderr
    assert listing(tmp_path) == ["c.onnx", "m.onnx"]  # no statistics: nothing was measured
    assert onnx.load(str(tmp_path / "c.onnx")).graph == onnx.load(str(tmp_path / "m.onnx")).graph


def test_the_training_environment_hint_is_a_command_that_works_from_a_checkout(tmp_path):
    """In the main environment finetune --backend ort says how to get the training environment: the script exists
    and installs the CLI (the default torch backend trains here: tests/test_training_torch.py)."""
    shutil.copy(MLP, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((4, 64), np.float32), y=np.zeros(4, np.int64))
    line = one_line_error(
        run_cli("finetune", "m.onnx", "--data", "d.npz", "--backend", "ort", cwd=tmp_path), "make_train_env.sh"
    )
    command = line.split("from the repository's folder: ", 1)[1].strip()
    script, _, run = command.partition(" && ")
    assert script == "scripts/make_train_env.sh train-env" and run.startswith("train-env/bin/normact-onnx finetune")
    path = ROOT / "scripts" / "make_train_env.sh"
    assert os.stat(path).st_mode & stat.S_IXUSR
    assert '"$ROOT[train]"' in path.read_text() and 'VENV="${1:-' in path.read_text()  # installs the package there
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
    assert '\nnormact-onnx = "normact_onnx.cli:main"' in pyproject  # train-env/bin/normact-onnx after the install
    assert listing(tmp_path) == ["d.npz", "m.onnx"]


def test_calibrate_still_measures_a_model_with_sites(tmp_path):
    shutil.copy(MLP, tmp_path / "m.onnx")
    r = run_cli("calibrate", "m.onnx", *SYN, "-o", "c.onnx", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "c.stats.json").exists(), r.stderr
