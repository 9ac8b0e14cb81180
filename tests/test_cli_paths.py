"""Issue 20, output paths: no path a command writes may name another output or any input of the same run.

Every pair is refused before any work with one line and exit 2; afterwards every file in the folder has
its old bytes and no new file exists (the input model replaced by JSON was the bug this prevents).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from .conftest import MODELS, one_line_error, run_cli
from .test_io_files_and_data import SYN, external_copy

MLP = MODELS / "mlp_relu.torchscript.onnx"


def _folder(tmp_path: Path) -> Path:
    """m.onnx, an external-data model e.onnx (+ weights.bin), statistics and data files a run may read."""
    shutil.copy(MLP, tmp_path / "m.onnx")
    external_copy(MLP, tmp_path, "e.onnx")
    (tmp_path / "s.json").write_text('{"not": "read: refused before"}')
    (tmp_path / "t.json").write_text('{"other": 1}')
    np.savez(tmp_path / "d.npz", x=np.ones((4, 64), np.float32))
    np.savez(tmp_path / "v.npz", x=np.ones((4, 64), np.float32))
    os.symlink("m.onnx", tmp_path / "link.onnx")
    os.link(tmp_path / "m.onnx", tmp_path / "hard.onnx")
    (tmp_path / "sub").mkdir()
    return tmp_path


# (arguments, what the one line must say)
CASES = [
    (["rewrite", "m.onnx", "-o", "r.onnx", "--report", "m.onnx"], "--report m.onnx would overwrite the input model"),
    (["rewrite", "m.onnx", "-o", "same.onnx", "--report", "same.onnx"], "name the same file"),
    (["rewrite", "m.onnx", "-o", "m.onnx"], "or pass --in-place"),
    (["rewrite", "m.onnx", "-o", "sub/../m.onnx"], "would overwrite the input model"),
    (["rewrite", "m.onnx", "-o", "link.onnx"], "would overwrite the input model"),
    (["rewrite", "link.onnx", "-o", "r.onnx", "--report", "m.onnx"], "would overwrite the input model"),
    (["rewrite", "m.onnx", "-o", "hard.onnx"], "would overwrite the input model"),
    (["rewrite", "m.onnx", "--in-place", "--report", "m.onnx"], "--in-place m.onnx and --report m.onnx name the same"),
    (["rewrite", "m.onnx", "-o", "r.onnx", "--stats", "s.json", "--report", "s.json"], "would overwrite --stats"),
    (["rewrite", "e.onnx", "-o", "r.onnx", "--report", "weights.bin"], "its external data file weights.bin"),
    (["rewrite", "e.onnx", "-o", "sub/r.onnx", "--report", "sub/weights.bin"], "the copy of weights.bin"),
    (["rewrite", "e.onnx", "-o", "r.onnx", "--report", "r.onnx.data"], "the data file beside the output"),
    (["calibrate", "m.onnx", *SYN, "-o", "c.onnx", "--stats", "m.onnx"], "--stats m.onnx would overwrite"),
    (["calibrate", "m.onnx", *SYN, "-o", "c4.onnx", "--stats", "c4.onnx"], "name the same file"),
    (["calibrate", "m.onnx", *SYN, "-o", "c2.onnx", "--report", "c2.onnx"], "name the same file"),
    (["calibrate", "m.onnx", *SYN, "-o", "c2.onnx", "--report", "c2.stats.json"], "statistics file beside"),
    (["calibrate", "m.onnx", "--data", "d.npz", "-o", "c.onnx", "--report", "d.npz"], "would overwrite --data"),
    (["calibrate", "m.onnx", "--data", "d.npz", "-o", "d.npz"], "would overwrite --data"),
    (["calibrate", "m.onnx", *SYN, "--stats-only", "--stats", "link.onnx"], "would overwrite the input model"),
    (["calibrate", "m.onnx", *SYN, "--in-place", "--stats", "m.onnx"], "name the same file"),
    (["fold", "m.onnx", "-o", "f.onnx", "--report", "m.onnx"], "would overwrite the input model"),
    (["fold", "m.onnx", "-o", "f.onnx", "--report", "f.onnx"], "name the same file"),
    (["fold", "m.onnx", "--data", "d.npz", "-o", "d.npz"], "would overwrite --data"),
    (["fold", "e.onnx", "-o", "f.onnx", "--report", "weights.bin"], "its external data file"),
    (["merge-stats", "s.json", "t.json", "-o", "t.json"], "would overwrite the input t.json"),
    (["finetune", "m.onnx", "--data", "d.npz", "-o", "d.npz"], "would overwrite --data"),
    (["finetune", "m.onnx", "--data", "d.npz", "--val", "v.npz", "-o", "v.npz"], "would overwrite --val"),
    (["finetune", "m.onnx", "--data", "d.npz", "-o", "t.onnx", "--workdir", "m.onnx"], "--workdir m.onnx would"),
    (["finetune", "m.onnx", "--data", "d.npz", "-o", "m.onnx"], "would overwrite the input model"),
]


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry's bytes (a link: its target), so a replaced input or a new file shows."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = (
            f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes() if p.is_file() else ""
        )
    return out


@pytest.mark.parametrize("args, needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_an_output_naming_another_path_of_the_run_is_refused_before_anything_is_written(tmp_path, args, needle):
    folder = _folder(tmp_path)
    before = _snapshot(folder)
    one_line_error(run_cli(*args, cwd=folder), needle)
    assert _snapshot(folder) == before  # the inputs keep their bytes, nothing new exists


def test_the_refusal_is_the_same_in_a_real_process(tmp_path):
    """One case end to end as a user runs it (the rest run in this process, for speed)."""
    folder = _folder(tmp_path)
    before = _snapshot(folder)
    r = run_cli("calibrate", "m.onnx", *SYN, "-o", "c2.onnx", "--report", "c2.onnx", cwd=folder, process=True)
    one_line_error(r, "-o c2.onnx and --report c2.onnx name the same file")
    assert _snapshot(folder) == before


def test_distinct_outputs_and_in_place_still_work(tmp_path):
    folder = _folder(tmp_path)
    assert run_cli("rewrite", "m.onnx", "-o", "r.onnx", "--report", "r.json", cwd=folder).returncode == 0
    assert run_cli("rewrite", "hard.onnx", "--in-place", cwd=folder).returncode == 0
    r = run_cli("calibrate", "m.onnx", *SYN, "-o", "c.onnx", "--stats", "c.json", "--report", "c.html", cwd=folder)
    assert r.returncode == 0, r.stderr
    assert {"r.onnx", "r.json", "c.onnx", "c.json", "c.html"} <= set(os.listdir(folder))
    shutil.copy(MLP, folder / "ip.onnx")
    r = run_cli("calibrate", "ip.onnx", *SYN, "--in-place", "--stats", "ip.json", cwd=folder)
    assert r.returncode == 0 and "wrote ip.onnx" in r.stdout, r.stderr


def test_external_data_named_like_the_output_is_no_collision(tmp_path):
    """Exporters name the data ``model.onnx.data``: the writer's own files beside an output never block a run."""
    (tmp_path / "in").mkdir()
    onnx.save(onnx.load(str(MLP)), str(tmp_path / "in/model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)  # fmt: skip
    for args in (
        ["rewrite", "in/model.onnx", "-o", "out/model.onnx"],
        ["rewrite", "in/model.onnx", "--preserve-function", "-o", "pf/model.onnx"],
        ["fold", "out/model.onnx", "-o", "in/model.folded.onnx"],
        ["rewrite", "in/model.onnx", "--in-place"],
    ):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr)
