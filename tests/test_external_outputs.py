"""Issue 20, external data: an output carries only the tensors it references; a killed run's temporaries go.

``fold`` and ``--preserve-function`` replace weights; copying the whole original data file beside their output
would carry every replaced tensor again (2.1 GB of a 2.6 GB model). A SIGKILLed run leaves its hidden
temporary file; the next run writing in that folder removes it, and nothing that is not a dead run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from normact_onnx.io import ALIGNMENT, model_tensors, temp_beside

from .conftest import fvi, listing, random_feeds, run_cli, run_model, tiny_model

WIDTH = 256  # each weight 256 KiB: the data file's size is dominated by tensors, not by page alignment


def _external_mlp(folder: Path) -> Path:
    """x → MatMul W1 → Relu → MatMul W2 → y, both weights in one weights.bin (512 KiB)."""
    rng = np.random.default_rng(0)
    ws = [numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / 16).astype(np.float32), n) for n in "AB"]
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "B"], ["y"]),
    ]
    folder.mkdir()
    path = folder / "m.onnx"
    model = tiny_model(nodes, [fvi("x", ["N", WIDTH])], [fvi("y", ["N", WIDTH])], ws)
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path


def _referenced(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Data file → the (offset, length) ranges the model at ``path`` reads from it."""
    out: dict[str, list[tuple[int, int]]] = {}
    for t in model_tensors(onnx.load(str(path), load_external_data=False)):
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            out.setdefault(info.location, []).append((info.offset or 0, info.length))
    return out


def _assert_only_referenced_bytes(out: Path) -> None:
    """Beside ``out``: one data file, every tensor in it referenced, nothing but page padding between them."""
    refs = _referenced(out)
    assert list(refs) == [out.name + ".data"], refs
    ranges = sorted(refs[out.name + ".data"])
    size = (out.parent / (out.name + ".data")).stat().st_size
    used = sum(n for _, n in ranges)
    assert size == ranges[-1][0] + ranges[-1][1]  # no trailing bytes
    assert used <= size < used + ALIGNMENT * len(ranges)  # between tensors: alignment padding only
    assert sorted(os.listdir(out.parent)) == [out.name, out.name + ".data"]  # weights.bin was not copied


def test_preserve_function_and_fold_outputs_carry_only_what_they_reference(tmp_path):
    src = _external_mlp(tmp_path / "in")
    original = (src.parent / "weights.bin").stat().st_size
    r = run_cli("rewrite", src, "--preserve-function", "-o", "p/p.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _assert_only_referenced_bytes(tmp_path / "p/p.onnx")
    # the weight it still reads (A, unchanged), the one it computed (B') and the bias the shift became
    assert sum(n for _, n in _referenced(tmp_path / "p/p.onnx")["p.onnx.data"]) == original + WIDTH * 4
    r = run_cli("fold", "p/p.onnx", "-o", "f/f.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _assert_only_referenced_bytes(tmp_path / "f/f.onnx")
    feeds = random_feeds(src)
    for out in ("p/p.onnx", "f/f.onnx"):  # the function is kept, read from the repacked files
        np.testing.assert_allclose(run_model(tmp_path / out, feeds)[0], run_model(src, feeds)[0], rtol=1e-4, atol=1e-5)


def test_a_plain_rewrite_still_carries_the_data_file_it_uses_whole(tmp_path):
    src = _external_mlp(tmp_path / "in")
    assert run_cli("rewrite", src, "-o", "n/n.onnx", cwd=tmp_path).returncode == 0
    assert sorted(os.listdir(tmp_path / "n")) == ["n.onnx", "weights.bin"]
    assert (tmp_path / "n/weights.bin").read_bytes() == (src.parent / "weights.bin").read_bytes()


def test_a_killed_runs_temporary_file_is_removed_by_the_next_run_in_that_folder(tmp_path):
    src = _external_mlp(tmp_path / "in")
    (tmp_path / "out").mkdir()
    # a real writer killed with SIGKILL while its temporary file exists
    code = (
        "import sys, time; from pathlib import Path; from normact_onnx.io import temp_beside; "
        "p = temp_beside(Path('out/r.onnx')); p.write_bytes(b'half a model'); print(p, flush=True); time.sleep(60)"
    )
    writer = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    leftover = tmp_path / writer.stdout.readline().strip()
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert leftover.exists() and leftover.name.startswith(".r.onnx.normact-")
    # what must stay: a live writer's temporary file, a look-alike another program wrote, a user's hidden file
    live = temp_beside(tmp_path / "out" / "x.onnx")  # this (live) process's
    others = [tmp_path / "out" / n for n in (".r.onnx.abc123.tmp", ".notes.normact-1.txt", ".r.onnx.normact-x.tmp")]
    for p in others:
        p.write_text("not ours")
    time.sleep(0.05)
    r = run_cli("rewrite", src, "-o", "out/r.onnx", cwd=tmp_path, process=True)  # another process than `live`
    assert r.returncode == 0, r.stderr
    assert not leftover.exists()
    assert live.exists() and all(p.exists() for p in others)
    assert ".r.onnx.abc123.tmp" in listing(tmp_path / "out")
    live.unlink()
